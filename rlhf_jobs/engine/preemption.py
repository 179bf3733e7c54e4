"""Preemption: a run told to go finishes its step, writes a checkpoint, and ends resumable.

Two signals reach the training loop, which asks `stop_notice.stop_requested()` at every optimizer step boundary on
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
For a worker pod, `python -m rlhf_jobs.engine.preemption --drain` is the preStop hook: it drains this machine's Ray
node through the GCS (`GcsClient.drain_node`, reason preemption, a short timeout) and waits while Ray Train
workers still run here. `ray drain-node` without a node id starts a Ray driver inside the hook to learn it (an
unreachable GCS kept it blocked 40+ s); here the node id and GCS address come from the command line of this
machine's raylet, and every failure is one line on stderr with a non-zero exit (a FailedPreStopHook event).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rlhf_jobs.engine import stop_notice
from rlhf_jobs.engine.stop_notice import NAMESPACE, PREEMPTED, stop_key

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
        stop_notice.reset_stop_request()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled:
            raise SystemExit(128 + signum)
        self.signalled = True
        stop_notice.request_stop()
        print(STOPPING, file=sys.stderr, flush=True)

    def restart_after(self, stop_reason: str | None) -> bool:
        return False  # no node of this run can be drained

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        stop_notice.reset_stop_request()


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


# ---- worker preStop hook: drain this machine's Ray node ---------------------------------------------------

DRAIN_TIMEOUT_S = 10.0  # for reaching the GCS and for its answer: a hook must not burn the grace period
TRAIN_WORKER = "RayTrainWorker"  # in the process title of Ray Train's worker actors


class DrainError(RuntimeError):
    """This machine's Ray node could not be drained; the message says why."""


def local_raylets(proc: Path = Path("/proc")) -> list[tuple[str, str, int]]:
    """(node id, GCS address, pid) of every raylet process visible here: in a pod, the pod's own one."""
    found = []
    for entry in proc.glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv or not argv[0].endswith(b"/raylet"):
                continue
            flags = dict(arg.decode(errors="replace").lstrip("-").partition("=")[::2]
                         for arg in argv[1:] if b"=" in arg)
            node_id, address = flags.get("node_id"), flags.get("gcs-address") or flags.get("gcs_address")
            if node_id and address:
                found.append((node_id, address, int(entry.name)))
    return sorted(found)


def _same_address(first: str, second: str) -> bool:
    def resolved(address: str) -> tuple[str, str]:
        host, _, port = address.rpartition(":")
        with contextlib.suppress(OSError):
            host = socket.gethostbyname(host)
        return host, port

    return first == second or resolved(first) == resolved(second)


def node_to_drain(node_id: str | None = None, address: str | None = None,
                  timeout_s: float = DRAIN_TIMEOUT_S) -> tuple[str, str, int | None]:
    """(node id, GCS address, raylet pid) of this machine's Ray node: the raylet here of the cluster at `address`
    ($RAY_ADDRESS), found by its --gcs-address, else by asking that GCS which nodes it has (KubeRay's RAY_ADDRESS
    names the head Service, which the raylet may have resolved); without an address, the one raylet here.
    `node_id` picks one where several run (a test cluster on one machine)."""
    address = address or os.environ.get("RAY_ADDRESS", "").removeprefix("ray://") or None
    raylets = local_raylets()
    if node_id:
        raylets = [raylet for raylet in raylets if raylet[0] == node_id] or (
            [(node_id, address, None)] if address else [])
    if address and raylets:
        same = [raylet for raylet in raylets if _same_address(raylet[1], address)]
        if not same:
            members = _with_gcs(address, timeout_s, lambda gcs: {
                key.hex() for key, info in gcs.get_all_node_info(timeout=timeout_s).items() if info.state == 0})
            same = [raylet for raylet in raylets if raylet[0] in members]
        raylets = [(node, address, pid) for node, _, pid in same]
    where = f" of the cluster at {address}" if address else ""
    if not raylets:
        raise DrainError(f"no Ray node{where} runs on this machine (no raylet process"
                         f"{' with node id ' + node_id if node_id else ''}): nothing to drain")
    if len(raylets) > 1:
        raise DrainError(f"{len(raylets)} Ray nodes{where} run on this machine "
                         f"({', '.join(raylet[0] for raylet in raylets)}): pass --node-id")
    return raylets[0]


def _with_gcs(address: str, timeout_s: float, call: Any) -> Any:
    """`call(GcsClient)` against the GCS at `address`, within about `timeout_s` (an unreachable GCS would hold
    GcsClient 40 s), in a thread a stuck call cannot hold the hook on; every failure is a DrainError."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise DrainError(f"cannot reach the Ray GCS at {address}: {err}") from None
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            from ray._raylet import GcsClient

            outcome["answer"] = call(GcsClient(address=address))
        except Exception as err:  # reported by the caller, in one line
            outcome["error"] = err

    worker = threading.Thread(target=run, name="rlhf-jobs-drain", daemon=True)
    worker.start()
    worker.join(timeout_s * 2)
    if worker.is_alive():
        raise DrainError(f"the Ray GCS at {address} did not answer in {timeout_s * 2:g} s")
    if "error" in outcome:
        error = outcome["error"]
        raise DrainError(f"the Ray GCS at {address}: {type(error).__name__}: {error}")
    return outcome["answer"]


def drain(node_id: str, address: str, deadline_s: float, message: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Ask the GCS at `address` to drain `node_id` for preemption (it will be killed in `deadline_s`), within
    `timeout_s`; Ray Train's PreemptionWatcher then tells the training loop, which stops after its step."""
    from ray.core.generated import autoscaler_pb2

    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    deadline_ms = int((time.time() + deadline_s) * 1000)
    try:
        accepted, rejection = _with_gcs(address, timeout_s, lambda gcs: gcs.drain_node(
            node_id, reason, message, deadline_ms, timeout=timeout_s))
    except DrainError as err:
        raise DrainError(f"draining node {node_id}: {err}") from None
    if not accepted:
        raise DrainError(f"the GCS at {address} refused to drain node {node_id}: {rejection}")


def _descends_from(pid: int, ancestor: int, proc: Path) -> bool:
    for _ in range(8):  # a worker is the raylet's child, or a grandchild through a runtime-env wrapper
        pid = int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def training_workers(raylet: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the Ray Train worker processes visible here (in a pod: the pod's own), only those the `raylet`
    process started when given (Ray's worker processes descend from it)."""
    pids = []
    for entry in proc.glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if TRAIN_WORKER.encode() not in (entry / "cmdline").read_bytes() or int(entry.name) == os.getpid():
                continue
            if raylet is None or _descends_from(int(entry.name), raylet, proc):
                pids.append(int(entry.name))
    return pids


def drain_and_wait(wait_s: float, deadline_s: float, node_id: str | None = None,
                   timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """The worker preStop hook: drain this machine's Ray node, then wait up to `wait_s` while Ray Train workers
    run here (they stop after their step and checkpoint). Failures go to stderr; exit code 1."""
    try:
        node, address, raylet = node_to_drain(node_id, timeout_s=timeout_s)
        drain(node, address, deadline_s, f"pod {os.environ.get('HOSTNAME') or socket.gethostname()} is terminating",
              timeout_s)
    except DrainError as err:
        print(f"rlhf-jobs preStop: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"rlhf-jobs preStop: drained Ray node {node} (GCS {address}) for preemption", file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait_s
    while (running := training_workers(raylet)) and time.monotonic() < deadline:
        time.sleep(1.0)
    if running:
        print(f"rlhf-jobs preStop: Ray Train workers {running} still running after {wait_s:g} s", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jobs.engine.preemption",
        description="preStop hooks: SIGTERM the rlhf-jobs drivers on this machine and wait for their checkpoint "
                    "(head pods); with --drain, drain this machine's Ray node and wait for its Ray Train workers "
                    "(worker pods)",
    )
    parser.add_argument("--wait", type=float, default=50.0,
                        help="seconds to wait for them to exit (the pod's grace period less a margin)")
    parser.add_argument("--drain", action="store_true",
                        help="drain this machine's Ray node (reason: preemption) instead of signalling drivers")
    parser.add_argument("--deadline", type=float, default=None,
                        help="--drain: seconds until the node is killed, told to Ray (default: --wait)")
    parser.add_argument("--node-id", default=None,
                        help="--drain: the node to drain where several raylets run on one machine (default: the one)")
    parser.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT_S,
                        help=f"--drain: seconds to reach the GCS and for its answer (default {DRAIN_TIMEOUT_S:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.drain:
        code = drain_and_wait(args.wait, args.deadline if args.deadline is not None else args.wait, args.node_id,
                              args.timeout)
        if any(thread.name == "rlhf-jobs-drain" for thread in threading.enumerate()) and __name__ == "__main__":
            sys.stderr.flush()
            os._exit(code)  # a GCS call still blocked in Ray's C++ client must not hold up the exit
        return code
    alive = stop_drivers(args.wait)
    if alive:
        print(f"drivers still running after {args.wait:g} s: {alive}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
