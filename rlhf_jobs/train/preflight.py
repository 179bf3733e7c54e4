"""Checks a stage makes on the driver before anything is written or any Ray worker starts.

Directories (separate, writable), the final model already in `checkpoint_dir` (only this run's
may be replaced), the models the stage starts from (a finished earlier stage; a hub id the hub
answers for, in seconds), and the run's identity in `output_dir` (see `identity.py`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from rlhf_jobs.core.config import StageConfig, TrainingBase
from rlhf_jobs.core.errors import CheckpointError, ConfigError
from rlhf_jobs.core.loading import looks_local
from rlhf_jobs.core.stages import NAMES, get
from rlhf_jobs.store import identity, storage
from rlhf_jobs.store.checkpoints import check_overwritable, require_stage
from rlhf_jobs.store.hub import check_hub_model


def check_directories(config: StageConfig) -> None:
    """checkpoint_dir and output_dir: separate (neither inside the other) and writable."""
    general = config.General
    if storage.location(general.output_dir).mirrored or storage.location(general.checkpoint_dir).mirrored:
        return  # not on this machine's file system: `storage.check_config` checked the object store
    output_dir, checkpoint_dir = Path(general.output_dir).resolve(), Path(general.checkpoint_dir).resolve()
    if output_dir == checkpoint_dir or output_dir in checkpoint_dir.parents or checkpoint_dir in output_dir.parents:
        relation = "are the same directory" if output_dir == checkpoint_dir else "are nested (one inside the other)"
        raise ConfigError(
            f"General.checkpoint_dir ({checkpoint_dir}) and General.output_dir ({output_dir}) {relation}; they must "
            "be separate: the final model replaces checkpoint_dir as a whole, and output_dir holds the training "
            "state a resume needs"
        )
    _check_writable(output_dir, "General.output_dir")
    # The final model is written beside checkpoint_dir, then renamed into place.
    _check_writable(checkpoint_dir.parent, "General.checkpoint_dir", shown=checkpoint_dir)


def _check_writable(path: Path, key: str, shown: Path | None = None) -> None:
    existing = path
    while not existing.exists():
        existing = existing.parent
    shown = shown or path
    if not existing.is_dir():
        raise ConfigError(f"{key}: {shown} cannot be created: {existing} is a file")
    try:
        with tempfile.TemporaryDirectory(prefix=".rlhf-write-test-", dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"{key}: {shown} is not writable: cannot create anything in {existing} ({err.strerror or err}); "
            "choose a writable directory"
        ) from None


def check_models(config: StageConfig) -> None:
    """The models the stage loads: earlier stages' checkpoints are finished; hub ids are reachable or
    cached (fails in seconds, naming the key)."""
    general, stage = config.General, get(config.stage)
    for model in stage.trained:
        key = next(k for k in model.keys if getattr(general, k, None))
        location = getattr(general, key)
        if key in stage.all_inputs:
            marker = require_stage(location, stage.all_inputs[key], f"General.{key}")
            check_finite_metrics(marker, location, f"General.{key}")
        elif not looks_local(location):  # an object-store URI looks local: `storage.check_config` checked it
            check_hub_model(location, f"General.{key}")


def check_finite_metrics(marker: dict[str, Any], location: str, key: str) -> None:
    """A final model whose run recorded NaN or infinite metrics diverged (written before runs stopped at the first
    non-finite loss): later stages refuse it."""
    metrics = marker.get("metrics") or {}
    bad = [f"{name} {value}" for name, value in metrics.items()
           if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        title = get(str(marker.get("stage"))).title if marker.get("stage") in NAMES else "its"
        raise CheckpointError(f"{key}: {location}: its run ended with non-finite metrics ({', '.join(bad)}): it "
                              f"diverged; train the {title} stage again (e.g. with a lower learning_rate)")


def check(config: StageConfig) -> None:
    """The read-only checks: directories, what checkpoint_dir holds, the models the stage starts from."""
    check_directories(config)
    check_overwritable(config.General.checkpoint_dir, stage=config.stage, output_dir=config.General.output_dir)
    check_models(config)


def settle_identity(config: StageConfig, on_config_change: str = "refuse", fresh: bool = False) -> identity.Decision:
    """Resume, refuse, or (restart, fresh) move the old run aside; the last step before training."""
    decision = identity.check(config, on_config_change, fresh)
    for source, target in decision.moved:
        print(f"{'a fresh start' if fresh else 'config changed'}: moved {source} aside to {target} "
              "(nothing deleted)", flush=True)
    return decision


def check_in_process(training: TrainingBase) -> None:
    """`--in-process` runs the stage's one worker in this process (Ray Train's local mode); refuse what it cannot."""
    if os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"--in-process runs the stage in this process, but RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                          "names a Ray cluster to run it on: unset RAY_ADDRESS or drop --in-process")
    if training.num_training_workers != 1:
        raise ConfigError("--in-process runs one worker, in this process: Training.num_training_workers must be 1 "
                          f"(got {training.num_training_workers}); drop --in-process to use Ray Train workers")
    if training.strategy == "fsdp":
        raise ConfigError("--in-process runs one worker, and Training.strategy: fsdp shards a model over several; "
                          "use Training.strategy: ddp (the default) or drop --in-process")
    if training.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--in-process: Training.resources_per_worker asks for a GPU (GPU: "
                              f"{training.resources_per_worker.GPU:g}) but this process sees none "
                              "(torch.cuda.is_available() is False); drop GPU or run where one is visible")
