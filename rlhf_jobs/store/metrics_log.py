"""Rank 0's metrics: JSON lines in `output_dir/metrics.jsonl`, and the same records to every tracker
in `Training.report_to` (TensorBoard scalars, MLflow, W&B: `trackers.py`).

With `output_dir` in object storage the files are written to its local mirror (`Location.local`):
`metrics.jsonl` is uploaded after every record (one small PUT per logging step, so a killed run loses no
line a local disk would have kept), TensorBoard's files every `SYNC_S` seconds and at `close`. A run
resumed on another machine first downloads the earlier `metrics.jsonl` (and the tracker run ids).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jobs.store import storage, trackers
from rlhf_jobs.store.disk import require_free, writing

SYNC_S = 30.0
MIN_FREE = 1 << 20  # bytes free where the logs go, below which a run stops saying the disk is full
RESUME_LATER = "; free some space, then run the same command again to resume from the last checkpoint"
SYNCED = ("metrics.jsonl", trackers.RUNS_FILE)


class MetricsLogger:
    """Rank 0 appends JSON lines to `output_dir/metrics.jsonl` and sends them to the trackers."""

    def __init__(self, output_dir: str, stage: str, enabled: bool, config: Any = None,
                 tracking: Mapping[str, str] | None = None) -> None:
        """`config` (the StageConfig) gives `report_to` and the tracker parameters; without it, TensorBoard only."""
        self.stage, self.enabled, self.output_dir = stage, enabled, str(output_dir)
        self.location = storage.location(self.output_dir)
        self.local = self.location.local
        self.path = self.local / "metrics.jsonl"
        self.writer = None
        self.trackers: list[trackers.Tracker] = []
        self.synced_at = time.monotonic()
        if not enabled:
            return
        report_to: Sequence[str] = config.Training.report_to if config is not None else ("tensorboard",)
        # TensorBoard writes from a thread of its own, whose errors are tracebacks: a full disk is said first.
        require_free(self.local, MIN_FREE, "metrics and TensorBoard logs", then=RESUME_LATER)
        with writing(self.local, "metrics and TensorBoard logs", then=RESUME_LATER):
            self.local.mkdir(parents=True, exist_ok=True)
            self._pull()
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.local / "tensorboard"))
        if config is not None:
            self.trackers = trackers.open_trackers(report_to, stage, config.to_dict(), tracking or {}, self.local)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "split": split, "step": step, "time": time.time(), **metrics}
        with writing(self.path, "metrics", then=RESUME_LATER):
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for name, value in metrics.items():
                    if isinstance(value, int | float):
                        self.writer.add_scalar(f"{split}/{name}", value, step)
                self.writer.flush()
        for tracker in self.trackers:
            tracker.log(step, split, metrics)
        self.sync(tensorboard=time.monotonic() - self.synced_at >= SYNC_S)

    def sync(self, tensorboard: bool = True) -> None:
        """Upload metrics.jsonl, the tracker ids and TensorBoard's files (nothing to do for a local output_dir)."""
        if not self.enabled:
            return
        for name in SYNCED:
            if (self.local / name).is_file():
                self.location.join(name).upload(self.local / name)
        if tensorboard and (self.local / "tensorboard").is_dir():
            self.location.join("tensorboard").upload(self.local / "tensorboard")
        self.synced_at = time.monotonic()

    def _pull(self) -> None:
        """The files a run resumed on another machine continues (nothing to do for a local output_dir)."""
        for name in SYNCED:
            kept = self.location.join(name)
            if kept.exists():
                kept.download(self.local / name)
            else:
                Path(self.local / name).unlink(missing_ok=True)

    def close(self, finished: bool = True) -> None:
        """`finished=False`: the run stopped early (preempted) and will resume; trackers say so."""
        if self.writer:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close(finished)
        self.trackers = []
        self.sync()
