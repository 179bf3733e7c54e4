"""Supervised fine-tuning: next-token loss on the response tokens only.

Each record becomes `[BOS] prompt + response + EOS` (BOS where the tokenizer adds one, as
Llama's does, or where a chat template writes it; never twice). Labels are the token ids where
the token starts inside the response, and -100 for BOS, the prompt and the padding, so the model
learns to answer, not to repeat the template.
The boundary comes from character offsets, never from searching for template tokens (which can
also occur inside the prompt). The loss is summed over label tokens; the shared loop divides by
the label tokens of the whole optimizer step.

A micro-batch is packed padding-free (`Training.padding_free`, `rlhf_jobs.engine.packing`) where the model
keeps packed sequences apart, else right-padded. Either way the LM head runs only at the positions
that predict a label (`logits_to_keep`), not at the prompt and padding positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_jobs.algorithms import supervised
from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.data import SFT_SCHEMA
from rlhf_jobs.core.errors import DataError
from rlhf_jobs.core.prompts import join_response, record_prompt
from rlhf_jobs.engine import packing
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import load_causal_lm, load_tokenizer, split_bos
from rlhf_jobs.engine.sharding import load_dtype
from rlhf_jobs.engine.worker import Worker

IGNORE_INDEX = -100


def tokenize_sft(record: dict[str, Any], tokenizer: Any, style: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels of one record; labels are -100 on the prompt."""
    prompt = record_prompt(record, style, tokenizer)
    text = join_response(prompt, record["response"])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    bos, body = split_bos(tokenizer, encoded["input_ids"])  # one BOS, whether the template wrote it or not
    offsets = encoded["offset_mapping"][len(encoded["input_ids"]) - len(body) :]
    input_ids = [*bos, *body, tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(bos)
    labels += [tok if start >= len(prompt) else IGNORE_INDEX for tok, (start, _) in zip(body, offsets, strict=True)]
    labels.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length],
            "truncated": len(input_ids) > max_length}


def next_token_targets(labels: list[int]) -> list[int]:
    """What each position predicts: the next token's label (-100 at the last position)."""
    return [*labels[1:], IGNORE_INDEX]


def pad_batch(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids (pad id) and targets (-100); the attention mask marks real tokens."""
    input_ids, attention_mask = pad([e["input_ids"] for e in examples], pad_token_id)
    targets, _ = pad([next_token_targets(e["labels"]) for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def packed_batch(examples: list[dict[str, list[int]]], plan: packing.RowPlan) -> dict[str, torch.Tensor]:
    """The examples packed into rows (position ids restart per example), targets likewise."""
    rows = plan.pack([e["input_ids"] for e in examples])
    targets = rows.place([next_token_targets(e["labels"]) for e in examples], IGNORE_INDEX)
    return {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "targets": targets}


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of label tokens): next-token cross-entropy where targets != -100,
    the LM head applied at those positions only."""
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX
    logits = packing.lm_logits(model, {k: v for k, v in batch.items() if k != "targets"}, keep)
    loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, keep.sum()


def full_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


def drop_unlabelled(examples: list[dict[str, list[int]]], name: str, max_length: int) -> list[dict[str, list[int]]]:
    """Examples whose prompt filled max_length teach nothing; all of them being so is an error."""
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not kept:
        raise DataError(
            f"{name}: every record's prompt fills Dataset.max_length={max_length}; "
            "no response token is left to train on"
        )
    return kept


class SFTTask:
    stage = "sft"
    packed = False  # until the loop has checked the model (`supervised.choose_packing`; padded batches are exact)
    rows: packing.RowPlan | None = None
    per_position = staticmethod(full_logits)
    lora_task = "CAUSAL_LM"
    items_name = "tokens"
    eval_keys = ("loss_sum", "tokens")

    def prepare(self, config: StageConfig) -> dict[str, Any]:
        dataset = config.Dataset
        data = supervised.prepare_examples(config, SFT_SCHEMA, tokenize_sft)
        names = {"train": dataset.train_file, "eval": dataset.validation_file or "validation split"}
        return {split: drop_unlabelled(examples, names[split], dataset.max_length) if examples is not None else None
                for split, examples in data.items()}

    def build(self, config: StageConfig, worker: Worker) -> tuple[Any, Any]:
        general = config.General
        self.tokenizer = load_tokenizer(general.base_model, general.trust_remote_code)
        model = load_causal_lm(general.base_model, self.tokenizer, general.trust_remote_code,
                               dtype=load_dtype(config.Training))
        return model, self.tokenizer

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if self.packed:
            return packed_batch(examples, self.rows)
        return pad_batch(examples, self.tokenizer.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return response_loss(model, batch)[0]

    def eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        loss_sum, tokens = response_loss(model, batch)
        return {"loss_sum": loss_sum.item(), "tokens": float(tokens)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        eval_loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}

    def marker_extras(self, eval_metrics: dict[str, float]) -> dict[str, Any]:
        return {}


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    return supervised.train_supervised(loop_config, SFTTask())


def train(config: StageConfig, stop_at_step: int | None = None, in_process: bool = False) -> Any:
    return supervised.run(config, SFTTask(), train_loop, stop_at_step, in_process)
