"""No non-finite model is certified finished: a run stops at the first NaN/inf loss or gradient norm, with one line
(the step, the value, the likely cause), keeps its last good checkpoint, writes no final model, exits non-zero and
is not restarted by Ray Train; later stages refuse a model with non-finite weights or metrics."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, local_config, write_config

from rlhf_jobs.cli import main
from rlhf_jobs.core.config import SupervisedTraining
from rlhf_jobs.core.errors import TrainingDiverged
from rlhf_jobs.engine.divergence import StepCheck, check_final_weights
from rlhf_jobs.engine.worker import Worker

CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))


def sft_config(tmp_path: Path, tiny_model: Path, **training: object) -> Path:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"] |= {"num_training_workers": 1, "logging_steps": 1, **training}
    return write_config(tmp_path / "sft.yaml", config)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- the check itself ---------------------------------------------------------------------------------------------


def test_a_non_finite_loss_or_gradient_norm_stops_with_the_step_value_and_cause() -> None:
    training = SupervisedTraining(learning_rate=3e-3)
    check = StepCheck("sft", training, CPU, "/runs/sft-output")
    check(1, 12.0, 4.0, [1.5])  # finite: goes on
    with pytest.raises(TrainingDiverged) as raised:
        check(7, float("nan"), 4.0, [1.5])
    assert str(raised.value) == (
        "sft: stopped at step 7: the loss is nan; likely cause: a learning rate too high (Training.learning_rate "
        "0.003), or a bad record in this step's batch. No weight was updated with it: the checkpoints before it are "
        "kept in /runs/sft-output, and no final model was written")
    with pytest.raises(TrainingDiverged, match=r"step 8: the model's gradient norm is inf; likely cause: a learning"):
        check(8, 12.0, 4.0, [math.inf])
    first = StepCheck("rm", training, CPU, "/out")
    with pytest.raises(TrainingDiverged, match=r"step 1: the loss is inf; likely cause: a bad record in the first "
                                               r"step's batch or a broken start model \(it happened before any"):
        first(1, math.inf, 4.0, [1.0])


def test_fp16_leaves_inf_gradients_to_the_loss_scaler_but_not_a_nan_loss() -> None:
    check = StepCheck("sft", SupervisedTraining(mixed_precision="fp16"), CPU, "/out")
    check(3, 12.0, 4.0, [math.inf])  # the scaler skips that step and lowers its scale
    with pytest.raises(TrainingDiverged, match="likely cause: an fp16 overflow"):
        check(4, float("nan"), 4.0, [1.0])


def test_a_final_model_with_non_finite_weights_is_never_written() -> None:
    model = torch.nn.Linear(2, 2)
    check_final_weights(model, "sft", "/out")
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"sft: the trained weights are not finite \(bias holds NaN or inf\)"):
        check_final_weights(model, "sft", "/out")


# ---- real runs ----------------------------------------------------------------------------------------------------


def test_sft_at_a_huge_learning_rate_stops_at_the_first_nan_and_keeps_the_last_checkpoint(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`learning_rate: 1e6`: NaN from step 3 here; before, it trained on to 'final model written', exit 0."""
    config = sft_config(tmp_path, tiny_model, learning_rate=1e6, save_steps=2, max_train_steps=12)
    assert main(["train", "sft", "--config_path", str(config), "--in-process"]) == 1
    error = last_line(capsys.readouterr().err)
    assert re.fullmatch(r"error: sft: stopped at step (\d+): the loss is nan; likely cause: a learning rate too high "
                        r"\(Training\.learning_rate 1e\+06\), or a bad record in this step's batch\. No weight was "
                        rf"updated with it: the checkpoints before it are kept in {tmp_path / 'out'}, and no final "
                        r"model was written", error), error
    step = int(re.search(r"step (\d+)", error).group(1))
    assert not (tmp_path / "model").exists()
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged if r["split"] == "train")
    assert max(r["step"] for r in logged if r["split"] == "train") == step - 1
    kept = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert kept and all((path / "complete.json").is_file() for path in kept)
    assert int(kept[-1].name.removeprefix("step-")) == (step - 1) // 2 * 2


@pytest.mark.slow
def test_a_diverged_run_on_ray_workers_is_not_restarted_and_says_so_last(tiny_model: Path, tmp_path: Path) -> None:
    """Two Ray workers stop at the same step; `max_failures: 2` does not restart the run (it would diverge again);
    the error is the last line of the output (stdout and stderr as a terminal shows them), no traceback."""
    config = sft_config(tmp_path, tiny_model, learning_rate=1e6, max_train_steps=12, num_training_workers=2,
                        max_failures=2)
    process = subprocess.run([sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", str(config)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert process.returncode == 1, process.stdout[-5000:]
    assert re.fullmatch(r"error: sft: stopped at step \d+: the loss is nan; likely cause: a learning rate too high .*",
                        last_line(process.stdout)), process.stdout[-5000:]
    assert process.stdout.count("[sft] eval at step 0:") == 1, process.stdout  # one attempt
    assert "Traceback" not in process.stdout, process.stdout
    assert not (tmp_path / "model").exists()


def test_ppo_stops_at_the_first_nan_update(tiny_model: Path, sft_checkpoint: Path, rm_checkpoint: Path,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = local_config("ppo", model_name=tiny_model, rm_name=tiny_model, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    config["General"] |= {"model_pretrain": str(sft_checkpoint), "rm_pretrain": str(rm_checkpoint)}
    config["Training"] |= {"num_training_workers": 1, "learning_rate": 1e6, "critic_learning_rate": 1e6,
                           "experience_batch_size": 8, "mini_batch_size": 4, "training_iteration": 4,
                           "eval_steps": 100}
    path = write_config(tmp_path / "ppo.yaml", config)
    assert main(["train", "ppo", "--config_path", str(path), "--in-process"]) == 1
    error = last_line(capsys.readouterr().err)
    assert re.fullmatch(r"error: ppo: stopped at iteration \d: the loss is nan; likely cause: a learning rate too "
                        r"high \(Training\.learning_rate 1e\+06, critic_learning_rate 1e\+06\), .*", error), error
    assert not (tmp_path / "model").exists()


# ---- what later stages accept -------------------------------------------------------------------------------------


def test_ppo_refuses_a_reward_model_with_non_finite_weights(tiny_model: Path, sft_checkpoint: Path,
                                                           rm_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A reward model trained into NaN before runs stopped at the first NaN (its marker is fine): PPO said
    nothing and died in `generate`."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "rm"
    shutil.copytree(rm_checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    config = local_config("ppo", model_name=tiny_model, rm_name=tiny_model, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    config["General"] |= {"model_pretrain": str(sft_checkpoint), "rm_pretrain": str(broken)}
    config["Training"] |= {"num_training_workers": 1, "training_iteration": 1}
    assert main(["train", "ppo", "--config_path", str(write_config(tmp_path / "ppo.yaml", config)),
                 "--in-process"]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: {broken}: its weights are not finite (score.weight holds NaN or inf): the run that wrote it "
        "diverged; train it again (e.g. with a lower learning_rate)")
    assert not (tmp_path / "model").exists()


def test_ppo_refuses_a_reward_model_whose_run_recorded_non_finite_metrics(
        tiny_model: Path, sft_checkpoint: Path, rm_checkpoint: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "rm"
    shutil.copytree(rm_checkpoint, broken)
    marker = json.loads((broken / "rlhf_stage.json").read_text())
    marker["metrics"]["eval_loss"] = float("nan")
    (broken / "rlhf_stage.json").write_text(json.dumps(marker))
    config = local_config("ppo", model_name=tiny_model, rm_name=tiny_model, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    config["General"] |= {"model_pretrain": str(sft_checkpoint), "rm_pretrain": str(broken)}
    config["Training"]["num_training_workers"] = 1
    assert main(["train", "ppo", "--config_path", str(write_config(tmp_path / "ppo.yaml", config))]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: General.rm_pretrain: {broken}: its run ended with non-finite metrics (eval_loss nan): it diverged; "
        "train the reward model stage again (e.g. with a lower learning_rate)")
    assert not (tmp_path / "out").exists()


def test_an_rm_record_with_a_nan_margin_is_refused_naming_its_line(tiny_model: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lines = (REPO / "examples" / "data" / "sample_rm_data.jsonl").read_text().splitlines()[:20]
    record = json.loads(lines[6])
    lines[6] = json.dumps({**record, "margin": float("nan")})  # json writes NaN, as Python's json reads it
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = local_config("rm", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model",
                          train_file=data)
    config["Training"]["num_training_workers"] = 1
    assert main(["train", "rm", "--config_path", str(write_config(tmp_path / "rm.yaml", config)),
                 "--in-process"]) == 2
    assert last_line(capsys.readouterr().err) == f"error: {data}:7: field 'margin' is NaN: expected a finite number"
    assert not (tmp_path / "out").exists()
