"""Our side: stage configs from the shared settings, run through the real trainers, figures from metrics.jsonl."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from typing import Any

from common import Settings, median, metrics_records

from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.loading import validate_config


def _training(settings: Settings, workers: int) -> dict[str, Any]:
    return {
        "optimizer": "AdamW", "weight_decay": settings.weight_decay, "max_grad_norm": settings.max_grad_norm,
        "seed": settings.seed, "num_training_workers": workers,
        "resources_per_worker": {"CPU": settings.threads},
    }


def _general(model: Path, run_dir: Path) -> dict[str, str]:
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover output_dir would make the trainer resume
    return {"base_model": str(model), "output_dir": str(run_dir / "output"), "checkpoint_dir": str(run_dir / "model")}


def supervised_config(stage: str, settings: Settings, model: Path, train_file: Path, run_dir: Path,
                      workers: int, training: dict[str, Any] | None = None) -> StageConfig:
    """The SFT, RM or DPO config of the benchmark: the same loop, its own steps and learning rate.

    `training`: Training keys to set besides (LoRA, strategy, mixed precision, resources...).
    """
    steps, learning_rate = {
        "sft": (settings.sft_steps, settings.sft_learning_rate), "rm": (settings.rm_steps, settings.rm_learning_rate),
        "dpo": (settings.rm_steps, settings.dpo_learning_rate),
    }[stage]
    general = _general(model, run_dir)
    if stage == "dpo":  # the policy and its frozen reference: the benchmark's model (no SFT model before it)
        general["model_name"] = general.pop("base_model")
    data = {
        "General": general,
        "Dataset": {"train_file": str(train_file), "validation_split_percentage": 0,
                    "max_length": settings.max_length},
        "Training": {
            **_training(settings, workers), "batch_size": settings.stage_batch_size(stage), "epochs": 1,
            "max_train_steps": steps, "learning_rate": learning_rate,
            "lr_scheduler": "cosine", "warmup_ratio": settings.warmup_ratio,
            "logging_steps": settings.logging_steps, **(training or {}),
        },
    }
    return validate_config(data, stage, source="<bench>")


def sft_config(settings: Settings, model: Path, train_file: Path, run_dir: Path, workers: int) -> StageConfig:
    return supervised_config("sft", settings, model, train_file, run_dir, workers)


def rm_config(settings: Settings, model: Path, train_file: Path, run_dir: Path, workers: int) -> StageConfig:
    return supervised_config("rm", settings, model, train_file, run_dir, workers)


def dpo_config(settings: Settings, model: Path, train_file: Path, run_dir: Path, workers: int) -> StageConfig:
    """DPO as TRL's side runs it: the reward model's pairs, batch and steps, beta `dpo_beta`, the sigmoid loss, the
    reference a second frozen copy of the model (as `trl_side.dpo` passes `ref_model`)."""
    return supervised_config("dpo", settings, model, train_file, run_dir, workers,
                             {"beta": settings.dpo_beta, "loss_type": "sigmoid"})


def ppo_config(settings: Settings, model: Path, train_file: Path, run_dir: Path, workers: int,
               training: dict[str, Any] | None = None) -> StageConfig:
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {
        "General": {"model_name": str(model), "rm_name": str(model), "output_dir": str(run_dir / "output"),
                    "checkpoint_dir": str(run_dir / "model")},
        "Dataset": {"train_file": str(train_file), "validation_split_percentage": 0,
                    "max_prompt_length": settings.max_prompt_length},
        "Training": {
            **_training(settings, workers), "experience_batch_size": settings.ppo_batch_size,
            "mini_batch_size": settings.ppo_mini_batch_size, "ppo_epochs": settings.ppo_epochs,
            "training_iteration": settings.ppo_iterations, "learning_rate": settings.ppo_learning_rate,
            "lr_scheduler": "constant", "kl_coeff": settings.kl_coeff, "kl_estimator": "k1",
            "max_new_tokens": settings.max_new_tokens, "temperature": 1.0, "score_clip": None,
            "missing_eos_penalty": 1.0, "eval_steps": settings.ppo_iterations,  # checkpoint/eval after the timed part
            **(training or {}),
        },
    }
    return validate_config(data, "ppo", source="<bench>")


def grpo_config(settings: Settings, model: Path, train_file: Path, run_dir: Path, workers: int,
                training: dict[str, Any] | None = None) -> StageConfig:
    """GRPO as `trl_side.grpo` runs it: `grpo_prompts` prompts × `num_generations` completions, one update per batch
    (ppo_epochs 1, one minibatch), token-mean loss, group-scaled advantages, clip 0.2, KL (k3) in the loss with
    `grpo_kl_coeff`, `common.length_reward` as the reward function, constant LR."""
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {
        "General": {"model_name": str(model), "output_dir": str(run_dir / "output"),
                    "checkpoint_dir": str(run_dir / "model"),
                    "reward_functions": [f"{Path(__file__).resolve().parent / 'common.py'}:length_reward"]},
        "Dataset": {"train_file": str(train_file), "validation_split_percentage": 0,
                    "max_prompt_length": settings.max_prompt_length},
        "Training": {
            **_training(settings, workers), "experience_batch_size": settings.grpo_prompts // workers,
            "num_generations": settings.num_generations, "ppo_epochs": 1, "advantage_estimator": "grpo",
            "loss_aggregation": "token_mean", "training_iteration": settings.grpo_iterations,
            "learning_rate": settings.grpo_learning_rate, "lr_scheduler": "constant",
            "kl_coeff": settings.grpo_kl_coeff, "kl_in_loss": True, "cliprange": 0.2,
            "max_new_tokens": settings.max_new_tokens, "temperature": 1.0,
            "eval_steps": settings.grpo_iterations,  # checkpoint/eval after the timed part
            **(training or {}),
        },
    }
    return validate_config(data, "grpo", source="<bench>")


def train(config: StageConfig) -> float:
    """Run the stage through `rlhf_jobs.train.train` (Ray Train workers); wall seconds."""
    from rlhf_jobs.train import train as train_stage

    start = time.perf_counter()
    train_stage(config)
    return time.perf_counter() - start


def drop_weights(config: StageConfig) -> None:
    """A finished run's final model and checkpoints, once its metrics are read: at 300M each run holds
    5-8 GB, and `make bench` makes nine of them at that size."""
    output = Path(config.General.output_dir)
    for path in (Path(config.General.checkpoint_dir), output / "checkpoints", output / "ray_train"):
        shutil.rmtree(path, ignore_errors=True)


def train_for_figures(config: StageConfig) -> dict[str, float]:
    """Train a PPO or GRPO run, read its `rl_figures`, then drop its weights."""
    train(config)
    figures = rl_figures(config)
    drop_weights(config)
    return figures


def supervised_rate(config: StageConfig, items: str) -> float:
    """Median `{items}_per_second` of the logging windows after the first (written by supervised.py)."""
    records = metrics_records(Path(config.General.output_dir))
    rates = [r[f"{items}_per_second"] for r in records]
    return median(rates[1:] or rates)


def rl_figures(config: StageConfig) -> dict[str, float]:
    """A PPO or GRPO run's median seconds per iteration (between consecutive metrics records), rollout tokens/s and
    the rollout/update split, first iteration left out."""
    records = metrics_records(Path(config.General.output_dir))
    times = [r["time"] for r in records]
    return {
        "seconds_per_iteration": median([b - a for a, b in itertools.pairwise(times)]),
        "tokens_per_second": median([r["tokens_per_second"] for r in records[1:]]),
        "response_length": median([r["response_length"] for r in records]),
        "rollout_seconds": median([r["time_rollout"] for r in records[1:]] or [float("nan")]),
        "update_seconds": median([r["time_update"] for r in records[1:]] or [float("nan")]),
    }
