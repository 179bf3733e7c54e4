"""The train-state store (`train_state.TrainState`) when `output_dir` is in object storage.

Checkpoints are written to the local mirror of `output_dir/checkpoints` (`storage.local_dir`) as on a
local disk, then uploaded with the same commit rule: every node uploads the files its ranks wrote,
and only after all of them are up does rank 0 upload `complete.json`. A remote step directory
without it is partial and never resumed from. Resuming downloads the newest complete one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from rlhf_jobs.store import storage

STEP_DIR = re.compile(r"^step-(\d{8})$")
STAGING = re.compile(r"^\.step-\d{8}\.download$")


def owned(name: str) -> bool:
    """Whether an entry of a checkpoints directory is a step directory (or a download of one) that cleaning
    may delete; anything else (a checkpoint moved aside as broken) is left alone."""
    return bool(STEP_DIR.match(name) or STAGING.match(name))


def _local_rank() -> int:
    try:
        import ray.train

        return ray.train.get_context().get_local_rank()
    except Exception:  # outside a Ray Train worker: one process per node
        return 0


class RemoteCheckpoints:
    """`uri` (`<output_dir>/checkpoints`) mirrored at `local` on every node."""

    def __init__(self, uri: str, local: Path, complete: str) -> None:
        self.uri, self.local, self.complete = uri, local, complete

    def _steps(self) -> tuple[list[str], list[str]]:
        """(complete, partial) step directory names in the object store, oldest first."""
        names = [name for name in storage.list_dir(self.uri) if STEP_DIR.match(name)]
        complete = [name for name in names if storage.exists(storage.join(self.uri, name, self.complete))]
        return complete, [name for name in names if name not in complete]

    def step_uri(self, path: Path) -> str:
        """The object-storage location of the local step directory `path`."""
        return storage.join(self.uri, path.name)

    def upload_shards(self, path: Path) -> None:
        """Every rank calls it after the local save: one process per node uploads that node's files
        (all but the commit marker)."""
        if _local_rank() == 0:
            storage.upload_tree(path, storage.join(self.uri, path.name), skip=(self.complete,))

    def commit(self, path: Path) -> None:
        """Rank 0, after every node's upload: the marker, last."""
        storage.upload_file(path / self.complete, storage.join(self.uri, path.name, self.complete))

    def clean(self, keep: int) -> None:
        """Rank 0: delete partial step directories and all but the newest `keep` complete ones."""
        complete, partial = self._steps()
        for name in partial + complete[:-keep]:
            storage.delete(storage.join(self.uri, name))

    def download_latest(self) -> None:
        """One process per node: make the local mirror hold exactly the newest complete remote checkpoint
        (local ones the object store does not have complete are dropped: the store is the truth)."""
        if _local_rank() != 0:
            return
        complete, _ = self._steps()
        newest = complete[-1] if complete else None
        if self.local.is_dir():
            for path in self.local.iterdir():
                if owned(path.name) and (path.name != newest or not (path / self.complete).is_file()):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if newest and not (self.local / newest / self.complete).is_file():
            staging = self.local / f".{newest}.download"  # renamed whole: a killed download leaves no step dir
            shutil.rmtree(staging, ignore_errors=True)
            storage.download_tree(storage.join(self.uri, newest), staging)
            staging.rename(self.local / newest)
