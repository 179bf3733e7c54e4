"""How a model is spread over the workers: DDP (a full copy each) or FSDP2 (`fully_shard`).

FSDP follows torchtitan: one `fully_shard` unit per decoder layer, then the root, with a
`MixedPrecisionPolicy` from `Training.mixed_precision` (parameters in the compute dtype for the
forward, gradients reduced in fp32, fp32 master weights sharded). Frozen models are sharded the
same way, so nothing is held in full on any worker except during generation, which gathers
the policy once (one full copy) instead of once per generated token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from rlhf_jobs.core.config import TrainingBase
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.engine.worker import Worker

COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ShardingError(ConfigError):
    """A model that `Training.strategy: fsdp` cannot shard."""


def compute_dtype(training: TrainingBase) -> torch.dtype | None:
    return COMPUTE_DTYPES[training.mixed_precision]


def frozen_dtype(training: TrainingBase) -> torch.dtype:
    """The dtype of weights that never train: the compute dtype under mixed precision, else fp32."""
    return compute_dtype(training) or torch.float32


def reference_dtype(training: TrainingBase) -> torch.dtype:
    """The dtype of a frozen copy that must compute exactly what the trained model computes at the start (PPO's
    reference: KL exactly 0 before the first update).

    Under FSDP the `MixedPrecisionPolicy` casts every parameter to the compute dtype, so the trained model's
    fp32 masters and a copy stored in that dtype compute the same function. Under DDP autocast casts only the
    matrix multiplies: the masters' fp32 embeddings, norms and residual stream would meet a bf16 copy's bf16
    ones, so the copy is kept in the masters' dtype (fp32: twice the memory of bf16). LoRA's base weights are
    frozen and shared, so they stay in the compute dtype.
    """
    if training.lora or training.strategy == "fsdp":
        return frozen_dtype(training)
    return load_dtype(training)


def load_dtype(training: TrainingBase) -> torch.dtype:
    """The dtype to load a model that will train in: fp32 masters, except under LoRA, whose base weights
    are frozen and may stay in the compute dtype (the adapters are fp32 either way, see `add_lora`)."""
    return frozen_dtype(training) if training.lora else torch.float32


def hf_model(model: torch.nn.Module) -> Any:
    """The transformers model inside a peft wrapper or our Critic."""
    for attribute in ("classifier",):
        model = getattr(model, attribute, model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes), in order."""
    names = set(getattr(hf_model(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def check_shardable(model: torch.nn.Module, key: str = "Training.strategy") -> None:
    if not decoder_layers(model):
        raise ShardingError(
            f"{key}: fsdp needs the model's repeated decoder layers, and {type(hf_model(model)).__name__} "
            "declares none (`_no_split_modules`); use strategy: ddp for this model"
        )


def fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


def shard(model: torch.nn.Module, training: TrainingBase) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (which holds embeddings, norms and heads)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    check_shardable(model)
    dtype = compute_dtype(training)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if hasattr(model, "generate"):
        # A peft model's generate bypasses its own forward: without this, the first decoder layer to run
        # would take itself for the root.
        register_fsdp_forward_method(model, "generate")
    return model


def prepare(model: torch.nn.Module, training: TrainingBase, worker: Worker, trainable: bool = True) -> torch.nn.Module:
    """Move `model` to the worker's device and distribute it as `Training.strategy` says.

    Frozen models (`trainable=False`) are sharded under FSDP too; under DDP they stay plain copies.
    """
    if trainable and training.gradient_checkpointing:
        transformers_model = hf_model(model)
        transformers_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        transformers_model.config.use_cache = False
    model.to(worker.device)
    if training.strategy == "fsdp":
        return shard(model, training)
    if trainable and worker.world_size > 1:
        device_ids = [worker.device.index] if worker.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce on micro-batches before the last one of an accumulation."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Hold a sharded model's full parameters for a while (generation: one all-gather, not one per token)."""
    modules = fsdp_modules(model)
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_reshard_after_forward(True, recurse=False)
            module.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight in full, on the CPU of rank 0 (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
