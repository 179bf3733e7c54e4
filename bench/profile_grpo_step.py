"""Where one GRPO iteration of ours spends its time, phase by phase, in one process (no Ray).

The bench's GRPO settings (common.SIZES, `ours.grpo_config`) on its model, through `rlhf_jobs.algorithms.grpo`'s
own functions: generation, the rollout's forwards (the policy's old log-probs and entropy, the reference's
log-probs), the reward functions, the advantages, and the update (forward/backward, clipping, the optimizer step).
Medians over the iterations after the first, in seconds and as a share of the iteration.

    python bench/profile_grpo_step.py                                  # the tiny model
    python bench/profile_grpo_step.py --size 300m --iterations 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import DATA, PPO_FILE, REPO, SIZES, build_model, read_jsonl
from ours import grpo_config

from rlhf_jobs.algorithms import grpo
from rlhf_jobs.algorithms.rl import rewards, rollout
from rlhf_jobs.algorithms.rl.policy import PolicyOptimizer
from rlhf_jobs.engine import optim
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import unwrap
from rlhf_jobs.engine.worker import Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch threads (default: the bench's for the size)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    args = parser.parse_args()
    settings = SIZES[args.size]
    torch.set_num_threads(args.threads or settings.threads)
    torch.manual_seed(settings.seed)
    model = build_model(args.size, args.workdir.resolve())
    config = grpo_config(settings, model, DATA / PPO_FILE, args.workdir.resolve() / "profile-grpo", workers=1)
    training, device = config.Training, torch.device("cpu")
    worker = Worker(0, 1, device)
    models = grpo.load_models(config, worker, None)
    policy, tokenizer = models.policy, models.policy.tokenizer
    optimizer = PolicyOptimizer.around(PolicyOptimizer.optimizer_of(policy.model, training), training, 10_000,
                                       device)
    prompts = rollout.tokenize_prompts(read_jsonl(DATA / PPO_FILE), tokenizer, "instruction",
                                       settings.max_prompt_length)
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times[name].append(time.perf_counter() - start)
        return result

    for iteration in range(args.iterations):
        batch_prompts = rollout.prompt_batch(prompts, worker, settings.seed, iteration * settings.grpo_prompts,
                                             settings.grpo_prompts)
        rows = grpo.grouped(batch_prompts, training.num_generations)
        start = time.perf_counter()
        responses = timed("generate", policy.engine.generate, [p["input_ids"] for p in rows],
                          rollout.Sampling.of(training))
        query, query_mask = pad([p["input_ids"] for p in rows], tokenizer.pad_token_id, side="left", device=device)
        response, mask = pad(responses, tokenizer.pad_token_id, device=device)
        inputs = rollout.sequence_inputs(query, query_mask, response, mask)
        width = response.size(1)
        with torch.no_grad(), optim.autocast(training, device):
            timed("rollout: policy forward (old log-probs)", rollout.response_logits, unwrap(policy.model), inputs,
                  width)
            if policy.has_reference:
                timed("rollout: reference forward", policy.reference_logits, inputs, width)
            scored = rewards.Responses(rows, response, mask, tokenizer)
            for reward in models.rewards:
                timed("rollout: reward functions", reward, scored)
        batch = grpo.judge(models, rows, responses, training, device)  # what the update needs
        total = rewards.weighted_total([batch.scores[name] for name in models.names], models.weights)
        advantages = grpo.advantages_of(batch, total, grpo.token_kl(batch, training), training, device)
        timed("update", grpo.grpo_update, policy, optimizer, batch, advantages, training)
        times["iteration (rollout forwards counted once)"].append(
            time.perf_counter() - start - sum(times[k][-1] for k in times if k.startswith("rollout")))
    total_time = statistics.median(times["iteration (rollout forwards counted once)"][1:])
    for name, values in times.items():
        value = statistics.median(values[1:] or values)
        print(f"{name:<45} {value:8.3f} s  {100 * value / total_time:5.1f} %")


if __name__ == "__main__":
    main()
