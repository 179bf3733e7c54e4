"""Reward model: a one-output sequence classifier trained on preference pairs.

Each pair becomes `prompt + chosen` and `prompt + rejected` (the same prompt format as SFT
and PPO, so the model scores what the policy will write). Both go through the model in one
right-padded batch, or packed padding-free (`Training.padding_free`, `rlhf_jobs.engine.packing`) where
the model keeps packed sequences apart; the score is read at the last real token. The loss is the
Bradley-Terry `-logsigmoid(r_chosen - r_rejected - margin)`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhf_jobs.algorithms import supervised
from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.data import RM_SCHEMA
from rlhf_jobs.core.prompts import join_response, record_prompt
from rlhf_jobs.engine import packing
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.distributed import Moments
from rlhf_jobs.engine.models import load_reward_model, load_tokenizer, with_bos_tail
from rlhf_jobs.engine.sharding import load_dtype
from rlhf_jobs.engine.worker import Worker


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) of -log σ(r_chosen - r_rejected - margin) over the pairs."""
    difference = chosen - rejected - (margin if margin is not None else 0.0)
    losses = -F.logsigmoid(difference)
    return losses.sum() if reduction == "sum" else losses.mean()


def tokenize_pair(record: dict[str, Any], tokenizer: Any, style: str, max_length: int) -> dict[str, Any]:
    """Token ids of [BOS] prompt+chosen and [BOS] prompt+rejected (one BOS, whether the tokenizer adds it or a
    chat template writes it), keeping the tail when too long.

    No EOS after the response: the classifier reads the last non-pad token, and with pad == EOS (as
    in most Llama-family setups) an appended EOS would be read as padding anyway. The score is the
    model's output at the last response token, in training and when PPO scores a policy's answer.
    """
    prompt = record_prompt(record, style, tokenizer)

    def ids(response: str) -> list[int]:
        return tokenizer(join_response(prompt, response), add_special_tokens=False)["input_ids"]

    (chosen, chosen_cut), (rejected, rejected_cut) = (with_bos_tail(tokenizer, ids(record[key]), max_length)
                                                      for key in ("chosen", "rejected"))
    return {
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "margin": float(record.get("margin") or 0.0),
        "truncated": chosen_cut or rejected_cut,
    }


def score(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence. The classifier reads its output at the rightmost non-pad token,
    which is the last real token here: sequences carry no EOS (the pad token) of their own."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


class RewardTask:
    stage = "rm"
    packed = False  # until the loop has checked the model (`supervised.choose_packing`; padded batches are exact)
    rows: packing.RowPlan | None = None
    per_position = staticmethod(packing.position_scores)
    lora_task = "SEQ_CLS"
    items_name = "pairs"
    eval_keys = ("pairs", "correct", "margin", "loss", "rewards", "reward_sum", "reward_squares")

    def prepare(self, config: StageConfig) -> dict[str, Any]:
        return supervised.prepare_examples(config, RM_SCHEMA, tokenize_pair)

    def build(self, config: StageConfig, worker: Worker) -> tuple[Any, Any]:
        general = config.General
        self.tokenizer = load_tokenizer(general.base_model, general.trust_remote_code)
        # Dropout off, as TRL's RewardTrainer does: scores are deterministic and training is faster
        # (bench/RESULTS.md: the whole RM throughput gap to TRL was dropout).
        model = load_reward_model(general.base_model, self.tokenizer, general.trust_remote_code, dropout=False,
                                  dtype=load_dtype(config.Training))
        return model, self.tokenizer

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen sequences first, then rejected ones, in one padded batch or packed rows (with where
        each sequence ends)."""
        sequences = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        margin = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        if self.packed:
            rows = self.rows.pack(sequences)
            ends = rows.starts + torch.tensor([len(s) for s in sequences]) - 1
            return {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "ends": ends, "margin": margin}
        input_ids, attention_mask = pad(sequences, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ends" in batch:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            rewards = packing.position_scores(model, inputs).flatten()[batch["ends"]].float()
        else:
            rewards = score(model, batch["input_ids"], batch["attention_mask"])
        pairs = batch["margin"].size(0)
        return rewards[:pairs], rewards[pairs:]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].size(0)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self.scores(model, batch)
        return pairwise_loss(chosen, rejected, batch["margin"], reduction="sum")

    def eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        chosen, rejected = self.scores(model, batch)
        rewards = Moments().add(torch.cat([chosen, rejected]))
        return {
            "pairs": float(chosen.size(0)), "correct": (chosen > rejected).sum().item(),
            "margin": (chosen - rejected).sum().item(),
            "loss": pairwise_loss(chosen, rejected, batch["margin"], reduction="sum").item(),
            "rewards": rewards.count, "reward_sum": rewards.total, "reward_squares": rewards.squares,
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        rewards = Moments(sums["rewards"], sums["reward_sum"], sums["reward_squares"])
        return {
            "eval_loss": sums["loss"] / pairs, "eval_accuracy": sums["correct"] / pairs,
            "eval_margin": sums["margin"] / pairs, "eval_reward_mean": rewards.mean, "eval_reward_std": rewards.std,
        }

    def marker_extras(self, eval_metrics: dict[str, float]) -> dict[str, Any]:
        """The validation reward mean/std, which PPO uses to normalise scores."""
        if "eval_reward_mean" not in eval_metrics:
            return {}
        return {"reward_stats": {"mean": eval_metrics["eval_reward_mean"], "std": eval_metrics["eval_reward_std"]}}


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    return supervised.train_supervised(loop_config, RewardTask())


def train(config: StageConfig, stop_at_step: int | None = None, in_process: bool = False) -> Any:
    return supervised.run(config, RewardTask(), train_loop, stop_at_step, in_process)
