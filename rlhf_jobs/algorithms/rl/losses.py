"""Losses and statistics of RL updates, shared by every RL stage: masked statistics and whitening, KL
estimators, the clipped policy surrogate and the clipped value loss. Pure tensor functions (tests compare them
with hand-computed values).
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    return masked_sum(values, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked values: unbiased (Bessel's correction n / (n - 1), as TRL's `masked_var`), or the
    population variance."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    return variance * count / (count - 1) if unbiased and count > 1 else variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  stats: tuple[float, float] | None = None) -> torch.Tensor:
    """(values - mean) / std over the masked entries (mean kept if not shift_mean); 0 outside the mask.

    The variance is the unbiased one, as TRL's `masked_whiten` (for PPO's thousands of tokens per batch the two
    differ by a factor of 1 + 1/n). `stats` = (mean, unbiased variance) computed elsewhere, e.g. over all workers
    by `global_mean_var(..., unbiased=True)`.
    """
    mean, var = stats if stats is not None else (masked_mean(values, mask), masked_var(values, mask))
    whitened = (values - mean) * torch.rsqrt(torch.as_tensor(var, dtype=values.dtype) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens: k1 = log(p/q), k3 = (r - 1) - log r, r = q/p."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: far outside any clip range, and no overflow to inf


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss max(-A·ratio, -A·clip(ratio, 1 - clip_low, 1 + clip_high)), where the clipped term won,
    the log-ratio). `advantages` per token, or per sequence ([N, 1] broadcasts). The log-ratio is clamped to ±20
    before `exp` (as OpenRLHF does)."""
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.max(unclipped, clipped), clipped > unclipped, log_ratio


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: masked mean of max(-A·ratio, -A·clip(ratio, 1 ± ε)), per token.

    `tokens`: divide the masked sums by this count instead of `mask.sum()` (a micro-batch's share of its
    minibatch's mean).
    """
    tokens = mask.sum().clamp(min=1) if tokens is None else tokens
    per_token, clipped, log_ratio = clipped_surrogate(logp, old_logp, advantages, cliprange, cliprange)
    loss = masked_sum(per_token, mask) / tokens
    return loss, surrogate_stats(clipped, log_ratio, mask, tokens)


def surrogate_stats(clipped: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                    tokens: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The share of tokens whose clipped term won and the approximate KL ½(log ratio)², masked sums / `tokens`."""
    with torch.no_grad():
        return {"clip_fraction": masked_sum(clipped.float(), mask) / tokens,
                "approx_kl": masked_sum(0.5 * log_ratio.detach() ** 2, mask) / tokens}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, divisor: torch.Tensor | float) -> torch.Tensor:
    """A per-token loss as one number (`Training.loss_aggregation`), a micro-batch's share of its update:

    - token_mean: Σ masked tokens / divisor, the divisor counting the update's tokens (every token weighs the same);
    - seq_mean_token_sum (Dr. GRPO): Σ masked tokens / divisor counting the update's sequences: each sequence's
      summed loss, averaged over sequences (TRL's `dr_grpo` divides by max_completion_length too: a constant);
    - seq_mean_token_mean (GRPO paper): Σ over sequences of the sequence's token mean / divisor counting sequences.

    The divisor is the count on ALL workers / the worker count (`global_items_divisor`): 2 workers compute what 1
    does with their union."""
    if mode == "seq_mean_token_mean":
        per_token = per_token / mask.sum(dim=1, keepdim=True).clamp(min=1)
    elif mode not in ("token_mean", "seq_mean_token_sum"):
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return masked_sum(per_token, mask) / divisor


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 × masked mean of max((V - R)², (clip(V, V_old ± ε) - R)²); `tokens` as in `policy_loss`."""
    tokens = mask.sum().clamp(min=1) if tokens is None else tokens
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.max(unclipped_error, clipped_error), mask) / tokens
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_sum((clipped_error > unclipped_error).float(), mask) / tokens}
    return loss, stats

