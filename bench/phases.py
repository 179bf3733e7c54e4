"""What the phase-by-phase profiles (`profile_ppo_step.py`, `profile_grpo_step.py`) share: their arguments and
set-up, the clock of each phase, and the table of medians."""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import REPO, SIZES, Settings, build_model

ITERATION = "iteration (rollout forwards counted once)"


def profile_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch threads (default: the bench's for the size)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--table", action="store_true", help="a torch.profiler table of the last update")
    return parser.parse_args()


def set_up(args: argparse.Namespace) -> tuple[Settings, Path]:
    """The bench's settings for the size, its torch threads and seed, and its model."""
    settings = SIZES[args.size]
    torch.set_num_threads(args.threads or settings.threads)
    torch.manual_seed(settings.seed)
    return settings, build_model(args.size, args.workdir.resolve())


class PhaseTimes:
    """Seconds of each named phase, one entry per iteration."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name].append(time.perf_counter() - start)
        return result

    def end_iteration(self, start: float) -> None:
        """The iteration's wall time since `start`, less this iteration's separately timed rollout forwards (the
        loop computes them again for what the update needs)."""
        self.times[ITERATION].append(
            time.perf_counter() - start - sum(self.times[k][-1] for k in self.times if k.startswith("rollout")))

    def report(self) -> None:
        """Medians over the iterations after the first, in seconds and as a share of the iteration."""
        total = statistics.median(self.times[ITERATION][1:])
        for name, values in self.times.items():
            value = statistics.median(values[1:] or values)
            print(f"{name:<45} {value:8.3f} s  {100 * value / total:5.1f} %")
