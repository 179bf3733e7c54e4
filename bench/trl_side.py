"""TRL's side: SFTTrainer (completion-only), RewardTrainer, the experimental PPOTrainer, GRPOTrainer and
DPOTrainer, on CPU, fp32.

Same model, records, prompt text, batch size, max length, steps, optimizer (AdamW), learning rate and
schedule as ours; reporting integrations, evaluation and saving off. Each trainer records when
every optimizer step (PPO, GRPO: iteration) ends and what it processed, measured as on our side.

    python bench/trl_side.py grpo --size tiny      # TRL's side of one row alone (figures printed)
    python bench/trl_side.py dpo --size tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    DATA,
    PPO_FILE,
    REPO,
    RM_FILE,
    SIZES,
    Settings,
    build_model,
    length_reward,
    median,
    read_jsonl,
    windowed_rate,
    write_repeated,
)

from rlhf_jobs.core.prompts import join_response, record_prompt
from rlhf_jobs.engine.models import load_causal_lm, load_reward_model, load_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _step_clock() -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall-clock time at the start of training and at the end of each optimizer step."""

        def __init__(self) -> None:
            self.start, self.ends = 0.0, []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    return StepClock()


def _common_args(settings: Settings, output_dir: Path, steps: int, learning_rate: float,
                 batch_size: int) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir), "per_device_train_batch_size": batch_size,
        "max_steps": steps, "learning_rate": learning_rate, "lr_scheduler_type": "cosine",
        "warmup_steps": settings.warmup_ratio,  # below 1: a ratio, rounded up as ours
        "weight_decay": settings.weight_decay,
        "max_grad_norm": settings.max_grad_norm, "optim": "adamw_torch", "seed": settings.seed,
        "logging_steps": settings.logging_steps, "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False,
        "dataloader_num_workers": 0, "disable_tqdm": True, "max_length": settings.max_length,
    }


def sft(settings: Settings, model_dir: Path, train_file: Path, output_dir: Path, loss_type: str | None = None) -> float:
    """Label tokens/s of SFTTrainer with completion-only loss on prompt/completion records.

    TRL's default `loss_type` is "chunked_nll": the LM head runs on the label positions only. "nll"
    computes the logits of every position, as ours does.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer)
    records = read_jsonl(train_file)
    dataset = Dataset.from_list([
        {"prompt": record_prompt(r, "instruction"), "completion": r["response"].strip() + tokenizer.eos_token}
        for r in records
    ])
    clock, counts = _step_clock(), []

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            counts.append(int((inputs["labels"][:, 1:] != -100).sum()))  # the tokens the loss is taken on
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = SFTConfig(**_common_args(settings, output_dir, settings.sft_steps, settings.sft_learning_rate,
                                  settings.stage_batch_size("sft")),
                     completion_only_loss=True, packing=False, dataset_num_proc=None,
                     **({"loss_type": loss_type} if loss_type else {}))
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[clock])
    trainer.train()
    return windowed_rate(clock.ends, clock.start, [float(c) for c in counts], settings.logging_steps)


def rm(settings: Settings, model_dir: Path, train_file: Path, output_dir: Path, disable_dropout: bool = True) -> float:
    """Pairs/s of RewardTrainer on prompt/chosen/rejected records.

    TRL turns the model's dropout off by default (`disable_dropout=True`); our reward model keeps it.
    """
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_reward_model(str(model_dir), tokenizer)
    records = read_jsonl(train_file)
    dataset = Dataset.from_list([
        {"chosen": join_response(record_prompt(r, "instruction"), r["chosen"]),
         "rejected": join_response(record_prompt(r, "instruction"), r["rejected"])}
        for r in records
    ])
    clock, counts = _step_clock(), []

    class CountingRewardTrainer(RewardTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            counts.append(inputs["input_ids"].size(0) // 2)  # chosen and rejected in one batch
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = RewardConfig(**_common_args(settings, output_dir, settings.rm_steps, settings.rm_learning_rate,
                                     settings.stage_batch_size("rm")),
                        disable_dropout=disable_dropout)
    trainer = CountingRewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                    callbacks=[clock])
    trainer.train()
    return windowed_rate(clock.ends, clock.start, [float(c) for c in counts], settings.logging_steps)


def _lora_config(lora: dict[str, Any] | None) -> Any:
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora.get("alpha", 2 * lora["r"]), target_modules="all-linear",
                      task_type="CAUSAL_LM")


def ppo(settings: Settings, model_dir: Path, train_file: Path, output_dir: Path,
        lora: dict[str, Any] | None = None) -> dict[str, float]:
    """Seconds per iteration and rollout tokens/s of trl.experimental.ppo.PPOTrainer.

    Rollout = from the start of generation to the first PPO minibatch (generation, reference and
    value forwards, reward), as our `time_rollout`; tokens = response tokens up to and including
    the first EOS, as ours. `lora` ({"r": ..., "alpha": ...}): TRL's `peft_config` on the policy,
    whose reference is then the policy with its adapter disabled (its value model stays full).
    """
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    from rlhf_jobs.algorithms.rl.rollout import response_mask, tokenize_prompts

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    policy = load_causal_lm(str(model_dir), tokenizer)
    reference = None if lora else load_causal_lm(str(model_dir), tokenizer)
    reward_model = load_reward_model(str(model_dir), tokenizer)
    value_model = load_reward_model(str(model_dir), tokenizer)
    prompts = tokenize_prompts(read_jsonl(train_file), tokenizer, "instruction", settings.max_prompt_length)
    dataset = Dataset.from_dict({"input_ids": [p["input_ids"] for p in prompts]})

    rollouts: list[dict[str, float]] = []
    original_generation = module.batch_generation

    def timed_generation(model: Any, queries: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        query_responses, logits = original_generation(model, queries, *args, **kwargs)
        response = query_responses[:, queries.size(1) :]
        tokens = response_mask(response, tokenizer.eos_token_id).sum().item()
        rollouts.append({"start": start, "tokens": tokens, "end": 0.0})
        return query_responses, logits

    args = PPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=settings.ppo_batch_size,
        gradient_accumulation_steps=1, num_mini_batches=settings.ppo_batch_size // settings.ppo_mini_batch_size,
        num_ppo_epochs=settings.ppo_epochs, total_episodes=settings.ppo_iterations * settings.ppo_batch_size,
        local_rollout_forward_batch_size=settings.ppo_batch_size, response_length=settings.max_new_tokens,
        temperature=1.0, kl_coef=settings.kl_coeff, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95, missing_eos_penalty=1.0, stop_token="eos", whiten_rewards=False,
        learning_rate=settings.ppo_learning_rate, lr_scheduler_type="constant", optim="adamw_torch",
        weight_decay=settings.weight_decay, seed=settings.seed, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", num_sample_generations=0, use_cpu=True, bf16=False, fp16=False,
        disable_tqdm=True,
    )
    clock = _step_clock()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         callbacks=[clock], peft_config=_lora_config(lora))
    accumulate = trainer.accelerator.accumulate

    def first_update_marks_rollout_end(*args: Any, **kwargs: Any) -> Any:
        if rollouts and not rollouts[-1]["end"]:
            rollouts[-1]["end"] = time.perf_counter()
        return accumulate(*args, **kwargs)

    trainer.accelerator.accumulate = first_update_marks_rollout_end
    module.batch_generation = timed_generation
    try:
        trainer.train()
    finally:
        module.batch_generation = original_generation
    ends = clock.ends
    return {
        "seconds_per_iteration": median([b - a for a, b in itertools.pairwise(ends)]),
        "tokens_per_second": median([r["tokens"] / max(r["end"] - r["start"], 1e-9) for r in rollouts[1:]]),
        "response_length": median([r["tokens"] / settings.ppo_batch_size for r in rollouts]),
    }


def grpo(settings: Settings, model_dir: Path, train_file: Path, output_dir: Path,
         lora: dict[str, Any] | None = None) -> dict[str, float]:
    """Seconds per iteration and rollout tokens/s of GRPOTrainer (HF generate, no vLLM).

    One iteration: `grpo_prompts` prompts × `num_generations` completions of up to `max_new_tokens`, one optimizer
    step on all of them (per_device_train_batch_size = prompts × G completions, gradient_accumulation_steps = 1,
    steps_per_generation = 1, num_iterations = 1), loss "dapo" (token mean over the batch), group-scaled
    advantages, clip 0.2, KL to the reference in the loss with `grpo_kl_coeff` (TRL loads the reference itself
    from `model_dir`; with `lora` it is the policy with its adapter disabled), `common.length_reward` as the
    reward function, dropout off, constant LR. Rollout = TRL's `_generate_and_score_completions` (generation, the
    reference forward, rewards, advantages), as our rollout runs from generation to the first update; tokens =
    completion tokens up to and including the first EOS.
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    policy = load_causal_lm(str(model_dir), tokenizer)
    dataset = Dataset.from_list([{"prompt": record_prompt(r, "instruction")} for r in read_jsonl(train_file)])
    completions = settings.grpo_prompts * settings.num_generations
    rollouts: list[dict[str, float]] = []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            start = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            rollouts.append({"seconds": time.perf_counter() - start, "tokens": int(output["completion_mask"].sum())})
            return output

    args = GRPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=completions, gradient_accumulation_steps=1,
        num_generations=settings.num_generations, steps_per_generation=1, num_iterations=1,
        max_completion_length=settings.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=settings.grpo_kl_coeff, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        max_steps=settings.grpo_iterations, learning_rate=settings.grpo_learning_rate, lr_scheduler_type="constant",
        optim="adamw_torch", weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
        seed=settings.seed, logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = _step_clock()
    trainer = TimedGRPOTrainer(model=policy, reward_funcs=length_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[clock], peft_config=_lora_config(lora))
    trainer.train()
    return {
        "seconds_per_iteration": median([b - a for a, b in itertools.pairwise(clock.ends)]),
        "tokens_per_second": median([r["tokens"] / max(r["seconds"], 1e-9) for r in rollouts[1:]]),
        "response_length": median([r["tokens"] / completions for r in rollouts]),
    }


def dpo_records(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """TRL's standard (non-conversational) preference format from reward-model records: `prompt`, and `chosen` /
    `rejected` such that prompt + completion is the text our stages join (`join_response`); TRL appends EOS."""
    rows = []
    for record in records:
        prompt = record_prompt(record, "instruction")
        rows.append({"prompt": prompt, "chosen": join_response(prompt, record["chosen"])[len(prompt):],
                     "rejected": join_response(prompt, record["rejected"])[len(prompt):]})
    return rows


def dpo(settings: Settings, model_dir: Path, train_file: Path, output_dir: Path, loss_type: str = "sigmoid",
        lora: dict[str, Any] | None = None) -> float:
    """Pairs/s of DPOTrainer on the reward model's records, windows as the other supervised rows.

    Pairs per step `stage_batch_size("dpo")`, `rm_steps` steps, max length `max_length` (TRL: prompt + completion
    cut at the end), beta `dpo_beta`, dropout off (TRL's default). The reference is the same model loaded
    again (with `lora`: the policy with its adapter disabled); chosen and rejected run in one padded forward.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer)
    reference = None if lora else load_causal_lm(str(model_dir), tokenizer)
    dataset = Dataset.from_list(dpo_records(read_jsonl(train_file)))
    clock, counts = _step_clock(), []

    class CountingDPOTrainer(DPOTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            counts.append(inputs["input_ids"].size(0) // 2)  # chosen and rejected in one batch
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = DPOConfig(**_common_args(settings, output_dir, settings.rm_steps, settings.dpo_learning_rate,
                                    settings.stage_batch_size("dpo")),
                     beta=settings.dpo_beta, loss_type=[loss_type], disable_dropout=True, dataset_num_proc=None)
    trainer = CountingDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[clock], peft_config=_lora_config(lora))
    trainer.train()
    return windowed_rate(clock.ends, clock.start, [float(c) for c in counts], settings.logging_steps)


def main() -> None:
    """TRL's side of the GRPO or DPO row alone, at one size (run_all.py runs both sides of the DPO row)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("stage", choices=("grpo", "dpo"))
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = SIZES[args.size]
    torch.set_num_threads(settings.threads)
    work = args.workdir.resolve()
    model = build_model(args.size, work)
    if args.stage == "grpo":
        figures: Any = grpo(settings, model, DATA / PPO_FILE, work / f"grpo-{args.size}-trl")
    else:
        pairs = write_repeated(DATA / RM_FILE, work / "data" / f"dpo-{args.size}.jsonl",
                               settings.rm_steps * settings.stage_batch_size("dpo"))
        figures = {"pairs_per_second": dpo(settings, model, pairs, work / f"dpo-{args.size}-trl")}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
