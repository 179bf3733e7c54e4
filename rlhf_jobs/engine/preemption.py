"""Preemption: a run told to go finishes its step, writes a checkpoint, and ends resumable.

Two signals reach the training loop, which asks `control.stop_requested()` at every optimizer step boundary on
every worker (cheap and local; the loop all-reduces the answer, so every rank stops after the same
step, writes the checkpoint, and returns):

- **SIGTERM to the driver** (`rlhf-jobs train`, the RayJob entrypoint on the head; Ctrl-C stays Ray
  Train's abort). Ray Train V2 runs the training function in a thread of each worker actor, where no
  signal handler can be installed, so the driver's handler (main thread) sets a key in Ray's internal
  KV store, scoped to the driver's Ray job id (the worker actors belong to that job); workers read it
  at most every `POLL_S` seconds. The driver then ends with "stopped after step N (preempted); run the
  same command again" (`launcher.RunStopped`, exit code 75: try again).
- **A drained Ray node** (Ray 2.60: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, which the
  chart's worker preStop hook runs, as do KubeRay's autoscaler and `ray start` itself on SIGTERM): Ray
  Train's PreemptionWatcher marks every worker (`ray.train.get_preemption_info()` would return it, but
  that call is a barrier; the same value is read here without one). The run stops the same way and the
  driver, which was not told to go, starts the run again at once on the nodes left (`DriverGuard`).

For a pod whose driver must stop (the head), `python -m rlhf_jobs.engine.preemption` is the preStop hook: it
sends SIGTERM to the `rlhf-jobs train` drivers registered on this machine and waits for them to exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rlhf_jobs.engine import control
from rlhf_jobs.engine.control import NAMESPACE, PREEMPTED, stop_key

PID_DIR_ENV = "RLHF_JOBS_PID_DIR"
STOPPING = "SIGTERM: training stops after the current step and writes a checkpoint (send SIGTERM again to exit at once)"


def pid_dir() -> Path:
    """Where drivers register their pid on this machine (for the preStop hook)."""
    return Path(os.environ.get(PID_DIR_ENV) or f"/tmp/rlhf-jobs-{os.getuid()}") / "drivers"


# ---- driver side --------------------------------------------------------------------------------


class DriverGuard:
    """While training runs: SIGTERM sets the stop key (a second SIGTERM exits at once), and the
    driver's pid is registered for the preStop hook. Use after `ray.init`."""

    def __init__(self) -> None:
        self.signalled = False
        self._wake = threading.Event()
        self._previous: Any = None
        self._key = ""
        self._pid_file = pid_dir() / str(os.getpid())

    def __enter__(self) -> DriverGuard:
        import ray
        from ray.experimental import internal_kv

        self._key = stop_key(ray.get_runtime_context().get_job_id())
        internal_kv._internal_kv_del(self._key, namespace=NAMESPACE)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._publish, name="rlhf-jobs-stop", daemon=True).start()
        with contextlib.suppress(OSError):
            self._pid_file.parent.mkdir(parents=True, exist_ok=True)
            self._pid_file.write_text(" ".join(sys.argv) + "\n")
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled:
            raise SystemExit(128 + signum)
        self.signalled = True
        self._wake.set()  # the KV write happens on a thread: no RPC inside a signal handler
        print(STOPPING, file=sys.stderr, flush=True)

    def restart_after(self, stop_reason: str | None) -> bool:
        """After a run ended: start it again? Yes when it stopped for a node drain while this driver
        was not told to go (the workers resume from the checkpoint they just wrote)."""
        if stop_reason != PREEMPTED or self.signalled:
            return False
        print("a node of this run is being drained (preemption): the run continues from its checkpoint "
              "on the nodes left", file=sys.stderr, flush=True)
        return True

    def _publish(self) -> None:
        from ray.experimental import internal_kv

        self._wake.wait()
        if self._key:
            with contextlib.suppress(Exception):
                internal_kv._internal_kv_put(self._key, b"SIGTERM", namespace=NAMESPACE)

    def __exit__(self, *exc: object) -> None:
        from ray.experimental import internal_kv

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        with contextlib.suppress(Exception):
            internal_kv._internal_kv_del(self._key, namespace=NAMESPACE)
        self._key = ""
        self._wake.set()  # ends the publishing thread
        self._pid_file.unlink(missing_ok=True)


class InProcessGuard:
    """`DriverGuard` for a run whose one worker is this process (`rlhf-jobs train --in-process`): the loop
    runs in the main thread, so SIGTERM marks this process's stop request directly (no Ray to tell)."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous: Any = None

    def __enter__(self) -> InProcessGuard:
        control.reset_stop_request()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled:
            raise SystemExit(128 + signum)
        self.signalled = True
        control.request_stop()
        print(STOPPING, file=sys.stderr, flush=True)

    def restart_after(self, stop_reason: str | None) -> bool:
        return False  # no node of this run can be drained

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        control.reset_stop_request()


# ---- preStop hook --------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """A running process (an exited one its parent has not reaped yet, a zombie, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def stop_drivers(wait_s: float) -> list[int]:
    """SIGTERM every registered live driver on this machine; wait up to `wait_s` for them to exit.
    Returns the pids still alive at the end (stale pid files are removed)."""
    directory = pid_dir()
    pids = []
    for path in directory.glob("*") if directory.is_dir() else []:
        if path.name.isdigit() and _alive(int(path.name)):
            pids.append(int(path.name))
        else:
            path.unlink(missing_ok=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jobs.engine.preemption",
        description="preStop hook: SIGTERM the rlhf-jobs drivers on this machine and wait for their checkpoint",
    )
    parser.add_argument("--wait", type=float, default=50.0,
                        help="seconds to wait for them to exit (the pod's grace period less a margin)")
    args = parser.parse_args(argv)
    alive = stop_drivers(args.wait)
    if alive:
        print(f"drivers still running after {args.wait:g} s: {alive}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
