"""The check that an RL update starts on-policy, for every RL stage (PPO, and the GRPO family).

An iteration samples responses, records their log-probs (and the critic's values) with the current
weights, then updates. Before the first optimizer step of the iteration nothing has changed, so the
first minibatch must see exactly the recorded numbers: ratio exactly 1, values exactly the rollout's.
A dropout left on (peft's `lora_dropout`, an attention dropout), a reference computed in another
dtype, or a model in another mode breaks that silently, and the clipped objective then clips noise.
`FirstUpdateCheck` measures it on every iteration, at no extra forward; it is logged as
`first_update_max_log_ratio` and `first_update_max_value_change` (0.0 when all is well; the same
batch shapes in rollout and update give bitwise equal forwards, other shapes float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_jobs.engine.distributed import all_reduce_max


@dataclass
class FirstUpdateCheck:
    """The largest |log ratio| and |value change| over the response tokens of an iteration's first
    minibatch (all of its micro-batches), before the optimizer has stepped."""

    log_ratio: float = 0.0
    value_change: float = 0.0
    done: bool = False  # set once the first optimizer step is taken: later minibatches are off-policy by design

    def add(self, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
            values: torch.Tensor | None = None, old_values: torch.Tensor | None = None) -> None:
        if self.done:
            return
        with torch.no_grad():
            real = mask.bool()
            self.log_ratio = _larger(self.log_ratio, _max_abs(logp.float() - old_logp.float(), real))
            if values is not None and old_values is not None:
                self.value_change = _larger(self.value_change, _max_abs(values.float() - old_values.float(), real))

    def stepped(self) -> None:
        self.done = True

    def metrics(self, device: torch.device, with_values: bool = True) -> dict[str, float]:
        """The maxima over all workers (every worker must call it)."""
        log_ratio, value_change = all_reduce_max([self.log_ratio, self.value_change], device)
        return {"first_update_max_log_ratio": log_ratio,
                **({"first_update_max_value_change": value_change} if with_values else {})}


def _larger(current: float, new: float) -> float:
    """max() that keeps a NaN (Python's max(0.0, nan) is 0.0)."""
    return new if new != new or new > current else current


def _max_abs(difference: torch.Tensor, real: torch.Tensor) -> float:
    picked = difference[real]
    return picked.abs().max().item() if picked.numel() else 0.0
