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


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: masked mean of max(-A·ratio, -A·clip(ratio, 1 ± ε)), per token.

    `tokens`: divide the masked sums by this count instead of `mask.sum()` (a micro-batch's share of its
    minibatch's mean). The log-ratio is clamped to ±20 before `exp` (as OpenRLHF does).
    """
    tokens = mask.sum().clamp(min=1) if tokens is None else tokens
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_sum(torch.max(unclipped, clipped), mask) / tokens
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_sum((clipped > unclipped).float(), mask) / tokens,
            "approx_kl": masked_sum(0.5 * log_ratio**2, mask) / tokens,
        }
    return loss, stats


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

