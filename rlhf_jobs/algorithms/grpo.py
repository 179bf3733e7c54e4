"""GRPO and its critic-free relatives (Dr. GRPO, RLOO, REINFORCE++), on Ray Train. Read it top to bottom.

No critic: the baseline of a completion's reward comes from the other completions of the same prompt (a group).
Every worker holds the **policy** (trainable, DDP or FSDP), a frozen **reference** only when `kl_coeff` > 0 (none
with LoRA: the policy with its adapter disabled), and a frozen **reward model** only when one is configured
(`General.rm_pretrain` / `rm_name`); Python **reward functions** (`General.reward_functions`) need no model. Loading,
dropout off, the reference's dtype, sampling and the final export are PPO's (`rl/policy.py`, `rl/rollout.py`).

One iteration (`train_loop`, steps 1-5):

1. **Rollout** (`collect_rollout`). The next `experience_batch_size × workers` prompts of the seeded prompt stream
   (`rl.rollout.prompt_batch`: the same global batch on any number of workers), each sampled `num_generations`
   times ON THE SAME WORKER, so a group's statistics need no communication and are exact whatever the worker count.
   One forward over prompt + completion gives the policy's log-probs (the `old` ones of the ratio; temperature-
   scaled logits, in rollout and update alike), the reference's (when there is a KL) and the entropy.
2. **Rewards**. Every reward scores every completion: a function `fn(prompts, completions, **columns)` (TRL's
   signature; `columns` = the prompt records' other fields, e.g. `answer`), the reward model (`reward/model`,
   normalised with its recorded mean/std unless `normalize_score: false`). The total is
   Σ weight × reward over the rewards that gave one (`None` = no opinion, left out of the sum); a completion nobody
   scored has no total and advantage 0 (as TRL).
3. **Advantages** (`advantages_of`, `Training.advantage_estimator`):
   - `grpo`: (r − group mean) / (group std + 1e-4), std unbiased (TRL's `scale_rewards="group"`);
   - `dr_grpo`: r − group mean;
   - `rloo`: r − the mean of the group's other completions;
   - `reinforce_pp`: −kl_coeff × KL on every token and r on the last, discounted return-to-go (`gamma`), whitened
     with the mean and unbiased variance of ALL workers' completion tokens.
   With the KL in the reward (`kl_in_loss: false`, the default of rloo and reinforce_pp), the group estimators
   subtract kl_coeff × each completion's summed KL from r first (TRL's RLOOTrainer).
4. **Update** (`grpo_update`). `ppo_epochs` passes over shuffled minibatches of `mini_batch_size` prompts' groups:
   per token the clipped surrogate max(−A·ρ, −A·clip(ρ, 1 − cliprange_low, 1 + cliprange_high)), ρ = exp(logp −
   logp_old), plus with `kl_in_loss` kl_coeff × k3(policy, reference) (the GRPO paper's term; TRL multiplies it by
   ρ by default: at ρ = 1 the values agree, the gradients do not). Aggregated by `loss_aggregation`: `token_mean`
   (every completion token of the minibatch on ALL workers weighs the same), `seq_mean_token_sum` (Dr. GRPO: the mean
   over ALL workers' completions of each one's summed token losses) or `seq_mean_token_mean` (the GRPO paper: the
   mean of per-completion token means). So 2 workers compute what 1 worker does with their union.
5. **Metrics** over all workers: `reward`, `reward/<name>` per reward, `kl` (per completion, summed over its tokens),
   `entropy`, `clip_fraction`, `approx_kl`, `policy_loss`, `response_length`, `eos_fraction`, `equal_reward_groups`
   (the share of groups whose rewards are all equal: they teach nothing), `first_update_max_log_ratio` (0.0: the
   first minibatch saw exactly the rollout's log-probs). Held-out prompts (split `eval`, `rl.policy.sample_held_out`:
   one completion per prompt at the training temperature, fixed seed) at the start, every `eval_steps` and at the end:
   `eval_reward`, `eval_reward/<name>`, `eval_response_length`.

A reward function that raises or answers something else than one float or None per completion stops the run with
one line naming it, the error and the first record it failed on (`RewardError`, never retried); the last checkpoint
stays. Checkpoints, resume (also on another number of workers), `--stop-at-step` and the final policy in
`checkpoint_dir` work as in PPO (`rl/iterations.py`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_jobs.algorithms.rl import policy as rl_policy
from rlhf_jobs.algorithms.rl.advantages import (
    equal_groups,
    group_advantages,
    reinforce_pp_returns,
    sequence_kl_penalty,
)
from rlhf_jobs.algorithms.rl.iterations import IterationRun
from rlhf_jobs.algorithms.rl.losses import (
    aggregate,
    clipped_surrogate,
    kl_estimate,
    masked_mean,
    masked_whiten,
    surrogate_stats,
)
from rlhf_jobs.algorithms.rl.onpolicy import FirstUpdateCheck
from rlhf_jobs.algorithms.rl.policy import (
    Policy,
    PolicyOptimizer,
    held_out_length,
    load_policy,
    policy_path,
    sample_held_out,
)
from rlhf_jobs.algorithms.rl.rewards import (
    Responses,
    Reward,
    RewardModelScore,
    check_reward_functions,
    load_reward_functions,
    weighted_total,
)
from rlhf_jobs.algorithms.rl.rollout import (
    Sampling,
    frozen,
    response_logits,
    response_logprobs,
    response_slice,
    row_chunks,
    sequence_inputs,
    tokenize_prompts,
)
from rlhf_jobs.core.config import GRPOTraining, StageConfig
from rlhf_jobs.core.data import PPO_SCHEMA, load_splits, report_truncation
from rlhf_jobs.core.errors import DataError, RewardError
from rlhf_jobs.engine import launcher, optim, sharding
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.distributed import (
    Moments,
    all_reduce_max,
    all_reduce_sum,
    global_items_divisor,
    global_mean_var,
    peak_memory_gib,
)
from rlhf_jobs.engine.divergence import StepCheck
from rlhf_jobs.engine.logprobs import entropy
from rlhf_jobs.engine.models import load_reward_model, load_tokenizer, unwrap
from rlhf_jobs.engine.train_state import ModelState
from rlhf_jobs.engine.worker import Worker, progress, setup_worker
from rlhf_jobs.store.checkpoints import require_stage

STAGE = "grpo"


# ---- driver: data and reward functions --------------------------------------------------------------------


def prepare(config: StageConfig) -> dict[str, Any]:
    """On the driver: check the SFT/RM checkpoints, load and try every reward function, read and tokenise prompts."""
    general, dataset = config.General, config.Dataset
    if general.model_pretrain:
        require_stage(general.model_pretrain, "sft", "General.model_pretrain")
    reward_stats = None
    if general.rm_pretrain:
        reward_stats = require_stage(general.rm_pretrain, "rm", "General.rm_pretrain").get("reward_stats")
    functions = load_reward_functions(general.reward_functions)  # a missing file or name: one line, here
    tokenizer = load_tokenizer(policy_path(config), general.trust_remote_code)
    train, evaluation = load_splits(
        dataset.train_file, dataset.validation_file, dataset.validation_split_percentage,
        PPO_SCHEMA, config.Training.seed, max_tokens=dataset.max_prompt_length,
    )
    if len(train) < config.Training.num_training_workers:
        raise DataError(
            f"{dataset.train_file}: {len(train)} prompt(s) for {config.Training.num_training_workers} workers"
        )
    names = {"train": dataset.train_file, "eval": dataset.validation_file or "validation split"}
    prompts = {
        split: report_truncation(tokenize_prompts(records, tokenizer, dataset.prompt_format, dataset.max_prompt_length),
                                 names[split], "Dataset.max_prompt_length", dataset.max_prompt_length, PPO_SCHEMA.keep)
        if records is not None else None
        for split, records in (("train", train), ("eval", evaluation))
    }
    check_reward_functions(functions, prompts["train"][0], dataset.train_file)  # signature and answer, here
    return {**prompts, "reward_stats": reward_stats}


# ---- worker: models -----------------------------------------------------------------------------------------


class NormalizedScore:
    """A reward model's score as GRPO weighs it: (raw - mean) / std with the statistics its RM stage recorded
    (`Training.normalize_score`), so that it is on the scale of 0/1 reward functions; raw without them."""

    name = "model"

    def __init__(self, score: RewardModelScore, stats: dict[str, float] | None) -> None:
        self.score, self.stats = score, stats

    def __call__(self, responses: Responses) -> torch.Tensor:
        raw = self.score(responses)
        if not self.stats:
            return raw
        return (raw - self.stats["mean"]) / max(self.stats["std"], 1e-6)


@dataclass
class GRPOModels:
    policy: Policy
    rewards: list[Reward]  # the reward functions in config order, then the reward model's score
    weights: list[float]  # one per reward

    @property
    def names(self) -> list[str]:
        return [reward.name for reward in self.rewards]


def load_models(config: StageConfig, worker: Worker, reward_stats: dict[str, float] | None) -> GRPOModels:
    """The policy, its reference when there is a KL (`kl_coeff` > 0), the reward functions and the reward model
    (frozen, in the compute dtype) when one is configured."""
    general, training = config.General, config.Training
    policy = load_policy(config, worker, with_reference=training.kl_coeff > 0)
    rewards: list[Reward] = list(load_reward_functions(general.reward_functions))
    weights = list(general.reward_weights or [1.0] * len(rewards))
    rm_path = general.rm_pretrain or general.rm_name
    if rm_path:
        rm_tokenizer = load_tokenizer(rm_path, general.trust_remote_code, padding_side="right")
        rm_tokenizer.truncation_side = "left"
        reward_model = sharding.load_prepared(  # under FSDP loaded sharded, as the policy
            lambda: frozen(load_reward_model(rm_path, rm_tokenizer, general.trust_remote_code, dropout=False,
                                             dtype=sharding.frozen_dtype(training))), training, worker, trainable=False)
        positions = getattr(sharding.hf_model(unwrap(reward_model)).config, "max_position_embeddings", None) or 1024

        def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return reward_model(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False).logits.squeeze(-1).float()

        rm_score = RewardModelScore(score, rm_tokenizer, positions, training, worker.device)
        rewards.append(NormalizedScore(rm_score, reward_stats if training.normalize_score else None))
        weights.append(general.rm_weight)
    return GRPOModels(policy, rewards, weights)


# ---- worker: rollout ------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout: every prompt's `num_generations` completions (consecutive rows) and what was said about them."""

    prompts: list[dict[str, Any]]  # one per row: each prompt repeated num_generations times
    inputs: dict[str, torch.Tensor]  # prompt + completion: input_ids, attention_mask, position_ids
    response: torch.Tensor
    mask: torch.Tensor  # float, 1 on completion tokens up to and including the first EOS
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None  # None without a reference (kl_coeff 0)
    entropy: torch.Tensor  # masked mean over the rollout
    scores: dict[str, torch.Tensor]  # reward name -> one score per row, NaN = no opinion
    has_eos: torch.Tensor

    @property
    def size(self) -> int:
        return self.response.size(0)


def grouped(prompts: list[dict[str, Any]], group: int) -> list[dict[str, Any]]:
    """Each prompt `group` times in a row: the rows of one rollout, a group per prompt."""
    return [prompt for prompt in prompts for _ in range(group)]


@torch.no_grad()
def collect_rollout(models: GRPOModels, prompts: list[dict[str, Any]], training: GRPOTraining,
                    device: torch.device) -> Rollout:
    """Sample `num_generations` completions of every prompt (`rollout_batch_size` prompts' groups per generate
    call), then judge them."""
    rows = grouped(prompts, training.num_generations)
    chunk = (training.rollout_batch_size or len(prompts)) * training.num_generations
    sampling = Sampling.of(training)
    responses = [ids for part in row_chunks(len(rows), chunk)
                 for ids in models.policy.engine.generate([p["input_ids"] for p in rows[part]], sampling)]
    return judge(models, rows, responses, training, device)


@torch.no_grad()
def judge(models: GRPOModels, rows: list[dict[str, Any]], responses: list[list[int]], training: GRPOTraining,
          device: torch.device) -> Rollout:
    """The policy's (and the reference's) log-probs, the entropy and every reward of sampled completions,
    `rollout_batch_size` prompts' groups per forward."""
    policy, tokenizer = models.policy, models.policy.tokenizer
    chunk = (training.rollout_batch_size or training.experience_batch_size) * training.num_generations
    query, query_mask = pad([p["input_ids"] for p in rows], tokenizer.pad_token_id, side="left", device=device)
    response, mask = pad(responses, tokenizer.pad_token_id, device=device)
    inputs = sequence_inputs(query, query_mask, response, mask)
    width, temperature, chunk_size = response.size(1), training.temperature, training.logprob_chunk_size
    parts: dict[str, list[torch.Tensor]] = {"old_logp": [], "ref_logp": [], "entropy": []}
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in models.names}
    for part in row_chunks(len(rows), chunk):
        sub = {key: value[part] for key, value in inputs.items()}
        with optim.autocast(training, device):
            logits = response_logits(unwrap(policy.model), sub, width)
            parts["old_logp"].append(response_logprobs(logits, response[part], temperature, chunk_size))
            parts["entropy"].append(entropy(response_slice(logits, width), temperature, chunk_size))
            del logits
            if policy.has_reference:
                parts["ref_logp"].append(response_logprobs(policy.reference_logits(sub, width), response[part],
                                                           temperature, chunk_size))
        responses_part = Responses(rows[part], response[part], mask[part], tokenizer)
        for reward in models.rewards:
            scores[reward.name].append(reward(responses_part).float())
    maskf = mask.float()
    has_eos = ((response == tokenizer.eos_token_id) & (mask == 1)).any(1)
    return Rollout(rows, inputs, response, maskf, torch.cat(parts["old_logp"]),
                   torch.cat(parts["ref_logp"]) if parts["ref_logp"] else None,
                   masked_mean(torch.cat(parts["entropy"]), maskf),
                   {name: torch.cat(values) for name, values in scores.items()}, has_eos)


# ---- worker: advantages ----------------------------------------------------------------------------------------


def token_kl(batch: Rollout, training: GRPOTraining) -> torch.Tensor:
    """The per-token KL estimate (`kl_estimator`) of the rollout to the reference; zeros without one."""
    if batch.ref_logp is None:
        return torch.zeros_like(batch.old_logp)
    return kl_estimate(batch.old_logp, batch.ref_logp, training.kl_estimator) * batch.mask


def advantages_of(batch: Rollout, total: torch.Tensor, kl: torch.Tensor, training: GRPOTraining,
                  device: torch.device) -> torch.Tensor:
    """Advantages, [N, 1] (one per completion, the group estimators) or [N, T] (per token, REINFORCE++); 0 for a
    completion no reward scored. `kl`: per-token KL, subtracted in the reward unless it goes into the loss."""
    penalty = 0.0 if training.kl_penalty_in_loss or batch.ref_logp is None else training.kl_coeff
    if training.advantage_estimator == "reinforce_pp":
        returns = reinforce_pp_returns(total, kl, batch.mask, penalty, training.gamma)
        scored = batch.mask * (~total.isnan()).float()[:, None]
        return masked_whiten(returns, scored, stats=global_mean_var(returns, scored, device, unbiased=True))
    scores = sequence_kl_penalty(total, kl, batch.mask, penalty) if penalty else total
    return group_advantages(scores, training.num_generations, training.advantage_estimator)[:, None]


# ---- worker: update --------------------------------------------------------------------------------------------

UPDATE_STATS = ("loss", "policy_loss", "kl_loss", "clip_fraction", "approx_kl")


def grpo_update(policy: Policy, optimizer: PolicyOptimizer, batch: Rollout, advantages: torch.Tensor,
                training: GRPOTraining, step_check: Callable[[float, list[float]], None] | None = None,
                ) -> tuple[dict[str, float], FirstUpdateCheck]:
    """`ppo_epochs` passes over shuffled minibatches of `mini_batch_size` prompts' groups, each split into
    `gradient_accumulation_steps` micro-batches; (the mean of each statistic over the updates, the check that the
    first minibatch saw the rollout's log-probs). `step_check` sees each update's loss and gradient norm before the
    weights change (a non-finite one stops the run).

    The loss of a micro-batch is its summed per-token losses (per-sequence means for `seq_mean_token_mean`) divided
    by `global_items_divisor` of the minibatch's tokens (`token_mean`) or sequences (the `seq_mean_*` modes) on ALL
    workers: 2 workers compute what 1 worker does with their union. Statistics are token means, likewise.
    """
    group = training.num_generations
    mini_rows = (training.mini_batch_size or training.experience_batch_size) * group
    micro_rows = mini_rows // training.gradient_accumulation_steps
    updates = training.ppo_epochs * (batch.size // mini_rows)
    kl_in_loss = batch.ref_logp is not None and training.kl_coeff > 0 and training.kl_penalty_in_loss
    sums = dict.fromkeys(UPDATE_STATS, 0.0)
    width, device, scaler = batch.response.size(1), batch.response.device, optimizer.scaler
    check = FirstUpdateCheck()
    for _ in range(training.ppo_epochs):
        for rows in torch.randperm(batch.size).split(mini_rows):
            _, tokens = global_items_divisor(batch.mask[rows].sum().item(), device)
            divisor = tokens if training.loss_aggregation == "token_mean" else \
                global_items_divisor(len(rows), device)[1]
            micro_batches = rows.split(micro_rows)
            update_loss = 0.0
            for index, micro in enumerate(micro_batches):
                minibatch = {key: value[micro] for key, value in batch.inputs.items()}
                mask, old_logp = batch.mask[micro], batch.old_logp[micro]
                with sharding.gradient_sync(policy.model, index == len(micro_batches) - 1), \
                        optim.autocast(training, device):
                    logp = response_logprobs(response_logits(policy.model, minibatch, width), batch.response[micro],
                                             training.temperature, training.logprob_chunk_size)
                    check.add(logp, old_logp, mask)
                    surrogate, clipped, log_ratio = clipped_surrogate(logp, old_logp, advantages[micro],
                                                                      training.clip_low, training.clip_high)
                    pg_loss = aggregate(surrogate, mask, training.loss_aggregation, divisor)
                    kl_loss = torch.zeros((), device=device)
                    if kl_in_loss:
                        kl = kl_estimate(logp, batch.ref_logp[micro], "k3")
                        kl_loss = aggregate(training.kl_coeff * kl, mask, training.loss_aggregation, divisor)
                    loss = pg_loss + kl_loss
                    (scaler.scale(loss) if scaler else loss).backward()
                update_loss += loss.item()
                stats = {"loss": loss, "policy_loss": pg_loss, "kl_loss": kl_loss,
                         **surrogate_stats(clipped, log_ratio, mask, tokens)}
                for name, value in stats.items():
                    sums[name] += value.item() / updates
            optim.step([(optimizer.optimizer, policy.model)], training, scaler,
                       check=step_check and (lambda norms, loss=update_loss: step_check(loss, norms)))
            check.stepped()
            optimizer.schedule.step()
    return sums, check


# ---- worker: metrics and evaluation ------------------------------------------------------------------------------


def scored_moments(values: torch.Tensor, device: torch.device) -> Moments:
    """Count, sum and squares of the non-NaN values, over all workers."""
    scored = ~values.isnan()
    return Moments().add(values.nan_to_num(0.0), scored.float()).reduce(device)


def reward_metrics(scores: dict[str, torch.Tensor], total: torch.Tensor, device: torch.device,
                   prefix: str = "") -> dict[str, float]:
    """`reward` (the weighted total) and `reward/<name>` per reward: means over the completions they scored on all
    workers (a reward that scored none is left out)."""
    metrics = {}
    for name, values in scores.items():
        moments = scored_moments(values, device)
        if moments.count:
            metrics[f"{prefix}reward/{name}"] = moments.mean
    moments = scored_moments(total, device)
    return {f"{prefix}reward": moments.mean, f"{prefix}reward_std": moments.std, **metrics}


def iteration_metrics(batch: Rollout, total: torch.Tensor, kl: torch.Tensor, update_stats: dict[str, float],
                      training: GRPOTraining, worker: Worker) -> dict[str, float]:
    """The iteration's debug variables over ALL workers (the update's statistics averaged over workers)."""
    device = batch.mask.device
    equal = equal_groups(total, training.num_generations)
    reduced = all_reduce_sum([
        kl.sum().item(), batch.entropy.item(), batch.mask.sum().item(), batch.has_eos.float().sum().item(),
        equal.float().sum().item(), float(equal.numel()), float(batch.size), *update_stats.values(),
    ], device)
    kl_sum, entropy_sum, tokens, eos_count, equal_count, groups, sequences = reduced[:7]
    (memory,) = all_reduce_max([peak_memory_gib(device)], device)
    return {
        **reward_metrics(batch.scores, total, device),
        **({"kl": kl_sum / sequences} if batch.ref_logp is not None else {}),
        "entropy": entropy_sum / worker.world_size,
        **{name: value / worker.world_size for name, value in zip(update_stats, reduced[7:], strict=True)},
        "response_length": tokens / sequences, "eos_fraction": eos_count / sequences,
        **({"equal_reward_groups": equal_count / groups} if training.num_generations > 1 else {}),
        "memory_peak_gib": memory,
    }


def evaluate_held_out(models: GRPOModels, eval_prompts: list[dict[str, Any]] | None, training: GRPOTraining,
                      worker: Worker) -> dict[str, float]:
    """`eval_reward` and `eval_reward/<name>` of one sampled completion per held-out prompt (fixed seed)."""
    if not eval_prompts:
        return {}
    values, length = sample_held_out(models.policy.engine, models.policy.tokenizer, models.rewards, eval_prompts,
                                     training, worker)
    total = weighted_total(values, models.weights)
    metrics = reward_metrics(dict(zip(models.names, values, strict=True)), total, worker.device, prefix="eval_")
    count = all_reduce_sum([float(total.numel())], worker.device)[0]
    return {**metrics, "eval_response_length": held_out_length(length, count, worker.device)}


def eval_summary(metrics: dict[str, float]) -> str:
    parts = [f"reward {metrics['eval_reward']:.4f}"]
    parts += [f"{key.removeprefix('eval_reward/')} {value:.4f}" for key, value in metrics.items()
              if key.startswith("eval_reward/")]
    return ", ".join(parts)


# ---- worker: the training loop -----------------------------------------------------------------------------------


@contextlib.contextmanager
def reward_failures(run: IterationRun, held_out: bool = False) -> Iterator[None]:
    """A reward function's failure as one line saying where the run stopped and what it kept."""
    try:
        yield
    except RewardError as err:
        where = f"scoring the held-out prompts at iteration {run.iteration}" if held_out else \
            f"at iteration {run.iteration + 1}"
        raise RewardError(f"{STAGE}: stopped {where}: {err}. No checkpoint was written since; the last one is "
                          f"kept in {run.config.General.output_dir}") from None


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    # -- hyperparameters and data
    config, worker = setup_worker(loop_config)
    general = config.General
    train_prompts, eval_prompts = loop_config["data"]["train"], loop_config["data"]["eval"]

    # -- models, optimizer, resume (on any number of workers: the global batch stays the checkpoint's)
    models = load_models(config, worker, loop_config["data"]["reward_stats"])
    policy = models.policy
    policy_optimizer = PolicyOptimizer.optimizer_of(policy.model, config.Training)
    tensors = {"policy": ModelState(policy.model, policy_optimizer, trainable_only=True)}
    run = IterationRun(STAGE, config, worker, loop_config, tensors, len(train_prompts))
    training: GRPOTraining = run.training
    optimizer = PolicyOptimizer.around(policy_optimizer, training, run.updates, worker.device)
    run.resume(optimizer.state_dict, optimizer.load_state_dict)
    with reward_failures(run, held_out=True):
        run.start(lambda: evaluate_held_out(models, eval_prompts, training, worker), eval_summary)
    check_update = StepCheck(STAGE, training, worker, general.output_dir, unit="iteration", models=("policy",))
    while run.running:
        run.seed()

        # -- 1. rollout and 2. rewards
        start = time.perf_counter()
        with reward_failures(run):
            batch = collect_rollout(models, run.prompts(train_prompts), training, worker.device)
        total = weighted_total([batch.scores[name] for name in models.names], models.weights)
        time_rollout = time.perf_counter() - start

        # -- 3. advantages
        kl = token_kl(batch, training)
        advantages = advantages_of(batch, total, kl, training, worker.device)

        # -- 4. update
        start = time.perf_counter()
        update_stats, on_policy = grpo_update(
            policy, optimizer, batch, advantages, training,
            step_check=lambda loss, norms, at=run.iteration + 1: check_update(at, loss, worker.world_size, norms))
        time_update = time.perf_counter() - start
        run.advance()

        # -- 5. metrics (over all workers)
        metrics = iteration_metrics(batch, total, kl, update_stats, training, worker)
        metrics |= on_policy.metrics(worker.device, with_values=False)
        sequences = run.global_batch * training.num_generations
        metrics |= {
            "learning_rate": optimizer.learning_rate, "time_rollout": time_rollout, "time_update": time_update,
            "tokens_per_second": metrics["response_length"] * sequences / max(time_rollout, 1e-9),
            "epoch": run.epoch,
        }
        by_reward = " ".join(f"{key.removeprefix('reward/')} {value:.3f}" for key, value in metrics.items()
                             if key.startswith("reward/"))
        progress(
            worker, STAGE,
            f"iteration {run.iteration}/{run.iterations} reward {metrics['reward']:.3f} ({by_reward}) "
            + (f"kl {metrics['kl']:.3f} " if "kl" in metrics else "")
            + f"entropy {metrics['entropy']:.2f} loss {metrics['loss']:.3f} clip {metrics['clip_fraction']:.2f} "
            f"len {metrics['response_length']:.1f} "
            + (f"equal groups {metrics['equal_reward_groups']:.2f} " if "equal_reward_groups" in metrics else "")
            + f"rollout {time_rollout:.1f}s update {time_update:.1f}s {metrics['tokens_per_second']:.0f} tok/s",
        )
        with reward_failures(run, held_out=True):
            outcome = run.end_iteration(metrics)
        if outcome is not None:
            return outcome

    with reward_failures(run, held_out=True):
        eval_metrics = run.finish()
    rl_policy.save_final(config, STAGE, policy.model, policy.tokenizer,
                         {"stage": STAGE, "config": config.to_dict(), "iteration": run.iteration,
                          "metrics": eval_metrics}, worker)


def train(config: StageConfig, stop_at_step: int | None = None, in_process: bool = False) -> Any:
    """Driver: validate checkpoints, data and reward functions (errors surface before Ray starts), then train."""
    return launcher.run_trainer(config, train_loop, data=prepare(config), stop_at_step=stop_at_step,
                                in_process=in_process)
