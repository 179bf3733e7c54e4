"""Reward model: the loss by hand, padding invariance, and a real 2-worker run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_jobs.algorithms.rm import pairwise_loss, score, tokenize_pair
from rlhf_jobs.core.data import RM_SCHEMA, read_records
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import load_reward_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_pairwise_loss_matches_hand_computation() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log σ(1) = log(1 + e^-1) = 0.313262; -log σ(-1) = log(1 + e) = 1.313262
    assert pairwise_loss(chosen, rejected).item() == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-6)
    # a margin of 0.5 on the first pair: -log σ(0.5) = log(1 + e^-0.5) = 0.474077
    margin = torch.tensor([0.5, 0.0])
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx((0.474077 + 1.313262) / 2, abs=1e-6)
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_padded_batch_scores_equal_one_by_one(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_reward_model(str(tiny_model), tokenizer).eval()
    texts = ["Short answer.", "A much longer answer with many more words in it than the first one.", "Mid length."]
    sequences = [tokenizer(t)["input_ids"] for t in texts]
    with torch.no_grad():
        batched = score(model, *pad(sequences, tokenizer.pad_token_id))
        alone = torch.cat([score(model, *pad([s], tokenizer.pad_token_id)) for s in sequences])
    assert batched.shape == (3,)
    assert torch.allclose(batched, alone, atol=1e-5)


def test_pairs_share_the_prompt_format(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    pair = tokenize_pair({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}, tokenizer, "instruction", 512)
    chosen, rejected = (tokenizer.decode(pair[k]) for k in ("chosen_ids", "rejected_ids"))
    assert chosen.endswith("### Response:\nHello!") and rejected.endswith("### Response:\nGo away.")
    assert chosen[: -len("Hello!")] == rejected[: -len("Go away.")]


@pytest.mark.slow
def test_reward_model_learns_the_preference_and_reloads(rm_checkpoint: Path) -> None:
    marker = json.loads((rm_checkpoint / "rlhf_stage.json").read_text())
    assert marker["stage"] == "rm"
    assert marker["metrics"]["eval_accuracy"] >= 0.8, marker["metrics"]
    assert set(marker["reward_stats"]) == {"mean", "std"}

    # Outside the trainer: the saved model, loaded the standard way, ranks held-out pairs as well.
    model = AutoModelForSequenceClassification.from_pretrained(rm_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_checkpoint)
    config = marker["config"]
    records = read_records(str(REPO / config["Dataset"]["train_file"]), RM_SCHEMA)
    from rlhf_jobs.core.data import load_splits

    _, held_out = load_splits(config["Dataset"]["train_file"], None, config["Dataset"]["validation_split_percentage"],
                              RM_SCHEMA, config["Training"]["seed"])
    assert len(records) > len(held_out)
    correct = 0
    with torch.no_grad():
        for record in held_out:
            pair = tokenize_pair(record, tokenizer, "instruction", config["Dataset"]["max_length"])
            ids, mask = pad([pair["chosen_ids"], pair["rejected_ids"]], tokenizer.pad_token_id)
            chosen, rejected = score(model, ids, mask).tolist()
            correct += chosen > rejected
    accuracy = correct / len(held_out)
    assert accuracy == pytest.approx(marker["metrics"]["eval_accuracy"], abs=0.05)
