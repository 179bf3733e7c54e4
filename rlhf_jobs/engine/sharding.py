"""How a model is spread over the workers: DDP (a full copy each) or FSDP2 (`fully_shard`).

FSDP follows torchtitan: one `fully_shard` unit per decoder layer, then the root, with a
`MixedPrecisionPolicy` from `Training.mixed_precision` (parameters in the compute dtype for the
forward, gradients reduced in fp32, fp32 master weights sharded). Frozen models are sharded the
same way, so nothing is held in full on any worker except during generation, which gathers
the policy once (one full copy, in the compute dtype) instead of once per generated token.

Under FSDP on several workers a model is loaded sharded (`load_prepared`): every worker builds it on the
meta device and allocates only its shards; rank 0 reads the checkpoint and broadcasts it a layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rlhf_jobs.core.config import TrainingBase
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.engine.models import loading_mode
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
    enable_checkpointing(model, training, trainable)
    model.to(worker.device)
    if training.strategy == "fsdp":
        return shard(model, training)
    if trainable and worker.world_size > 1:
        device_ids = [worker.device.index] if worker.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def enable_checkpointing(model: torch.nn.Module, training: TrainingBase, trainable: bool) -> None:
    if trainable and training.gradient_checkpointing:
        transformers_model = hf_model(model)
        transformers_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        transformers_model.config.use_cache = False


def load_prepared(build: Callable[[], torch.nn.Module], training: TrainingBase, worker: Worker,
                  trainable: bool = True) -> torch.nn.Module:
    """`prepare(build(), ...)`, without a full copy of the model on every worker under FSDP.

    `build` loads the model with the loaders of `engine.models` and adds what the stage needs (LoRA adapters,
    a critic's value head, frozen flags). Under FSDP on several workers every worker builds it on the meta device
    (`loading_mode("skeleton")`), shards it and allocates its shards only; rank 0 alone also builds it with its
    weights, read in the checkpoint's dtype where widening them is exact (`loading_mode("stored")`: a bf16
    checkpoint for fp32 masters), and broadcasts it (`_broadcast_from_rank0`). Every worker then holds what a full
    load gives it, values, buffers, modes and random state included, while none holds a full fp32 copy. One
    difference: weights the checkpoint lacks (a new score head, LoRA adapters) are drawn in the dtype rank 0 reads
    in, so from a bf16 checkpoint for fp32 masters they are the bf16 roundings of a full load's draws. DDP and one
    worker load as before.
    """
    if training.strategy != "fsdp" or worker.world_size == 1:
        return prepare(build(), training, worker, trainable)
    with torch.random.fork_rng(devices=[]), loading_mode("skeleton"):
        model = build()
    check_shardable(model)
    full = _load_on_rank0(build, model, worker)
    enable_checkpointing(model, training, trainable)
    shard(model, training)
    model.to_empty(device=worker.device)
    _broadcast_from_rank0(model, full, worker)
    return model


def _structure(model: torch.nn.Module) -> dict[str, Any]:
    return {"parameters": {name: (tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()},
            "buffers": {name: tuple(b.shape) for name, b in model.named_buffers()},
            "training": [name for name, module in model.named_modules() if module.training]}


def _load_on_rank0(build: Callable[[], torch.nn.Module], skeleton: torch.nn.Module,
                   worker: Worker) -> torch.nn.Module | None:
    """Rank 0's model with its weights (None elsewhere). What goes wrong on rank 0 (weights that are not finite, a
    model that differs from the skeleton in its parameters, buffers or modes) is raised on every worker, not left
    to hang the others in the broadcast."""
    full, outcome = None, None
    if worker.is_main:
        try:
            with loading_mode("stored"):
                full = build()
        except Exception as error:  # every worker raises it below (this one with its traceback)
            outcome = error
        else:
            built, expected = _structure(full), _structure(skeleton)
            differ = [key for key in built if built[key] != expected[key]]
            if differ:
                outcome = ShardingError(f"cannot load {type(hf_model(full)).__name__} sharded: the model built on "
                                        f"the meta device differs from the loaded one in its {', '.join(differ)}")
    message = [_picklable(outcome)]
    torch.distributed.broadcast_object_list(message, src=0)
    if outcome is not None:
        raise outcome
    if message[0] is not None:
        raise message[0]
    return full


def _picklable(error: Exception | None) -> Exception | None:
    import pickle

    try:
        pickle.dumps(error)
    except Exception:  # an error that cannot cross to the other workers: its type and message can
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


@torch.no_grad()
def _broadcast_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None, worker: Worker) -> None:
    """Fill every worker's shards and buffers with rank 0's loaded `full` model, one decoder layer at a time (each
    freed once sent), then the rest; and give every worker rank 0's random generator state, which the loaded
    model's fresh weights (a new score head, LoRA adapters) advanced as a full load advances every worker's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for name, buffer in model.named_buffers():  # non-persistent ones (rotary inv_freq) are in no state dict
        if full is not None:
            buffer.copy_(full.get_buffer(name))
        torch.distributed.broadcast(buffer, src=0)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    full_layers = decoder_layers(full) if full is not None else None
    for index, layer in enumerate(decoder_layers(model)):
        set_model_state_dict(layer, full_layers[index].state_dict() if full_layers else {}, options=options)
        if full_layers:
            full_layers[index].to("meta")  # sent: free it
    rest = {} if full is None else {key: value for key, value in full.state_dict().items() if not value.is_meta}
    set_model_state_dict(model, rest, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))
    generator = torch.get_rng_state().to(worker.device)
    torch.distributed.broadcast(generator, src=0)
    torch.set_rng_state(generator.cpu())


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce on micro-batches before the last one of an accumulation."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP unit of `model` back to its shards (a no-op for a model that is not sharded)."""
    for module in fsdp_modules(model):
        module.reshard()


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
