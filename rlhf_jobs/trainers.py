"""One entry point for every stage's trainer, imported lazily (torch and Ray load only when training)."""

from __future__ import annotations

import importlib
from typing import Any

from rlhf_jobs.checkpoints import check_overwritable
from rlhf_jobs.config import StageConfig

TRAINER_MODULES = {"sft": "rlhf_jobs.sft", "rm": "rlhf_jobs.rm", "ppo": "rlhf_jobs.ppo"}


def train(config: StageConfig) -> Any:
    """Train a validated stage config; refuses to replace a checkpoint_dir we did not write."""
    check_overwritable(config.General.checkpoint_dir)
    return importlib.import_module(TRAINER_MODULES[config.stage]).train(config)
