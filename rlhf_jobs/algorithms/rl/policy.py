"""The policy every RL stage trains, in one place: loading it and its frozen reference, its optimizer and
schedule, sampling the held-out prompts, and writing the final policy.

- **Loading** (`load_policy`): the policy in the trainable dtype with every dropout off, LoRA's `lora_dropout`
  too (`models.disable_dropout`: the first update of each iteration must see exactly the rollout's log-probs), then
  distributed at once (DDP, or sharded under FSDP: a worker never holds more than one full model besides the shards
  of those before it). The reference is a frozen copy in `sharding.reference_dtype` (it computes exactly the
  policy's initial function: KL is 0 before the first update), or with LoRA the policy with its adapter disabled;
  none at all when the stage needs no KL.
- **Optimizer** (`PolicyOptimizer`): the policy's optimizer, its schedule over the run's updates and the fp16 loss
  scaler, with what a resume restores.
- **Held-out sampling** (`sample_held_out`): each worker's share of the held-out prompts, one completion each,
  sampled at the training temperature with a fixed seed, scored by every reward.
- **Final policy** (`save_final`): gathered when sharded, checked finite, LoRA merged (or kept as an adapter), in the
  save dtype, written atomically with the stage marker, optionally with a companion model (PPO's critic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_jobs.algorithms.rl.rewards import Responses, Reward
from rlhf_jobs.algorithms.rl.rollout import (
    HFRolloutEngine,
    RolloutEngine,
    Sampling,
    frozen,
    reference_logits,
    row_chunks,
)
from rlhf_jobs.core.config import RLTraining, StageConfig
from rlhf_jobs.engine import export, optim, sharding
from rlhf_jobs.engine.adapters import add_lora
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.distributed import all_reduce_sum
from rlhf_jobs.engine.divergence import check_final_weights
from rlhf_jobs.engine.models import disable_dropout, load_causal_lm, load_tokenizer, stored_dtype
from rlhf_jobs.engine.worker import Worker, progress
from rlhf_jobs.store.checkpoints import write_atomically


def policy_path(config: StageConfig) -> str:
    """Where the policy starts: the SFT model (`model_pretrain`), else the base model."""
    return config.General.model_pretrain or config.General.model_name


@dataclass
class Policy:
    model: torch.nn.Module  # trainable; wrapped (DDP) or sharded (FSDP)
    reference: torch.nn.Module | None  # frozen copy; None with LoRA (adapter disabled) or without a KL
    has_reference: bool  # whether `reference_logits` has anything to compute
    tokenizer: Any  # left padding
    engine: RolloutEngine  # samples the responses (transformers' generate on the policy)

    def reference_logits(self, inputs: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        return reference_logits(self.model, self.reference, inputs, width)


def load_policy(config: StageConfig, worker: Worker, with_reference: bool = True) -> Policy:
    """The policy and (`with_reference`) its frozen reference on this worker: trainable weights in fp32 (or the
    load dtype), the reference in the dtype that computes exactly the policy's function."""
    general, training = config.General, config.Training
    path, trust, lora = policy_path(config), general.trust_remote_code, training.lora
    tokenizer = load_tokenizer(path, trust, padding_side="left")

    # Each model is distributed as soon as it is loaded, and under FSDP loaded sharded (`sharding.load_prepared`):
    # no worker holds a full fp32 copy (rank 0 reads each checkpoint, the others only receive their shards).
    def build_policy() -> torch.nn.Module:
        policy = load_causal_lm(path, tokenizer, trust, dropout=False, dtype=sharding.load_dtype(training))
        # peft's lora_dropout is a new dropout: off too (`disable_dropout`)
        return disable_dropout(add_lora(policy, lora, "CAUSAL_LM")) if lora else policy

    policy = sharding.load_prepared(build_policy, training, worker)
    reference = None
    if with_reference and not lora:
        reference = sharding.load_prepared(
            lambda: frozen(load_causal_lm(path, tokenizer, trust, dropout=False,
                                          dtype=sharding.reference_dtype(training))), training, worker, trainable=False)
    return Policy(policy, reference, with_reference, tokenizer, HFRolloutEngine(policy, tokenizer, training,
                                                                                  worker.device))


@dataclass
class PolicyOptimizer:
    """The policy's optimizer, its learning-rate schedule over the run's updates, and the fp16 loss scaler."""

    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler | None

    @staticmethod
    def optimizer_of(model: torch.nn.Module, training: RLTraining,
                     learning_rate: float | None = None) -> torch.optim.Optimizer:
        """The optimizer alone: a resume loads its state before the schedule is built (how many updates a run has
        depends on the checkpoint's global batch)."""
        return optim.build_optimizer(model, training, learning_rate)

    @classmethod
    def around(cls, optimizer: torch.optim.Optimizer, training: RLTraining, total_updates: int,
               device: torch.device) -> PolicyOptimizer:
        return cls(optimizer, optim.build_scheduler(optimizer, training, total_updates),
                   optim.grad_scaler(training, device))

    def state_dict(self) -> dict[str, Any]:
        """What resumes besides the tensors (those go through `train_state.ModelState`)."""
        return {"policy_scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optim.restore_scheduler(self.schedule, state["policy_scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def learning_rate(self) -> float:
        return self.schedule.get_last_lr()[0]


def sample_held_out(engine: RolloutEngine, tokenizer: Any, rewards: Sequence[Reward],
                    eval_prompts: list[dict[str, Any]], training: RLTraining,
                    worker: Worker) -> tuple[list[torch.Tensor], float]:
    """Every reward's scores of one sampled completion per prompt of this worker's share of the held-out prompts
    (every `world_size`-th from its rank), and their summed length in tokens. Sampled at the training temperature
    with a fixed seed per rank (the same prompts get the same draws at every evaluation of one run; the global RNG
    is left as it was). When the policy is sharded every worker runs the same number of forwards (a gather is a
    collective): the short ones pad with prompts whose scores are dropped."""
    shard = eval_prompts[worker.rank :: worker.world_size]
    chunk = training.rollout_batch_size or training.experience_batch_size
    if getattr(engine, "sharded", False):  # every worker must run the same forwards
        most = math.ceil(len(eval_prompts) / worker.world_size)
        shard, real = shard + eval_prompts[: most - len(shard)], len(shard)
    else:
        real = len(shard)
    scores: list[list[torch.Tensor]] = [[] for _ in rewards]
    length = 0.0
    devices = [worker.device] if worker.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(training.seed + 7919 * (worker.rank + 1))
        for rows in row_chunks(len(shard), chunk):
            prompts = shard[rows]
            response, mask = pad(engine.generate([p["input_ids"] for p in prompts], Sampling.of(training)),
                                 tokenizer.pad_token_id, device=worker.device)
            responses = Responses(prompts, response, mask, tokenizer)
            keep = max(0, min(real - rows.start, len(prompts)))  # padding prompts count for nothing
            for index, reward in enumerate(rewards):
                scores[index].append(reward(responses)[:keep])
            length += mask[:keep].sum().item()
    joined = [torch.cat(parts) if parts else torch.zeros(0, device=worker.device) for parts in scores]
    return joined, length


def held_out_length(length: float, count: float, device: torch.device) -> float:
    """The mean completion length over all workers' held-out samples."""
    (length,) = all_reduce_sum([length], device)
    return length / max(count, 1)


@dataclass
class Companion:
    """A model written beside the final policy, in `checkpoint_dir/<name>` (PPO's critic)."""

    name: str
    model: torch.nn.Module
    skeleton: Callable[[], torch.nn.Module] | None
    write: Callable[[Any, Path, torch.dtype], None]  # (the gathered model, its directory, the save dtype)


def save_final(config: StageConfig, stage: str, model: torch.nn.Module, tokenizer: Any, marker: dict[str, Any],
               worker: Worker, companion: Companion | None = None) -> None:
    """The final policy (+ tokenizer, + the companion) in checkpoint_dir, atomically, with the stage marker.
    Every rank calls it (sharded models are gathered)."""
    general, training = config.General, config.Training
    policy = export.gathered_model(model, worker)
    extra = export.gathered_model(companion.model, worker, companion.skeleton) if companion else None
    if not worker.is_main:
        return
    for gathered in (policy, extra):
        if gathered is not None:
            check_final_weights(gathered, stage, general.output_dir)
    dtype = export.save_dtype(training, stored_dtype(policy_path(config), general.trust_remote_code))
    policy = export.exportable(policy, training, dtype)

    def write(directory: Any) -> None:
        tokenizer.padding_side = "right"
        policy.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if extra is not None:
            companion.write(extra, directory / companion.name, dtype)

    path = write_atomically(general.checkpoint_dir, write, marker)
    beside = f" ({companion.name} in {path}/{companion.name})" if extra is not None else ""
    progress(worker, stage, f"final policy written to {path}{beside}")
