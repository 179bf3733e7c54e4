"""Stopping a run cleanly at a step boundary: every worker agrees, writes a checkpoint, and the
run ends resumable.

Two reasons stop a run early: `--stop-at-step N` (a time-boxed run, and how tests interrupt a
run at an exact step), and a preemption notice (`stop_requested()`: the driver's SIGTERM or a drained node,
stop_notice.py). The decision is all-reduced, so every worker stops after the same step.
"""

from __future__ import annotations

from typing import Any

from rlhf_jobs.engine.distributed import all_reduce_sum
from rlhf_jobs.engine.stop_notice import PREEMPTED, stop_requested
from rlhf_jobs.engine.worker import Worker, progress

STOPPED_METRIC = "stopped_at_step"  # what a loop that stopped early reports (the driver reads it: launcher.py)
class StopControl:
    def __init__(self, worker: Worker, stop_at_step: int | None = None) -> None:
        self.worker, self.stop_at_step = worker, stop_at_step

    def should_stop(self, step: int) -> str | None:
        """Why every worker stops after `step` (the same answer on all of them), or None to go on."""
        (preempted,) = all_reduce_sum([1.0 if stop_requested() else 0.0], self.worker.device)
        if preempted:
            return PREEMPTED
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return f"--stop-at-step {self.stop_at_step}"
        return None


def stopped(worker: Worker, stage: str, step: int, reason: str, logger: Any) -> dict[str, Any]:
    """End a loop that stopped early (its checkpoint is written): say so, leave the tracker runs unfinished,
    and return what the driver reads (Ray Train hands rank 0's return value to `Result.return_value`;
    `Result.metrics` would only hold a registered checkpoint's metrics)."""
    import ray.train

    progress(worker, stage, f"stopped after step {step} ({reason}); run the same command again to continue")
    logger.close(finished=False)
    ray.train.report({STOPPED_METRIC: step, "reason": reason})
    return {STOPPED_METRIC: step, "reason": reason}
