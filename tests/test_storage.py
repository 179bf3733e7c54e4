# ruff: noqa: F811  (pytest fixtures imported from servers.py)
"""Object storage against a real S3-compatible server (moto's) on loopback: pre-flight errors, final
models published atomically and read back, models downloaded once per node, and real stages that write
to S3, are killed, resume from S3, and feed the next stage from S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, local_config, write_config
from servers import BUCKET, s3_env, s3_server  # noqa: F401  (fixtures)

from rlhf_jobs.cli import main
from rlhf_jobs.core.errors import CheckpointError
from rlhf_jobs.store import storage
from rlhf_jobs.store.checkpoints import require_stage, write_atomically
from rlhf_jobs.store.markers import read_marker


def prefix() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


def write_files(count: int, tag: str):
    def write(directory: Path) -> None:
        directory.mkdir(parents=True)
        for index in range(count):
            (directory / f"part-{index:03d}.bin").write_text(f"{tag}-{index}")
    return write


# ---- pre-flight --------------------------------------------------------------------------------------


def sft_config(tmp_path: Path, tiny_model: Path, **general: str) -> str:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["General"].update(general)
    return str(write_config(tmp_path / "sft.yaml", config))


def test_missing_credentials_fail_in_one_line_naming_the_key(s3_env, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    uri = f"{prefix()}/sft-output"
    start = time.monotonic()
    assert main(["train", "sft", "--config_path", sft_config(tmp_path, tiny_model, output_dir=uri)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: General.output_dir: {uri}: no AWS credentials: set AWS_ACCESS_KEY_ID")
    assert len(err.splitlines()) == 1 and time.monotonic() - start < 10
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()


def test_missing_bucket_fails_in_one_line_naming_the_key(s3_env, tmp_path, tiny_model, capsys):
    uri = "s3://no-such-bucket-here/run/sft"
    assert main(["train", "sft", "--config_path", sft_config(tmp_path, tiny_model, checkpoint_dir=uri)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: General.checkpoint_dir: {uri}: no such bucket 'no-such-bucket-here'"


def test_missing_remote_model_names_the_key(s3_env, tmp_path, tiny_model, capsys):
    uri = f"{prefix()}/nothing-here"
    assert main(["train", "sft", "--config_path", sft_config(tmp_path, tiny_model, base_model=uri)]) == 2
    expected = f"error: General.base_model: {uri}: no model there (no objects under this prefix)"
    assert capsys.readouterr().err.strip() == expected


def test_a_remote_checkpoint_dir_that_is_not_ours_is_refused_before_training(s3_env, tmp_path, tiny_model, capsys):
    """As for a local one: before anything is written, not after training, when the final model would replace it."""
    uri = f"{prefix()}/theirs"
    storage.write_text(f"{uri}/users-file.txt", "keep me")
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=uri)
    config["Training"].update(num_training_workers=1, max_train_steps=2)
    path = str(write_config(tmp_path / "sft.yaml", config))
    assert main(["train", "sft", "--config_path", path, "--in-process"]) == 2
    expected = f"error: General.checkpoint_dir: {uri} is not empty and holds no rlhf_stage.json; refusing to overwrite"
    assert capsys.readouterr().err.strip().startswith(expected)
    assert not (tmp_path / "out").exists(), "nothing written"
    assert storage.read_text(f"{uri}/users-file.txt") == "keep me"


def test_a_remote_input_model_must_be_a_finished_stage_before_training(s3_env, tmp_path, tiny_model, capsys):
    """DPO from an SFT model in S3 that has no marker (an unfinished or foreign upload): refused at pre-flight, as a
    local one is, instead of trained on."""
    uri = f"{prefix()}/not-sft"
    storage.upload_tree(tiny_model, uri)
    config = local_config("dpo", model_name=tiny_model, model_pretrain=uri, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model")
    config["Training"].update(num_training_workers=1, max_train_steps=2)
    path = str(write_config(tmp_path / "dpo.yaml", config))
    assert main(["train", "dpo", "--config_path", path, "--in-process"]) == 2
    expected = (f"error: General.model_pretrain: {uri} has no rlhf_stage.json, so it is not a finished SFT checkpoint; "
                "run the SFT stage first (rlhf-jobs train sft)")
    assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()


# ---- final models ------------------------------------------------------------------------------------


def test_final_model_round_trip_and_replacement(s3_env):
    uri = f"{prefix()}/sft"
    assert write_atomically(uri, write_files(3, "a"), {"stage": "sft"}) == uri
    assert require_stage(uri, "sft", "General.model_pretrain")["stage"] == "sft"
    with pytest.raises(CheckpointError, match="holds a 'sft' checkpoint, expected 'rm'"):
        require_stage(uri, "rm", "General.rm_pretrain")
    first = storage.local_model(uri)
    assert storage.local_model(uri) == first, "downloaded once"
    assert (Path(first) / "part-000.bin").read_text() == "a-0" and read_marker(first)["stage"] == "sft"

    write_atomically(uri, write_files(2, "b"), {"stage": "sft"})
    assert storage.list_dir(uri) == ["part-000.bin", "part-001.bin", "rlhf_stage.json"], "old files are gone"
    second = storage.local_model(uri)
    assert second != first and (Path(second) / "part-000.bin").read_text() == "b-0"


def test_no_marker_means_not_finished_and_not_overwritable(s3_env):
    uri = f"{prefix()}/data"
    storage.write_text(f"{uri}/users-file.txt", "keep me")
    with pytest.raises(CheckpointError, match=r"has no rlhf_stage\.json, so it is not a finished SFT checkpoint"):
        require_stage(uri, "sft", "General.model_pretrain")
    with pytest.raises(CheckpointError, match=r"is not empty and holds no rlhf_stage\.json; refusing"):
        write_atomically(uri, write_files(1, "x"), {"stage": "sft"})
    assert storage.read_text(f"{uri}/users-file.txt") == "keep me"
    with pytest.raises(CheckpointError, match="does not exist; run the SFT stage first"):
        require_stage(f"{prefix()}/missing", "sft", "General.model_pretrain")


def test_a_reader_never_sees_a_marker_beside_half_a_model(s3_env):
    """Replace a 40-file model while a reader polls: whenever a marker is there, so is all of its model."""
    uri = f"{prefix()}/rm"
    write_atomically(uri, write_files(40, "old"), {"stage": "rm", "files": 40})
    seen, done = [], threading.Event()

    def reader() -> None:
        while not done.is_set():
            marker = read_marker(uri)
            names = storage.list_dir(uri)
            if marker is not None and read_marker(uri) == marker:  # the same marker before and after listing
                seen.append((marker["files"], len([n for n in names if n.startswith("part-")])))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        write_atomically(uri, write_files(25, "new"), {"stage": "rm", "files": 25})
    finally:
        done.set()
        thread.join(timeout=30)
    assert seen and all(expected == found for expected, found in seen), seen[:5]
    assert read_marker(uri)["files"] == 25


# ---- real stages ---------------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`rlhf-jobs ...` in its own session (its in-process Ray dies with the process group)."""
    return subprocess.Popen([sys.executable, "-m", "rlhf_jobs.cli", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def saved_steps(output_dir: str) -> list[str]:
    """Resumable checkpoints under output_dir (Ray Train's, or the train-state store's complete ones)."""
    found = []
    for relative, _ in storage._listing(output_dir):
        parts = relative.split("/")
        if parts[-1] == "complete.json" or (parts[0] == "ray_train" and parts[1].startswith("checkpoint_")
                                            and parts[-1] == "train_state.pt"):
            found.append(relative)
    return found


@pytest.mark.slow
def test_stages_write_to_s3_resume_from_it_and_read_from_it(s3_env, tiny_model, tmp_path):
    root = prefix()
    env = {**os.environ, **s3_env, "RLHF_JOBS_PID_DIR": str(tmp_path / "pids")}
    storage.upload_tree(tiny_model, f"{root}/tiny")

    def stage_config(stage: str, base_model: str) -> str:
        config = local_config(stage, base_model=base_model, output_dir=f"{root}/{stage}-output",
                              checkpoint_dir=f"{root}/{stage}")
        config["Training"].update(epochs=1, save_steps=2, logging_steps=1)
        if stage == "rm":
            config["Training"]["max_train_steps"] = 3
        return str(write_config(tmp_path / f"{stage}.yaml", config))

    # SFT from a model in S3; killed (SIGKILL, the whole process group) once a checkpoint is in S3.
    sft = stage_config("sft", f"{root}/tiny")
    first = run_cli(["train", "sft", "--config_path", sft], env, tmp_path / "sft-1.log")
    deadline = time.monotonic() + 300
    while first.poll() is None and not saved_steps(f"{root}/sft-output") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, (tmp_path / "sft-1.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert storage.read_text(f"{root}/sft/rlhf_stage.json") is None

    # The re-run (a fresh cache: another machine) resumes from S3 and publishes the final model there.
    env["RLHF_JOBS_CACHE_DIR"] = str(tmp_path / "other-node-cache")
    second = run_cli(["train", "sft", "--config_path", sft], env, tmp_path / "sft-2.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "sft-2.log").read_text()[-3000:]
    assert "resuming at" in (tmp_path / "sft-2.log").read_text()
    marker = json.loads(storage.read_text(f"{root}/sft/rlhf_stage.json"))
    assert marker["stage"] == "sft"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.list_dir(f"{root}/sft"))
    records = [json.loads(line) for line in storage.read_text(f"{root}/sft-output/metrics.jsonl").splitlines()]
    train_steps = {r["step"] for r in records if r["split"] == "train"}
    assert train_steps == set(range(1, marker["step"] + 1)), "no metrics line lost to the kill"

    # The reward model starts from the SFT model in S3 and writes its own there.
    rm = stage_config("rm", f"{root}/sft")
    third = run_cli(["train", "rm", "--config_path", rm], env, tmp_path / "rm.log")
    assert third.wait(timeout=400) == 0, (tmp_path / "rm.log").read_text()[-3000:]
    assert json.loads(storage.read_text(f"{root}/rm/rlhf_stage.json"))["stage"] == "rm"
    assert storage.read_text(f"{root}/rm-output/metrics.jsonl")


def test_a_broken_newest_checkpoint_in_s3_is_moved_aside_and_the_previous_one_resumed(
    s3_env, tiny_model, tmp_path, capfd, monkeypatch
):
    """The object store is the truth: its truncated shard is set aside there (copied, never deleted), and a run on
    another node resumes from the previous complete checkpoint."""
    root = prefix()
    config = local_config("sft", base_model=tiny_model, output_dir=f"{root}/sft-output", checkpoint_dir=tmp_path / "m")
    config["Training"].update(num_training_workers=1, epochs=1, max_train_steps=5, save_steps=2, logging_steps=1)
    path = str(write_config(tmp_path / "sft.yaml", config))
    assert main(["train", "sft", "--config_path", path, "--in-process", "--stop-at-step", "4"]) == 0
    step = f"{root}/sft-output/checkpoints/step-00000004"
    [shard] = [name for name in storage.list_dir(step) if name.endswith(".distcp")]
    storage.download_file(f"{step}/{shard}", tmp_path / "shard")
    truncated = (tmp_path / "shard").read_bytes()[:100]
    (tmp_path / "shard").write_bytes(truncated)
    storage.upload_file(tmp_path / "shard", f"{step}/{shard}")
    capfd.readouterr()

    monkeypatch.setenv("RLHF_JOBS_CACHE_DIR", str(tmp_path / "other-node-cache"))
    assert main(["train", "sft", "--config_path", path, "--in-process"]) == 0
    out = capfd.readouterr().out
    assert f"[resume] checkpoint {step} is broken: {shard} is 100 bytes, complete.json recorded " in out, out[-3000:]
    assert "resuming at epoch 1, step 2/5" in out
    [kept] = [name for name in storage.list_dir(f"{root}/sft-output/checkpoints") if ".broken-" in name]
    assert kept.startswith("step-00000004.broken-")
    storage.download_file(f"{root}/sft-output/checkpoints/{kept}/{shard}", tmp_path / "kept")
    assert (tmp_path / "kept").read_bytes() == truncated, "nothing deleted"
    assert json.loads((tmp_path / "m" / "rlhf_stage.json").read_text())["step"] == 5


def test_a_full_disk_while_writing_a_final_model_keeps_the_old_one(tmp_path):
    import errno

    from rlhf_jobs.store.storage import DiskFull

    model = tmp_path / "model"
    write_atomically(model, write_files(2, "old"), {"stage": "sft"})

    def disk_fills_up(directory: Path) -> None:
        write_files(1, "new")(directory)
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))

    with pytest.raises(DiskFull, match=rf"^no space left on device at {model} \(writing the final model; [0-9.]+ \w+ "
                                       r"free there\); the training state in General\.output_dir is intact"):
        write_atomically(model, disk_fills_up, {"stage": "sft"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no staging directory left"
    assert (model / "part-001.bin").read_text() == "old-1" and read_marker(model)["stage"] == "sft"
