"""The step directories of a run's resumable checkpoints (`train_state.TrainState`), kept at a `storage.Location`.

`<output_dir>/checkpoints/step-00000012/` is written and read in the location's local copy (`Location.local`: a
local output_dir itself, or the local mirror of one in object storage), and kept at the location with one commit
rule: every node uploads the files its ranks wrote, and only after all of them are there does rank 0 upload the
commit file (`complete.json`). A step directory without it is partial and never resumed from. Resuming from object
storage first makes the mirror hold the newest complete step directory there (the store is the truth). For a local
output_dir the copy is the location: uploads and downloads are nothing to do.
"""

from __future__ import annotations

import contextlib
import json
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


class StepDirs:
    """The step directories at `location` (`<output_dir>/checkpoints`) and in its local copy."""

    def __init__(self, location: storage.Location, complete: str) -> None:
        self.location, self.complete = location, complete
        self.local = location.local

    def complete_steps(self) -> list[Path]:
        """The local copy's complete step directories, oldest first."""
        if not self.local.is_dir():
            return []
        found = [(int(m.group(1)), path) for path in self.local.iterdir() if (m := STEP_DIR.match(path.name))]
        return [path for _, path in sorted(found) if (path / self.complete).is_file()]

    def step_location(self, path: Path) -> storage.Location:
        """Where the local step directory `path` is kept."""
        return self.location.join(path.name)

    def clean(self, keep: int) -> None:
        """Rank 0: delete partial step directories and all but the newest `keep` complete ones, in the local copy and
        at the location (nothing else: a checkpoint moved aside as broken stays). Best effort: what cannot be
        deleted now is deleted by a later cleaning."""
        if not self.local.is_dir():
            return
        for place in dict.fromkeys((storage.location(self.local), self.location)):  # one, for a local output_dir
            names = [name for name in place.names() if owned(name)]
            complete = [name for name in names if STEP_DIR.match(name) and place.join(name, self.complete).is_file()]
            for name in names:
                if name not in complete[-keep:]:
                    with contextlib.suppress(OSError):
                        place.join(name).delete()

    def upload_shards(self, path: Path) -> None:
        """Every rank calls it after the local save: one process per node uploads that node's files (all but the
        commit file). Nothing to do for a local output_dir."""
        if self.location.mirrored and _local_rank() == 0:
            self.step_location(path).upload(path, skip=(self.complete,))

    def sizes(self, path: Path) -> dict[str, int]:
        """{relative path: size} of the files of step directory `path` where it is kept: every node's."""
        return self.step_location(path).sizes()

    def commit(self, path: Path) -> None:
        """Rank 0, after every node's upload: the commit file, last."""
        self.step_location(path).join(self.complete).upload(path / self.complete)

    def _whole(self, path: Path) -> bool:
        """A local step directory with its commit file and every file that commit lists, at its size: on a node
        that wrote part of a multi-node checkpoint, the mirror holds only this node's shards besides the commit."""
        try:
            recorded = json.loads((path / self.complete).read_text()).get("files") or {}
        except (OSError, ValueError):
            return False
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in recorded.items())

    def download_latest(self) -> None:
        """One process per node: make the local mirror hold exactly the newest complete step directory at the
        location (local ones it does not have complete are dropped: the store is the truth). Nothing to do for a
        local output_dir, whose older complete checkpoints are what a broken newest one falls back to."""
        if not self.location.mirrored or _local_rank() != 0:
            return
        names = [name for name in self.location.names() if STEP_DIR.match(name)]
        complete = [name for name in names if self.location.join(name, self.complete).exists()]
        newest = complete[-1] if complete else None
        if self.local.is_dir():
            for path in self.local.iterdir():
                if owned(path.name) and (path.name != newest or not self._whole(path)):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if newest and not (self.local / newest).is_dir():
            staging = self.local / f".{newest}.download"  # renamed whole: a killed download leaves no step dir
            shutil.rmtree(staging, ignore_errors=True)
            self.location.join(newest).download(staging)
            staging.rename(self.local / newest)
