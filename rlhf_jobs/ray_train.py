"""Ray Train scaffolding every trainer shares.

Driver side: start (or join) Ray, check resources, run a `TorchTrainer`. Worker side: seeds,
device, optimizer and scheduler by name, checkpoints through `ray.train.report`, and a
rank-0 metrics logger writing `metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.config import StageConfig, TrainingBase, validate_config

OPTIMIZER_TABLE: dict[str, type[torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
STATE_FILE = "train_state.pt"
RUN_NAME = "ray_train"


class ResourceError(RuntimeError):
    """The Ray cluster cannot hold the workers the config asks for."""


# ---- driver side ---------------------------------------------------------------------------------


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


# ---- worker side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """Where this training process stands in the worker group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_worker(loop_config: dict[str, Any]) -> tuple[StageConfig, Worker]:
    """The validated config (paths were checked on the driver), seeded RNGs, device and threads."""
    import ray.train
    import ray.train.torch

    config = validate_config(loop_config["config"], loop_config["stage"], source="<worker>", paths=False)
    _quiet_report_logs()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    context = ray.train.get_context()
    training = config.Training
    if not training.use_gpu:
        torch.set_num_threads(max(1, int(training.resources_per_worker.CPU)))
    seed_everything(training.seed)
    worker = Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    return config, worker


def _quiet_report_logs() -> None:
    """Ray Train V2 logs every `report` and checkpoint at INFO, which drowns the progress lines.

    The report line comes from a logger named after its source file, hence the path lookup.
    """
    import importlib.util

    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(
    model: torch.nn.Module, training: TrainingBase, learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """Optimizer from the fixed table; weight decay on matrices only (not biases or norms)."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return OPTIMIZER_TABLE[training.optimizer](groups, lr=learning_rate or training.learning_rate)


def warmup_steps(training: TrainingBase, total_steps: int) -> int:
    return training.warmup_steps or math.ceil(training.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingBase, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULER_NAMES[training.lr_scheduler],
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(training, total_steps),
        num_training_steps=total_steps,
    )


def autocast(training: TrainingBase, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if training.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if training.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all workers (identity with one worker)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


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


def progress(worker: Worker, stage: str, text: str) -> None:
    """A line on rank 0's real stdout (Ray Train V2 echoes `print` twice through its logger)."""
    if worker.is_main:
        stream = sys.__stdout__ or sys.stdout
        stream.write(f"[{stage}] {text}\n")
        stream.flush()


def batches(loader: Any, skip: int) -> Iterator[Any]:
    """The loader's batches after the first `skip` (resuming inside an epoch)."""
    for index, batch in enumerate(loader):
        if index >= skip:
            yield batch
