# ruff: noqa: F811  (pytest fixtures imported from servers.py)
"""A changed config never resumes old training state: the run's identity in output_dir, refuse or
restart (moving aside, never deleting), inputs re-trained upstream, the pipeline's use of restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import local_config, write_config
from servers import s3_env, s3_server  # noqa: F401  (fixtures)

from rlhf_jobs.cli import main
from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.store import identity, markers
from rlhf_jobs.store.markers import MARKER


def sft_config(tmp_path: Path, tiny_model: Path, **training: object) -> StageConfig:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"].update(training)
    return validate_config(config, "sft", paths=False)


def started_run(config: StageConfig) -> Path:
    """An output_dir as a run leaves it after its first checkpoint."""
    output_dir = identity.record(config)
    state = output_dir / "ray_train" / "checkpoint_000000"
    state.mkdir(parents=True)
    (state / "train_state.pt").write_bytes(b"weights")
    return output_dir


def test_same_config_resumes_and_resumable_keys_may_change(tiny_model: Path, tmp_path: Path) -> None:
    started_run(sft_config(tmp_path, tiny_model))
    assert identity.check(sft_config(tmp_path, tiny_model)).action == "resume"
    more_workers = sft_config(tmp_path, tiny_model, num_training_workers=1, logging_steps=1, save_steps=3,
                              max_failures=3, resources_per_worker={"CPU": 2}, report_to="none",
                              gradient_checkpointing=True)
    assert identity.check(more_workers).action == "resume"


def test_changed_config_is_refused_with_the_changed_keys(tiny_model: Path, tmp_path: Path) -> None:
    output_dir = started_run(sft_config(tmp_path, tiny_model))
    changed = sft_config(tmp_path, tiny_model, batch_size=4, learning_rate=0.01)
    with pytest.raises(ConfigError) as info:
        identity.check(changed)
    message = str(info.value)
    assert message.startswith(f"General.output_dir: {output_dir} holds the training state of a different config")
    assert "Training.batch_size: 8 -> 4" in message and "Training.learning_rate: 0.003 -> 0.01" in message
    assert "Training.epochs" not in message
    assert "--on-config-change restart" in message and "deletes nothing" in message
    assert (output_dir / "ray_train" / "checkpoint_000000" / "train_state.pt").read_bytes() == b"weights"


def test_restart_moves_the_old_run_aside(tiny_model: Path, tmp_path: Path) -> None:
    output_dir = started_run(sft_config(tmp_path, tiny_model))
    final = tmp_path / "model"
    final.mkdir()
    (final / MARKER).write_text(json.dumps({"stage": "sft", "run": {"output_dir": str(output_dir.resolve())}}))
    decision = identity.check(sft_config(tmp_path, tiny_model, epochs=2), "restart")
    assert decision.action == "restart"
    moved = dict(decision.moved)
    assert set(moved) == {str(output_dir), str(final)}
    assert not output_dir.exists() and not final.exists()
    assert (Path(moved[str(output_dir)]) / "ray_train" / "checkpoint_000000" / "train_state.pt").is_file()
    assert Path(moved[str(final)]).name.startswith("model.replaced-")
    assert identity.check(sft_config(tmp_path, tiny_model, epochs=2)).action == "fresh"


def test_an_output_dir_without_identity_is_not_resumed(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "out" / "ray_train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds files but no rlhf_run\.json"):
        identity.check(sft_config(tmp_path, tiny_model))


def test_a_retrained_input_model_is_a_change(tiny_model: Path, tmp_path: Path) -> None:
    sft_model = tmp_path / "sft"
    sft_model.mkdir()
    (sft_model / MARKER).write_text(json.dumps({"stage": "sft", "written_at": 1_700_000_000.0}))
    config = local_config("rm", base_model=sft_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "rm")
    rm = validate_config(config, "rm", paths=False)
    started_run(rm)
    assert identity.check(rm).action == "resume"
    (sft_model / MARKER).write_text(json.dumps({"stage": "sft", "written_at": time.time()}))
    with pytest.raises(ConfigError, match=r"General\.base_model \(the model there\)\.written_at: 2023-11-1"):
        identity.check(rm)


def test_unknown_on_config_change_value(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected one of refuse, restart"):
        identity.check(sft_config(tmp_path, tiny_model), "delete")


def read_steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if record["split"] == "train"]


@pytest.mark.slow
def test_train_refuses_a_changed_config_and_restarts_on_request(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """The issue's case: a re-run with another batch size resumed the old state and stopped at a step
    count matching neither config. Now it is refused before anything runs, or restarted from scratch."""
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"].update(max_train_steps=3, logging_steps=1)
    path = write_config(tmp_path / "sft.yaml", config)
    assert main(["train", "sft", "--config_path", str(path)]) == 0
    first_steps, first_model = read_steps(tmp_path / "out"), (tmp_path / "model" / MARKER).read_text()
    assert first_steps == [1, 2, 3]

    changed = ["--set", "Training.batch_size=4"]
    assert main(["train", "sft", "--config_path", str(path), *changed]) == 2
    err = capsys.readouterr().err
    assert "Training.batch_size: 8 -> 4" in err and "--on-config-change restart" in err
    assert read_steps(tmp_path / "out") == first_steps and (tmp_path / "model" / MARKER).read_text() == first_model

    assert main(["train", "sft", "--config_path", str(path), *changed, "--on-config-change", "restart"]) == 0
    assert read_steps(tmp_path / "out") == [1, 2, 3], "a fresh run, not a resumed one"
    old_runs = sorted(tmp_path.glob("out.replaced-*"))
    old_models = sorted(tmp_path.glob("model.replaced-*"))
    assert len(old_runs) == len(old_models) == 1
    assert read_steps(old_runs[0]) == first_steps and (old_models[0] / MARKER).read_text() == first_model
    marker = json.loads((tmp_path / "model" / MARKER).read_text())
    assert marker["config"]["Training"]["batch_size"] == 4
    assert marker["run"] == {"output_dir": str((tmp_path / "out").resolve()),
                             "identity": markers.recorded_hash(tmp_path / "out")}


def test_fresh_moves_the_run_aside_even_with_the_same_config(tiny_model: Path, tmp_path: Path) -> None:
    output_dir = started_run(sft_config(tmp_path, tiny_model))
    decision = identity.check(sft_config(tmp_path, tiny_model), fresh=True)
    assert decision.action == "restart" and not output_dir.exists()
    [(source, target)] = decision.moved
    assert source == str(output_dir) and (Path(target) / "ray_train" / "checkpoint_000000").is_dir()


def test_in_object_storage_a_restart_copies_the_run_aside(s3_env, tiny_model: Path, tmp_path: Path) -> None:
    """No rename in S3: the objects are copied under <prefix>.replaced-<time>, then the old prefix is deleted."""
    from servers import BUCKET

    from rlhf_jobs.store import storage

    output_dir = f"s3://{BUCKET}/{tmp_path.name}/out"
    config = local_config("sft", base_model=tiny_model, output_dir=output_dir, checkpoint_dir=tmp_path / "model")
    first = validate_config(config, "sft", paths=False)
    identity.record(first)
    storage.write_text(storage.join(output_dir, "checkpoints", "step-00000002", "state.pt"), "weights")
    config["Training"]["epochs"] = 2
    changed = validate_config(config, "sft", paths=False)
    with pytest.raises(ConfigError, match=r"Training\.epochs: 6 -> 2"):
        identity.check(changed)
    decision = identity.check(changed, "restart")
    [(source, target)] = decision.moved
    assert source == output_dir and target.startswith(f"{output_dir}.replaced-")
    assert not storage.exists(output_dir)
    assert storage.read_text(storage.join(target, "checkpoints", "step-00000002", "state.pt")) == "weights"
    assert markers.read_identity(target) == identity.compute(first)
    assert identity.check(changed).action == "fresh"


# ---- one run at a time per output_dir --------------------------------------------------------------------


def test_a_second_run_on_a_running_output_dir_is_refused_and_the_first_goes_on(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """Two runs on one output_dir used to share it: the second resumed from the first's in-progress checkpoint
    and the first died with a traceback."""
    import subprocess
    import sys

    from conftest import REPO

    from rlhf_jobs.store import run_lock

    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"].update(num_training_workers=1, logging_steps=1, save_steps=2, epochs=3)
    path = str(write_config(tmp_path / "sft.yaml", config))
    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", path,
                              "--in-process"], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    lock = Path(run_lock.location(tmp_path / "out"))
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and not (tmp_path / "out" / "metrics.jsonl").is_file():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert first.poll() is None and json.loads(lock.read_text())["pid"] == first.pid, log.read_text()[-3000:]
        capsys.readouterr()
        assert main(["train", "sft", "--config_path", path, "--in-process"]) == 2
        err = capsys.readouterr().err
        assert first.poll() is None, "the first run was still running while the second was refused"
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: General.output_dir: {tmp_path / 'out'} is in use by another run: pid "
                              f"{first.pid} on host ")
        assert f"rm {lock}" in err
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert "Traceback" not in log.read_text()
    assert read_steps(tmp_path / "out") == list(range(1, read_steps(tmp_path / "out")[-1] + 1)), "one run's steps"
    assert (tmp_path / "model" / MARKER).is_file() and not lock.exists(), "released at the end"
    assert not list(tmp_path.glob("out.replaced-*")), "nothing moved"


def dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(output_dir: Path | str, **owner: object) -> str:
    from rlhf_jobs.store import run_lock, storage

    lock = run_lock.location(output_dir)
    now = time.time()
    storage.write_text(lock, json.dumps({**run_lock._this_machine(), "pid": 1, "command": "rlhf-jobs train sft",
                                         "started_at": now, "renewed_at": now, "token": "theirs", **owner}))
    return lock


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path: Path, capsys) -> None:
    from rlhf_jobs.store import run_lock

    lock = write_lock(tmp_path / "out", pid=dead_pid())
    with run_lock.holding(tmp_path / "out"):
        assert json.loads(Path(lock).read_text())["pid"] == os.getpid()
    assert f"taking over the lock {lock} of a run that is gone (process " in capsys.readouterr().out
    assert not Path(lock).exists()


def test_a_live_lock_of_another_host_is_refused_until_its_lease_runs_out(tmp_path: Path) -> None:
    from rlhf_jobs.store import run_lock

    lock = write_lock(tmp_path / "out", host="node-7", pid=4242, boot_id="other-boot")
    with pytest.raises(run_lock.LockHeld, match=rf"is in use by another run: pid 4242 on host node-7 \(rlhf-jobs "
                                                 rf"train sft\), started .*; wait for that run to end, or if it is "
                                                 rf"gone for good, rm {lock} "):
        run_lock.acquire(tmp_path / "out")
    assert json.loads(Path(lock).read_text())["token"] == "theirs", "untouched"
    write_lock(tmp_path / "out", host="node-7", pid=4242, boot_id="other-boot",
               renewed_at=time.time() - run_lock.LEASE_S - 1)
    with run_lock.holding(tmp_path / "out") as held:
        assert json.loads(Path(lock).read_text())["token"] == held.owner["token"]


def test_the_lock_is_renewed_while_held_and_released_on_failure(tmp_path: Path, monkeypatch) -> None:
    from rlhf_jobs.store import run_lock

    monkeypatch.setattr(run_lock, "RENEW_S", 0.05)
    lock = Path(run_lock.location(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="training crashed"), run_lock.holding(tmp_path / "out") as held:
        started = json.loads(lock.read_text())["renewed_at"]
        deadline = time.monotonic() + 10
        while json.loads(lock.read_text())["renewed_at"] == started:
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.05)
        assert held.owner["renewed_at"] > started
        raise RuntimeError("training crashed")
    assert not lock.exists()


def test_a_running_output_dir_is_not_moved_aside(tiny_model: Path, tmp_path: Path) -> None:
    """A restart (or a pipeline re-running a stage) must not move a live run's output_dir away from it."""
    import subprocess
    import sys

    from rlhf_jobs.store.run_lock import LockHeld

    output_dir = started_run(sft_config(tmp_path, tiny_model))
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(output_dir, pid=owner.pid)
        with pytest.raises(LockHeld, match=f"pid {owner.pid} on host"):
            identity.check(sft_config(tmp_path, tiny_model, epochs=2), "restart")
        assert (output_dir / "ray_train" / "checkpoint_000000" / "train_state.pt").is_file()
    finally:
        owner.kill()
        owner.wait()


def test_in_object_storage_the_lock_is_an_object(s3_env, tmp_path: Path) -> None:
    from servers import BUCKET

    from rlhf_jobs.store import run_lock, storage

    output_dir = f"s3://{BUCKET}/{tmp_path.name}/out"
    with run_lock.holding(output_dir) as held:
        assert held.location == f"{output_dir}.lock"
        assert json.loads(storage.read_text(held.location))["pid"] == os.getpid()
        with pytest.raises(run_lock.LockHeld, match=rf"wait for that run to end, or if it is gone for good, delete "
                                                     rf"the object {output_dir}\.lock "):
            run_lock.acquire(output_dir)  # this process's own run is alive: refused like any other
    assert not storage.exists(f"{output_dir}.lock")
