"""One entry point for every stage's trainer, imported lazily (torch and Ray load only when training)."""

from __future__ import annotations

import importlib
from typing import Any

from rlhf_jobs import storage, trackers
from rlhf_jobs.checkpoints import check_overwritable
from rlhf_jobs.config import StageConfig
from rlhf_jobs.stages import get


def train(config: StageConfig, stop_at_step: int | None = None) -> Any:
    """Train a validated stage config; refuses to replace a checkpoint_dir we did not write.

    `stop_at_step`: stop after that optimizer step (PPO: iteration) with a checkpoint, to continue later.
    Pre-flight, before Ray starts: object-storage locations usable, trackers installed.
    """
    from rlhf_jobs.model_checks import check_models

    storage.check_config(config)
    trackers.check(config.Training.report_to)
    check_overwritable(config.General.checkpoint_dir)
    check_models(config)
    return importlib.import_module(get(config.stage).trainer).train(config, stop_at_step=stop_at_step)
