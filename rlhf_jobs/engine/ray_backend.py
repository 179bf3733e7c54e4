"""Ray Train's torch backend, without importing torch in Ray Train's controller process.

`TorchTrainer` hands its `TorchConfig` to the controller actor, and unpickling it there imports
`ray.train.torch.config`, which imports torch: ~3 s of a fresh process on the critical path of every
run's start (the controller starts the workers only after it is up). `LazyTorchConfig` is the same
configuration in a module without torch; the work it does (process group set-up and tear-down, the
CUDA device) runs on the workers, which import torch anyway, through Ray Train's own functions.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig

from rlhf_jobs.core.errors import is_deterministic


@dataclass
class LazyTorchConfig(BackendConfig):
    """`ray.train.torch.TorchConfig`'s fields and behaviour (env:// init), importable without torch."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return LazyTorchBackend

    @property
    def train_func_context(self) -> type:
        return _TorchContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH


class _TorchContext:
    """Runs on each worker around the training function: `TorchConfig`'s (sets the CUDA device)."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        self._inner.__enter__()

    def __exit__(self, *exc: object) -> bool:
        return bool(self._inner.__exit__(*exc))


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _setup_process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class LazyTorchBackend(Backend):
    """`ray.train.torch.config._TorchBackend` for GPUs and CPUs (no TPU), calling its worker functions."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: LazyTorchConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        if backend_config.init_method != "env":
            raise ValueError(f"LazyTorchConfig.init_method: only 'env', not {backend_config.init_method!r}")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_set_distributed_env)
        size = len(worker_group)
        ray.get([
            worker_group.execute_single_async(rank, _setup_process_group, backend=backend, world_rank=rank,
                                              world_size=size, init_method="env://",
                                              timeout_s=backend_config.timeout_s)
            for rank in range(size)
        ])

    def on_shutdown(self, worker_group: Any, backend_config: LazyTorchConfig) -> None:
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        # As Ray's backend: a worker that does not tear down in time is killed with its group.
        with contextlib.suppress(GetTimeoutError):
            ray.get(futures, timeout=timeout_s)


class NoRetryOfDeterministicFailures:
    """Ray Train's failure policy, except that a worker group failed by a deterministic error is not restarted
    (`FailureConfig.max_failures` is for what a restart can get past: a lost node, a killed worker)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def make_decision(self, training_failed_error: Any) -> Any:
        from ray.train.v2._internal.execution.failure_handling import FailureDecision

        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any(is_deterministic(error) for error in failures.values()):
            return FailureDecision.RAISE
        return self.policy.make_decision(training_failed_error)

    def __getattr__(self, name: str) -> Any:  # only for what this class lacks
        if name == "policy" or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.policy, name)
