"""A recorded reference for our GRPO family: TRL 1.12 `GRPOTrainer`'s advantages for a fixed reward matrix and its
loss on fixed inputs, written as JSON (tests/fixtures/trl_grpo_reference.json) for the main tests, without TRL.

Both parts run TRL's own code:
- advantages: `_generate_and_score_completions` on 3 prompts × G = 4 completions with generation replaced by
  fixed completions, two Python reward functions returning a fixed matrix (with `None`s: one function silent on a
  sample, one sample no function scores, a group whose weighted rewards are all equal) and `reward_weights`
  [1.0, 0.5]; for `scale_rewards` group, batch and none, and `multi_objective_aggregation` normalize_then_sum.
  Also recorded: the keyword arguments a reward function receives, and the logged reward metrics.
- loss: `_compute_loss` on 2 prompts (cut to the same token length, so no left padding: TRL passes no
  position_ids) × G = 4 ragged completions, with the policy's per-token log-probs from its forward, fixed
  advantages, old log-probs = the policy's minus fixed offsets (so ratios ≠ 1 and some tokens clip), reference
  log-probs from the reference model, beta 0.04; loss types grpo, bnpo, dr_grpo and dapo, and dapo variants
  (epsilon_high 0.28, KL without TRL's importance-ratio correction, beta 0). Logged metrics (kl, entropy,
  clip_ratio/*) with each.

    .venv-bench/bin/python bench/trl_grpo_reference.py      # writes tests/fixtures/trl_grpo_reference.json

Models: policy = `build_tiny_model(dir, seed=1)`, reference = `build_tiny_model(dir, seed=0)` (as the DPO fixture).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import DATA, PPO_FILE, REPO, RM_FILE, read_jsonl
from trl_dpo_reference import TINY_MODELS, load, tiny_models, versions, write_fixture

from rlhf_jobs.core.prompts import record_prompt

G = 4
REWARD_WEIGHTS = [1.0, 0.5]
# Per completion (3 groups of G): the two functions' rewards; None = no opinion on that sample.
REWARDS_A = [1.0, 0.0, 0.5, 0.25, 0.5, 0.5, 0.5, None, 2.0, -1.0, 2.0, 0.0]
REWARDS_B = [0.0, 1.0, None, 1.0, None, None, None, None, 1.0, 1.0, 0.0, None]
ANSWERS = ["4", "7", "12"]  # an extra dataset column, passed to the reward functions
BETA, EPSILON, EPSILON_HIGH, MAX_COMPLETION_LENGTH = 0.04, 0.2, 0.28, 8
ADVANTAGES = [1.2, -0.8, 0.3, -0.7, 0.0, 1.5, -1.5, 0.0]
COMPLETION_LENGTHS = [6, 3, 8, 1, 5, 8, 2, 7]
ENDS_WITH_EOS = [True, False, False, True, True, False, True, False]
PROMPT_TOKENS = 20


def offset(row: int, position: int) -> float:
    """old log-prob = policy log-prob - offset: ratios exp(offset) of 0.74 to 1.35, some clipped at 1 ± 0.2 only."""
    return 0.1 * ((row + 3 * position) % 7 - 3)


def grpo_trainer(policy: Path, output_dir: Path, rewards: list[Any], reward_kwargs: list[set[str]]) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def reward_a(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        reward_kwargs.append({"prompts", "completions", *kwargs})
        return rewards[0][: len(prompts)]

    def reward_b(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        return rewards[1][: len(prompts)]

    args = GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=len(REWARDS_A), num_generations=G,
                      gradient_accumulation_steps=1, beta=BETA, epsilon=EPSILON,
                      max_completion_length=MAX_COMPLETION_LENGTH, reward_weights=REWARD_WEIGHTS, use_cpu=True,
                      bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", disable_dropout=True,
                      temperature=1.0, disable_tqdm=True)
    dataset = Dataset.from_list([{"prompt": "unused", "answer": "0"}] * 4)
    tokenizer = AutoTokenizer.from_pretrained(str(policy), padding_side="left")
    trainer = GRPOTrainer(model=load(policy, torch.float32), reward_funcs=[reward_a, reward_b], args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch per step here
    trainer.model.train()
    return trainer


def logged(trainer: Any) -> dict[str, float]:
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
    trainer._metrics["train"].clear()
    return metrics


def advantages_part(trainer: Any, prompts: list[str], completion_ids: list[list[int]],
                    reward_kwargs: list[set[str]]) -> dict[str, Any]:
    """TRL's `_generate_and_score_completions` with generation replaced by fixed completions."""
    tokenizer = trainer.processing_class
    inputs = [{"prompt": prompts[i // G], "answer": ANSWERS[i // G]} for i in range(len(completion_ids))]
    prompt_ids = [tokenizer(text=inputs[i]["prompt"])["input_ids"] for i in range(len(inputs))]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

    def fixed_generation(batch_prompts: list[str]) -> tuple[Any, ...]:
        return prompt_ids, completion_ids, None, texts, None, {}, None, []

    trainer._generate = fixed_generation
    variants = {"group": ("group", "sum_then_normalize"), "batch": ("batch", "sum_then_normalize"),
                "none": ("none", "sum_then_normalize"), "normalize_then_sum": ("group", "normalize_then_sum")}
    beta, trainer.beta = trainer.beta, 0.0  # no reference forward needed for advantages
    results = {}
    for name, (scale, aggregation) in variants.items():
        trainer.scale_rewards, trainer.multi_objective_aggregation = scale, aggregation
        trainer._metrics["train"].clear()
        output = trainer._generate_and_score_completions(inputs)
        results[name] = {"scale_rewards": scale, "multi_objective_aggregation": aggregation,
                         "advantages": output["advantages"].tolist(), "metrics": logged(trainer)}
    trainer.beta = beta
    return {"num_generations": G, "reward_weights": REWARD_WEIGHTS,
            "rewards": {"reward_a": REWARDS_A, "reward_b": REWARDS_B}, "answers_per_group": ANSWERS,
            "reward_function_kwargs": sorted(reward_kwargs[0]), "variants": results}


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([row + [0.0] * (width - len(row)) for row in rows])


def loss_part(trainer: Any, reference: Path, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              ) -> dict[str, Any]:
    """TRL's `_compute_loss` on fixed inputs, for each loss type."""
    pad = trainer.processing_class.pad_token_id
    width = max(map(len, completion_ids))
    prompts = torch.tensor([prompt_ids[i // G] for i in range(len(completion_ids))])
    completions = torch.tensor([ids + [pad] * (width - len(ids)) for ids in completion_ids])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in completion_ids])
    input_ids = torch.cat([prompts, completions], dim=1)
    attention = torch.cat([torch.ones_like(prompts), mask], dim=1)
    with torch.no_grad():
        policy_logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, width)[0]
        reference_logps = trainer._get_per_token_logps_and_entropies(load(reference, torch.float32), input_ids,
                                                                     attention, width)[0]
    old = [[policy_logps[i, t].item() - offset(i, t) for t in range(len(ids))] for i, ids in enumerate(completion_ids)]
    ref = [[reference_logps[i, t].item() for t in range(len(ids))] for i, ids in enumerate(completion_ids)]
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
              "completion_mask": mask, "advantages": torch.tensor(ADVANTAGES),
              "old_per_token_logps": padded(old, width), "ref_per_token_logps": padded(ref, width),
              "num_items_in_batch": mask.sum()}
    variants = {
        "grpo": {"loss_type": "grpo"}, "bnpo": {"loss_type": "bnpo"}, "dr_grpo": {"loss_type": "dr_grpo"},
        "dapo": {"loss_type": "dapo"},
        "dapo_epsilon_high_0.28": {"loss_type": "dapo", "epsilon_high": EPSILON_HIGH},
        "dapo_no_kl_ratio_correction": {"loss_type": "dapo", "use_bias_correction_kl": False},
        "dapo_beta_0": {"loss_type": "dapo", "beta": 0.0},
    }
    results = {}
    for name, variant in variants.items():
        trainer.loss_type = variant["loss_type"]
        trainer.epsilon_high = variant.get("epsilon_high", EPSILON)
        trainer.args.use_bias_correction_kl = variant.get("use_bias_correction_kl", True)
        trainer.beta = variant.get("beta", BETA)
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(trainer.model, inputs)
        results[name] = {"loss_type": variant["loss_type"], "beta": trainer.beta, "epsilon_low": trainer.epsilon_low,
                         "epsilon_high": trainer.epsilon_high,
                         "use_bias_correction_kl": trainer.args.use_bias_correction_kl,
                         "loss": loss.item(), "metrics": logged(trainer)}
    return {
        "num_generations": G, "temperature": trainer.temperature, "max_completion_length": MAX_COMPLETION_LENGTH,
        "prompt_ids": prompt_ids, "completion_ids": completion_ids, "advantages": ADVANTAGES,
        "policy_logps": [[policy_logps[i, t].item() for t in range(len(ids))] for i, ids in enumerate(completion_ids)],
        "old_logps": old, "reference_logps": ref, "variants": results,
    }


def fixed_token_ids(tokenizer: Any) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Prompts of the PPO sample file; 2 cut to PROMPT_TOKENS tokens; ragged completions from RM responses."""
    prompts = [record_prompt(r, "instruction") for r in read_jsonl(DATA / PPO_FILE)[:3]]
    prompt_ids = [tokenizer(text=p)["input_ids"][-PROMPT_TOKENS:] for p in prompts[:2]]
    responses = [r["chosen"] for r in read_jsonl(DATA / RM_FILE)[:8]]
    completion_ids = []
    for response, length, eos in zip(responses, COMPLETION_LENGTHS, ENDS_WITH_EOS, strict=True):
        ids = tokenizer(text=response)["input_ids"][: length - 1 if eos else length]
        completion_ids.append([*ids, tokenizer.eos_token_id] if eos else ids)
    return prompts, prompt_ids, completion_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "tests" / "fixtures" / "trl_grpo_reference.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        policy, reference = tiny_models(work)
        reward_kwargs: list[set[str]] = []
        trainer = grpo_trainer(policy, work / "grpo", [REWARDS_A, REWARDS_B], reward_kwargs)
        prompts, prompt_ids, completion_ids = fixed_token_ids(trainer.processing_class)
        advantage_completions = [completion_ids[i % len(completion_ids)] for i in range(len(REWARDS_A))]
        advantages = advantages_part(trainer, prompts, advantage_completions, reward_kwargs)
        loss = loss_part(trainer, reference, prompt_ids, completion_ids)
    fixture = {
        "about": "TRL GRPOTrainer: advantages from a fixed reward matrix, and the loss on fixed inputs per loss type. "
                 "Written by bench/trl_grpo_reference.py.",
        "command": "python bench/trl_grpo_reference.py " + " ".join(sys.argv[1:]),
        "versions": versions(),
        "models": TINY_MODELS,
        "advantages": advantages,
        "loss": loss,
    }
    write_fixture(args.output, fixture)
    for name, value in advantages["variants"].items():
        print(f"advantages {name:20s} {[round(a, 4) for a in value['advantages']]}")
    for name, value in loss["variants"].items():
        print(f"loss {name:28s} {value['loss']:.8f} {value['metrics']}")


if __name__ == "__main__":
    main()
