"""The recorded TRL 1.12 references reproduce here, without TRL installed.

tests/fixtures/trl_dpo_reference.json and trl_grpo_reference.json were written in the bench venv by
bench/trl_dpo_reference.py and bench/trl_grpo_reference.py (TRL's own DPOTrainer / GRPOTrainer code on fixed
inputs). These tests rebuild the same models from their seeds and check the token ids and log-probs the fixtures
hold, and that the formulas below (TRL 1.12's, as the implementers' notes state them) give TRL's recorded losses,
advantages and metrics. The DPO and GRPO stages' own tests compare their functions with the same fixtures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf_jobs.core.prompts import join_response, record_prompt

FIXTURES = Path(__file__).parent / "fixtures"
DPO = json.loads((FIXTURES / "trl_dpo_reference.json").read_text())
GRPO = json.loads((FIXTURES / "trl_grpo_reference.json").read_text())


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixtures' policy (build_tiny_model seed 1) and reference (seed 0, the session's tiny model)."""
    from rlhf_jobs.tools.tiny_model import build_tiny_model

    assert DPO["models"]["reference"].endswith("seed=0)") and DPO["models"]["policy"].endswith("seed=1)")
    return {"policy": build_tiny_model(tmp_path_factory.mktemp("seed1") / "model", seed=1), "reference": tiny_model}


def load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@torch.no_grad()
def token_logps(model: torch.nn.Module, prefix: list[int], completion: list[int]) -> torch.Tensor:
    """Log-probs of `completion`'s tokens after `prefix`, one unpadded sequence."""
    ids = torch.tensor([prefix + completion])
    logits = model(input_ids=ids).logits[0, len(prefix) - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


# ---- DPO ------------------------------------------------------------------------------------------------


def test_dpo_fixture_token_ids_are_trls_tokenisation_of_our_prompt_text(repo_root: Path, models: dict) -> None:
    """prompt = our instruction prompt; prompt + chosen = our joined text; TRL tokenises prompt and
    prompt + completion + EOS text separately (the tokenizer's own special tokens) and keeps the tail as completion."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models["policy"]))
    records = [json.loads(line) for line in (repo_root / DPO["pairs_file"]).read_text().splitlines() if line.strip()]
    for index, pair in zip(DPO["record_indices"], DPO["pairs"], strict=True):
        record = records[index]
        assert pair["prompt"] == record_prompt(record, "instruction")
        prompt_ids = tokenizer(pair["prompt"])["input_ids"]
        assert pair["prompt_ids"] == prompt_ids
        for side in ("chosen", "rejected"):
            assert pair["prompt"] + pair[side] == join_response(pair["prompt"], record[side])
            full = tokenizer(pair["prompt"] + pair[side] + tokenizer.eos_token)["input_ids"]
            assert full[: len(prompt_ids)] == prompt_ids
            assert pair[f"{side}_ids"] == full[len(prompt_ids) :]
            assert pair[f"{side}_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(("precision", "dtype", "tolerance"), [("float32", torch.float32, 2e-4),
                                                               ("float64", torch.float64, 1e-10)])
def test_dpo_fixture_logps_reproduce(models: dict, precision: str, dtype: torch.dtype, tolerance: float) -> None:
    """Summed completion log-probs (prompt masked) of the rebuilt models = TRL's, pair by pair."""
    recorded = DPO[precision]["logps"]
    for name in ("policy", "reference"):
        model = load(models[name], dtype)
        for side in ("chosen", "rejected"):
            ours = [token_logps(model, p["prompt_ids"], p[f"{side}_ids"]).sum().item() for p in DPO["pairs"]]
            assert ours == pytest.approx(recorded[f"{name}_{side}"], abs=tolerance, rel=0)


def test_dpo_fixture_losses_follow_trls_formulas() -> None:
    """On the float64 run: Δ = (π_c - ref_c) - (π_r - ref_r) per pair; the loss is the mean over pairs of
    sigmoid -logσ(βΔ), hinge relu(1 - βΔ), ipo (Δ_c/n_c - Δ_r/n_r - 1/(2β))² with n the completion tokens (EOS
    included), robust (-(1-ε)logσ(βΔ) + ε logσ(-βΔ)) / (1-2ε), cDPO -(1-ε)logσ(βΔ) - ε logσ(-βΔ); TRL 1.12's
    sigmoid ignores label_smoothing. rewards/* = β × the log-ratios."""
    values, beta = DPO["float64"], DPO["settings"]["beta"]
    logps = {k: torch.tensor(v, dtype=torch.float64) for k, v in values["logps"].items()}
    chosen = logps["policy_chosen"] - logps["reference_chosen"]
    rejected = logps["policy_rejected"] - logps["reference_rejected"]
    delta = chosen - rejected
    lengths = {k: torch.tensor(v, dtype=torch.float64) for k, v in values["completion_tokens"].items()}
    eps = 0.1
    expected = {
        "sigmoid": -F.logsigmoid(beta * delta),
        "sigmoid_label_smoothing_0.1": -F.logsigmoid(beta * delta),
        "hinge": torch.relu(1 - beta * delta),
        "ipo": (chosen / lengths["chosen"] - rejected / lengths["rejected"] - 1 / (2 * beta)) ** 2,
        "robust_label_smoothing_0.1": (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta))
        / (1 - 2 * eps),
        "cdpo_label_smoothing_0.1": -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta),
    }
    assert set(expected) == set(values["losses"])
    for name, per_pair in expected.items():
        recorded = values["losses"][name]
        assert per_pair.tolist() == pytest.approx(recorded["per_pair_loss"], abs=1e-9), name
        assert per_pair.mean().item() == pytest.approx(recorded["loss"], abs=1e-9), name
    metrics = values["losses"]["sigmoid"]["metrics"]
    assert metrics["rewards/chosen"] == pytest.approx((beta * chosen).mean().item(), abs=1e-9)
    assert metrics["rewards/rejected"] == pytest.approx((beta * rejected).mean().item(), abs=1e-9)
    assert metrics["rewards/margins"] == pytest.approx((beta * delta).mean().item(), abs=1e-9)
    assert metrics["rewards/accuracies"] == (delta > 0).double().mean().item() == 0.5
    assert metrics["logps/chosen"] == pytest.approx(logps["policy_chosen"].mean().item(), abs=1e-9)


# ---- GRPO -----------------------------------------------------------------------------------------------


def test_grpo_fixture_logps_reproduce(models: dict) -> None:
    """Per-token completion log-probs (temperature 1) of the rebuilt models = TRL's (equal-length prompts)."""
    data = GRPO["loss"]
    group = data["num_generations"]
    for name, key in (("policy", "policy_logps"), ("reference", "reference_logps")):
        model = load(models[name])
        for row, completion in enumerate(data["completion_ids"]):
            ours = token_logps(model, data["prompt_ids"][row // group], completion)
            assert ours.tolist() == pytest.approx(data[key][row], abs=1e-5)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation over the non-NaN values, with Bessel's correction (n - 1), as TRL's `nanstd`."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = values.nanmean(dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim)
    return (((values - mean) ** 2).nanmean(dim=dim) * count / (count - 1)).sqrt()


def test_grpo_fixture_advantages_follow_trls_formulas() -> None:
    """Weighted sum of the functions' rewards skipping None (a sample no function scores is NaN, left out of the
    group statistics, advantage 0); A = (r - group mean) / (std + 1e-4) with std unbiased over the group
    (`group`), over the whole batch (`batch`), or no division (`none`); `normalize_then_sum` normalises each
    function within the group first, sums with the weights, then normalises over the batch."""
    data = GRPO["advantages"]
    group = data["num_generations"]
    per_function = torch.tensor([[math.nan if r is None else r for r in data["rewards"][name]]
                                 for name in ("reward_a", "reward_b")]).T
    weights = torch.tensor(data["reward_weights"])
    unscorable = per_function.isnan().all(dim=1)
    rewards = (per_function * weights).nansum(dim=1)
    rewards[unscorable] = math.nan
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
    group_std = nanstd(grouped, dim=1).repeat_interleave(group)
    expected = {"group": centred / (group_std + 1e-4), "batch": centred / (nanstd(rewards) + 1e-4), "none": centred}
    by_function = per_function.view(-1, group, 2)
    normalised = (by_function - by_function.nanmean(dim=1, keepdim=True)) / (nanstd(by_function, dim=1)[:, None] + 1e-4)
    summed = (normalised.view(-1, 2) * weights).nansum(dim=1)
    summed[unscorable] = math.nan
    expected["normalize_then_sum"] = (summed - summed.nanmean()) / (nanstd(summed) + 1e-4)
    for name, advantages in expected.items():
        recorded = data["variants"][name]
        assert advantages.nan_to_num(0.0).tolist() == pytest.approx(recorded["advantages"], abs=1e-5), name
    metrics = data["variants"]["group"]["metrics"]
    assert metrics["reward"] == pytest.approx(rewards.nanmean().item(), abs=1e-6)
    assert metrics["reward_std"] == pytest.approx(nanstd(rewards).item(), abs=1e-6)
    assert metrics["frac_reward_zero_std"] == pytest.approx((group_std.nan_to_num(0.0) < 1e-8).float().mean().item())
    assert {"prompts", "completions", "completion_ids", "answer"} <= set(data["reward_function_kwargs"])


def test_grpo_fixture_losses_follow_trls_formulas() -> None:
    """Per token: ratio = exp(logp - old), -min(ratio A, clip(ratio, 1-ε_low, 1+ε_high) A), plus β × k3 KL
    (exp(ref - logp) - (ref - logp) - 1) multiplied by the ratio unless use_bias_correction_kl is off; aggregated
    per loss type: grpo mean over sequences of each sequence's token mean, bnpo / dapo (one process, one micro-batch)
    sum over all tokens / tokens, dr_grpo sum / (sequences × max_completion_length)."""
    data = GRPO["loss"]
    width = max(map(len, data["completion_ids"]))

    def padded(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([row + [0.0] * (width - len(row)) for row in rows], dtype=torch.float64)

    logp, old, ref = padded(data["policy_logps"]), padded(data["old_logps"]), padded(data["reference_logps"])
    mask = padded([[1.0] * len(ids) for ids in data["completion_ids"]])
    advantages = torch.tensor(data["advantages"], dtype=torch.float64)[:, None]
    ratio = torch.exp(logp - old)
    for name, variant in data["variants"].items():
        clipped = ratio.clamp(1 - variant["epsilon_low"], 1 + variant["epsilon_high"])
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if variant["use_bias_correction_kl"]:
            kl = kl * ratio
        per_token = per_token + variant["beta"] * kl
        if variant["loss_type"] == "grpo":
            loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        elif variant["loss_type"] == "dr_grpo":
            loss = (per_token * mask).sum() / (mask.size(0) * data["max_completion_length"])
        else:
            loss = (per_token * mask).sum() / mask.sum()
        assert loss.item() == pytest.approx(variant["loss"], abs=1e-5), name
        if variant["beta"]:
            assert ((kl * mask).sum() / mask.sum()).item() == pytest.approx(variant["metrics"]["kl"], abs=1e-5), name
        high = ((ratio > 1 + variant["epsilon_high"]) & (advantages > 0)).double()
        low = ((ratio < 1 - variant["epsilon_low"]) & (advantages < 0)).double()
        assert ((high * mask).sum() / mask.sum()).item() == pytest.approx(variant["metrics"]["clip_ratio/high_mean"])
        assert ((low * mask).sum() / mask.sum()).item() == pytest.approx(variant["metrics"]["clip_ratio/low_mean"])
