"""Padding-free batches: a micro-batch's sequences packed into as few rows as fit, position ids
restarting at 0 for each sequence.

transformers keeps packed sequences apart when a forward gets `position_ids` and no
`attention_mask` (`masking_utils`: a block-diagonal causal mask for sdpa/eager/flex attention,
variable-length kernels for flash attention): every token attends to the tokens of its own
sequence before it, at the positions it would have alone. That is the computation of a padded
batch, without the padding. Rows are filled first-fit-decreasing; a row's unused tail is a padding
sequence of its own, which no real token attends to and no loss reads (made of the row's first
token, not the pad token: transformers warns about pad tokens without a mask).

How wide the rows are is chosen per batch (`RowPlan`): wider rows leave less padding, but sdpa and
eager attention compute a whole row's attention under the block mask, a cost per token that grows
with the width (about width / (6 × hidden size) of the linear layers', several times that with
attention dropout on, which takes the unfused path and draws a mask per attention weight); flash
attention attends per sequence, so there the widest rows win. bench/profile_sft_step.py times it.

Whether a model honours packed positions is checked once per worker (`packing_is_exact`): two
short sequences, packed and padded, must give the same outputs; a model that fails trains padded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_jobs.engine.models import unwrap

NOT_EXACT = "padding-free packing off: {model} does not keep packed sequences apart; training on padded batches"


@dataclass(frozen=True)
class Packed:
    """Rows of packed sequences. `starts[i]` is where sequence i begins in the flattened rows."""

    input_ids: torch.Tensor  # (rows, row length)
    position_ids: torch.Tensor  # (rows, row length), restarting at 0 for every sequence
    starts: torch.Tensor  # (sequences,) flat index of each sequence's first token

    def place(self, values: list[list[int]], fill: int) -> torch.Tensor:
        """Per-token `values` (one list per sequence, as long as it) laid out like the input ids."""
        flat = torch.full((self.input_ids.numel(),), fill, dtype=torch.long)
        for start, row in zip(self.starts.tolist(), values, strict=True):
            flat[start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        return flat.view_as(self.input_ids)


def fill_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Sequence indices per row, first-fit decreasing; a sequence longer than a row gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            rows.append([index])
            room.append(row_length - lengths[index])
        else:
            rows[target].append(index)
            room[target] -= lengths[index]
    return rows


@dataclass(frozen=True)
class RowPlan:
    """Row widths for a model: the width, from the longest sequence up to all of them in one row, with the
    least estimated work."""

    hidden_size: int
    dense_attention: bool = True  # False for flash attention: its cost does not grow with the row
    dropout: bool = False  # dropout on in training: attention without the fused kernel, a mask per weight

    DROPOUT_ATTENTION_COST = 4.0

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> RowPlan:
        from rlhf_jobs.engine.sharding import hf_model

        config = hf_model(unwrap(model)).config
        implementation = str(getattr(config, "_attn_implementation", "") or "")
        dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        return cls(int(getattr(config, "hidden_size", 0) or 0) or 1, not implementation.startswith("flash"), dropout)

    def work(self, lengths: list[int], width: int) -> float:
        """Token positions computed, each weighted by its attention share: rows × width × (1 + width / 6h)."""
        share = width / (6.0 * self.hidden_size) * (self.DROPOUT_ATTENTION_COST if self.dropout else 1.0)
        return len(fill_rows(lengths, width)) * width * (1.0 + (share if self.dense_attention else 0.0))

    def width(self, lengths: list[int]) -> int:
        longest = max(lengths)
        candidates = range(longest, sum(lengths) + longest // 8 + 1, max(1, longest // 8))
        return min(candidates, key=lambda width: self.work(lengths, width))

    def pack(self, sequences: list[list[int]]) -> Packed:
        return pack(sequences, self.width([len(s) for s in sequences]))


def pack(sequences: list[list[int]], row_length: int) -> Packed:
    """`sequences` in rows of at most `row_length` tokens (the longest sequence, if longer)."""
    lengths = [len(s) for s in sequences]
    rows = fill_rows(lengths, row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    starts = torch.zeros(len(sequences), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            length = lengths[index]
            input_ids[r, offset : offset + length] = torch.tensor(sequences[index], dtype=torch.long)
            position_ids[r, offset : offset + length] = torch.arange(length)
            starts[index] = r * width + offset
            offset += length
        input_ids[r, offset:] = input_ids[r, 0]  # the tail: a padding sequence of its own
        position_ids[r, offset:] = torch.arange(width - offset)
    return Packed(input_ids, position_ids, starts)


# ---- what a forward returns per position ---------------------------------------------------------------------


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    from rlhf_jobs.engine.sharding import hf_model

    return "logits_to_keep" in inspect.signature(hf_model(unwrap(model)).forward).parameters


def lm_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits at the positions where `keep` (rows × length, bool) is set, (kept, vocabulary).

    The LM head runs on those positions only (`logits_to_keep`) where the model supports it, inside
    the model's own forward, so a DDP or FSDP wrapper still synchronises its gradients.
    """
    if accepts_logits_to_keep(model):
        return model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return model(**inputs, use_cache=False).logits[keep]


def score_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The head a transformers sequence classifier scores every position with (`score` in most)."""
    module = unwrap(model)
    base = module.get_base_model() if callable(getattr(module, "get_base_model", None)) else module
    return getattr(base, "score", None)


def position_scores(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A one-output sequence classifier's score at every position (rows × length), through its own forward.

    The classifier applies its head at every position and then reads one per row; the head's
    output is taken on the way (a forward hook), so the graph, and DDP/FSDP, are as usual.
    """
    head = score_module(model)
    if head is None:
        raise TypeError(f"{type(unwrap(model)).__name__} has no `score` head to read per position")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, output: seen.append(output))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[-1].squeeze(-1)


# ---- the check ---------------------------------------------------------------------------------------------


@torch.no_grad()
def packing_is_exact(model: torch.nn.Module, per_position: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor],
                     pad_token_id: int, vocab_size: int) -> bool:
    """Whether two short sequences give the same outputs packed in one row as padded in two rows.

    `per_position(model, inputs)` returns the model's output at every position (rows × length × ...).
    A model whose attention ignores packed position ids lets the second sequence see the first, or
    reads absolute positions from the row, and fails this.
    """
    device = next(model.parameters()).device
    high = max(3, min(vocab_size, 1000))
    sequences = [[(7 * i + 3) % high for i in range(1, 7)], [(11 * i + 5) % high for i in range(1, 5)]]
    lengths = [len(s) for s in sequences]
    padded = torch.full((2, max(lengths)), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, ids in enumerate(sequences):
        padded[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    packed = pack(sequences, sum(lengths))
    was_training = model.training
    model.eval()
    try:
        reference = per_position(model, {"input_ids": padded.to(device), "attention_mask": mask.to(device)})
        flat = per_position(model, {"input_ids": packed.input_ids.to(device),
                                    "position_ids": packed.position_ids.to(device)})
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    # Loose enough for the rounding of the dtype the outputs were computed in (bf16 under FSDP's mixed precision),
    # tight enough that a sequence seeing another's tokens fails.
    relative = max(1e-3, 2 * torch.finfo(reference.dtype).eps) if reference.is_floating_point() else 1e-3
    flat = flat.reshape(-1, *flat.shape[2:]).float()
    for row, (start, length) in enumerate(zip(packed.starts.tolist(), lengths, strict=True)):
        expected = reference[row, :length].float()
        tolerance = relative / 10 * (1 + expected.abs().max().item())
        if not torch.allclose(flat[start : start + length], expected, rtol=relative, atol=tolerance):
            return False
    return True
