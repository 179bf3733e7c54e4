"""Resumable training state in `output_dir/checkpoints/`, written by every rank, committed by rank 0.

Each checkpoint is a directory `step-00000012/` holding
- the tensors (model and optimizer state) as a `torch.distributed.checkpoint` save: every rank
  writes its own shard, nothing is gathered on one rank, and a resume on another number of
  workers reshards them;
- `state.pt`: the rest (schedules, counters) from rank 0;
- `complete.json`, written last, once every rank has finished, with the size of every file. A directory
  without it is partial (killed mid-write, disk full) and is never resumed from; the next run deletes it.

Resume reads the newest complete directory, after checking it (`verify`): a checkpoint whose files are
not what `complete.json` and the tensor index promise (a truncated shard, an empty state file) is moved
aside to `step-N.broken-<time>` (never deleted), with a line naming the file, and the run resumes from
the previous complete one. Ray Train's own checkpoint registry is not what a resume uses: it misses a
checkpoint written moments before the driver is interrupted, which made runs redo more steps than the
checkpoint interval.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.engine.distributed import all_reduce_sum, is_distributed
from rlhf_jobs.engine.worker import Worker, progress
from rlhf_jobs.store import storage
from rlhf_jobs.store.checkpoints import move_aside
from rlhf_jobs.store.disk import writing
from rlhf_jobs.store.step_dirs import StepDirs

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
EXTRA = "state.pt"


class ModelState:
    """A model and its optimizer as one `Stateful` for DCP: keys are parameter names, so the state
    loads into a model sharded differently (other worker count, DDP <-> FSDP)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 trainable_only: bool = False) -> None:
        self.model, self.optimizer, self.trainable_only = model, optimizer, trainable_only

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=self._options())}
        model, optimizer = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=self._options())
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._options())


@contextlib.contextmanager
def _alone_is_fine() -> Iterator[None]:
    """Without a process group (`rlhf-jobs train --in-process`) torch.distributed.checkpoint warns, at every
    save and load, that it works in one process, which is what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def _short(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def verify(path: Path) -> str | None:
    """What is wrong with the checkpoint in `path`, naming the file, or None when it is whole: `complete.json`
    parses, every file it lists has its recorded size, every byte range of the tensor index (DCP's `.metadata`)
    is there, and `state.pt` loads. Checkpoints written before sizes were recorded get the last three checks."""
    try:
        commit = json.loads((path / COMPLETE).read_text())
        if not isinstance(commit, dict):
            raise ValueError(f"a JSON {type(commit).__name__}, expected an object")
        recorded = {str(name): int(size) for name, size in (commit.get("files") or {}).items()}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return f"{COMPLETE} does not parse ({_short(err)})"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        index = FileSystemReader(str(path)).read_metadata().storage_data or {}
    except Exception as err:  # missing or truncated: whatever unpickling raises
        return f".metadata (the tensor index) does not load ({_short(err)})"
    index_ends: dict[str, int] = {}
    for info in index.values():
        index_ends[info.relative_path] = max(index_ends.get(info.relative_path, 0), info.offset + info.length)
    for name in sorted(set(recorded) | set(index_ends)):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        found = file.stat().st_size
        if name in recorded and found != recorded[name]:
            return f"{name} is {found} bytes, {COMPLETE} recorded {recorded[name]}"
        if found < index_ends.get(name, 0):
            return f"{name} is {found} bytes, the tensor index needs {index_ends[name]}"
    try:
        torch.load(path / EXTRA, map_location="cpu", weights_only=False)
    except Exception as err:  # empty, truncated, garbled: whatever unpickling raises
        return f"{EXTRA} does not load ({_short(err)})"
    return None


class TrainState:
    """The checkpoints of one run's `output_dir`."""

    def __init__(self, output_dir: str, worker: Worker, keep: int = 2) -> None:
        self.steps = StepDirs(storage.location(output_dir).join(CHECKPOINTS), COMPLETE)
        self.root = self.steps.local  # an s3:// output_dir: its local mirror
        self.worker, self.keep = worker, keep

    def latest(self) -> Path | None:
        complete = self.steps.complete_steps()
        return complete[-1] if complete else None

    def clean(self) -> None:
        """Rank 0 deletes partial checkpoints and all but the newest `keep` complete ones (nothing else: a
        checkpoint moved aside as broken stays)."""
        if self.worker.is_main:
            self.steps.clean(self.keep)
        _barrier()

    def save(self, step: int, tensors: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Every rank calls it: each writes its shard of `tensors`, rank 0 `extra`, then the commit marker.

        A full disk is one `DiskFull` line naming the path and the size of a checkpoint; the partial
        directory is removed, and the last complete checkpoint (cleaned only after a new one is complete) stays."""
        import torch.distributed.checkpoint as dcp

        path = self.root / f"step-{step:08d}"
        with writing(path, f"checkpoint {path.name}", needed=lambda: self._size_estimate(tensors),
                             cleanup=lambda: shutil.rmtree(path, ignore_errors=True), then=self._what_stays()):
            if self.worker.is_main:
                shutil.rmtree(path, ignore_errors=True)  # a partial one from a killed attempt
                path.mkdir(parents=True)
            _barrier()
            with _alone_is_fine():
                dcp.save(tensors, checkpoint_id=str(path))
            if self.worker.is_main:
                torch.save(extra, path / EXTRA)
            _barrier()
            self.steps.upload_shards(path)
            _barrier()
            if self.worker.is_main:
                files = self.steps.sizes(path)  # every node's
                files.pop(COMPLETE, None)
                (path / COMPLETE).write_text(json.dumps({"step": step, "time": time.time(),
                                                         "world_size": self.worker.world_size, "files": files}) + "\n")
                self.steps.commit(path)
        self.clean()
        return path

    def _what_stays(self) -> str:
        latest = self.latest()
        if latest is None:
            return "; no checkpoint of this run is complete yet: free some space, then run the same command again"
        return (f"; the last complete checkpoint, {latest.name}, is intact: free some space, then run the same "
                "command again to resume from it")

    def _size_estimate(self, tensors: dict[str, Any]) -> int | None:
        """Bytes a checkpoint takes: the last one's files, else the tensors' (DTensors count their global size)."""
        latest = self.latest()
        if latest is not None:
            try:
                return sum(json.loads((latest / COMPLETE).read_text()).get("files", {}).values()) or None
            except (OSError, ValueError, TypeError):
                pass
        try:
            return _tensor_bytes({name: state.state_dict() for name, state in tensors.items()}) or None
        except Exception:  # an estimate only; the message then says less
            return None

    def load(self, tensors: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest intact checkpoint into `tensors` (in place) and return its `extra`; None when
        there is none. Partial checkpoints are cleaned up first, broken ones moved aside."""
        import torch.distributed.checkpoint as dcp

        set_aside = False
        while True:
            self.steps.download_latest()
            _barrier()
            self.clean()
            path = self.latest()
            if path is None:
                if set_aside:
                    progress(self.worker, "resume", "no intact checkpoint left: starting from the beginning")
                return None
            if not self._set_aside_if_broken(path):
                break
            set_aside = True
        with _alone_is_fine():
            dcp.load(tensors, checkpoint_id=str(path))
        return torch.load(path / EXTRA, map_location="cpu", weights_only=False)

    def _set_aside_if_broken(self, path: Path) -> bool:
        """Rank 0 checks `path` and moves a broken checkpoint aside (in object storage too); every rank learns
        whether it did."""
        broken = 0.0
        if self.worker.is_main and (problem := verify(path)) is not None:
            location = self.steps.step_location(path)
            moved = move_aside(location, "broken")
            progress(self.worker, "resume", f"checkpoint {location} is broken: {problem}; moved it aside to {moved} "
                                            "(nothing deleted), resuming from the previous complete one")
            broken = 1.0
        (broken,) = all_reduce_sum([broken], self.worker.device)
        return broken > 0
