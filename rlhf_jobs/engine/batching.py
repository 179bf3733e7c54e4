"""Padding token sequences into batches: one helper for every stage (right for training, left for prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def pad(sequences: Sequence[Sequence[int]], value: int, side: Literal["left", "right"] = "right",
        device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded ids, attention mask): `value` fills the `side` of shorter rows, the mask marks real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        ids[row, span] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))
