"""Resume and sharding equivalences on real Ray runs (2 workers × 1 CPU, the tiny GPT-2).

- A run stopped mid-epoch (`--stop-at-step`) and run again computes exactly what an uninterrupted
  run computes: the same per-step losses and the same final weights (SFT and PPO). Today's counters
  would pass if the optimizer, schedule, KL coefficient or data position were not restored; these
  comparisons would not.
- FSDP follows DDP's loss curve with the same seeds (SFT and RM), PPO's first iteration matches.
- An FSDP run stopped on 2 workers continues on 1 (and the reverse) from the same step, keeping
  the global batch (gradient accumulation makes up for the missing worker).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import local_config, write_config

from rlhf_jobs.cli import main

pytestmark = pytest.mark.slow
# FSDP vs DDP: the same arithmetic, summed in another order (reduce-scatter vs all-reduce): float32 noise.
SHARDING_TOLERANCE = 1e-4


def records(output_dir: Path, split: str = "train") -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def assert_same_weights(model_dir: Path, reference_dir: Path, rtol: float, atol: float) -> None:
    final, reference = weights(model_dir), weights(reference_dir)
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=rtol, atol=atol, msg=name)


def ppo_config(tmp_path: Path, name: str, policy: Path, sft: Path, rm: Path, **training: object) -> dict:
    config = local_config("ppo", model_name=policy, rm_name=policy, output_dir=tmp_path / name / "out",
                          checkpoint_dir=tmp_path / name / "model")
    config["General"].update(model_pretrain=str(sft), rm_pretrain=str(rm))
    config["Training"].update({"eval_steps": 100, "save_critic": False, **training})
    return config


def run(stage: str, config: dict, path: Path, *args: str) -> None:
    assert main(["train", stage, "--config_path", str(write_config(path, config)), *args]) == 0


def stage_config(stage: str, tmp_path: Path, name: str, base: Path, **training: object) -> dict:
    config = local_config(stage, base_model=base, output_dir=tmp_path / name / "out",
                          checkpoint_dir=tmp_path / name / "model")
    config["Training"].update({"logging_steps": 1, "save_dtype": "float32", **training})
    return config


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_sft_stopped_mid_epoch_and_resumed_equals_uninterrupted(lora, tiny_model: Path, tmp_path: Path) -> None:
    """With LoRA the checkpoint holds only the adapters (and their optimizer state)."""
    settings = {"epochs": 2, "max_train_steps": 9, "save_steps": 100,  # 7 steps per epoch: resume crosses one
                "lora": lora, "learning_rate": 1e-2 if lora else 3e-3}
    whole = stage_config("sft", tmp_path, "whole", tiny_model, **settings)
    run("sft", whole, tmp_path / "whole.yaml")
    split = stage_config("sft", tmp_path, "split", tiny_model, **settings)
    run("sft", split, tmp_path / "split.yaml", "--stop-at-step", "3")
    assert max(records(tmp_path / "split" / "out")) == 3 and not (tmp_path / "split" / "model").exists()
    run("sft", split, tmp_path / "split.yaml")

    expected, resumed = records(tmp_path / "whole" / "out"), records(tmp_path / "split" / "out")
    assert sorted(resumed) == sorted(expected) == list(range(1, 10))
    for step, record in expected.items():  # dropout, data order, optimizer and schedule all restored
        assert resumed[step]["loss"] == pytest.approx(record["loss"], rel=1e-6), step
        assert resumed[step]["learning_rate"] == pytest.approx(record["learning_rate"], rel=1e-9), step
    assert_same_weights(tmp_path / "split" / "model", tmp_path / "whole" / "model", rtol=1e-6, atol=1e-7)


def test_ppo_stopped_and_resumed_equals_uninterrupted(
    tiny_model: Path, sft_checkpoint: Path, rm_checkpoint: Path, tmp_path: Path
) -> None:
    # target_kl: the adaptive KL coefficient must resume too
    configs = {name: ppo_config(tmp_path, name, tiny_model, sft_checkpoint, rm_checkpoint, training_iteration=4,
                                target_kl=0.5, save_dtype="float32") for name in ("whole", "split")}
    run("ppo", configs["whole"], tmp_path / "whole.yaml")
    run("ppo", configs["split"], tmp_path / "split.yaml", "--stop-at-step", "2")
    run("ppo", configs["split"], tmp_path / "split.yaml")
    expected, resumed = records(tmp_path / "whole" / "out"), records(tmp_path / "split" / "out")
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
    for step, record in expected.items():
        for name in ("score_mean", "kl", "kl_coeff", "policy_loss", "value_loss", "explained_variance", "entropy"):
            assert resumed[step][name] == pytest.approx(record[name], rel=1e-5, abs=1e-7), (step, name)
    assert_same_weights(tmp_path / "split" / "model", tmp_path / "whole" / "model", rtol=1e-5, atol=1e-6)


def test_ppo_first_iteration_under_fsdp_matches_ddp(
    tiny_model: Path, sft_checkpoint: Path, rm_checkpoint: Path, tmp_path: Path
) -> None:
    for strategy in ("ddp", "fsdp"):
        config = ppo_config(tmp_path, strategy, tiny_model, sft_checkpoint, rm_checkpoint, training_iteration=1,
                            strategy=strategy)
        run("ppo", config, tmp_path / f"{strategy}.yaml")
    ddp, fsdp = records(tmp_path / "ddp" / "out")[1], records(tmp_path / "fsdp" / "out")[1]
    for name in ("score_mean", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl",
                 "explained_variance", "response_length"):
        assert fsdp[name] == pytest.approx(ddp[name], rel=SHARDING_TOLERANCE, abs=1e-6), name


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_fsdp_follows_the_ddp_loss_curve(stage: str, tiny_model: Path, sft_checkpoint: Path, tmp_path: Path) -> None:
    base = tiny_model if stage == "sft" else sft_checkpoint
    settings = {"epochs": 1, "max_train_steps": 6, "save_steps": 100}
    for strategy in ("ddp", "fsdp"):
        run(stage, stage_config(stage, tmp_path, strategy, base, strategy=strategy, **settings),
            tmp_path / f"{strategy}.yaml")
    ddp, fsdp = records(tmp_path / "ddp" / "out"), records(tmp_path / "fsdp" / "out")
    assert sorted(fsdp) == sorted(ddp) == list(range(1, 7))
    for step in ddp:
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=SHARDING_TOLERANCE), step
    ddp_eval, fsdp_eval = records(tmp_path / "ddp" / "out", "eval"), records(tmp_path / "fsdp" / "out", "eval")
    assert fsdp_eval[6]["eval_loss"] == pytest.approx(ddp_eval[6]["eval_loss"], rel=SHARDING_TOLERANCE)
    # atol 1e-4: Adam turns rounding-level gradient differences (DDP uses the fused AdamW kernel, FSDP's DTensors
    # the foreach one) into steps of up to lr on weights whose gradients are near zero (biases: seen 2.3e-5)
    assert_same_weights(tmp_path / "fsdp" / "model", tmp_path / "ddp" / "model", rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_fsdp_run_continues_on_another_number_of_workers(
    before: int, after: int, tiny_llama: Path, tmp_path: Path
) -> None:
    """Global batch 8 either way: 2 workers × batch 4, or 1 worker × batch 4 × accumulation 2. The
    Llama model has no dropout, so the losses after the resume can match the uninterrupted run's."""
    tiny_model = tiny_llama
    settings = {"epochs": 1, "max_train_steps": 6, "save_steps": 100, "strategy": "fsdp", "batch_size": 4,
                "gradient_accumulation_steps": 2 // before}
    whole = stage_config("sft", tmp_path, "whole", tiny_model, num_training_workers=before, **settings)
    run("sft", whole, tmp_path / "whole.yaml")
    split = stage_config("sft", tmp_path, "split", tiny_model, num_training_workers=before, **settings)
    run("sft", split, tmp_path / "split.yaml", "--stop-at-step", "3")
    split["Training"]["num_training_workers"] = after
    run("sft", split, tmp_path / "split.yaml")
    expected, resumed = records(tmp_path / "whole" / "out"), records(tmp_path / "split" / "out")
    assert sorted(resumed) == sorted(expected) == list(range(1, 7))  # continued at step 4, ended at 6
    for step in range(4, 7):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=SHARDING_TOLERANCE), step
    assert json.loads((tmp_path / "split" / "model" / "rlhf_stage.json").read_text())["step"] == 6


def truncate_shard(step_dir: Path) -> str:
    [shard] = step_dir.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def empty_state_file(step_dir: Path) -> str:
    (step_dir / "state.pt").write_bytes(b"")
    return "state.pt"


@pytest.mark.parametrize("corrupt", [truncate_shard, empty_state_file], ids=["truncated-shard", "empty-state-file"])
def test_a_broken_newest_checkpoint_is_moved_aside_and_the_previous_one_resumed(
    corrupt, tiny_model: Path, tmp_path: Path, capfd
) -> None:
    """A truncated shard or an empty state file used to block every rerun with a traceback. Now the rerun names
    the file, keeps the broken checkpoint (moved aside) and computes what an uninterrupted run computes."""
    settings = {"num_training_workers": 1, "epochs": 1, "max_train_steps": 6, "save_steps": 2}
    whole = stage_config("sft", tmp_path, "whole", tiny_model, **settings)
    run("sft", whole, tmp_path / "whole.yaml", "--in-process")
    split = stage_config("sft", tmp_path, "split", tiny_model, **settings)
    run("sft", split, tmp_path / "split.yaml", "--in-process", "--stop-at-step", "4")
    checkpoints = tmp_path / "split" / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    name = corrupt(checkpoints / "step-00000004")
    broken = {p.name: p.read_bytes() for p in (checkpoints / "step-00000004").iterdir()}
    capfd.readouterr()

    run("sft", split, tmp_path / "split.yaml", "--in-process")
    out = capfd.readouterr().out
    line = next(line for line in out.splitlines() if "is broken" in line)
    assert line.startswith(f"[resume] checkpoint {checkpoints / 'step-00000004'} is broken: {name} ")
    assert "moved it aside to" in line and "resuming from the previous complete one" in line
    assert "resuming at epoch 1, step 2/6" in out
    [kept] = checkpoints.glob("step-00000004.broken-*")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == broken, "nothing deleted"
    expected, resumed = records(tmp_path / "whole" / "out"), records(tmp_path / "split" / "out")
    assert sorted(resumed) == list(range(1, 7))
    for step in (5, 6):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6), step
    assert_same_weights(tmp_path / "split" / "model", tmp_path / "whole" / "model", rtol=1e-6, atol=1e-7)


# ---- a full disk ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MiB tmpfs (root with CAP_SYS_ADMIN only: a real 'No space left on device'); skipped elsewhere, where
    the test below simulates the error at the write call instead."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def checkpoint_files(step_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(step_dir.iterdir())}


def stopped_at_step_2(tiny_model: Path, output_dir: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A 6-step one-worker SFT run stopped after step 2: its config file, checkpoints directory and step 2's files."""
    config = local_config("sft", base_model=tiny_model, output_dir=output_dir, checkpoint_dir=tmp_path / "m")
    config["Training"].update(num_training_workers=1, epochs=1, max_train_steps=6, save_steps=2, logging_steps=1)
    path = tmp_path / "sft.yaml"
    run("sft", config, path, "--in-process", "--stop-at-step", "2")
    checkpoints = output_dir / "checkpoints"
    return path, checkpoints, checkpoint_files(checkpoints / "step-00000002")


def one_error_line(err: str, expected: str) -> str:
    """The only `error:` line, which is the last line, starting with `expected`."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert errors[0].startswith(expected), errors[0]
    return errors[0]


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(small_disk: Path, tiny_model: Path, tmp_path: Path,
                                                               capfd) -> None:
    """It used to be 214 lines and 7 tracebacks that never said 'No space left'."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    path, checkpoints, kept = stopped_at_step_2(tiny_model, small_disk / "out", tmp_path)
    size = sum(map(len, kept.values()))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - size // 2))  # half a checkpoint left free

    full = subprocess.run([sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", str(path),
                           "--in-process"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert "Traceback" not in full.stdout + full.stderr, full.stderr[-3000:]
    line = one_error_line(full.stderr, f"error: no space left on device at {checkpoints / 'step-00000004'} (writing "
                                       "checkpoint step-00000004, about ")
    assert line.endswith("the last complete checkpoint, step-00000002, is intact: free some space, then run the same "
                         "command again to resume from it")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"], "the partial one is removed"
    assert checkpoint_files(checkpoints / "step-00000002") == kept
    assert not (small_disk / "out.lock").exists()

    filler.unlink()
    assert main(["train", "sft", "--config_path", str(path), "--in-process"]) == 0
    assert "resuming at epoch 1, step 2/6" in capfd.readouterr().out
    assert json.loads((tmp_path / "m" / "rlhf_stage.json").read_text())["step"] == 6


def test_a_full_disk_at_the_write_call_is_one_line_too(tiny_model: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    """Where no tmpfs can be mounted: the state file's write fails with ENOSPC half-way (as torch.save does on a
    full disk), and the same line comes out."""
    import errno

    path, checkpoints, kept = stopped_at_step_2(tiny_model, tmp_path / "out", tmp_path)
    save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        if str(f).endswith("step-00000004/state.pt"):
            Path(f).write_bytes(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    capfd.readouterr()
    assert main(["train", "sft", "--config_path", str(path), "--in-process"]) == 2
    one_error_line(capfd.readouterr().err, f"error: no space left on device at {checkpoints / 'step-00000004'} "
                                           "(writing checkpoint step-00000004, about ")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    assert checkpoint_files(checkpoints / "step-00000002") == kept


def _two_ranks_resume_past_a_broken_checkpoint(rank: int, world_size: int, root: str) -> tuple[int, float]:
    from rlhf_jobs.engine.train_state import ModelState, TrainState
    from rlhf_jobs.engine.worker import Worker

    worker = Worker(rank, world_size, torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    tensors = {"model": ModelState(model, torch.optim.AdamW(model.parameters()))}
    store = TrainState(root, worker)
    for step in (2, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        store.save(step, tensors, {"step": step})
    torch.distributed.barrier()
    if rank == 0:
        truncate_shard_of(Path(root) / "checkpoints" / "step-00000004")
    torch.distributed.barrier()
    with torch.no_grad():
        model.weight.zero_()
    extra = store.load(tensors)
    return extra["step"], model.weight.mean().item()


def truncate_shard_of(step_dir: Path) -> None:
    shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:10])


def test_every_rank_resumes_from_the_same_checkpoint_past_a_broken_one(tmp_path: Path) -> None:
    """Rank 0 checks and moves aside; every rank then loads the previous complete checkpoint (no hang)."""
    from process_group import run_processes

    results = run_processes(_two_ranks_resume_past_a_broken_checkpoint, 2, str(tmp_path), timeout=120)
    assert results == [(2, 2.0), (2, 2.0)]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0] == "step-00000002" and names[1].startswith("step-00000004.broken-") and len(names) == 2


def recording_ppo_loop(record: str, loop_config: dict) -> object:
    """PPO's own training loop, with every rollout's prompts appended to `record` (one JSON line per worker and
    iteration). Pickled by value to the Ray workers, so it patches the worker's own `ppo` module."""
    import json

    import ray.train

    from rlhf_jobs.algorithms import ppo

    original = ppo.collect_experience

    def collect(models: Any, prompts: list, training: Any, device: Any) -> Any:
        with open(record, "a") as handle:
            handle.write(json.dumps({"rank": ray.train.get_context().get_world_rank(),
                                     "prompts": [p["text"] for p in prompts]}) + "\n")
        return original(models, prompts, training, device)

    ppo.collect_experience = collect
    try:
        return ppo.train_loop(loop_config)
    finally:
        ppo.collect_experience = original


def served_prompts(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_ppo_stopped_on_two_workers_resumes_on_one_without_serving_a_prompt_twice(
    tiny_model: Path, tmp_path: Path
) -> None:
    """16 prompts, 2 workers × 4 per rollout: 2 iterations per epoch, 4 in 2 epochs. Stopped after iteration 1 on
    2 workers, resumed on 1 (in this process): the one worker takes 8 prompts per rollout (the global batch), the
    run still ends at iteration 4, and each epoch serves every prompt exactly once. Before: the resumed run
    planned 8 iterations and served some prompts of the epoch twice."""
    import functools
    import sys

    import ray.cloudpickle

    from rlhf_jobs.algorithms import ppo
    from rlhf_jobs.core.errors import RunStopped
    from rlhf_jobs.core.loading import validate_config
    from rlhf_jobs.engine import launcher

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea."}) + "\n"
                               for i in range(16)))
    config = local_config("ppo", model_name=tiny_model, rm_name=tiny_model, output_dir=tmp_path / "out",
                          checkpoint_dir=tmp_path / "model", train_file=prompts)
    config["General"].update(model_pretrain=None, rm_pretrain=None)
    config["Dataset"]["validation_split_percentage"] = 0
    config["Training"].update(num_training_workers=2, experience_batch_size=4, mini_batch_size=2, epochs=2,
                              training_iteration=None, ppo_epochs=1, max_new_tokens=4, save_steps=100,
                              eval_steps=100, save_critic=False)
    record = tmp_path / "served.jsonl"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this test module is not importable there
    loop = functools.partial(recording_ppo_loop, str(record))

    def train(in_process: bool = False, stop_at_step: int | None = None) -> None:
        """What `rlhf-jobs train ppo` runs, with the recording loop."""
        stage_config = validate_config(config, "ppo")
        launcher.run_trainer(stage_config, loop, data=ppo.prepare(stage_config), stop_at_step=stop_at_step,
                             in_process=in_process)

    with pytest.raises(RunStopped):
        train(stop_at_step=1)
    first = served_prompts(record)
    assert sorted(r["rank"] for r in first) == [0, 1] and all(len(r["prompts"]) == 4 for r in first)

    config["Training"]["num_training_workers"] = 1
    train(in_process=True)
    resumed = served_prompts(record)[len(first):]
    assert len(resumed) == 3 and all(len(r["prompts"]) == 8 for r in resumed)  # iterations 2, 3, 4
    assert sorted(records(tmp_path / "out")) == [1, 2, 3, 4]
    served = [text for r in first + resumed for text in r["prompts"]]
    every = sorted(set(served))
    assert len(every) == 16
    assert sorted(served[:16]) == sorted(served[16:]) == every  # each epoch: every prompt exactly once
    assert records(tmp_path / "out")[4]["epoch"] == pytest.approx(2.0)
