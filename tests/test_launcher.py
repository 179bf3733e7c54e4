"""The launcher: the Ray Train trainer it builds for a Ray started in this process."""

from __future__ import annotations

import pickle

import pytest

from rlhf_jobs.engine import launcher
from rlhf_jobs.engine.adapters import AdapterError
from rlhf_jobs.engine.ray_backend import NoRetryOfDeterministicFailures


def test_a_joined_cluster_gets_the_stock_trainer_but_for_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's own callbacks and scaling policy; its failure policy does not restart a deterministic failure."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import create_failure_policy
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    monkeypatch.setattr(launcher, "_started_here", False)
    seen: dict = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: seen.update(kwargs))
    trainer = launcher.trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert isinstance(trainer, TorchTrainer)
    defaults, policy = trainer._create_default_callbacks(), create_scaling_policy(trainer.scaling_config)
    failures = create_failure_policy(FailureConfig(max_failures=3))
    trainer._initialize_and_run_controller(callbacks=defaults, scaling_policy=policy, failure_policy=failures)
    assert seen["callbacks"] == defaults and seen["scaling_policy"] is policy
    assert isinstance(seen["failure_policy"], NoRetryOfDeterministicFailures)
    assert seen["failure_policy"].policy is failures


def test_deterministic_failures_are_not_retried_others_are() -> None:
    """A worker's bad input or non-finite loss fails the run at once; a crash is retried up to max_failures."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, create_failure_policy
    from ray.train.v2.api.exceptions import WorkerGroupError

    from rlhf_jobs.core.errors import ConfigError, DataError

    policy = NoRetryOfDeterministicFailures(create_failure_policy(FailureConfig(max_failures=2)))
    pickle.loads(pickle.dumps(policy))  # what Ray does to hand it to its controller
    for error in (launcher.TrainingDiverged("nan"), DataError("f:1: bad"), AdapterError("Training.lora: ...")):
        group = WorkerGroupError("failed", {0: error, 1: RuntimeError("collective aborted")})
        assert policy.make_decision(group) == FailureDecision.RAISE, error
    crash = WorkerGroupError("failed", {0: RuntimeError("segfault")})
    assert [policy.make_decision(crash) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]
    assert isinstance(AdapterError("x"), ConfigError)


def test_an_in_process_ray_starts_no_cluster_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the placement-group cleaner, the Ray Data dataset manager and autoscaler requests; everything
    else Ray Train sets up (backend, accelerators, working directory, metrics, user callbacks) stays."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, create_scaling_policy

    monkeypatch.setattr(launcher, "_started_here", True)
    seen: dict = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: seen.update(kwargs))
    trainer = launcher.trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    defaults = trainer._create_default_callbacks()
    left_out = (DatasetsCallback, PlacementGroupCleanerCallback)
    assert all(any(isinstance(c, kind) for c in defaults) for kind in left_out)  # Ray still adds both

    policy = create_scaling_policy(trainer.scaling_config)
    trainer._initialize_and_run_controller(callbacks=defaults, scaling_policy=policy, failure_policy=None)
    assert [type(c) for c in seen["callbacks"]] == [type(c) for c in defaults if not isinstance(c, left_out)]
    policy = seen["scaling_policy"]
    assert isinstance(policy, FixedScalingPolicy) and type(policy) is not FixedScalingPolicy
    policy.after_controller_start(None)  # no AutoscalingCoordinator actor is created
    assert policy._coordinator_client is None


def test_sharded_cpu_workers_return_freed_memory_to_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP on CPU: glibc's fixed mmap threshold, so the full weights freed after sharding leave the process;
    nothing for DDP or GPUs, and a value the user set is kept."""
    from rlhf_jobs.core.config import SupervisedTraining

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    fsdp = SupervisedTraining(strategy="fsdp", num_training_workers=2)
    assert launcher.worker_env(fsdp) == {"MALLOC_MMAP_THRESHOLD_": "1048576"}
    assert launcher.worker_env(SupervisedTraining(num_training_workers=2)) == {}
    gpu = SupervisedTraining(strategy="fsdp", num_training_workers=2, resources_per_worker={"CPU": 1, "GPU": 1})
    assert launcher.worker_env(gpu) == {}
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert launcher.worker_env(fsdp) == {}


def test_ray_trains_controller_needs_no_torch() -> None:
    """The backend config and failure policy Ray Train unpickles in its controller process import no torch (a fresh
    process pays ~3 s for it on the critical path of every run's start); runs on 1 and 2 workers use them throughout."""
    import subprocess
    import sys

    code = ("import pickle, sys; "
            "from rlhf_jobs.engine.ray_backend import LazyTorchConfig, NoRetryOfDeterministicFailures; "
            "from ray.train import FailureConfig; "
            "from ray.train.v2._internal.execution.failure_handling import create_failure_policy; "
            "data = pickle.dumps((LazyTorchConfig(backend='gloo'), "
            "NoRetryOfDeterministicFailures(create_failure_policy(FailureConfig())))); "
            "sys.modules.pop('rlhf_jobs.engine.ray_backend'); config, _ = pickle.loads(data); config.backend_cls; "
            "print(config.backend, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["gloo", "False"]
