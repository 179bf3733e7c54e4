"""Training state for resume: saved with a Ray Train checkpoint, restored when a run starts again."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.worker import Worker

STATE_FILE = "train_state.pt"


def load_train_state() -> dict[str, Any] | None:
    """The state saved by the last `report_checkpoint`, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def report_checkpoint(worker: Worker, metrics: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
    """All ranks report; rank 0 attaches a checkpoint holding `state()`."""
    import ray.train

    if not worker.is_main:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state(), Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
