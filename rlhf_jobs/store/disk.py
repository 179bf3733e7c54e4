"""A full local disk while a run writes: one `DiskFull` line naming the path and the space needed, not tracebacks."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from rlhf_jobs.store.object_store import StorageError


class DiskFull(StorageError):
    """No space left where a run writes; the message is one line naming the path and the space needed."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def _errors(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and the per-rank errors a `torch.distributed.checkpoint` failure holds."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():  # CheckpointException: rank -> (error, tb)
            pending.append(failure[0] if isinstance(failure, tuple) else failure)


def no_space(error: BaseException) -> bool:
    """Whether `error` says a disk is full (ENOSPC, EDQUOT, or their words in a wrapped message)."""
    return any(
        (isinstance(item, OSError) and item.errno in NO_SPACE) or any(word in str(item) for word in NO_SPACE_WORDS)
        for item in _errors(error) if isinstance(item, BaseException)
    )


def free_bytes(path: str | Path) -> int | None:
    """Free space (for this user) on the file system holding `path`, or its nearest existing parent."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"


def require_free(path: str | Path, needed: int, what: str, then: str = "") -> None:
    """`DiskFull` when less than `needed` bytes are free at the local `path` (before a writer that would fail badly)."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskFull(f"no space left on device at {path} (at least {mib(needed)} needed for {what}; {mib(free)} "
                       f"free there){then}")


@contextlib.contextmanager
def writing(path: str | Path, what: str, needed: Callable[[], int | None] | None = None,
            cleanup: Callable[[], None] | None = None, then: str = "") -> Iterator[None]:
    """Writing `what` at the local `path`: a full disk becomes one `DiskFull` line naming the path, the space `what`
    needs (`needed()`, bytes) and the space free, and ending with `then` (what is intact, what to do).

    `cleanup` removes what the failed write left (a partial checkpoint, a staging directory), whatever the error.
    Some writers lose the errno (torch's zip writer raises "unexpected pos"), so an error is also taken for a full
    disk when, after the cleanup, less than `needed()` is free."""
    try:
        yield
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        size = needed() if needed is not None else None
        if cleanup is not None:
            cleanup()
        free = free_bytes(path)
        if not (no_space(err) or (size is not None and free is not None and free < size)):
            raise
        needs = f", about {mib(size)}" if size else ""
        room = f"; {mib(free)} free there" if free is not None else ""
        raise DiskFull(f"no space left on device at {path} (writing {what}{needs}{room}){then}") from None
