"""The preemption notice as a worker reads it, and the key the driver writes it under.

Light on purpose (no torch): the driver's SIGTERM handler and the pods' preStop hook (`python -m
rlhf_jobs.engine.preemption`, which must start in a second) import it too.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

PREEMPTED = "preempted"  # the stop reason for a preemption notice
NAMESPACE = "rlhf_jobs"  # Ray KV namespace of the driver's stop key (preemption.DriverGuard writes it)
POLL_S = 0.5


def stop_key(job_id: str) -> str:
    return f"stop/{job_id}"


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
