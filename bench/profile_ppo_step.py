"""Where one PPO iteration of ours spends its time, phase by phase, in one process (no Ray).

The bench's PPO settings (common.SIZES) on its model, through `rlhf_jobs.algorithms.ppo`'s own functions:
generation, the four rollout forwards (policy, reference, critic, reward model), and the update
(policy and critic forward/backward, clipping, optimizer steps). Medians over the iterations after
the first, in seconds and as a share of the iteration.

    python bench/profile_ppo_step.py                                  # the tiny model
    python bench/profile_ppo_step.py --size 300m --iterations 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import DATA, PPO_FILE, REPO, SIZES, build_model, read_jsonl
from ours import ppo_config

from rlhf_jobs.algorithms import ppo
from rlhf_jobs.algorithms.rl import advantages as rl_advantages
from rlhf_jobs.algorithms.rl import losses, rollout
from rlhf_jobs.algorithms.rl import rewards as rl_rewards
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
    parser.add_argument("--table", action="store_true", help="a torch.profiler table of the last update")
    args = parser.parse_args()
    settings = SIZES[args.size]
    torch.set_num_threads(args.threads or settings.threads)
    torch.manual_seed(settings.seed)
    model = build_model(args.size, args.workdir.resolve())
    config = ppo_config(settings, model, DATA / PPO_FILE, args.workdir.resolve() / "profile-ppo", workers=1)
    training, device = config.Training, torch.device("cpu")
    worker = Worker(0, 1, device)
    models = ppo.load_models(config, worker, None)
    optimizers = ppo.Optimizers.build(models, training, 10_000, device)
    prompts = rollout.tokenize_prompts(read_jsonl(DATA / PPO_FILE), models.tokenizer, "instruction",
                                   settings.max_prompt_length)
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times[name].append(time.perf_counter() - start)
        return result

    for iteration in range(args.iterations):
        batch_prompts = rollout.prompt_batch(prompts, worker, settings.seed, iteration * settings.ppo_batch_size,
                                             settings.ppo_batch_size)
        start = time.perf_counter()
        responses = timed("generate", models.engine.generate, [p["input_ids"] for p in batch_prompts],
                          rollout.Sampling.of(training))
        query, query_mask = pad([p["input_ids"] for p in batch_prompts], models.tokenizer.pad_token_id,
                                side="left", device=device)
        response, mask = pad(responses, models.tokenizer.pad_token_id, device=device)
        inputs = rollout.sequence_inputs(query, query_mask, response, mask)
        width = response.size(1)
        with torch.no_grad(), optim.autocast(training, device):
            timed("rollout: policy forward", rollout.response_logits, unwrap(models.policy), inputs, width)
            timed("rollout: reference forward", models.reference_logits, inputs, width)
            timed("rollout: critic forward", unwrap(models.critic), **inputs)
            timed("rollout: reward model", models.reward,
                  rl_rewards.Responses(batch_prompts, response, mask, models.tokenizer))
        batch = ppo.judge_responses(models, batch_prompts, responses, training, device)  # what the update needs
        kl = losses.kl_estimate(batch.old_logp, batch.ref_logp, training.kl_estimator) * batch.mask
        rewards, _ = rl_advantages.compute_rewards(batch.raw_score, kl, batch.mask, training.kl_coeff)
        advantages, returns = rl_advantages.compute_gae(rewards, batch.old_values, batch.mask, training.gamma,
                                                        training.lam)
        advantages = losses.masked_whiten(advantages, batch.mask)
        timed("update (all PPO epochs)", ppo.ppo_update, models, optimizers, batch, advantages, returns, training)
        times["iteration (rollout forwards counted once)"].append(
            time.perf_counter() - start - sum(times[k][-1] for k in times if k.startswith("rollout")))
    if args.table:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            ppo.ppo_update(models, optimizers, batch, advantages, returns, training)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    total = statistics.median(times["iteration (rollout forwards counted once)"][1:])
    for name, values in times.items():
        value = statistics.median(values[1:] or values)
        print(f"{name:<45} {value:8.3f} s  {100 * value / total:5.1f} %")


if __name__ == "__main__":
    main()
