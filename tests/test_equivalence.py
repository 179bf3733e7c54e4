"""Equivalences that hold only if the all-reduce paths are right, checked in real multi-process groups.

- SFT: batch 8 on 1 worker, batch 4 × accumulation 2 on 1 worker, batch 4 on 2 workers (DDP) and
  batch 4 on 2 workers (FSDP) give the same gradient, because every label token weighs the same.
- RM: the same for pairs.
- Evaluation on 2 workers equals evaluation on 1, also with fewer examples than workers (the case
  where a DDP-wrapped forward used to hang a worker with no batch).
- PPO: advantages whitened with the statistics of both workers equal whitening the union; the
  iteration metrics of 2 workers equal those of their union where they are token- or sequence-weighted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLES
from process_group import run_processes

from rlhf_jobs.algorithms import ppo, supervised
from rlhf_jobs.algorithms.rl import advantages as rl_advantages
from rlhf_jobs.algorithms.rl import losses, rollout
from rlhf_jobs.core.config import SupervisedTraining
from rlhf_jobs.engine import packing, sharding
from rlhf_jobs.engine.models import load_causal_lm, load_reward_model, load_tokenizer, unwrap
from rlhf_jobs.engine.worker import Worker

CPU = torch.device("cpu")
# Loose enough for float summation order (gloo sums, different batch shapes), tight enough that
# a mean of per-micro-batch means (the old weighting) fails by orders of magnitude more.
TOLERANCE = {"rtol": 2e-5, "atol": 2e-7}


def sample_records(name: str, count: int) -> list[dict[str, Any]]:
    lines = (SAMPLES / name).read_text().splitlines()
    return [json.loads(line) for line in lines[:count]]


def _task(stage: str, model_dir: str) -> Any:
    from rlhf_jobs.algorithms.rm import RewardTask
    from rlhf_jobs.algorithms.sft import SFTTask

    task = SFTTask() if stage == "sft" else RewardTask()
    task.tokenizer = load_tokenizer(model_dir)
    return task


def _examples(stage: str, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    from rlhf_jobs.algorithms.rm import tokenize_pair
    from rlhf_jobs.algorithms.sft import tokenize_sft

    if stage == "sft":
        records = sample_records("sample_finetune_data.jsonl", count)
        return [tokenize_sft(record, tokenizer, "instruction", 256) for record in records]
    records = sample_records("sample_rm_data.jsonl", count)
    return [tokenize_pair(record, tokenizer, "instruction", 256) for record in records]


def _model(stage: str, model_dir: str, tokenizer: Any) -> torch.nn.Module:
    torch.manual_seed(0)  # the RM's fresh score head must be the same in every process
    loader = load_causal_lm if stage == "sft" else load_reward_model
    return loader(model_dir, tokenizer, dropout=False)


def step_gradient(rank: int, world_size: int, stage: str, model_dir: str, batch_size: int, accumulation: int,
                  strategy: str, packed: bool = False) -> dict[str, Any]:
    """One optimizer step's gradient (full tensors) with the given layout, through the trainer's own code."""
    task = _task(stage, model_dir)
    examples = _examples(stage, task.tokenizer, 8)
    worker = Worker(rank, world_size, CPU)
    training = SupervisedTraining(batch_size=batch_size, gradient_accumulation_steps=accumulation, strategy=strategy)
    model = _model(stage, model_dir, task.tokenizer)
    task.packed, task.rows = packed, packing.RowPlan.for_model(model)  # as `build` sets them
    model = sharding.prepare(model, training, worker)
    indices, taken = supervised.step_micro_batches(list(range(8)), 0, batch_size, accumulation, worker)
    batches = [task.collate([examples[i] for i in chunk]) for chunk in indices]
    _, items = supervised.accumulate_gradients(model, task, batches, training, worker)
    module = unwrap(model)
    gradient = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for name, p in module.named_parameters()}
    return {"gradient": gradient, "items": items, "taken": taken, "batches": len(batches)}


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_the_same_global_batch_gives_the_same_gradient_in_every_layout(stage: str, tiny_model: Path) -> None:
    layouts = {
        "batch 8 × 1 worker": run_processes(step_gradient, 1, stage, str(tiny_model), 8, 1, "ddp"),
        "batch 4 × accumulation 2": run_processes(step_gradient, 1, stage, str(tiny_model), 4, 2, "ddp"),
        "batch 4 × 2 workers (DDP)": run_processes(step_gradient, 2, stage, str(tiny_model), 4, 1, "ddp"),
        "batch 4 × 2 workers (FSDP)": run_processes(step_gradient, 2, stage, str(tiny_model), 4, 1, "fsdp"),
        "batch 8 × 1 worker, packed": run_processes(step_gradient, 1, stage, str(tiny_model), 8, 1, "ddp", True),
        "batch 4 × 2 workers (DDP), packed": run_processes(step_gradient, 2, stage, str(tiny_model), 4, 1, "ddp",
                                                           True),
        "batch 4 × 2 workers (FSDP), packed": run_processes(step_gradient, 2, stage, str(tiny_model), 4, 1, "fsdp",
                                                            True),
    }
    reference = layouts["batch 8 × 1 worker"][0]
    assert reference["taken"] == 8
    for name, results in layouts.items():
        for result in results:
            assert result["items"] == reference["items"], name  # tokens (pairs) of the whole step, all workers
            for key, grad in reference["gradient"].items():
                torch.testing.assert_close(result["gradient"][key], grad, **TOLERANCE, msg=f"{name}: {key}")


def test_the_old_mean_of_means_would_differ(tiny_model: Path) -> None:
    """The SFT micro-batches above hold different numbers of label tokens, so per-micro-batch means
    weigh tokens differently: the equivalence test discriminates."""
    task = _task("sft", str(tiny_model))
    examples = _examples("sft", task.tokenizer, 8)
    counts = [task.count(task.collate(examples[i : i + 4])) for i in (0, 4)]
    assert counts[0] != counts[1]


def evaluation(rank: int, world_size: int, stage: str, model_dir: str, count: int) -> dict[str, float]:
    task = _task(stage, model_dir)
    examples = _examples(stage, task.tokenizer, count)
    worker = Worker(rank, world_size, CPU)
    training = SupervisedTraining(batch_size=2)
    model = sharding.prepare(_model(stage, model_dir, task.tokenizer), training, worker)
    with torch.no_grad():
        return supervised.evaluate(model, task, examples, 2, worker)


@pytest.mark.parametrize(("stage", "count"), [("sft", 5), ("rm", 5), ("sft", 1)])
def test_evaluation_on_two_workers_equals_one(stage: str, count: int, tiny_llama: Path) -> None:
    one = run_processes(evaluation, 1, stage, str(tiny_llama), count)[0]
    two = run_processes(evaluation, 2, stage, str(tiny_llama), count)
    for metrics in two:
        assert metrics.keys() == one.keys()
        for key, value in one.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5), key


def whitening(rank: int, world_size: int, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = slice(rank * values.size(0) // world_size, (rank + 1) * values.size(0) // world_size)
    local, local_mask = values[rows], mask[rows]
    stats = ppo.global_mean_var(local, local_mask, CPU, unbiased=True)
    return losses.masked_whiten(local, local_mask, stats=stats)


def test_advantages_are_whitened_with_the_statistics_of_all_workers() -> None:
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + torch.tensor([[0.0], [1.0], [5.0], [9.0]])  # workers see different means
    mask = (torch.rand(4, 6) > 0.3).float()
    union = run_processes(whitening, 1, values, mask)[0]
    halves = torch.cat(run_processes(whitening, 2, values, mask))
    torch.testing.assert_close(halves, union, rtol=1e-5, atol=1e-6)


def metrics_of(rank: int, world_size: int, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    part = {key: value[rows] for key, value in tensors.items()}
    batch = ppo.Experience(inputs={}, response=part["response"], mask=part["mask"], old_logp=part["logp"],
                           ref_logp=part["logp"], old_values=part["values"], entropy=torch.tensor(0.0),
                           raw_score=part["score"], has_eos=part["has_eos"])
    kl = part["kl"] * part["mask"]
    return ppo.iteration_metrics(batch, kl, -0.1 * kl, part["returns"], {"policy_loss": 1.0 + rank},
                                 Worker(rank, world_size, CPU))


def test_iteration_metrics_of_two_workers_equal_those_of_their_union() -> None:
    torch.manual_seed(1)
    tensors = {
        "response": torch.zeros(4, 5, dtype=torch.long), "mask": (torch.rand(4, 5) > 0.3).float(),
        "logp": torch.randn(4, 5), "values": torch.randn(4, 5), "score": torch.randn(4) * 2 + 1,
        "has_eos": torch.tensor([True, False, True, True]), "kl": torch.rand(4, 5), "returns": torch.randn(4, 5),
    }
    union = run_processes(metrics_of, 1, tensors)[0]
    for metrics in run_processes(metrics_of, 2, tensors):
        for key in ("score_mean", "score_std", "kl", "non_score_reward", "explained_variance", "response_length",
                    "eos_fraction"):
            assert metrics[key] == pytest.approx(union[key], rel=1e-6, abs=1e-9), key
        assert metrics["policy_loss"] == pytest.approx(1.5)  # the update's statistics: mean over workers


# ---- PPO: the update on 2 workers equals the update on 1; FSDP starts on-policy -------------------------------

PPO_PROMPTS = [{"prompt": p} for p in ("Name a colour of the sky.", "Say hello politely, then stop.",
                                      "Give one word for happy.", "What do bees make?", "Describe rain.",
                                      "Count to three.", "Name a fruit.", "Why is the sea salty?")]


def ppo_models(worker: Worker, model_dir: str, **training: Any) -> tuple[Any, Any, list[dict[str, Any]]]:
    from rlhf_jobs.core.loading import validate_config

    config = {
        "General": {"model_name": model_dir, "rm_name": model_dir, "output_dir": "unused", "checkpoint_dir": "unused"},
        "Dataset": {"train_file": "unused"},
        "Training": {"num_training_workers": worker.world_size, "max_new_tokens": 12, **training},
    }
    training_config = validate_config(config, "ppo", paths=False).Training
    torch.manual_seed(0)  # the critic's value head comes from the (random) score head: the same in every process
    models = ppo.load_models(validate_config(config, "ppo", paths=False), worker, None)
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    return training_config, models, rollout.tokenize_prompts(PPO_PROMPTS, tokenizer, "instruction", 64)


def ppo_update_on_fixed_experience(rank: int, world_size: int, model_dir: str) -> dict[str, Any]:
    """Every process samples the same 8 responses (same weights, same seed); worker r then updates on its
    share of them, as if it had sampled them: 1 worker × 8 sequences vs 2 workers × 4."""
    worker = Worker(rank, world_size, CPU)
    per_worker = len(PPO_PROMPTS) // world_size
    training, models, prompts = ppo_models(worker, model_dir, optimizer="SGD", learning_rate=0.5,
                                           critic_learning_rate=0.5, experience_batch_size=per_worker,
                                           gradient_accumulation_steps=2, ppo_epochs=2, max_grad_norm=None)
    torch.manual_seed(1)
    responses = models.engine.generate([p["input_ids"] for p in prompts], rollout.Sampling.of(training))
    # The untrained model never samples EOS within 12 tokens: cut responses to unequal lengths instead, so the
    # workers hold different numbers of response tokens (34 and 28).
    responses = [ids[:length] for ids, length in zip(responses, (12, 3, 7, 12, 5, 12, 9, 2), strict=True)]
    everything = ppo.judge_responses(models, prompts, responses, training, CPU)
    rows = slice(rank * per_worker, (rank + 1) * per_worker)
    batch = ppo.Experience({k: v[rows] for k, v in everything.inputs.items()}, everything.response[rows],
                           everything.mask[rows], everything.old_logp[rows], everything.ref_logp[rows],
                           everything.old_values[rows], everything.entropy, everything.raw_score[rows],
                           everything.has_eos[rows])
    kl = losses.kl_estimate(batch.old_logp, batch.ref_logp, "k1") * batch.mask
    rewards, _ = rl_advantages.compute_rewards(batch.raw_score, kl, batch.mask, 0.05)
    advantages, returns = rl_advantages.compute_gae(rewards, batch.old_values, batch.mask, 1.0, 0.95)
    advantages = losses.masked_whiten(advantages, batch.mask,
                                   stats=ppo.global_mean_var(advantages, batch.mask, CPU, unbiased=True))
    optimizers = ppo.Optimizers.build(models, training, 4, CPU)
    stats, _ = ppo.ppo_update(models, optimizers, batch, advantages, returns, training)
    weights = {f"{name}.{key}": value.detach().clone() for name in ("policy", "critic")
               for key, value in unwrap(getattr(models, name)).named_parameters() if value.requires_grad}
    return {"stats": stats, "weights": weights, "tokens": batch.mask.sum().item()}


def test_ppo_update_on_two_workers_equals_one_worker_with_their_union(tiny_model: Path) -> None:
    """Losses are sums over the minibatch's response tokens on ALL workers / their count, as SFT and the RM
    weigh tokens: the statistics (averaged over workers) and the weights after two PPO epochs (SGD, so a
    differently weighted gradient shows in the weights) are those of one worker holding both halves."""
    one = run_processes(ppo_update_on_fixed_experience, 1, str(tiny_model))[0]
    two = run_processes(ppo_update_on_fixed_experience, 2, str(tiny_model))
    assert two[0]["tokens"] != two[1]["tokens"]  # a mean of per-worker means would weigh tokens differently
    for name, value in one["stats"].items():
        assert sum(w["stats"][name] for w in two) / 2 == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for result in two:
        for key, weight in one["weights"].items():
            torch.testing.assert_close(result["weights"][key], weight, rtol=1e-5, atol=1e-6, msg=key)


def fsdp_first_iteration(rank: int, world_size: int, model_dir: str) -> list[dict[str, float]]:
    results = []
    for precision in ("no", "bf16"):
        worker = Worker(rank, world_size, CPU)
        training, models, prompts = ppo_models(worker, model_dir, strategy="fsdp", mixed_precision=precision,
                                               experience_batch_size=2, mini_batch_size=2)
        torch.manual_seed(2 + rank)
        batch = ppo.collect_experience(models, prompts[2 * rank : 2 * rank + 2], training, CPU)
        kl = losses.kl_estimate(batch.old_logp, batch.ref_logp, "k1") * batch.mask
        optimizers = ppo.Optimizers.build(models, training, 4, CPU)
        advantages = torch.randn_like(batch.old_logp)
        _, check = ppo.ppo_update(models, optimizers, batch, advantages, advantages, training)
        results.append({"precision": precision, "max_kl": kl.abs().max().item(), **check.metrics(CPU)})
    return results


@pytest.mark.slow
def test_fsdp_ppo_starts_with_kl_zero_and_ratio_one_in_fp32_and_bf16(tiny_llama: Path) -> None:
    """FSDP (2 workers): the reference, sharded with the policy's MixedPrecisionPolicy, computes exactly the
    policy's function, and the first update sees exactly the rollout's log-probs and values."""
    for results in run_processes(fsdp_first_iteration, 2, str(tiny_llama)):
        for result in results:
            assert result["max_kl"] == 0.0, result
            assert result["first_update_max_log_ratio"] == 0.0, result
            assert result["first_update_max_value_change"] == 0.0, result
