"""Ray log lines a user cannot act on, dropped on the driver (and only those); the driver's last word.

Worker and actor output reaches the driver through Ray's log forwarding; this filter sits in front
of Ray's own printer and removes lines matching `NOISE`, each listed with where it comes from.
Everything else, warnings and errors included, is printed as before.

When a run fails with a message of ours (out of memory, a non-finite loss, bad input a worker found),
`stop_ray_output` lets the forwarded output settle and disconnects from Ray before the message is
printed, so it is the last line: Ray would otherwise go on printing the failed workers' tracebacks and
its controller's process tables after it. A worker does not log the traceback of such an error at all
(`worker._DeterministicTraceback`).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

NOISE: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Ray Train 2.60 PreemptionCallback creates its watcher actor with max_restarts=-1 and actor-handle
    # arguments; Ray core (core_worker.cc) then logs an ERROR at every stage start. Nothing is wrong.
    ("PreemptionWatcher constructor warning",
     re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store")),
    # Ray Train's CheckpointManager on resume (checkpoint_manager.py): advice to configure a new
    # RunConfig(name) or delete the folder. Our resume is deliberate; the trainer prints "resuming at ...".
    ("run snapshot advice", re.compile(
        r"A run snapshot was found in storage folder at:"
        r"|This snapshot contains a list of checkpoints reported via `ray\.train\.report`"
        r"|If you meant to start a brand new training job without any information about previous checkpoints"
    )),
)
HANDLER_NAME = "ray_print_logs"


def is_noise(line: str) -> bool:
    return any(pattern.search(line) for _, pattern in NOISE)


_last_forwarded = 0.0  # time.monotonic() of the last forwarded output the driver received


def _filtering(handler: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def emit(data: dict[str, Any]) -> None:
        global _last_forwarded
        _last_forwarded = time.monotonic()
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines or not data.get("lines"):
            handler({**data, "lines": lines})

    emit.rlhf_jobs_filter = True  # type: ignore[attr-defined]
    return emit


def install_ray_log_filter() -> bool:
    """Wrap Ray's driver-side log printer (after `ray.init(log_to_driver=True)`); True if installed."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        handlers = dispatcher.handlers
        if not any(name == HANDLER_NAME for name, _ in handlers):
            return False
        dispatcher.handlers = [
            (name, handler if name != HANDLER_NAME or getattr(handler, "rlhf_jobs_filter", False)
             else _filtering(handler))
            for name, handler in handlers
        ]
    return True


def stop_ray_output(quiet_s: float = 1.0, limit_s: float = 5.0) -> None:
    """Wait until Ray's forwarded output has been quiet for `quiet_s` (at most `limit_s`), then disconnect
    from Ray (a Ray started here stops with it), so that nothing Ray prints comes after what the driver prints
    next. The next run in this process starts or joins Ray again."""
    import ray

    if not ray.is_initialized():
        return
    start = time.monotonic()
    while time.monotonic() - max(start, _last_forwarded) < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.1)
    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
