"""Resumable training state in `output_dir/checkpoints/`, written by every rank, committed by rank 0.

Each checkpoint is a directory `step-00000012/` holding
- the tensors (model and optimizer state) as a `torch.distributed.checkpoint` save: every rank
  writes its own shard, nothing is gathered on one rank, and a resume on another number of
  workers reshards them;
- `state.pt`: the rest (schedules, counters) from rank 0;
- `complete.json`, written last, once every rank has finished. A directory without it is partial
  (killed mid-write, disk full) and is never resumed from; the next run deletes it.

Resume reads the newest complete directory. Ray Train's own checkpoint registry is not what a
resume uses: it misses a checkpoint written moments before the driver is interrupted, which made
runs redo more steps than the checkpoint interval.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.engine.distributed import is_distributed
from rlhf_jobs.engine.worker import Worker
from rlhf_jobs.store import storage
from rlhf_jobs.store.remote_state import RemoteCheckpoints

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
EXTRA = "state.pt"
STEP_DIR = re.compile(r"^step-(\d{8})$")


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


class TrainState:
    """The checkpoints of one run's `output_dir`."""

    def __init__(self, output_dir: str, worker: Worker, keep: int = 2) -> None:
        self.root = storage.local_dir(output_dir) / CHECKPOINTS  # an s3:// output_dir: its local mirror
        self.worker, self.keep = worker, keep
        self.remote = (RemoteCheckpoints(storage.join(output_dir, CHECKPOINTS), self.root, COMPLETE)
                       if storage.is_remote(output_dir) else None)

    def _complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))]
        return sorted((step, path) for step, path in found if (path / COMPLETE).is_file())

    def latest(self) -> Path | None:
        complete = self._complete()
        return complete[-1][1] if complete else None

    def clean(self) -> None:
        """Rank 0 deletes partial checkpoints and all but the newest `keep` complete ones."""
        if self.worker.is_main and self.root.is_dir():
            keep = {path for _, path in self._complete()[-self.keep :]}
            for path in self.root.iterdir():
                if path not in keep:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if self.remote:
                self.remote.clean(self.keep)
        _barrier()

    def save(self, step: int, tensors: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Every rank calls it: each writes its shard of `tensors`, rank 0 `extra`, then the commit marker."""
        import torch.distributed.checkpoint as dcp

        path = self.root / f"step-{step:08d}"
        if self.worker.is_main:
            shutil.rmtree(path, ignore_errors=True)  # a partial one from a killed attempt
            path.mkdir(parents=True)
        _barrier()
        with _alone_is_fine():
            dcp.save(tensors, checkpoint_id=str(path))
        if self.worker.is_main:
            torch.save(extra, path / EXTRA)
        _barrier()
        if self.remote:
            self.remote.upload_shards(path)
            _barrier()
        if self.worker.is_main:
            (path / COMPLETE).write_text(json.dumps({"step": step, "time": time.time(),
                                                     "world_size": self.worker.world_size}) + "\n")
            if self.remote:
                self.remote.commit(path)
        self.clean()
        return path

    def load(self, tensors: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into `tensors` (in place) and return its `extra`; None when
        there is none. Partial checkpoints are cleaned up first."""
        import torch.distributed.checkpoint as dcp

        if self.remote:
            self.remote.download_latest()
            _barrier()
        self.clean()
        path = self.latest()
        if path is None:
            return None
        with _alone_is_fine():
            dcp.load(tensors, checkpoint_id=str(path))
        return torch.load(path / EXTRA, map_location="cpu", weights_only=False)
