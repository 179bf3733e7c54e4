"""Optimizers and learning-rate schedules by name, and the autocast context of `mixed_precision`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from rlhf_jobs.core.config import TrainingBase

OPTIMIZER_TABLE: dict[str, type[torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


FUSABLE = ("AdamW", "Adam")


def fusable(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused Adam(W) kernel takes these: plain (not FSDP-sharded) float tensors on CPU or CUDA."""
    from torch.distributed.tensor import DTensor

    return all(not isinstance(p, DTensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
               for p in parameters)


def build_optimizer(
    model: torch.nn.Module, training: TrainingBase, learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """Optimizer from the fixed table; weight decay on matrices only (not biases or norms).

    Adam and AdamW use torch's fused kernel where it applies (the same update in one pass over each
    tensor instead of one per operation: about 3 × faster on CPU, bench/README.md).
    """
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = training.optimizer in FUSABLE and fusable(decay + no_decay)
    return OPTIMIZER_TABLE[training.optimizer](groups, lr=learning_rate or training.learning_rate,
                                               **({"fused": True} if fused else {}))


def gradient_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    """The total gradient norm of `model` (FSDP: over all shards), clipping to `max_norm` when set."""
    gradients = [p for p in model.parameters() if p.grad is not None]
    if not gradients:
        return 0.0
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(gradients, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in gradients])
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
    return float(full_tensor() if full_tensor else norm)


def warmup_steps(training: TrainingBase, total_steps: int) -> int:
    return training.warmup_steps or math.ceil(training.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingBase, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULER_NAMES[training.lr_scheduler],
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(training, total_steps),
        num_training_steps=total_steps,
    )


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    """Load a schedule's state and put its current rate back into the optimizer (building a schedule
    resets the optimizer's rate to the schedule's first value)."""
    scheduler.load_state_dict(state)
    for group, rate in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = rate


def autocast(training: TrainingBase, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if training.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if training.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(training: TrainingBase, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if training.mixed_precision == "fp16" else None


def step(pairs: list[tuple[torch.optim.Optimizer, torch.nn.Module]], training: TrainingBase,
         scaler: torch.amp.GradScaler | None, check: Callable[[list[float]], None] | None = None) -> None:
    """Unscale (fp16), clip each model's gradients to max_grad_norm, step each optimizer, clear gradients.

    `check` sees each model's gradient norm (before clipping) before any weight changes, and may raise
    (`divergence.StepCheck`)."""
    norms = []
    for optimizer, model in pairs:
        if scaler:
            scaler.unscale_(optimizer)
        norms.append(gradient_norm(model, training.max_grad_norm))
    if check:
        check(norms)
    for optimizer, _ in pairs:
        scaler.step(optimizer) if scaler else optimizer.step()
    if scaler:
        scaler.update()
    for optimizer, _ in pairs:
        optimizer.zero_grad(set_to_none=True)
