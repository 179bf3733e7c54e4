"""Driver side of every stage: start (or join) Ray, check resources, run a Ray Train `TorchTrainer`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_jobs.config import StageConfig, TrainingBase

RUN_NAME = "ray_train"


class ResourceError(RuntimeError):
    """The Ray cluster cannot hold the workers the config asks for."""


def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_ray(training: TrainingBase) -> None:
    """Join the cluster in RAY_ADDRESS (KubeRay sets it), else start Ray in this process."""
    import ray

    _quiet_ray_env()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # The dashboard process also serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(include_dashboard=True, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    check_local_resources(training, ray.cluster_resources())


def check_local_resources(training: TrainingBase, available: dict[str, float]) -> None:
    wanted = training.resources_per_worker.ray_resources()
    workers = training.num_training_workers
    for name, amount in wanted.items():
        if workers * amount > available.get(name, 0.0) + 1e-9:
            have = available.get(name, 0.0)
            shown = f"{have / 2**30:.1f} GiB" if name == "memory" else f"{have:g}"
            raise ResourceError(
                f"Training.num_training_workers × resources_per_worker.{name} = {workers} × "
                f"{amount:g} but this machine's Ray has {shown} {name}; lower them, e.g. "
                f"--set Training.resources_per_worker.{name}=... or Training.num_training_workers=..."
            )


def run_trainer(
    config: StageConfig,
    train_loop: Callable[[dict[str, Any]], None],
    data: dict[str, Any] | None = None,
    run_name: str = RUN_NAME,
) -> Any:
    """Run `train_loop` on `num_training_workers` Ray Train workers; resume from `output_dir`.

    `data` (prepared on the driver) reaches every worker through Ray's object store, so
    only the driver needs to reach the data files.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    training = config.Training
    init_ray(training)
    output_dir = Path(config.General.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"stage": config.stage, "config": config.to_dict(), "data": data},
        scaling_config=ScalingConfig(
            num_workers=training.num_training_workers,
            use_gpu=training.use_gpu,
            resources_per_worker=training.resources_per_worker.ray_resources(),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(output_dir),
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:  # an aborted run can return instead of raising
        raise result.error
    return result
