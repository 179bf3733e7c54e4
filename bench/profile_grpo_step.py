"""Where one GRPO iteration of ours spends its time, phase by phase, in one process (no Ray).

The bench's GRPO settings (common.SIZES, `ours.grpo_config`) on its model, through `rlhf_jobs.algorithms.grpo`'s
own functions: generation, the rollout's forwards (the policy's old log-probs and entropy, the reference's
log-probs), the reward functions, the advantages, and the update (forward/backward, clipping, the optimizer step).
Medians over the iterations after the first, in seconds and as a share of the iteration.

    python bench/profile_grpo_step.py                                  # the tiny model
    python bench/profile_grpo_step.py --size 300m --iterations 3 --threads 2
"""

from __future__ import annotations

import time

import torch
from common import DATA, PPO_FILE, read_jsonl
from ours import grpo_config
from phases import PhaseTimes, profile_arguments, set_up

from rlhf_jobs.algorithms import grpo
from rlhf_jobs.algorithms.rl import rewards, rollout
from rlhf_jobs.algorithms.rl.policy import PolicyOptimizer
from rlhf_jobs.engine import optim
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import unwrap
from rlhf_jobs.engine.worker import Worker


def main() -> None:
    args = profile_arguments(__doc__.splitlines()[0])
    settings, model = set_up(args)
    config = grpo_config(settings, model, DATA / PPO_FILE, args.workdir.resolve() / "profile-grpo", workers=1)
    training, device = config.Training, torch.device("cpu")
    worker = Worker(0, 1, device)
    models = grpo.load_models(config, worker, None)
    policy, tokenizer = models.policy, models.policy.tokenizer
    optimizer = PolicyOptimizer.around(PolicyOptimizer.optimizer_of(policy.model, training), training, 10_000,
                                       device)
    prompts = rollout.tokenize_prompts(read_jsonl(DATA / PPO_FILE), tokenizer, "instruction",
                                       settings.max_prompt_length)
    phases = PhaseTimes()
    timed = phases.timed
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
        phases.end_iteration(start)
    if args.table:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            grpo.grpo_update(policy, optimizer, batch, advantages, training)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    phases.report()


if __name__ == "__main__":
    main()
