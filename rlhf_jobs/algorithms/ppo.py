"""PPO: optimise the SFT policy against the reward model, on Ray Train. Read it top to bottom.

Every worker holds four models: the **policy** (trainable, DDP), a frozen **reference** copy of
the initial policy, the **critic** (trainable, DDP: the reward model's backbone with its score
head applied at every position, so values start out as reward-model scores) and the frozen
**reward model**. Frozen models are in eval mode under `torch.no_grad`. Every dropout is off in all
four, LoRA's `lora_dropout` and attention-dropout rates included (`models.disable_dropout`): the first
minibatch of each iteration must see exactly the rollout's log-probs and values (ratio exactly 1), which
`onpolicy.FirstUpdateCheck` measures and logs every iteration. The reference computes exactly the
policy's initial function in every precision and strategy (`sharding.reference_dtype`): KL is exactly 0
before the first update.

One iteration (`train_loop`, steps 1-5):

1. **Rollout** (`collect_experience`). An iteration takes the next `experience_batch_size × workers`
   prompts of one seeded shuffle of all prompts per epoch (`prompt_batch`; every prompt is used once
   per epoch), worker `r` every `workers`-th of them from `r`: the order and the global batch do not
   depend on the worker count, so a run resumes on another number of workers where it stopped
   (`resumed_layout`). Prompts are left-padded and left-truncated to `max_prompt_length`; responses are
   sampled in one batched `generate` with the KV cache. Tokens after the first EOS are padding (the EOS
   itself is part of the response). One forward over prompt + response gives the log-probs of the
   response tokens under the policy and the reference (temperature-scaled logits, the same in rollout
   and update) and the critic's value of each response token. The reward model scores the text it was
   trained on, `join_response(prompt_text, response_text)`, re-tokenised with its own tokenizer.
2. **Rewards** (`compute_rewards`). Per token: `-kl_coeff × KL` (k1 `logp - ref_logp`, or k3
   `(r - 1) - log r` with `r = exp(ref_logp - logp)`); the score (`shape_scores`: normalised with the
   reward model's recorded mean/std, clipped to ±`score_clip`, minus `missing_eos_penalty` without EOS)
   is added at the last response token.
3. **Advantages** (`compute_gae`). GAE(`gamma`, `lam`) over the response tokens (the value after the
   last one is 0); returns = advantages + values; advantages whitened with the mean and the unbiased
   variance (as TRL) of ALL workers' response tokens.
4. **Update** (`ppo_update`). `ppo_epochs` passes over shuffled minibatches of `mini_batch_size`:
   per-token ratio `exp(logp_new - logp_old)`, clipped surrogate loss and clipped value loss, both means
   over the minibatch's response tokens on ALL workers (every token weighs the same, as in SFT and the
   RM: 2 workers compute what 1 worker computes with their union). One backward of
   `policy_loss + vf_coef × value_loss` fills the gradients of the two separate models, each clipped to
   `max_grad_norm` and stepped by its own optimizer (`learning_rate` / `critic_learning_rate`). Prompt
   and padding tokens never contribute.
5. **KL control** (optional, `target_kl`): Ziegler et al.'s adaptive coefficient; then the metrics
   (`iteration_metrics`, over all workers).

Metrics go to `metrics.jsonl` and TensorBoard every iteration; the held-out prompts are scored
(`eval_score_mean`, split "eval") at the start, every `eval_steps` iterations and at the end. Ray
Train checkpoints (policy, critic, optimizers, schedulers, KL coefficient, iteration, prompt
position, global batch) every `save_steps` (default `eval_steps`) iterations and at the end; a rerun with the
same `output_dir` resumes. The final policy + tokenizer are written to `checkpoint_dir`
(atomically, with the `rlhf_stage.json` marker) and the critic to `checkpoint_dir/critic`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.algorithms.rl import policy as rl_policy
from rlhf_jobs.algorithms.rl.advantages import AdaptiveKLController, compute_gae, compute_rewards
from rlhf_jobs.algorithms.rl.iterations import IterationRun
from rlhf_jobs.algorithms.rl.losses import kl_estimate, masked_mean, masked_whiten, policy_loss, value_loss
from rlhf_jobs.algorithms.rl.onpolicy import FirstUpdateCheck
from rlhf_jobs.algorithms.rl.policy import (
    Companion,
    PolicyOptimizer,
    held_out_length,
    load_policy,
    policy_path,
    sample_held_out,
)
from rlhf_jobs.algorithms.rl.rewards import Responses, RewardModelScore
from rlhf_jobs.algorithms.rl.rollout import (
    RolloutEngine,
    Sampling,
    frozen,
    reference_logits,
    response_logits,
    response_logprobs,
    response_slice,
    row_chunks,
    sequence_inputs,
    tokenize_prompts,
)
from rlhf_jobs.core.config import PPOTraining, StageConfig
from rlhf_jobs.core.data import PPO_SCHEMA, load_splits, report_truncation
from rlhf_jobs.core.errors import DataError
from rlhf_jobs.engine import export, launcher, optim, sharding
from rlhf_jobs.engine.adapters import add_lora, disabled_adapter
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
from rlhf_jobs.engine.models import disable_dropout, load_reward_model, load_tokenizer, unwrap
from rlhf_jobs.engine.train_state import ModelState
from rlhf_jobs.engine.worker import Worker, progress, setup_worker
from rlhf_jobs.store.checkpoints import require_stage

STAGE = "ppo"


# ---- models ----------------------------------------------------------------------------------------------


def score_head(classifier: torch.nn.Module) -> torch.nn.Linear:
    """The one-output linear head of a transformers sequence classifier (`score` in most architectures)."""
    hf_model = sharding.hf_model(classifier)
    head = getattr(hf_model, "score", None) or getattr(hf_model, "classifier", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise TypeError(f"{type(hf_model).__name__} has no one-output linear score head")
    return head


class Critic(torch.nn.Module):
    """A value per position: a sequence classifier's transformer and a value head of its own.

    The value head starts as the classifier's score head rescaled by the reward model's recorded
    statistics, `(score - mean) / std`, so the critic's first value at the last response token is the
    normalised score the rewards use. The classifier's own head stays frozen: with LoRA the critic's
    base model, adapter disabled, is the reward model itself (`forward(..., score=True)`).
    """

    def __init__(self, classifier: torch.nn.Module, value_head: torch.nn.Linear) -> None:
        super().__init__()
        self.classifier, self.value_head = classifier, value_head
        score_head(classifier).requires_grad_(False)

    @classmethod
    def from_classifier(cls, classifier: torch.nn.Module, reward_stats: dict[str, float] | None = None) -> Critic:
        """The value head = the classifier's score head, rescaled to `(score - mean) / std`."""
        head = score_head(classifier)
        mean, std = (reward_stats["mean"], max(reward_stats["std"], 1e-6)) if reward_stats else (0.0, 1.0)
        value_head = torch.nn.Linear(head.in_features, 1, dtype=torch.float32, device=head.weight.device)
        with torch.no_grad():
            value_head.weight.copy_(head.weight.float() / std)
            bias = head.bias.float() if head.bias is not None else torch.zeros(1, device=head.weight.device)
            value_head.bias.copy_((bias - mean) / std)
        return cls(classifier, value_head)

    def skeleton(self) -> Critic:
        """An empty (meta-device) critic of the same structure, to gather a sharded one into."""
        with torch.device("meta"):
            value_head = torch.nn.Linear(self.value_head.in_features, 1, dtype=torch.float32)
        return Critic(export.skeleton(self.classifier), value_head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, score: bool = False) -> torch.Tensor:
        if score:  # the classifier's own score (the reward model, when the adapter is disabled)
            return self.classifier(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits.squeeze(-1).float()
        transformer = sharding.hf_model(self.classifier).base_model
        hidden = transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()


# ---- driver: data -------------------------------------------------------------------------------------------


def prepare(config: StageConfig) -> dict[str, Any]:
    """On the driver: check the SFT/RM checkpoints, read and tokenise prompts, read the RM's score stats."""
    general, dataset = config.General, config.Dataset
    if general.model_pretrain:
        require_stage(general.model_pretrain, "sft", "General.model_pretrain")
    reward_stats = None
    if general.rm_pretrain:
        reward_stats = require_stage(general.rm_pretrain, "rm", "General.rm_pretrain").get("reward_stats")
    tokenizer = load_tokenizer(general.model_pretrain or general.model_name, general.trust_remote_code)
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
    return {**prompts, "reward_stats": reward_stats}


# ---- worker: models and optimizers ---------------------------------------------------------------------------


@dataclass
class PPOModels:
    policy: torch.nn.Module  # trainable; wrapped (DDP) or sharded (FSDP)
    critic: Critic  # trainable, likewise
    reference: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled
    reward_model: torch.nn.Module | None  # None with LoRA when it shares the critic's base model
    tokenizer: Any  # the policy's, left padding
    rm_tokenizer: Any  # the reward model's, right padding, left truncation
    engine: RolloutEngine  # samples the responses (transformers' generate on the policy)
    reward: RewardModelScore  # the reward model's score of a response

    def reference_logits(self, inputs: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        return reference_logits(self.policy, self.reference, inputs, width)

    @torch.no_grad()
    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_model_forward(self.reward_model, self.critic)(input_ids, attention_mask)


def reward_model_forward(reward_model: torch.nn.Module | None,
                         critic: Critic) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reward model's score of token ids: the frozen classifier, or with LoRA (no such copy) the critic's base
    model with its adapter disabled, which is the reward model itself."""
    if reward_model is not None:
        return lambda input_ids, attention_mask: reward_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float()

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        module = unwrap(critic)
        with disabled_adapter(module.classifier):
            return module(input_ids=input_ids, attention_mask=attention_mask, score=True)

    return score


def load_models(config: StageConfig, worker: Worker, reward_stats: dict[str, float] | None) -> PPOModels:
    """The models on this worker. Trainable weights in fp32; frozen ones in the compute dtype under mixed
    precision. With LoRA, one base model serves as policy and reference, another as critic and reward model."""
    general, training = config.General, config.Training
    rm_path = general.rm_pretrain or general.rm_name
    trust, lora = general.trust_remote_code, training.lora
    frozen_dtype, trained_dtype = sharding.frozen_dtype(training), sharding.load_dtype(training)
    # Each model is distributed as soon as it is loaded, and under FSDP loaded sharded (`sharding.load_prepared`):
    # no worker holds a full fp32 copy (rank 0 reads each checkpoint, the others only receive their shards).
    policy = load_policy(config, worker)
    tokenizer = policy.tokenizer
    rm_tokenizer = load_tokenizer(rm_path, trust, padding_side="right")
    rm_tokenizer.truncation_side = "left"
    # The critic reads the policy's tokens: it starts from the RM when they share a vocabulary (its value
    # head then starts as the normalised score), else from the policy's backbone with a fresh value head.
    # Started from the RM, it is the RM too under LoRA (adapter disabled), which reads the RM tokenizer's padding.
    same_vocab = rm_tokenizer.get_vocab() == tokenizer.get_vocab()

    def build_critic() -> Critic:
        classifier = load_reward_model(rm_path if same_vocab else policy_path(config),
                                       rm_tokenizer if same_vocab else tokenizer, trust, dropout=False,
                                       dtype=trained_dtype)
        critic = Critic.from_classifier(classifier, reward_stats if same_vocab else None)
        if lora:  # the transformer gets adapters; the score head stays the reward model's
            critic.classifier = disable_dropout(add_lora(classifier, lora, "FEATURE_EXTRACTION",
                                                         exclude=("score", "classifier")))
        return critic

    critic = sharding.load_prepared(build_critic, training, worker)
    reward_model = None
    if not (lora and same_vocab):
        reward_model = sharding.load_prepared(
            lambda: frozen(load_reward_model(rm_path, rm_tokenizer, trust, dropout=False, dtype=frozen_dtype)),
            training, worker, trainable=False)
    scorer = reward_model if reward_model is not None else critic
    positions = getattr(sharding.hf_model(unwrap(scorer)).config, "max_position_embeddings", None) or 1024
    reward = RewardModelScore(reward_model_forward(reward_model, critic), rm_tokenizer, positions, training,
                              worker.device)
    return PPOModels(policy=policy.model, critic=critic, reference=policy.reference, reward_model=reward_model,
                     tokenizer=tokenizer, rm_tokenizer=rm_tokenizer, engine=policy.engine, reward=reward)


@dataclass
class Optimizers:
    """The policy's optimizer, schedule and fp16 loss scaler (`rl.policy.PolicyOptimizer`), the critic's optimizer
    and schedule, and the KL coefficient."""

    policy_side: PolicyOptimizer
    critic: torch.optim.Optimizer
    critic_schedule: Any
    kl_control: AdaptiveKLController

    @property
    def policy(self) -> torch.optim.Optimizer:
        return self.policy_side.optimizer

    @property
    def policy_schedule(self) -> Any:
        return self.policy_side.schedule

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.policy_side.scaler

    @classmethod
    def build(cls, models: PPOModels, training: PPOTraining, total_updates: int, device: torch.device) -> Optimizers:
        return cls.around(*cls.optimizers(models, training), training, total_updates, device)

    @staticmethod
    def optimizers(models: PPOModels, training: PPOTraining) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """The policy's and the critic's optimizers alone (a resume loads their state before the schedules
        are built: how many updates a run has depends on the checkpoint's global batch)."""
        return (PolicyOptimizer.optimizer_of(models.policy, training),
                PolicyOptimizer.optimizer_of(models.critic, training, training.critic_learning_rate))

    @classmethod
    def around(cls, policy: torch.optim.Optimizer, critic: torch.optim.Optimizer, training: PPOTraining,
               total_updates: int, device: torch.device) -> Optimizers:
        """Schedules over `total_updates`, the KL coefficient and the loss scaler, around built optimizers."""
        return cls(PolicyOptimizer.around(policy, training, total_updates, device), critic,
                   optim.build_scheduler(critic, training, total_updates),
                   AdaptiveKLController(training.kl_coeff, training.target_kl, training.kl_horizon))

    def state_dict(self) -> dict[str, Any]:
        """What resumes besides the tensors (those go through `train_state.ModelState`)."""
        return {**self.policy_side.state_dict(), "critic_scheduler": self.critic_schedule.state_dict(),
                "kl_control": self.kl_control.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy_side.load_state_dict(state)
        optim.restore_scheduler(self.critic_schedule, state["critic_scheduler"])
        self.kl_control.load_state_dict(state["kl_control"])


# ---- worker: rollout ---------------------------------------------------------------------------------------------



def shape_scores(raw: torch.Tensor, has_eos: torch.Tensor, reward_stats: dict[str, float] | None,
                 training: PPOTraining) -> torch.Tensor:
    """The score PPO optimises: normalised with the RM's statistics, clipped, minus the missing-EOS penalty."""
    shaped = raw
    if reward_stats:
        shaped = (shaped - reward_stats["mean"]) / max(reward_stats["std"], 1e-6)
    if training.score_clip:
        shaped = shaped.clamp(-training.score_clip, training.score_clip)
    return shaped - training.missing_eos_penalty * (~has_eos).float()


@dataclass
class Experience:
    """One rollout batch: the sampled responses and what the frozen copies said about them."""

    inputs: dict[str, torch.Tensor]  # prompt + response: input_ids, attention_mask, position_ids
    response: torch.Tensor
    mask: torch.Tensor  # float, 1 on response tokens up to and including the first EOS
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    entropy: torch.Tensor  # masked mean over the batch
    raw_score: torch.Tensor
    has_eos: torch.Tensor

    @property
    def size(self) -> int:
        return self.response.size(0)


@torch.no_grad()
def collect_experience(models: PPOModels, prompts: list[dict[str, Any]], training: PPOTraining,
                       device: torch.device) -> Experience:
    """Generate, then the four rollout forwards, `rollout_batch_size` prompts at a time."""
    chunk = training.rollout_batch_size or len(prompts)
    sampling = Sampling.of(training)
    responses = [ids for rows in row_chunks(len(prompts), chunk)
                 for ids in models.engine.generate([p["input_ids"] for p in prompts[rows]], sampling)]
    return judge_responses(models, prompts, responses, training, device)


@torch.no_grad()
def judge_responses(models: PPOModels, prompts: list[dict[str, Any]], responses: list[list[int]],
                    training: PPOTraining, device: torch.device) -> Experience:
    """What the policy, the reference, the critic and the reward model say about sampled responses,
    `rollout_batch_size` sequences per forward."""
    tokenizer, chunk = models.tokenizer, training.rollout_batch_size or len(prompts)
    query, query_mask = pad([p["input_ids"] for p in prompts], tokenizer.pad_token_id, side="left", device=device)
    response, mask = pad(responses, tokenizer.pad_token_id, device=device)
    inputs = sequence_inputs(query, query_mask, response, mask)
    width, temperature, chunk_size = response.size(1), training.temperature, training.logprob_chunk_size
    maskf = mask.float()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("old_logp", "ref_logp", "values", "entropy", "raw")}
    for rows in row_chunks(len(prompts), chunk):
        sub = {key: value[rows] for key, value in inputs.items()}
        with optim.autocast(training, device):
            logits = response_logits(unwrap(models.policy), sub, width)
            parts["old_logp"].append(response_logprobs(logits, response[rows], temperature, chunk_size))
            parts["entropy"].append(entropy(response_slice(logits, width), temperature, chunk_size))
            del logits
            parts["ref_logp"].append(response_logprobs(models.reference_logits(sub, width), response[rows],
                                                       temperature, chunk_size))
            parts["values"].append(response_slice(unwrap(models.critic)(**sub), width))
            parts["raw"].append(models.reward(Responses(prompts[rows], response[rows], mask[rows], tokenizer)))
    joined = {name: torch.cat(values) for name, values in parts.items()}
    has_eos = ((response == tokenizer.eos_token_id) & (mask == 1)).any(1)
    return Experience(inputs, response, maskf, joined["old_logp"], joined["ref_logp"], joined["values"] * maskf,
                      masked_mean(joined["entropy"], maskf), joined["raw"], has_eos)


# ---- worker: update ------------------------------------------------------------------------------------------------

UPDATE_STATS = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl")


def ppo_update(models: PPOModels, optimizers: Optimizers, batch: Experience, advantages: torch.Tensor,
               returns: torch.Tensor, training: PPOTraining,
               step_check: Callable[[float, list[float]], None] | None = None,
               ) -> tuple[dict[str, float], FirstUpdateCheck]:
    """`ppo_epochs` passes of clipped policy and value updates over shuffled minibatches, each split into
    `gradient_accumulation_steps` micro-batches; (the mean of each statistic over the updates, the check
    that the first minibatch saw the rollout's numbers). `step_check` sees each update's loss and the policy's
    and critic's gradient norms before the weights change (a non-finite one stops the run).

    Every response token of a minibatch weighs the same on any worker: the losses are sums over this
    worker's tokens divided by `global_items_divisor` (the minibatch's tokens on ALL workers / the worker
    count, as DDP and FSDP average gradients), so 2 workers compute what 1 worker does with their union. Each
    worker's statistics are then its sums × world_size / all tokens: their mean over workers is the mean
    over all tokens.
    """
    mini_batch_size = training.mini_batch_size or batch.size
    micro_size = mini_batch_size // training.gradient_accumulation_steps
    updates = training.ppo_epochs * (batch.size // mini_batch_size)
    sums = dict.fromkeys(UPDATE_STATS, 0.0)
    width, device, scaler = batch.response.size(1), batch.response.device, optimizers.scaler
    check = FirstUpdateCheck()
    for _ in range(training.ppo_epochs):
        for rows in torch.randperm(batch.size).split(mini_batch_size):
            _, tokens = global_items_divisor(batch.mask[rows].sum().item(), device)
            micro_batches = rows.split(micro_size)
            update_loss = 0.0
            for index, micro in enumerate(micro_batches):
                minibatch = {key: value[micro] for key, value in batch.inputs.items()}
                mask, last = batch.mask[micro], index == len(micro_batches) - 1
                with contextlib.ExitStack() as stack:
                    for model in (models.policy, models.critic):
                        stack.enter_context(sharding.gradient_sync(model, last))
                    stack.enter_context(optim.autocast(training, device))
                    logp = response_logprobs(response_logits(models.policy, minibatch, width), batch.response[micro],
                                             training.temperature, training.logprob_chunk_size)
                    values = response_slice(models.critic(**minibatch), width)
                    check.add(logp, batch.old_logp[micro], mask, values, batch.old_values[micro])
                    pg_loss, pg_stats = policy_loss(logp, batch.old_logp[micro], advantages[micro], mask,
                                                    training.cliprange, tokens)
                    vf_loss, vf_stats = value_loss(values, batch.old_values[micro], returns[micro], mask,
                                                   training.cliprange_value, tokens)
                    loss = pg_loss + training.vf_coef * vf_loss
                    (scaler.scale(loss) if scaler else loss).backward()
                update_loss += loss.item()
                for name, value in {"policy_loss": pg_loss, "value_loss": vf_loss, **pg_stats, **vf_stats}.items():
                    sums[name] += value.item() / updates
            optim.step([(optimizers.policy, models.policy), (optimizers.critic, models.critic)], training, scaler,
                       check=step_check and (lambda norms, loss=update_loss: step_check(loss, norms)))
            check.stepped()
            optimizers.policy_schedule.step()
            optimizers.critic_schedule.step()
    return sums, check


# ---- worker: metrics and evaluation ----------------------------------------------------------------------------


def iteration_metrics(batch: Experience, kl: torch.Tensor, non_score: torch.Tensor, returns: torch.Tensor,
                      update_stats: dict[str, float], worker: Worker) -> dict[str, float]:
    """The iteration's debug variables over ALL workers (the update's statistics averaged over workers)."""
    device = batch.mask.device
    _, returns_var = global_mean_var(returns, batch.mask, device)
    _, residual_var = global_mean_var(returns - batch.old_values, batch.mask, device)
    score = Moments().add(batch.raw_score).reduce(device)
    reduced = all_reduce_sum([
        kl.sum().item(), non_score.sum().item(), batch.entropy.item(), batch.mask.sum().item(),
        batch.has_eos.float().sum().item(), *update_stats.values(),
    ], device)
    kl_sum, non_score_sum, entropy_sum, tokens, eos_count = reduced[:5]
    (memory,) = all_reduce_max([peak_memory_gib(device)], device)
    sequences = score.count
    return {
        "score_mean": score.mean, "score_std": score.std,
        "kl": kl_sum / sequences, "non_score_reward": non_score_sum / sequences,
        "entropy": entropy_sum / worker.world_size,
        **{name: value / worker.world_size for name, value in zip(update_stats, reduced[5:], strict=True)},
        "explained_variance": 1.0 - residual_var / returns_var if returns_var > 0 else 0.0,
        "response_length": tokens / sequences, "eos_fraction": eos_count / sequences,
        "memory_peak_gib": memory,
    }


def evaluate_held_out(models: PPOModels, eval_prompts: list[dict[str, Any]] | None, training: PPOTraining,
                      worker: Worker) -> dict[str, float]:
    """Mean RM score of sampled responses to the held-out prompts (`rl.policy.sample_held_out`: fixed seed)."""
    if not eval_prompts:
        return {}
    (raw,), length = sample_held_out(models.engine, models.tokenizer, [models.reward], eval_prompts, training, worker)
    scores = Moments().add(raw).reduce(worker.device)
    return {"eval_score_mean": scores.mean, "eval_score_std": scores.std,
            "eval_response_length": held_out_length(length, scores.count, worker.device)}


# ---- worker: the training loop -----------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    # -- hyperparameters and data
    config, worker = setup_worker(loop_config)
    general = config.General
    train_prompts, eval_prompts = loop_config["data"]["train"], loop_config["data"]["eval"]
    reward_stats = loop_config["data"]["reward_stats"] if config.Training.normalize_score else None

    # -- models, optimizers, resume (on any number of workers: the global batch stays the checkpoint's)
    models = load_models(config, worker, reward_stats)
    policy_optimizer, critic_optimizer = Optimizers.optimizers(models, config.Training)
    tensors = {"policy": ModelState(models.policy, policy_optimizer, trainable_only=True),
               "critic": ModelState(models.critic, critic_optimizer, trainable_only=True)}
    run = IterationRun(STAGE, config, worker, loop_config, tensors, len(train_prompts))
    training = run.training
    optimizers = Optimizers.around(policy_optimizer, critic_optimizer, training, run.updates, worker.device)
    run.resume(optimizers.state_dict, optimizers.load_state_dict)
    run.start(lambda: evaluate_held_out(models, eval_prompts, training, worker),
              lambda metrics: f"score {metrics['eval_score_mean']:.4f}")
    check_update = StepCheck(STAGE, training, worker, general.output_dir, unit="iteration", models=("policy", "critic"))
    while run.running:
        run.seed()

        # -- 1. rollout
        start = time.perf_counter()
        prompts = run.prompts(train_prompts)
        batch = collect_experience(models, prompts, training, worker.device)
        time_rollout = time.perf_counter() - start

        # -- 2. rewards and 3. advantages
        kl = kl_estimate(batch.old_logp, batch.ref_logp, training.kl_estimator) * batch.mask
        scores = shape_scores(batch.raw_score, batch.has_eos, reward_stats, training)
        rewards, non_score = compute_rewards(scores, kl, batch.mask, optimizers.kl_control.value)
        if training.whiten_rewards:
            rewards = masked_whiten(rewards, batch.mask, shift_mean=False,
                                    stats=global_mean_var(rewards, batch.mask, worker.device, unbiased=True))
        advantages, returns = compute_gae(rewards, batch.old_values, batch.mask, training.gamma, training.lam)
        advantages = masked_whiten(advantages, batch.mask,
                                   stats=global_mean_var(advantages, batch.mask, worker.device, unbiased=True))

        # -- 4. update
        start = time.perf_counter()
        update_stats, on_policy = ppo_update(
            models, optimizers, batch, advantages, returns, training,
            step_check=lambda loss, norms, at=run.iteration + 1: check_update(at, loss, worker.world_size, norms))
        time_update = time.perf_counter() - start
        run.advance()

        # -- 5. KL control and metrics (over all workers)
        metrics = iteration_metrics(batch, kl, non_score, returns, update_stats, worker)
        metrics |= on_policy.metrics(worker.device)
        sequences = run.global_batch
        metrics |= {
            "kl_coeff": optimizers.kl_control.value, "learning_rate": optimizers.policy_schedule.get_last_lr()[0],
            "time_rollout": time_rollout, "time_update": time_update,
            "tokens_per_second": metrics["response_length"] * sequences / max(time_rollout, 1e-9),
            "epoch": run.epoch,
        }
        optimizers.kl_control.update(metrics["kl"], sequences)
        progress(
            worker, STAGE,
            f"iteration {run.iteration}/{run.iterations} score {metrics['score_mean']:.3f} kl {metrics['kl']:.3f} "
            f"entropy {metrics['entropy']:.2f} pg {metrics['policy_loss']:.3f} vf {metrics['value_loss']:.3f} "
            f"clip {metrics['clip_fraction']:.2f} len {metrics['response_length']:.1f} "
            f"rollout {time_rollout:.1f}s update {time_update:.1f}s {metrics['tokens_per_second']:.0f} tok/s",
        )
        outcome = run.end_iteration(metrics)
        if outcome is not None:
            return outcome

    eval_metrics = run.finish()
    save_final(config, models, {"stage": STAGE, "config": config.to_dict(), "iteration": run.iteration,
                                "metrics": eval_metrics}, worker)


def save_final(config: StageConfig, models: PPOModels, marker: dict[str, Any], worker: Worker) -> None:
    """The final policy (+ tokenizer) in checkpoint_dir; the critic in checkpoint_dir/critic (its transformer
    as a sequence classifier, and `value_head.safetensors`). Every rank calls it (sharded models are gathered)."""
    training = config.Training

    def write_critic(critic: Critic, directory: Path, dtype: torch.dtype) -> None:
        from safetensors.torch import save_file

        export.exportable(critic.classifier, training, dtype).save_pretrained(directory)
        models.tokenizer.save_pretrained(directory)
        save_file({name: tensor.detach().float().contiguous().cpu()
                   for name, tensor in critic.value_head.state_dict().items()},
                  directory / "value_head.safetensors")

    companion = Companion("critic", models.critic, unwrap(models.critic).skeleton, write_critic) \
        if training.save_critic else None
    rl_policy.save_final(config, STAGE, models.policy, models.tokenizer, marker, worker, companion)


def train(config: StageConfig, stop_at_step: int | None = None, in_process: bool = False) -> Any:
    """Driver: validate checkpoints and data (errors surface before Ray starts), then train."""
    return launcher.run_trainer(config, train_loop, data=prepare(config), stop_at_step=stop_at_step,
                                in_process=in_process)
