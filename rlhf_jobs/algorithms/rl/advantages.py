"""From scores to what an update maximises: per-token rewards with the KL penalty, generalised advantage
estimation, and the adaptive KL coefficient.
"""

from __future__ import annotations

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

