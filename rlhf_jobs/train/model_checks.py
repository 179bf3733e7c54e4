"""What a stage's config asks of its models, checked on the driver before any worker starts.

The models are built on PyTorch's meta device from their configs, so these checks load no
weights: a LoRA target the model lacks, LoRA on a model peft cannot wrap, FSDP on a model with
no decoder layers to shard, and fp16 with FSDP each fail here with one clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.stages import TrainedModel, get
from rlhf_jobs.engine.adapters import AdapterError, add_lora, require_peft
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


def check_adapter_inputs(config: StageConfig, trained: tuple[TrainedModel, ...]) -> None:
    """A model the stage starts from that is a LoRA adapter export (`export: adapter`) loads with peft."""
    from rlhf_jobs.engine.models import ADAPTER_CONFIG

    general = config.General
    for model in trained:
        key = next(k for k in model.keys if getattr(general, k, None))
        name = model.name(general)
        if "://" not in name and (Path(name).expanduser() / ADAPTER_CONFIG).is_file():
            require_peft(f"General.{key} ({name}) is a LoRA adapter: loading it")


def positions(name: str, trust_remote_code: bool = False) -> int | None:
    """How many token positions a model has (its config's max_position_embeddings; GPT-2: n_positions)."""
    from transformers import AutoConfig

    from rlhf_jobs.engine.models import adapter_base
    from rlhf_jobs.store.storage import local_model

    model_config = AutoConfig.from_pretrained(local_model(adapter_base(name) or name),
                                              trust_remote_code=trust_remote_code)
    value = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    return int(value) if isinstance(value, int) else None


def check_positions(config: StageConfig, trained: tuple[TrainedModel, ...]) -> None:
    """The longest sequence the stage builds fits every model it trains (a longer one fails inside a worker:
    GPT-2's position embeddings have no row for it)."""
    general, dataset = config.General, config.Dataset
    if hasattr(dataset, "max_prompt_length"):  # an RL stage: prompt + sampled response
        length = dataset.max_prompt_length + config.Training.max_new_tokens
        what = (f"Dataset.max_prompt_length + Training.max_new_tokens = {dataset.max_prompt_length} + "
                f"{config.Training.max_new_tokens} = {length} tokens")
        advice = "lower them to add up to at most"
    else:
        length, what = dataset.max_length, f"Dataset.max_length is {dataset.max_length} tokens"
        advice = "lower Dataset.max_length to at most"
    for model in trained:
        name = model.name(general)
        if "://" in name:  # in object storage: not downloaded on the driver just for this
            continue
        limit = positions(name, general.trust_remote_code)
        if limit is not None and length > limit:
            key = next(k for k in model.keys if getattr(general, k, None))
            raise ConfigError(f"{what}, but General.{key} ({name}) has {limit} positions (max_position_embeddings); "
                              f"{advice} {limit}")


def check_models(config: StageConfig) -> None:
    training, general = config.Training, config.General
    if training.strategy == "fsdp" and training.mixed_precision == "fp16":
        raise ShardingError("Training.mixed_precision: fp16 is not supported with strategy: fsdp; use bf16")
    if training.lora:
        require_peft("Training.lora")
    trained: tuple[TrainedModel, ...] = get(config.stage).trained
    check_adapter_inputs(config, trained)
    check_positions(config, trained)
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
