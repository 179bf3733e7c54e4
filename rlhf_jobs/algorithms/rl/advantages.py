"""From scores to what an update maximises: per-token rewards with the KL penalty, generalised advantage
estimation, the adaptive KL coefficient, and the critic-free estimators: group-relative (GRPO, Dr. GRPO),
leave-one-out (RLOO) and REINFORCE++'s return-to-go.
"""

from __future__ import annotations

import math

import torch


def compute_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                    kl_coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, non-score rewards): -kl_coeff × KL per response token, plus the score at the last one."""
    non_score = -kl_coeff * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(rewards.size(0)), last] += score
    return rewards, non_score


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over the response tokens.

    δ_t = r_t + γ V_{t+1} - V_t and A_t = δ_t + γλ A_{t+1}, with V and A zero past the last
    response token (the episode ends there). Returns = advantages + values.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


class AdaptiveKLController:
    """Ziegler et al. (2019): kl_coeff *= 1 + clip(KL / target - 1, ±0.2) × n_steps / horizon."""

    def __init__(self, kl_coeff: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = kl_coeff, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]



# ---- critic-free estimators --------------------------------------------------------------------------------

GROUP_STD_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


def group_view(scores: torch.Tensor, group: int) -> torch.Tensor:
    """[N] scores of consecutive groups of `group` completions (one prompt each) as [N / group, group]."""
    if scores.numel() % group:
        raise ValueError(f"{scores.numel()} scores do not form groups of {group}")
    return scores.view(-1, group)


def group_advantages(scores: torch.Tensor, group: int, estimator: str) -> torch.Tensor:
    """One advantage per completion from the scores of its group (the other completions of its prompt).

    NaN scores (no reward scored it) are left out of the group's statistics and get advantage 0, as TRL does:
    - grpo: (r - mean) / (std + 1e-4), std unbiased (n - 1) over the group's scored completions (TRL's
      `scale_rewards="group"`); a group with one scored completion gets 0;
    - dr_grpo: r - mean (no std division);
    - rloo: r - mean of the group's OTHER scored completions (OpenRLHF, veRL); 0 without another one.
    A group whose scores are all equal gets 0 everywhere: it teaches nothing.
    """
    grouped = group_view(scores.float(), group)
    scored = ~grouped.isnan()
    count = scored.sum(dim=1, keepdim=True).float()
    total = grouped.nansum(dim=1, keepdim=True)
    mean = total / count.clamp(min=1)
    centred = grouped - mean
    if estimator == "grpo":
        variance = (centred.nan_to_num(0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        advantages = centred / (variance.sqrt() + GROUP_STD_EPS)
        advantages = advantages.masked_fill(count < 2, 0.0)
    elif estimator == "dr_grpo":
        advantages = centred
    elif estimator == "rloo":
        others = (total - grouped) / (count - 1).clamp(min=1)
        advantages = (grouped - others).masked_fill(count < 2, 0.0)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}; expected grpo, dr_grpo or rloo")
    return advantages.masked_fill(~scored, 0.0).reshape(-1)


def equal_groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Per group: whether its scored completions all have the same score (fewer than two scored count as equal)."""
    grouped = group_view(scores.float(), group)
    high = grouped.nan_to_num(-math.inf).max(dim=1).values
    low = grouped.nan_to_num(math.inf).min(dim=1).values
    scored = (~grouped.isnan()).sum(dim=1)
    return (scored < 2) | torch.isclose(high, low)


def sequence_kl_penalty(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coeff: float) -> torch.Tensor:
    """Outcome scores with the KL in the reward: r - kl_coeff × Σ_t KL_t over each completion (TRL's
    RLOOTrainer); NaN stays NaN (an unscored completion has no reward to lower)."""
    return scores - kl_coeff * (kl * mask).sum(dim=1)


def reinforce_pp_returns(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coeff: float,
                         gamma: float) -> torch.Tensor:
    """REINFORCE++'s per-token returns before whitening: reward -kl_coeff × KL_t on every completion token and the
    score on the last one (`compute_rewards`), then the discounted return-to-go Σ_{s≥t} γ^{s-t} r_s (GAE with no
    values and λ = 1). Rows with a NaN score (nothing scored them) get 0."""
    rewards, _ = compute_rewards(scores.nan_to_num(0.0), kl, mask, kl_coeff)
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns.masked_fill(scores.isnan()[:, None], 0.0)
