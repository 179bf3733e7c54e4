"""What a stage's config asks of its models, checked on the driver before any worker starts.

The models are built on PyTorch's meta device from their configs, so these checks load no
weights: a LoRA target the model lacks, LoRA on a model peft cannot wrap, FSDP on a model with
no decoder layers to shard, and fp16 with FSDP each fail here with one clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.adapters import AdapterError, add_lora, require_peft
from rlhf_jobs.config import StageConfig
from rlhf_jobs.sharding import ShardingError, check_shardable
from rlhf_jobs.stages import TrainedModel, get


def empty_model(name: str, task: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_jobs.models import adapter_base
    from rlhf_jobs.storage import local_model

    config = AutoConfig.from_pretrained(local_model(adapter_base(name) or name), trust_remote_code=trust_remote_code)
    auto_class = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    if task == "SEQ_CLS":
        config.num_labels = 1
    with torch.device("meta"):
        return auto_class.from_config(config, trust_remote_code=trust_remote_code)


def check_adapter_inputs(config: StageConfig, trained: tuple[TrainedModel, ...]) -> None:
    """A model the stage starts from that is a LoRA adapter export (`export: adapter`) loads with peft."""
    from rlhf_jobs.models import ADAPTER_CONFIG

    general = config.General
    for model in trained:
        key = next(k for k in model.keys if getattr(general, k, None))
        name = model.name(general)
        if "://" not in name and (Path(name).expanduser() / ADAPTER_CONFIG).is_file():
            require_peft(f"General.{key} ({name}) is a LoRA adapter: loading it")


def check_models(config: StageConfig) -> None:
    training, general = config.Training, config.General
    if training.strategy == "fsdp" and training.mixed_precision == "fp16":
        raise ShardingError("Training.mixed_precision: fp16 is not supported with strategy: fsdp; use bf16")
    if training.lora:
        require_peft("Training.lora")
    trained: tuple[TrainedModel, ...] = get(config.stage).trained
    check_adapter_inputs(config, trained)
    if not training.lora and training.strategy != "fsdp":
        return
    for model in trained:
        name = model.name(general)
        key = f"General.{next(k for k in model.keys if getattr(general, k, None))}"
        empty = empty_model(name, model.task, general.trust_remote_code)
        if training.lora:
            try:
                add_lora(empty, training.lora, model.task)
            except AdapterError as err:
                raise AdapterError(f"{key} ({name}): {err}") from None
        if training.strategy == "fsdp":
            try:
                check_shardable(empty)
            except ShardingError as err:
                raise ShardingError(f"{key} ({name}): {err}") from None
