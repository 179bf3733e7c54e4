"""Stopping a run at the first non-finite loss or gradient norm, and never saving non-finite weights.

A NaN or infinite loss poisons every weight it touches, and the run would go on to certify a NaN model
as finished. Every trainer calls `StepCheck` between the backward passes and the optimizer step (so the
weights are still the last good ones): the loss is all-reduced, the gradient norms are the same on every
worker (DDP averages gradients, FSDP's clipping all-reduces the norm), so all workers stop at the same step.
The error (`launcher.TrainingDiverged`) is deterministic: Ray Train does not retry it (`ray_backend`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlhf_jobs.core.config import TrainingBase
from rlhf_jobs.core.errors import TrainingDiverged
from rlhf_jobs.engine.distributed import all_reduce_sum
from rlhf_jobs.engine.worker import Worker


def likely_cause(training: TrainingBase, unit: str, first_update: bool) -> str:
    if training.mixed_precision == "fp16":
        return "an fp16 overflow (use Training.mixed_precision: bf16, or a lower learning_rate)"
    if first_update:
        return f"a bad record in the first {unit}'s batch or a broken start model (it happened before any update)"
    rates = f"Training.learning_rate {training.learning_rate:g}"
    critic_rate = getattr(training, "critic_learning_rate", None)
    if critic_rate:
        rates += f", critic_learning_rate {critic_rate:g}"
    return f"a learning rate too high ({rates}), or a bad record in this {unit}'s batch"


class StepCheck:
    """Raises `TrainingDiverged` on every worker when a step's loss or a gradient norm is not finite."""

    def __init__(self, stage: str, training: TrainingBase, worker: Worker, output_dir: str,
                 unit: str = "step", models: Sequence[str] = ("model",)) -> None:
        self.stage, self.training, self.worker, self.output_dir = stage, training, worker, output_dir
        self.unit, self.models = unit, tuple(models)
        self.updates = 0  # checks passed in this run

    def __call__(self, at: int, loss_sum: float, count: float, gradient_norms: Sequence[float]) -> None:
        """`loss_sum`: this worker's share of the step's summed loss; `count`: what it sums over on all workers;
        `gradient_norms`: one per model (already the same on every worker). Every worker must call it."""
        (total,) = all_reduce_sum([loss_sum], self.worker.device)
        loss = total / max(count, 1.0)
        if not math.isfinite(loss):
            self.fail(at, f"the loss is {loss}")
        if self.training.mixed_precision == "fp16":
            self.updates += 1
            return  # the loss scaler skips a step with inf/NaN gradients and lowers its scale: that is its job
        for name, norm in zip(self.models, gradient_norms, strict=True):
            if not math.isfinite(norm):
                self.fail(at, f"the {name}'s gradient norm is {norm}")
        self.updates += 1

    def fail(self, at: int, what: str) -> None:
        cause = likely_cause(self.training, self.unit, first_update=at == 1 and not self.updates)
        raise TrainingDiverged(
            f"{self.stage}: stopped at {self.unit} {at}: {what}; likely cause: {cause}. No weight was updated with "
            f"it: the checkpoints before it are kept in {self.output_dir}, and no final model was written"
        )


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or ±inf (None when all are finite)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
                return name
    return None


def check_final_weights(model: torch.nn.Module, stage: str, output_dir: str) -> None:
    """The last guard before a final model is written."""
    name = non_finite_parameter(model)
    if name is not None:
        raise TrainingDiverged(f"{stage}: the trained weights are not finite ({name} holds NaN or inf); no final "
                               f"model was written (the checkpoints in {output_dir} are kept)")
