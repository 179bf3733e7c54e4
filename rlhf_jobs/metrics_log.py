"""Rank 0's metrics: JSON lines in `output_dir/metrics.jsonl` and TensorBoard scalars."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    """Rank 0 appends JSON lines to `output_dir/metrics.jsonl` and writes TensorBoard scalars."""

    def __init__(self, output_dir: str, stage: str, enabled: bool) -> None:
        self.stage, self.enabled, self.path = stage, enabled, Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "split": split, "step": step, "time": time.time(), **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
