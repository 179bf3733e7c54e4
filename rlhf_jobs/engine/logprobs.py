"""Log-probabilities and entropy over a large vocabulary without full-size fp32 copies.

A (batch, positions, vocabulary) logits tensor of a 128k-token model is gigabytes; `log_softmax`
in fp32 copies it, and autograd keeps the copy. Here the log-sum-exp is computed a chunk of
positions at a time in fp32, and the backward pass recomputes the softmax chunk by chunk from
the logits, so the only full-size tensors are the logits themselves and their gradient.
"""

from __future__ import annotations

from typing import Any

import torch


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits / temperature)[..., index] for 2-D logits (rows, vocabulary), in chunks of rows."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, index: torch.Tensor, temperature: float,
                chunk_size: int) -> torch.Tensor:
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), chunk_size):
            lse[start : start + chunk_size] = (logits[start : start + chunk_size].float() / temperature).logsumexp(-1)
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float() / temperature
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # d/dlogits of log_softmax(logits / T)[index] = (onehot(index) - softmax(logits / T)) / T
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scaled_output = grad_output.float() / ctx.temperature
        for start in range(0, logits.size(0), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            softmax = (logits[rows].float() / ctx.temperature - lse[rows, None]).exp()
            chunk = -softmax * scaled_output[rows, None]
            chunk.scatter_add_(-1, index[rows, None], scaled_output[rows, None])
            grad[rows] = chunk.to(grad.dtype)
        return grad, None, None, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          chunk_size: int = 256) -> torch.Tensor:
    """`log_softmax(logits.float() / temperature, -1).gather(-1, index)` for logits (..., V) and index (...),
    in fp32, computed `chunk_size` positions at a time."""
    shape = index.shape
    flat = _SelectiveLogSoftmax.apply(logits.reshape(-1, logits.size(-1)), index.reshape(-1), temperature,
                                      chunk_size)
    return flat.view(shape)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position (fp32), `chunk_size` positions at a time."""
    flat = logits.reshape(-1, logits.size(-1))
    result = torch.empty(flat.size(0), dtype=torch.float32, device=logits.device)
    for start in range(0, flat.size(0), chunk_size):
        chunk = flat[start : start + chunk_size].float() / temperature
        log_probs = chunk.log_softmax(-1)
        result[start : start + chunk_size] = -(log_probs.exp() * log_probs).sum(-1)
    return result.view(logits.shape[:-1])
