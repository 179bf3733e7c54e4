"""Worker side of every stage: where this process stands in the group, seeds, threads, progress lines."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.errors import is_deterministic
from rlhf_jobs.core.loading import validate_config


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
    if loop_config.get("in_process") and training.use_gpu:  # no Ray to assign one: the first visible GPU
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = ray.train.torch.get_device()
    worker = Worker(context.get_world_rank(), context.get_world_size(), device)
    return config, worker


class _DeterministicTraceback(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback when the error is one of ours that the driver
    prints as one line (`errors.is_deterministic`); any other error keeps its traceback. Ray Train logs it
    while handling the error, in the thread that raised it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = sys.exc_info()[1]
        return not (str(record.msg).startswith("Error in training function") and error is not None
                    and is_deterministic(error))


def _quiet_report_logs() -> None:
    """Ray Train V2 logs every `report` and checkpoint at INFO, which drowns the progress lines, and the
    traceback of every error, also those the driver prints as one line (`_DeterministicTraceback`).

    The report line comes from a logger named after its source file, hence the path lookup; in local mode
    (`--in-process`) from train_fn_utils' logger.
    """
    import importlib.util

    logger = logging.getLogger("ray.train.v2._internal.util")
    if not any(isinstance(f, _DeterministicTraceback) for f in logger.filters):
        logger.addFilter(_DeterministicTraceback())
    for name in ("storage", "train_fn_utils"):
        logging.getLogger(f"ray.train.v2._internal.execution.{name}").setLevel(logging.WARNING)
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
