"""Driver-side checks before anything is written or any Ray worker starts: whose model is in
checkpoint_dir, separate and writable directories, model paths and hub ids (failing in seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import local_config, write_config

from rlhf_jobs.cli import main
from rlhf_jobs.store.markers import MARKER


def finished_model(tiny_model: Path, directory: Path, stage: str, output_dir: Path) -> Path:
    """A final model as a stage leaves it: the model files and the marker naming stage and run."""
    shutil.copytree(tiny_model, directory)
    marker = {"stage": stage, "config": {"General": {"output_dir": str(output_dir)}}, "written_at": time.time(),
              "run": {"output_dir": str(output_dir.resolve()), "identity": "0123456789abcdef"}}
    (directory / MARKER).write_text(json.dumps(marker))
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def train_sft(tmp_path: Path, tiny_model: Path, capsys, **general: object) -> tuple[int, str]:
    paths = {"base_model": tiny_model, "output_dir": tmp_path / "out", "checkpoint_dir": tmp_path / "model", **general}
    config = local_config("sft", **paths)
    code = main(["train", "sft", "--config_path", str(write_config(tmp_path / "sft.yaml", config))])
    return code, capsys.readouterr().err


def test_a_reward_model_in_checkpoint_dir_is_not_replaced_by_sft(tiny_model: Path, tmp_path: Path, capsys) -> None:
    reward_model = finished_model(tiny_model, tmp_path / "rm", "rm", tmp_path / "rm-output")
    before = snapshot(reward_model)
    code, err = train_sft(tmp_path, tiny_model, capsys, checkpoint_dir=reward_model)
    assert code == 2
    assert f"General.checkpoint_dir: {reward_model} holds the final reward model of the run in {tmp_path}/rm-output" \
        in err
    assert "refusing to replace it with the SFT model" in err
    assert snapshot(reward_model) == before
    assert not (tmp_path / "out").exists(), "refused before anything was written"


def test_a_final_model_of_another_run_is_not_replaced(tiny_model: Path, tmp_path: Path, capsys) -> None:
    other = finished_model(tiny_model, tmp_path / "model", "sft", tmp_path / "other-run")
    before = snapshot(other)
    code, err = train_sft(tmp_path, tiny_model, capsys)
    assert code == 2
    assert f"holds the final SFT model of the run in {tmp_path}/other-run" in err
    assert "not of this run" in err and str(tmp_path / "out") in err
    assert snapshot(other) == before


@pytest.mark.parametrize("checkpoint_dir", ["out", "out/final"])
def test_checkpoint_dir_must_not_be_or_sit_in_output_dir(
    tiny_model: Path, tmp_path: Path, capsys, checkpoint_dir: str
) -> None:
    code, err = train_sft(tmp_path, tiny_model, capsys, checkpoint_dir=tmp_path / checkpoint_dir)
    assert code == 2
    assert "General.checkpoint_dir" in err and "General.output_dir" in err and "must be separate" in err
    assert not (tmp_path / "out").exists()


def test_output_dir_inside_checkpoint_dir_is_refused(tiny_model: Path, tmp_path: Path, capsys) -> None:
    code, err = train_sft(tmp_path, tiny_model, capsys, output_dir=tmp_path / "model" / "state")
    assert code == 2 and "nested" in err


def test_an_output_dir_below_a_file_is_found_before_training(tiny_model: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("")
    code, err = train_sft(tmp_path, tiny_model, capsys, output_dir=tmp_path / "a-file" / "out")
    assert code == 2
    assert f"General.output_dir: {tmp_path}/a-file/out cannot be created: {tmp_path}/a-file is a file" in err


def test_an_unwritable_checkpoint_dir_is_found_before_training(tiny_model: Path, tmp_path: Path, capsys) -> None:
    # /sys refuses new entries even to root; chmod would not stop root, which runs these tests in CI containers.
    code, err = train_sft(tmp_path, tiny_model, capsys, checkpoint_dir="/sys/rlhf-jobs-test/model")
    assert code == 2
    assert "General.checkpoint_dir: /sys/rlhf-jobs-test/model is not writable: cannot create anything in /sys" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_output_dir_is_found_before_training(tiny_model: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = train_sft(tmp_path, tiny_model, capsys, output_dir=locked / "out")
    assert code == 2 and f"General.output_dir: {locked}/out is not writable" in err


# ---- model paths ----------------------------------------------------------------------------------------


def test_a_missing_relative_model_path_is_not_taken_for_a_hub_id(
    tiny_model: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, err = train_sft(tmp_path, tiny_model, capsys, base_model="runs/tiny-model")
    assert code == 2
    assert "General.base_model: no such model directory: runs/tiny-model" in err
    assert "rlhf-jobs tiny-model --output runs/tiny-model" in err


def test_a_folder_that_is_not_a_model_is_one_complete_message(tiny_model: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("train a model")
    code, err = train_sft(tmp_path, tiny_model, capsys, base_model=folder)
    assert code == 2
    assert f"General.base_model: {folder} is a directory but not a Hugging Face model: no config.json" in err
    assert "tokenizer" in err and err.count("\n") == 1


def cli(tmp_path: Path, config: dict, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`rlhf-jobs train sft` in a fresh process, with an empty Hugging Face cache."""
    path = write_config(tmp_path / "sft.yaml", config)
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", str(path)],
                             cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    return process, time.perf_counter() - start


@pytest.mark.parametrize("name", ["EleutherAI/gpt-j-6b", "runs/tiny-model"])
def test_an_unreachable_hub_fails_in_seconds_naming_the_key(tmp_path: Path, name: str) -> None:
    # Port 9 on loopback refuses the connection: a hub that does not answer, whatever this machine's network.
    config = local_config("sft", base_model=name, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    process, seconds = cli(tmp_path, config, HF_ENDPOINT="http://127.0.0.1:9")
    assert process.returncode == 2, process.stderr[-2000:]
    err = process.stderr
    assert f"General.base_model: '{name}' is not a local directory" in err
    assert "the hub is unreachable" in err and "HF_HUB_OFFLINE=1" in err and "local model directory" in err
    assert seconds < 15, f"took {seconds:.0f} s"  # from_pretrained's retries took about a minute
    assert not (tmp_path / "out").exists()


def test_offline_mode_without_the_model_in_the_cache(tmp_path: Path) -> None:
    config = local_config("sft", base_model="EleutherAI/gpt-j-6b", output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    process, seconds = cli(tmp_path, config, HF_HUB_OFFLINE="1")
    assert process.returncode == 2
    assert "General.base_model: 'EleutherAI/gpt-j-6b'" in process.stderr
    assert "not in the Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)" in process.stderr
    assert seconds < 15




# ---- locations: a `scheme:` that is not a URL the key takes --------------------------------------------


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("output_dir", "s3:/bucket/x", "not a URL: 's3:' is not followed by '//' (expected s3://bucket/prefix)"),
    ("checkpoint_dir", "s3:bucket/x", "not a URL: 's3:' is not followed by '//' (expected s3://bucket/prefix)"),
    ("base_model", "gs://bucket/model", "unsupported storage scheme 'gs'"),
    ("output_dir", "file:///tmp/out", "file: URLs are not taken here; write the local path itself (/tmp/out)"),
    ("checkpoint_dir", "file:model", "not a URL: 'file:' is not followed by '//'"),
    ("output_dir", "s3:///out", "no bucket in the URL"),
    ("train_file", "s3:/bucket/data.jsonl", "not a URL: 's3:' is not followed by '//' (expected e.g. https://"),
    ("validation_file", "foo://host/data.jsonl", "unknown URL scheme 'foo'"),
], ids=lambda value: value if isinstance(value, str) and ":" in value else None)
def test_a_malformed_or_unknown_url_is_refused_naming_key_and_value(
    key: str, value: str, expected: str, tiny_model: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`s3:/bucket/x` used to train into a local folder named `s3:`."""
    monkeypatch.chdir(tmp_path)
    section = "Dataset" if key.endswith("_file") else "General"
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config[section][key] = value
    code = main(["train", "sft", "--config_path", str(write_config(tmp_path / "sft.yaml", config))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{section}.{key}: {expected}" in err and f"(got '{value}')" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.yaml"], "nothing created"


def test_urls_a_key_takes_still_validate(tiny_model: Path) -> None:
    from rlhf_jobs.core.loading import validate_config

    config = local_config("sft", base_model="./s3:/a-local-folder", output_dir="s3://bucket/run/sft-output",
                          checkpoint_dir="runs/a:b")
    config["Dataset"].update(train_file="https://example.com/data.jsonl",
                             validation_file="simplecache::https://example.com/eval.jsonl")
    validated = validate_config(config, "sft", paths=False)
    assert validated.General.output_dir == "s3://bucket/run/sft-output"
    assert validated.Dataset.validation_file == "simplecache::https://example.com/eval.jsonl"


@pytest.mark.helm
@pytest.mark.skipif(not shutil.which("helm"), reason="needs helm")
@pytest.mark.parametrize("values", [
    "configs.sft.General.output_dir=s3:/bucket/x", "configs.ppo.General.rm_pretrain=s3:bucket/rm",
    "configs.sft.General.base_model=gs://bucket/model", "configs.rm.Dataset.train_file=s3:/bucket/data.jsonl",
])
def test_the_chart_refuses_the_same_locations(values: str) -> None:
    """values.schema.json carries the rule (generated from the config models by `make schema`)."""
    from chart_helpers import render, render_error

    key = values.split("=")[0].replace(".", "/")
    assert f"at '/{key}'" in render_error("rlhf-sft", sets=(values,))
    assert render("rlhf-sft", sets=(values.split("=")[0] + "=s3://bucket/x",))
