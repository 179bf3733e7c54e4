"""Bad input to the command line is one line naming what is wrong (exit code 2), never a traceback, and it is
refused before anything is written; side commands never overwrite a model."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, local_config, write_config

from rlhf_jobs.cli import main


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of a failed command: the last line of stderr, with no traceback before it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- tiny-model: never overwrite ------------------------------------------------------------------------------------


def test_tiny_model_never_replaces_a_finished_model(sft_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """It replaced a finished SFT model's weights and kept its rlhf_stage.json: PPO then took a random model."""
    model = tmp_path / "sft"
    shutil.copytree(sft_checkpoint, model)
    before = digest(model)
    assert main(["tiny-model", "--output", str(model)]) == 2
    error = one_error(capsys)
    assert error.startswith(f"error: --output: {model} is not empty (it holds the final SFT model of the run in ")
    assert error.endswith("); refusing to overwrite it: choose a new directory")
    assert digest(model) == before


def test_tiny_model_refuses_a_file_and_a_non_empty_directory(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """`--output <a file>` printed "written" and wrote nothing."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert main(["tiny-model", "--output", str(file)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: --output: {file} is a file; expected a new directory"
    assert "written" not in captured.out and file.read_text() == "mine"
    assert main(["tiny-model", "--output", str(tiny_model)]) == 2
    assert one_error(capsys) == (f"error: --output: {tiny_model} is not empty (it holds a model); refusing to "
                                 "overwrite it: choose a new directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("1,2\n")
    assert main(["tiny-model", "--output", str(tmp_path / "other")]) == 2
    assert "(it holds 1 file(s): data.csv)" in one_error(capsys)


def test_tiny_model_into_an_empty_directory_and_a_missing_data_file(tmp_path: Path, capsys) -> None:
    assert main(["tiny-model", "--output", str(tmp_path / "m"), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert one_error(capsys) == f"error: --data: {tmp_path / 'missing.jsonl'}: file not found"
    assert not (tmp_path / "m").exists()
    (tmp_path / "empty").mkdir()
    assert main(["tiny-model", "--output", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"tiny model written to {tmp_path / 'empty'}"
    assert (tmp_path / "empty" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left


# ---- records, configs, work directories ---------------------------------------------------------------------------


def test_a_null_response_in_a_record(tiny_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": null}\n')
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model",
                          train_file=data)
    config["Training"]["num_training_workers"] = 1
    assert main(["train", "sft", "--config_path", str(write_config(tmp_path / "c.yaml", config)), "--in-process"]) == 2
    assert one_error(capsys) == f"error: {data}:2: field 'response' is null: expected a string"
    assert not (tmp_path / "out").exists()


def test_max_length_above_the_model_s_positions_is_refused_before_anything_is_written(
        tiny_model: Path, tmp_path: Path, capsys) -> None:
    """It failed inside the worker after recording the run's identity, so the corrected command was refused
    as a changed config."""
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"] |= {"num_training_workers": 1, "max_train_steps": 1}
    config["Dataset"]["max_length"] = 1024
    path = write_config(tmp_path / "c.yaml", config)
    assert main(["train", "sft", "--config_path", str(path), "--in-process"]) == 2
    assert one_error(capsys) == (f"error: Dataset.max_length is 1024 tokens, but General.base_model ({tiny_model}) "
                                 "has 512 positions (max_position_embeddings); lower Dataset.max_length to at most 512")
    assert not (tmp_path / "out").exists()
    assert main(["train", "sft", "--config_path", str(path), "--in-process", "--set", "Dataset.max_length=512"]) == 0
    # `train` ends with one line: how long, the stage's key figures, where the final model is.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = r"eval loss \d\.\d{3} → \d\.\d{3}"
    assert re.fullmatch(rf"sft finished in \d+ s: {figures}; final model: {tmp_path / 'model'}", last), last


def test_ppo_prompt_and_response_above_the_policy_s_positions(tiny_model: Path, sft_checkpoint: Path,
                                                             rm_checkpoint: Path, tmp_path: Path, capsys) -> None:
    config = local_config("ppo", model_name=tiny_model, rm_name=tiny_model, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    config["General"] |= {"model_pretrain": str(sft_checkpoint), "rm_pretrain": str(rm_checkpoint)}
    config["Training"] |= {"num_training_workers": 1, "max_new_tokens": 500}
    assert main(["train", "ppo", "--config_path", str(write_config(tmp_path / "c.yaml", config)),
                 "--in-process"]) == 2
    assert one_error(capsys) == (
        "error: Dataset.max_prompt_length + Training.max_new_tokens = 96 + 500 = 596 tokens, but "
        f"General.model_pretrain ({sft_checkpoint}) has 512 positions (max_position_embeddings); lower them to add up "
        "to at most 512")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["pipeline", "status"])
def test_a_truncated_pipeline_record(command: str, tiny_model: Path, tmp_path: Path, capsys) -> None:
    record = tmp_path / "pipeline.json"
    record.write_text('{"stages": {"sft": {"status": "succeeded", "checkp')
    argv = ["status", "--workdir", str(tmp_path)] if command == "status" else [
        "pipeline", "--workdir", str(tmp_path), "--base-model", str(tiny_model), "--in-process",
        "--config-dir", str(REPO / "configs" / "local"), "--set", "Training.num_training_workers=1"]
    assert main(argv) == 2
    assert one_error(capsys) == (
        f"error: {record}: the pipeline record is damaged (not valid JSON, line 1: Unterminated string starting at); "
        f"nothing was changed: move it aside (mv {record} {record}.damaged) to start a new record, each stage then "
        "resuming from its last checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.json"]


@pytest.mark.parametrize("command", ["pipeline", "status"])
def test_a_workdir_that_is_a_file(command: str, tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "runs"
    workdir.write_text("not a directory")
    assert main([command, "--workdir", str(workdir)]) == 2
    assert one_error(capsys) == f"error: --workdir: {workdir} is a file; expected a pipeline's work directory"


# ---- generate -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive number of tokens, got 0"),
    (["--temperature", "0"], "--temperature: expected a positive number, got 0; for the most likely answer use "
                             "--greedy"),
    (["--num", "-1"], "--num: expected 0 (every prompt) or a positive number of prompts, got -1"),
    (["--output", "{tmp}"], "--output: {tmp} is a directory; expected a file to write the JSON lines to"),
])
def test_generate_options(flags: list[str], expected: str, tmp_path: Path, capsys) -> None:
    """`--num -1` silently took 11 of 12 prompts; the others were tracebacks."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(prompts), *flags]) == 2
    assert one_error(capsys) == "error: " + expected.format(tmp=tmp_path)


def test_bare_status_without_kubernetes_hints_at_workdir(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["status"]) == 2
    error = one_error(capsys)
    assert error.startswith("error: no Kubernetes cluster configured")
    assert error.endswith("; for a local pipeline: rlhf-jobs status --workdir DIR (the pipeline's default: "
                          "runs/pipeline)")

