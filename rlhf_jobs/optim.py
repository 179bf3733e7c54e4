"""Optimizers and learning-rate schedules by name, and the autocast context of `mixed_precision`."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from rlhf_jobs.config import TrainingBase

OPTIMIZER_TABLE: dict[str, type[torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(
    model: torch.nn.Module, training: TrainingBase, learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """Optimizer from the fixed table; weight decay on matrices only (not biases or norms)."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return OPTIMIZER_TABLE[training.optimizer](groups, lr=learning_rate or training.learning_rate)


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


def autocast(training: TrainingBase, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if training.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if training.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
