"""Stopping a run cleanly at a step boundary: every worker agrees, writes a checkpoint, and the
run ends resumable.

Two reasons stop a run early: `--stop-at-step N` (a time-boxed run, and how tests interrupt a
run at an exact step), and a preemption notice (`stop_requested()`: the driver's SIGTERM or a drained node,
see preemption.py). The decision is all-reduced, so every worker stops after the same step.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from rlhf_jobs.engine.distributed import all_reduce_sum
from rlhf_jobs.engine.worker import Worker, progress

STOPPED_METRIC = "stopped_at_step"  # what a loop that stopped early reports (the driver reads it: launcher.py)
PREEMPTED = "preempted"  # the stop reason for a preemption notice
NAMESPACE = "rlhf_jobs"  # Ray KV namespace of the driver's stop key (preemption.DriverGuard writes it)
POLL_S = 0.5


def stop_key(job_id: str) -> str:
    return f"stop/{job_id}"


# ---- the preemption notice, as a worker sees it ---------------------------------------------------

_worker: dict[str, Any] = {"checked_at": float("-inf"), "signalled": False}


def _node_drained() -> bool:
    """Ray Train's preemption notice for this worker (set by its PreemptionWatcher), read without a barrier."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # not in a Ray Train worker, or Ray moved it: no notice
        return False


def _driver_signalled() -> bool:
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized() or not internal_kv._internal_kv_initialized():
        return False
    key = stop_key(ray.get_runtime_context().get_job_id())
    return internal_kv._internal_kv_exists(key, namespace=NAMESPACE)


def stop_requested() -> bool:
    """Whether this worker has been told to stop (driver SIGTERM or node drain). Local and cheap: the
    KV store is asked at most every POLL_S seconds; the answer, once True, stays True."""
    if _worker["signalled"] or _node_drained():
        return True
    now = time.monotonic()
    if now - _worker["checked_at"] >= POLL_S:
        _worker["checked_at"] = now
        with contextlib.suppress(Exception):  # a GCS hiccup is not a stop
            _worker["signalled"] = _driver_signalled()
    return _worker["signalled"]


def request_stop() -> None:
    """Mark this process told to stop (an in-process run's SIGTERM handler: the loop runs in this process)."""
    _worker["signalled"] = True


def reset_stop_request() -> None:
    _worker.update(signalled=False, checked_at=float("-inf"))




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
