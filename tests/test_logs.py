"""Logs keep to what matters: Ray's and transformers' lines a user cannot act on are gone, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import local_config, write_config

from rlhf_jobs.engine.logs import is_noise

# As Ray 2.60 forwards them to the driver (seen at every stage start, and on every resume).
PREEMPTION_LINE = (
    "[2026-11-27 07:13:57,657 E 27200 27252] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'420d473e474dd743a0843f4301000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
SNAPSHOT_LINES = (
    "A run snapshot was found in storage folder at: '/tmp/out/ray_train'",
    "This snapshot contains a list of checkpoints reported via `ray.train.report` and will be loaded. This allows the "
    "latest checkpoint found in the snapshot to be accessible within your training function via "
    "`ray.train.get_checkpoint`.",
    "If you meant to start a brand new training job without any information about previous checkpoints found in this "
    "directory, please configure a new, unique `RunConfig(name)` or delete the existing folder at '/tmp/o/ray_train'.",
)


def test_only_the_listed_lines_are_noise() -> None:
    assert is_noise(PREEMPTION_LINE)
    assert all(is_noise(line) for line in SNAPSHOT_LINES)
    for line in ("[sft] resuming at epoch 1, step 3/3", "Actor with class name: 'RayTrainWorker' died unexpectedly",
                 "core_worker.cc:2465: something else failed", "ValueError: Please configure a new optimizer"):
        assert not is_noise(line)


@pytest.mark.slow
def test_a_reward_model_run_and_its_resume_print_no_noise(sft_checkpoint: Path, tmp_path: Path, capfd) -> None:
    from rlhf_jobs.cli import main

    config = local_config("rm", base_model=sft_checkpoint, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    config["Training"].update(max_train_steps=2)
    path = str(write_config(tmp_path / "rm.yaml", config))
    assert main(["train", "rm", "--config_path", path]) == 0
    first = "".join(capfd.readouterr())
    assert main(["train", "rm", "--config_path", path]) == 0  # finished: resumes and rewrites the final model
    second = "".join(capfd.readouterr())
    assert first.count("the score head (score.weight) is new, initialised randomly") == 1  # rank 0 only
    assert "[rm] resuming at epoch" in second
    for text in (first, second):
        assert "LOAD REPORT" not in text and "PreemptionWatcher" not in text
        assert "RunConfig(name)" not in text and "A run snapshot was found" not in text
