"""Where one PPO iteration of ours spends its time, phase by phase, in one process (no Ray).

The bench's PPO settings (common.SIZES) on its model, through `rlhf_jobs.algorithms.ppo`'s own functions:
generation, the four rollout forwards (policy, reference, critic, reward model), and the update
(policy and critic forward/backward, clipping, optimizer steps). Medians over the iterations after
the first, in seconds and as a share of the iteration.

    python bench/profile_ppo_step.py                                  # the tiny model
    python bench/profile_ppo_step.py --size 300m --iterations 3 --threads 2
"""

from __future__ import annotations

import time

import torch
from common import DATA, PPO_FILE, read_jsonl
from ours import ppo_config
from phases import PhaseTimes, profile_arguments, set_up

from rlhf_jobs.algorithms import ppo
from rlhf_jobs.algorithms.rl import advantages as rl_advantages
from rlhf_jobs.algorithms.rl import losses, rollout
from rlhf_jobs.algorithms.rl import rewards as rl_rewards
from rlhf_jobs.engine import optim
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import unwrap
from rlhf_jobs.engine.worker import Worker


def main() -> None:
    args = profile_arguments(__doc__.splitlines()[0])
    settings, model = set_up(args)
    config = ppo_config(settings, model, DATA / PPO_FILE, args.workdir.resolve() / "profile-ppo", workers=1)
    training, device = config.Training, torch.device("cpu")
    worker = Worker(0, 1, device)
    models = ppo.load_models(config, worker, None)
    optimizers = ppo.Optimizers.build(models, training, 10_000, device)
    prompts = rollout.tokenize_prompts(read_jsonl(DATA / PPO_FILE), models.tokenizer, "instruction",
                                   settings.max_prompt_length)
    phases = PhaseTimes()
    timed = phases.timed
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
        phases.end_iteration(start)
    if args.table:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            ppo.ppo_update(models, optimizers, batch, advantages, returns, training)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    phases.report()


if __name__ == "__main__":
    main()
