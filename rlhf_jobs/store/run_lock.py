"""One run at a time per `output_dir`: a lock beside it, `<output_dir>.lock`, on a local disk or in object storage.

The lock is a small JSON file (an object, in object storage) naming its owner: host, process id, command, when
it started and when it was last renewed. The driver takes it after the read-only pre-flight checks and before it
writes or moves anything (Ray Train's workers are its children: they take none), renews it every `RENEW_S`
seconds while the run lives, and removes it when the run ends, finished, failed or stopped. A second run on the
same `output_dir` is refused in one line naming the owner and what to do.

A lock its owner left behind (killed without a chance to remove it) is stale, and is taken over with a line
saying so, when
- the owner ran on this host (same host name, process namespace and boot) and that process is gone, or
- it was not renewed for `LEASE_S` seconds: an owner on another host, e.g. a pod since replaced, or a
  process-id reused after a reboot.
A live lock of another host is refused with the way to remove it, should that host be gone for good.

The lock sits beside `output_dir`, not in it, so moving the old run aside on a restart keeps it in place.
In object storage pyarrow has no create-if-absent: two runs starting within the same instant could both take
the lock; the renewal notices and says so (`Location.create_text`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.store import storage

SUFFIX = ".lock"
# A lease short enough that a replaced pod (a KubeRay retry: a new head pod, another host) rarely waits for it,
# long enough for a busy driver's renewal thread (one small write each time).
RENEW_S = 10.0
LEASE_S = 45.0  # not renewed for this long: the owner is gone
_held: dict[str, Lock] = {}  # the locks this process holds, by location


class LockHeld(ConfigError):
    """Another live run holds the lock of this output_dir."""


def location(output_dir: storage.Where) -> str:
    """Where the lock of `output_dir` lives: `<output_dir>.lock` beside it (absolute, for a local path)."""
    return str(storage.location(output_dir).resolved().beside(SUFFIX))


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _this_machine() -> dict[str, Any]:
    """What tells two processes apart: host name, process-id namespace (containers sharing a host name) and boot."""
    try:
        namespace: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "pid_namespace": namespace,
            "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_reason(owner: dict[str, Any], now: float | None = None) -> str | None:
    """Why the lock of `owner` is left over from a run that is gone, or None while that run may live."""
    now = time.time() if now is None else now
    here = _this_machine()
    same_machine = all(owner.get(key) == value for key, value in here.items() if value is not None)
    if same_machine and not _alive(int(owner.get("pid", -1))):
        return f"process {owner.get('pid')} on this host is gone"
    age = now - float(owner.get("renewed_at", 0))
    if age > LEASE_S:
        return f"not renewed for {age:.0f} s (lease {LEASE_S:.0f} s)"
    return None


def _when(timestamp: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(timestamp)))
    except (TypeError, ValueError):
        return "?"


def refusal(output_dir: str | Path, lock: str, owner: dict[str, Any], key: str = "General.output_dir") -> str:
    age = time.time() - float(owner.get("renewed_at", 0))
    remove = storage.location(lock).how_to_delete()
    command = f" ({owner['command']})" if owner.get("command") else ""
    return (f"{key}: {output_dir} is in use by another run: pid {owner.get('pid')} on host {owner.get('host')}"
            f"{command}, started {_when(owner.get('started_at'))}, its lock {lock} renewed {age:.0f} s ago; wait "
            f"for that run to end, or if it is gone for good, {remove} (a lock not renewed for {LEASE_S:.0f} s is "
            "taken over by itself)")


class Lock:
    """A lock this process holds, renewed by a daemon thread until `release`."""

    def __init__(self, output_dir: str, lock: str, owner: dict[str, Any]) -> None:
        self.output_dir, self.location, self.owner = output_dir, lock, owner
        self._file = storage.location(lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"run-lock {lock}", daemon=True)

    def _ours(self) -> bool:
        text = self._file.read_text()
        try:
            return text is not None and json.loads(text).get("token") == self.owner["token"]
        except ValueError:
            return False

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self._ours():
                    print(f"warning: {self.output_dir}: another run has taken over its lock {self.location}; two "
                          "runs may now write there", file=sys.stderr, flush=True)
                    return
                self.owner["renewed_at"] = time.time()
                self._file.write_text(json.dumps(self.owner) + "\n")
            except Exception as err:  # a storage hiccup: try again at the next renewal
                print(f"warning: could not renew the lock {self.location}: {err}", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        _held.pop(self.location, None)
        with contextlib.suppress(Exception):  # never mask the run's own outcome
            if self._ours():
                self._file.delete()


def acquire(output_dir: str | Path, key: str = "General.output_dir") -> Lock:
    """Take the lock of `output_dir`, taking over a stale one; `LockHeld` (one line) when another run holds it."""
    lock = location(output_dir)
    file = storage.location(lock)
    now = time.time()
    owner = {**_this_machine(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300], "started_at": now,
             "renewed_at": now, "token": uuid.uuid4().hex}
    for _ in range(3):  # a lock released or taken over in between: look again
        if file.create_text(json.dumps(owner) + "\n"):
            held = Lock(str(output_dir), lock, owner)
            _held[lock] = held
            held._thread.start()
            return held
        text = file.read_text()
        if text is None:
            continue
        try:
            theirs = json.loads(text)
            reason = stale_reason(theirs)
        except (ValueError, TypeError, AttributeError):
            theirs, reason = {}, "it does not parse"
        if reason is None:
            raise LockHeld(refusal(output_dir, lock, theirs, key))
        if file.read_text() == text:  # still the lock judged stale
            print(f"{output_dir}: taking over the lock {lock} of a run that is gone ({reason})", flush=True)
            file.delete()
    raise LockHeld(f"{key}: {output_dir}: could not take its lock {lock}: other runs keep taking it")


@contextlib.contextmanager
def holding(output_dir: str | Path, key: str = "General.output_dir") -> Iterator[Lock]:
    """The lock of `output_dir` for the duration of a `with` block, released however the block ends."""
    held = acquire(output_dir, key)
    try:
        yield held
    finally:
        held.release()


def refuse_if_in_use(path: storage.Where, key: str = "General.output_dir") -> None:
    """`LockHeld` when another live run holds the lock of `path` (before moving it aside); this process's are fine."""
    lock = location(path)
    if lock in _held:
        return
    text = storage.location(lock).read_text()
    if text is None:
        return
    try:
        theirs = json.loads(text)
        live = stale_reason(theirs) is None
    except (ValueError, TypeError, AttributeError):  # a torn lock protects nothing
        return
    if live:
        raise LockHeld(refusal(path, lock, theirs, key))
