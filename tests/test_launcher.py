"""The launcher: the Ray Train trainer it builds for a Ray started in this process."""

from __future__ import annotations

import pytest

from rlhf_jobs import launcher


def test_a_joined_cluster_gets_the_stock_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.torch import TorchTrainer

    monkeypatch.setattr(launcher, "_started_here", False)
    assert launcher.trainer_class() is TorchTrainer


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
    trainer._initialize_and_run_controller(callbacks=defaults, scaling_policy=policy)
    assert [type(c) for c in seen["callbacks"]] == [type(c) for c in defaults if not isinstance(c, left_out)]
    policy = seen["scaling_policy"]
    assert isinstance(policy, FixedScalingPolicy) and type(policy) is not FixedScalingPolicy
    policy.after_controller_start(None)  # no AutoscalingCoordinator actor is created
    assert policy._coordinator_client is None
