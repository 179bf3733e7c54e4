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


def recording_ppo_loop(record: str, loop_config: dict) -> object:
    """PPO's own training loop, with every rollout's prompts appended to `record` (one JSON line per worker and
    iteration). Pickled by value to the Ray workers, so it patches the worker's own `ppo` module."""
    import json

    import ray.train

    from rlhf_jobs import ppo

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

    from rlhf_jobs import launcher, ppo
    from rlhf_jobs.config import validate_config
    from rlhf_jobs.launcher import RunStopped

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
