"""`rlhf-jobs train --in-process`: the stage's one worker runs in the driver (Ray Train's local mode).

It must compute what a one-worker Ray Train run computes (same per-step losses, same final weights,
same PPO metrics), stop and resume the same way (`--stop-at-step`, SIGTERM), and refuse what it cannot
run before anything is written.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, local_config, write_config
from test_preemption import train_steps
from test_resume import assert_same_weights, ppo_config, records, run, stage_config

from rlhf_jobs.cli import main

ONE_WORKER = {"num_training_workers": 1}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_in_process_computes_what_one_ray_worker_computes(stage: str, tiny_model: Path, tmp_path: Path) -> None:
    settings = {**ONE_WORKER, "max_train_steps": 6, "save_steps": 100}
    on_ray = stage_config(stage, tmp_path, "ray", tiny_model, **settings)
    run(stage, on_ray, tmp_path / "ray.yaml")
    here = stage_config(stage, tmp_path, "here", tiny_model, **settings)
    run(stage, here, tmp_path / "here.yaml", "--in-process")

    expected, got = records(tmp_path / "ray" / "out"), records(tmp_path / "here" / "out")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step, record in expected.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=1e-6), step
    assert_same_weights(tmp_path / "here" / "model", tmp_path / "ray" / "model", rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_in_process_ppo_stopped_and_resumed_matches_one_ray_worker(tiny_model: Path, sft_checkpoint: Path,
                                                                    rm_checkpoint: Path, tmp_path: Path) -> None:
    settings = {**ONE_WORKER, "training_iteration": 3, "save_steps": 100, "experience_batch_size": 8,
                "mini_batch_size": 4}
    on_ray = ppo_config(tmp_path, "ray", tiny_model, sft_checkpoint, rm_checkpoint, **settings)
    run("ppo", on_ray, tmp_path / "ray.yaml")
    here = ppo_config(tmp_path, "here", tiny_model, sft_checkpoint, rm_checkpoint, **settings)
    run("ppo", here, tmp_path / "here.yaml", "--in-process", "--stop-at-step", "2")
    assert max(records(tmp_path / "here" / "out")) == 2
    run("ppo", here, tmp_path / "here.yaml", "--in-process")

    expected, got = records(tmp_path / "ray" / "out"), records(tmp_path / "here" / "out")
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for iteration, record in expected.items():
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "entropy"):
            assert got[iteration][key] == pytest.approx(record[key], rel=1e-5, abs=1e-7), (iteration, key)
    assert_same_weights(tmp_path / "here" / "model", tmp_path / "ray" / "model", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("change", "expected"), [
    ({"num_training_workers": 2}, r"--in-process runs one worker.*num_training_workers must be 1 \(got 2\)"),
    ({"strategy": "fsdp"}, r"--in-process runs one worker, and Training\.strategy: fsdp"),
    ({"RAY_ADDRESS": "ray://head:10001"}, r"RAY_ADDRESS=ray://head:10001 names a Ray cluster"),
    ({"resources_per_worker": {"CPU": 1, "GPU": 1}}, r"asks for a GPU .* but this process sees none"),
], ids=["two-workers", "fsdp", "cluster", "no-gpu"])
def test_in_process_refuses_what_it_cannot_run_before_writing_anything(
        change: dict, expected: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"].update(ONE_WORKER)
    for key, value in change.items():
        if key.isupper():
            monkeypatch.setenv(key, value)
        else:
            config["Training"][key] = value
    path = write_config(tmp_path / "sft.yaml", config)
    assert main(["train", "sft", "--config_path", str(path), "--in-process"]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()


@pytest.mark.slow
def test_sigterm_stops_an_in_process_run_after_the_step_and_the_rerun_continues(tiny_model: Path,
                                                                                tmp_path: Path) -> None:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"].update(ONE_WORKER, epochs=1, logging_steps=1, batch_size=4)
    command = [sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path",
               str(write_config(tmp_path / "sft.yaml", config)), "--in-process"]
    log = tmp_path / "first.log"
    first = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    metrics, deadline = tmp_path / "out" / "metrics.jsonl", time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline and not train_steps(metrics):
        time.sleep(0.1)
    assert first.poll() is None, log.read_text()[-3000:]
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(timeout=60) == 75, log.read_text()[-3000:]  # EX_TEMPFAIL: run it again
    stopped = re.search(r"stopped after step (\d+) \(preempted\)", log.read_text())
    assert stopped, log.read_text()[-3000:]
    stopped_at = int(stopped.group(1))
    total = int(re.search(r"(\d+) steps/epoch", log.read_text()).group(1))
    assert stopped_at < total and max(train_steps(metrics)) == stopped_at
    assert (tmp_path / "out" / "checkpoints" / f"step-{stopped_at:08d}" / "complete.json").is_file()

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming at epoch 1, step {stopped_at}/{total}" in second.stdout
    assert sorted(train_steps(metrics)) == list(range(1, total + 1)), "no step lost or redone"
    assert (tmp_path / "model" / "rlhf_stage.json").is_file()
