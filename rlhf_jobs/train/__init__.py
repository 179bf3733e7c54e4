"""The one way into training: the driver-side checks, then the stage's trainer.

Importing this package loads neither torch nor Ray (the pipeline and the CLI import it to run stages);
the trainer module, and with it torch and Ray, is imported only once the checks have passed.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.stages import get
from rlhf_jobs.store import run_lock, storage, trackers
from rlhf_jobs.train import preflight


def train(config: StageConfig, stop_at_step: int | None = None, on_config_change: str = "refuse",
          fresh: bool = False, in_process: bool = False) -> Any:
    """Train a validated stage config, after the driver-side checks (nothing is written before they pass).

    `stop_at_step`: stop after that optimizer step (PPO: iteration) with a checkpoint, to continue later.
    `on_config_change`: what to do when output_dir holds a run with another config (see identity.py);
    `fresh`: move this run's old output_dir and final model aside even with the same config;
    `in_process`: run the one worker in this process (`preflight.check_in_process`).
    Pre-flight, before Ray starts: object-storage locations usable, trackers installed, directories,
    final and input models (`preflight`); then, holding the output_dir's lock until the run ends (`run_lock`:
    a second run on it is refused), the run's identity and the training.
    """
    if in_process:
        preflight.check_in_process(config.Training)
    storage.check_config(config)
    trackers.check(config.Training.report_to)
    preflight.check(config)  # before importing torch: a bad path or an unreachable hub fails in seconds
    from rlhf_jobs.train.model_checks import check_models

    check_models(config)
    with run_lock.holding(config.General.output_dir):
        preflight.settle_identity(config, on_config_change, fresh)
        trainer = importlib.import_module(get(config.stage).trainer)
        return trainer.train(config, stop_at_step=stop_at_step, in_process=in_process)
