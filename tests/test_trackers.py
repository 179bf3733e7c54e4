# ruff: noqa: F811  (pytest fixtures imported from servers.py)
"""Trackers (`Training.report_to`): a real local pipeline (SFT -> RM on Ray) reporting to a real MLflow
server (SQLite backend, loopback) and to W&B in offline mode; what each received is checked against
metrics.jsonl. Bad `report_to` values fail in one line before any worker starts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, local_config, write_config
from servers import mlflow_server  # noqa: F401

from rlhf_jobs.cli import main
from rlhf_jobs.store.trackers import flat_params


def sft_config(tmp_path: Path, tiny_model: Path) -> str:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    return str(write_config(tmp_path / "sft.yaml", config))


def test_unknown_tracker_fails_in_one_line(tmp_path: Path, tiny_model: Path, capsys) -> None:
    args = ["train", "sft", "--config_path", sft_config(tmp_path, tiny_model), "--set", "Training.report_to=comet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Training.report_to.0: Input should be 'tensorboard', 'mlflow', 'wandb' or 'none'" in err
    assert not (tmp_path / "out").exists()


def test_none_with_another_tracker_fails(tmp_path: Path, tiny_model: Path, capsys) -> None:
    path = sft_config(tmp_path, tiny_model)
    args = ["train", "sft", "--config_path", path, "--set", "Training.report_to=[none,mlflow]"]
    assert main(args) == 2
    assert "Training.report_to: 'none' cannot be combined with other trackers" in capsys.readouterr().err


def test_missing_package_fails_in_one_line_before_ray(tmp_path: Path, tiny_model: Path) -> None:
    """The CLI in a process where `wandb` cannot be imported (as if not installed)."""
    code = ("import sys; sys.modules['wandb'] = None; from rlhf_jobs.cli import main; "
            f"sys.exit(main(['train', 'sft', '--config_path', {sft_config(tmp_path, tiny_model)!r}, "
            "'--set', 'Training.report_to=[tensorboard,wandb]']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: Training.report_to: wandb needs the wandb package, which is not installed (pip install "
        "'rlhf-jobs[wandb]')"
    ]
    assert not (tmp_path / "out").exists()


# ---- a real pipeline -------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a W&B `.wandb` file (a LevelDB-style log of protobuf records; offline mode writes it)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    position, chunks = header, []
    while position + header <= len(data):
        left = block - position % block
        if left < header:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            position += left
            continue
        payload = data[position + header : position + header + length]
        position += header + length
        chunks = [payload] if kind in (1, 2) else [*chunks, payload]  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL or LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def expected_metrics(output_dir: Path) -> dict[str, dict[int, float]]:
    """`{"train/loss": {step: value}}` from metrics.jsonl: what every tracker must have received."""
    expected: dict[str, dict[int, float]] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name not in ("stage", "split", "step", "time") and isinstance(value, int | float):
                expected.setdefault(f"{record['split']}/{name}", {})[record["step"]] = float(value)
    return expected


@pytest.mark.slow
def test_pipeline_reports_every_metric_to_mlflow_and_wandb(mlflow_server: str, tiny_model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from rlhf_jobs.pipeline.backends.local import LocalBackend
    from rlhf_jobs.pipeline.plan import PipelineOptions, run_pipeline

    experiment = f"test-{tmp_path.name}"
    for name, value in {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": experiment,
                        "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "exp7"
    overrides = ["Training.report_to=[tensorboard,mlflow,wandb]", "Training.epochs=1", "Training.logging_steps=1"]
    run_pipeline(LocalBackend(workdir), PipelineOptions(stages=["sft", "rm"], base_model=str(tiny_model),
                                                        overrides=overrides))

    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment_id])}
    assert set(runs) == {"exp7", "sft", "rm"}
    parent = runs["exp7"]
    assert parent.data.tags["rlhf_jobs.role"] == "pipeline" and parent.info.status == "FINISHED"
    for stage in ("sft", "rm"):
        run = runs[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["rlhf_jobs.stage"] == stage and run.data.tags["rlhf_jobs.group"] == "exp7"
        config = json.loads((workdir / stage / "rlhf_stage.json").read_text())["config"]
        assert run.data.params == flat_params(config), "the run's config as parameters"
        expected = expected_metrics(workdir / f"{stage}-output")
        assert set(run.data.metrics) == set(expected)
        for key, by_step in expected.items():
            got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert got == pytest.approx(by_step), key

        wandb_files = list((workdir / f"{stage}-output" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_files) == 1
        records = list(wandb_records(wandb_files[0]))
        (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run_record.run_group, run_record.job_type, run_record.display_name) == ("exp7", stage, f"exp7-{stage}")
        logged_config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in run_record.config.update}
        assert {key: logged_config[key] for key in config} == config, "the run's config"
        history: dict[str, dict[int, float]] = {}
        for record in records:
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for key, value in row.items():
                    if "/" in key:
                        history.setdefault(key, {})[int(row["step"])] = value
        assert history.keys() == expected.keys()
        for key, by_step in expected.items():
            assert history[key] == pytest.approx(by_step), key
        assert any((workdir / f"{stage}-output" / "tensorboard").iterdir())
    assert os.environ.get("RLHF_JOBS_RUN_GROUP") is None, "the group ends with the pipeline"
