"""What a stage's config asks of its models, checked on the driver before any worker starts.

The models are built on PyTorch's meta device from their configs, so these checks load no
weights: a LoRA target the model lacks, LoRA on a model peft cannot wrap, FSDP on a model with
no decoder layers to shard, and fp16 with FSDP each fail here with one clear message.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.stages import TrainedModel, get
from rlhf_jobs.engine.adapters import AdapterError, add_lora
from rlhf_jobs.engine.sharding import ShardingError, check_shardable


def empty_model(name: str, task: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_jobs.engine.models import adapter_base
    from rlhf_jobs.store.storage import local_model

    config = AutoConfig.from_pretrained(local_model(adapter_base(name) or name), trust_remote_code=trust_remote_code)
    auto_class = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    if task == "SEQ_CLS":
        config.num_labels = 1
    with torch.device("meta"):
        return auto_class.from_config(config, trust_remote_code=trust_remote_code)


def check_models(config: StageConfig) -> None:
    training, general = config.Training, config.General
    if training.strategy == "fsdp" and training.mixed_precision == "fp16":
        raise ShardingError("Training.mixed_precision: fp16 is not supported with strategy: fsdp; use bf16")
    if not training.lora and training.strategy != "fsdp":
        return
    trained: tuple[TrainedModel, ...] = get(config.stage).trained
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
