"""Padding-free packing and the label-only LM head compute what padded batches and full logits do:
the same losses and the same gradients, for GPT-2 (absolute positions) and Llama (rotary)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_jobs.algorithms.rm import RewardTask, pairwise_loss, tokenize_pair
from rlhf_jobs.algorithms.sft import IGNORE_INDEX, full_logits, packed_batch, pad_batch, response_loss, tokenize_sft
from rlhf_jobs.core.data import RM_SCHEMA, SFT_SCHEMA, read_records
from rlhf_jobs.engine import packing
from rlhf_jobs.engine.models import load_causal_lm, load_reward_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "examples" / "data"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhf_jobs.tools.tiny_model import build_llama

    return build_llama(tmp_path_factory.mktemp("llama") / "model", "tiny")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request: pytest.FixtureRequest, tiny_model: Path, tiny_llama: Path) -> Path:
    return tiny_model if request.param == "gpt2" else tiny_llama


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    found = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return found


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    scale = max(g.abs().max().item() for g in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6 * scale), name


def test_rows_are_filled_first_fit_decreasing() -> None:
    assert packing.fill_rows([5, 3, 4, 2], row_length=8) == [[0, 1], [2, 3]]  # 5+3, 4+2
    assert packing.fill_rows([9, 2], row_length=8) == [[0], [1]]  # too long for a row: a row of its own

    rows = packing.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], row_length=6)
    assert rows.input_ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 1, 1, 1]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert rows.starts.tolist() == [6, 4, 0]
    assert rows.place([[1, 1, 1], [2, 2], [3, 3, 3, 3]], fill=-1).tolist() == [[3, 3, 3, 3, 2, 2],
                                                                              [1, 1, 1, -1, -1, -1]]


def test_row_width_weighs_padding_against_attention() -> None:
    lengths = [100, 70, 70, 50, 50]  # rows as wide as the longest: 4 rows, 60 padding positions
    # A wide model: attention is cheap next to the linear layers, so wider rows with less padding win.
    assert len(packing.fill_rows(lengths, packing.RowPlan(hidden_size=4096).width(lengths))) <= 2
    # A narrow one: attention over a wide row costs more than the padding it saves.
    assert packing.RowPlan(hidden_size=8).width(lengths) == 100
    # Attention dropout makes wide rows dearer still.
    with_dropout, without = packing.RowPlan(hidden_size=64, dropout=True), packing.RowPlan(hidden_size=64)
    assert with_dropout.width(lengths) <= without.width(lengths)
    # Flash attention attends per sequence: the widest rows (fewest positions) win.
    flash = packing.RowPlan(hidden_size=8, dense_attention=False)
    assert len(packing.fill_rows(lengths, flash.width(lengths))) == 1


SHORT = [{"instruction": "Hi.", "response": "Hello there."}, {"instruction": "Add 2 and 2.", "response": "4"}]


def sft_examples(tokenizer, count: int = 4, max_length: int = 160) -> list[dict[str, list[int]]]:
    """Sample records of different lengths, and two short ones that fit beside them in a row."""
    records = read_records(str(SAMPLES / "sample_finetune_data.jsonl"), SFT_SCHEMA)[:count] + SHORT
    return [tokenize_sft(r, tokenizer, "instruction", max_length) for r in records]


def test_packed_sft_loss_and_gradients_equal_padded(model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer, dropout=False)
    examples = sft_examples(tokenizer)
    assert packing.packing_is_exact(model, full_logits, tokenizer.pad_token_id, model.config.vocab_size)

    padded_loss, padded_tokens = response_loss(model, pad_batch(examples, tokenizer.pad_token_id))
    padded_loss.backward()
    padded_grads = grads(model)
    batch = packed_batch(examples, packing.RowPlan.for_model(model))
    assert batch["input_ids"].size(0) < len(examples)  # several examples share a row
    packed_loss, packed_tokens = response_loss(model, batch)
    packed_loss.backward()

    assert int(packed_tokens) == int(padded_tokens) > 0
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert_same_grads(padded_grads, grads(model))


def test_label_only_head_equals_the_full_head(model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer, dropout=False)
    examples = sft_examples(tokenizer)
    batch = pad_batch(examples, tokenizer.pad_token_id)
    assert packing.accepts_logits_to_keep(model)

    # the LM head at every position, then the cross-entropy on the labelled ones
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    full.backward()
    full_grads = grads(model)
    label_only, _ = response_loss(model, batch)
    label_only.backward()

    assert label_only.item() == pytest.approx(full.item(), rel=1e-5)
    assert_same_grads(full_grads, grads(model))


def test_packed_reward_scores_and_gradients_equal_padded(model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    model = load_reward_model(str(model_dir), tokenizer, dropout=False)
    records = read_records(str(SAMPLES / "sample_rm_data.jsonl"), RM_SCHEMA)[:3]
    records.append({"prompt": "Hi.", "chosen": "Hello there.", "rejected": "Go away."})
    examples = [tokenize_pair(r, tokenizer, "instruction", 160) for r in records]
    assert packing.packing_is_exact(model, packing.position_scores, tokenizer.pad_token_id, model.config.vocab_size)

    task = RewardTask()
    task.tokenizer, task.rows = tokenizer, packing.RowPlan.for_model(model)

    def loss_and_scores(packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        task.packed = packed
        batch = task.collate(examples)
        assert ("ends" in batch) == packed
        if packed:
            assert batch["input_ids"].size(0) < 2 * len(examples)  # several sequences share a row
        chosen, rejected = task.scores(model, batch)
        loss = pairwise_loss(chosen, rejected, batch["margin"], reduction="sum")
        loss.backward()
        return loss, torch.cat([chosen, rejected]).detach()

    padded_loss, padded_scores = loss_and_scores(packed=False)
    padded_grads = grads(model)
    packed_loss, packed_scores = loss_and_scores(packed=True)

    assert torch.allclose(packed_scores, padded_scores, rtol=1e-4, atol=1e-5)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert_same_grads(padded_grads, grads(model))


def test_a_model_that_ignores_packed_positions_is_refused() -> None:
    class Leaky(torch.nn.Module):
        """Each position sees the running sum of its row: packed sequences leak into each other."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(50, 4)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return SimpleNamespace(logits=self.embedding(input_ids).cumsum(1))

    assert not packing.packing_is_exact(Leaky(), full_logits, pad_token_id=0, vocab_size=50)


def test_the_check_allows_the_rounding_of_bf16_outputs() -> None:
    """Under FSDP with bf16 mixed precision the check runs in bf16 (on the sharded model): packed outputs one bf16
    step away from the padded ones pass, a leak between packed sequences still fails."""

    class RoundedDifferently(torch.nn.Module):
        def __init__(self, leak: bool) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(50, 4, dtype=torch.bfloat16)
            self.leak = leak

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            logits = self.embedding(input_ids)
            if attention_mask is None:  # packed: the same values one bf16 step up (another kernel's rounding)
                logits = logits.cumsum(1) if self.leak else (logits.float() * (1 + 2**-7)).bfloat16()
            return SimpleNamespace(logits=logits)

    assert packing.packing_is_exact(RoundedDifferently(leak=False), full_logits, pad_token_id=0, vocab_size=50)
    assert not packing.packing_is_exact(RoundedDifferently(leak=True), full_logits, pad_token_id=0, vocab_size=50)
