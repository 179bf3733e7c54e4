"""Sampling responses and reading them back, for every RL stage and `rlhf-jobs generate`.

- the prompts: tokenised once on the driver (`tokenize_prompts`), served from one seeded shuffle per epoch
  whatever the number of workers (`prompt_batch`, `resumed_layout`);
- a `RolloutEngine` samples responses after prompt ids (`HFRolloutEngine`: transformers' `generate` on the
  training policy; another engine, e.g. vLLM, is one more class with the same two methods): the trainer
  recomputes log-probs with the training policy, so the engine cannot bias the importance ratio;
- reading responses back: prompt + response as one batch (`sequence_inputs`), the logits at the response
  positions only (`response_logits`), their log-probs at the sampling temperature (`response_logprobs`).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhf_jobs.algorithms.supervised import epoch_order
from rlhf_jobs.core.data import PPO_SCHEMA
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.prompts import record_prompt
from rlhf_jobs.engine import optim, sharding
from rlhf_jobs.engine.adapters import disabled_adapter
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.logprobs import selective_log_softmax
from rlhf_jobs.engine.models import split_bos, unwrap, with_bos_tail
from rlhf_jobs.engine.worker import Worker, progress


def response_mask(response: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it."""
    is_eos = (response == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


def response_slice(per_position: torch.Tensor, width: int) -> torch.Tensor:
    """The positions that predict the `width` response tokens of prompt + response.

    The token at position P + t is predicted at position P + t - 1, so the slice is `[:, P - 1 : -1]`.
    """
    return per_position[:, -width - 1 : -1]


def response_logprobs(logits: torch.Tensor, response: torch.Tensor, temperature: float,
                      chunk_size: int = 256) -> torch.Tensor:
    """Log-probs of `response` from the logits of prompt + response (all positions, or only the last
    `width + 1` as `logits_to_keep` returns them: the response slice is the same).

    Logits are divided by the sampling temperature, in rollout and update alike; the log-softmax is
    computed in fp32 a chunk of positions at a time (`logprobs.selective_log_softmax`).
    """
    return selective_log_softmax(response_slice(logits, response.size(1)), response, temperature, chunk_size)


def response_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """The model's logits at the `width + 1` last positions only (`logits_to_keep`), where it supports that."""
    hf_model = sharding.hf_model(unwrap(model))
    if "logits_to_keep" in inspect.signature(hf_model.forward).parameters:
        return model(**inputs, use_cache=False, logits_to_keep=width + 1).logits
    return model(**inputs, use_cache=False).logits


@torch.no_grad()
def reference_logits(policy: torch.nn.Module, reference: torch.nn.Module | None, inputs: dict[str, torch.Tensor],
                     width: int) -> torch.Tensor:
    """The reference's logits at the response positions: a frozen copy of the initial policy, or with LoRA (no
    copy) the policy with its adapter disabled."""
    if reference is not None:
        return response_logits(reference, inputs, width)
    module = unwrap(policy)
    with disabled_adapter(module):
        return response_logits(module, inputs, width)


def sequence_inputs(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Left-padded prompt + right-padded response, with positions counted from the first real token
    (as `generate` counts them for left-padded prompts)."""
    attention_mask = torch.cat([query_mask, mask], dim=1)
    return {
        "input_ids": torch.cat([query, response], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
    }


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def tokenize_prompts(records: Any, tokenizer: Any, style: str, max_prompt_length: int) -> list[dict[str, Any]]:
    """[BOS] + prompt ids, left-truncated to max_prompt_length (one BOS, whether the tokenizer adds it or a chat
    template writes it), the text of exactly those ids (what the RM sees: with the BOS only where the text
    wrote it, since a tokenizer that adds BOS adds its own), and the record's other fields (`columns`: what
    reward functions read besides prompt and completion, e.g. `answer`)."""
    examples = []
    prompt_fields = PPO_SCHEMA.fields()
    for record in records:
        full = tokenizer(record_prompt(record, style, tokenizer), add_special_tokens=False)["input_ids"]
        bos, body = split_bos(tokenizer, full)
        input_ids, truncated = with_bos_tail(tokenizer, full, max_prompt_length)
        written = full[: len(full) - len(body)]  # the BOS the text itself starts with, if any
        text = tokenizer.decode(written + input_ids[len(bos) :])
        columns = {key: value for key, value in record.items() if key not in prompt_fields}
        examples.append({"input_ids": input_ids, "text": text, "truncated": truncated, "columns": columns})
    return examples


def prompt_batch(examples: list[dict[str, Any]], worker: Worker, seed: int, position: int,
                 global_batch: int) -> list[dict[str, Any]]:
    """This worker's share of the `global_batch` prompts after the first `position` of the prompt stream: every
    `world_size`-th of them from its rank on.

    The stream is one seeded shuffle of ALL prompts per epoch, epoch after epoch, the same on any number of
    workers: a run resumed on another worker count (same global batch, `resumed_layout`) serves the rest of the
    epoch's prompts, each once.
    """
    orders: dict[int, list[int]] = {}
    batch = []
    for index in range(position + worker.rank, position + global_batch, worker.world_size):
        epoch, offset = divmod(index, len(examples))
        if epoch not in orders:
            orders[epoch] = epoch_order(len(examples), epoch, seed, 1)
        batch.append(examples[orders[epoch][offset]])
    return batch


def resumed_layout(saved: dict[str, Any] | None, training: Any, worker: Worker, stage: str) -> Any:
    """`training` with the per-worker experience batch, minibatch and gradient accumulation that keep the
    checkpoint's global batch and global minibatch on this number of workers (2 workers × 8 prompts -> 1 worker
    × 16), so iterations, schedule and prompt position mean what they meant. Micro-batches never grow.
    `training`: an RL stage's Training section (experience_batch_size, mini_batch_size, ...)."""
    batch = training.experience_batch_size
    mini = training.mini_batch_size or batch
    if not saved or "global_batch" not in saved:  # a fresh run (or a checkpoint from before global batches)
        return training
    global_batch, global_mini = saved["global_batch"], saved["global_mini_batch"]
    if global_batch == batch * worker.world_size and global_mini == mini * worker.world_size:
        return training
    if global_batch % worker.world_size or global_mini % worker.world_size:
        raise ConfigError(
            f"Training.num_training_workers: the checkpoint was written with a global batch of {global_batch} "
            f"prompts per iteration (minibatches of {global_mini}), which {worker.world_size} worker(s) cannot "
            "share evenly; resume with a worker count that divides both, or start over (--on-config-change restart)"
        )
    new_batch, new_mini = global_batch // worker.world_size, global_mini // worker.world_size
    micro = mini // training.gradient_accumulation_steps
    accumulation = next(steps for steps in range(1, new_mini + 1)
                        if new_mini % steps == 0 and new_mini // steps <= micro)
    rollout = min(training.rollout_batch_size, new_batch) if training.rollout_batch_size else None
    progress(worker, stage, f"resuming on {worker.world_size} worker(s): experience_batch_size {batch} -> {new_batch}, "
                            f"mini_batch_size {mini} -> {new_mini}, gradient_accumulation_steps "
                            f"{training.gradient_accumulation_steps} -> {accumulation} keep the global batch of "
                            f"{global_batch} prompts")
    return training.model_copy(update={"experience_batch_size": new_batch, "mini_batch_size": new_mini,
                                       "gradient_accumulation_steps": accumulation, "rollout_batch_size": rollout})


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled: from exactly softmax(logits / temperature), the distribution whose log-probs an
    RL stage trains on; `greedy` (for `rlhf-jobs generate` only): the most likely token at every step."""

    temperature: float
    max_new_tokens: int
    greedy: bool = False

    @classmethod
    def of(cls, training: Any, greedy: bool = False) -> Sampling:
        """An RL stage's sampling settings (its Training section's temperature and max_new_tokens)."""
        return cls(training.temperature, training.max_new_tokens, greedy)

    def generation_config(self, tokenizer: Any) -> Any:
        """Every setting that reshapes the distribution at its neutral value (top_k 0: transformers' default is
        50; top_p 1). `HFRolloutEngine` also hides the checkpoint's own `generation_config.json`
        (repetition_penalty, no_repeat_ngram_size, min_p, ...), whose values `generate` would merge into any
        setting left unset. TRL samples the same way."""
        from transformers import GenerationConfig

        greedy = self.greedy
        return GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else self.temperature, top_k=None if greedy else 0,
            top_p=None if greedy else 1.0, max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
        )


@contextlib.contextmanager
def without_checkpoint_generation_config(model: torch.nn.Module) -> Any:
    """`model.generate` with only the settings it is given: the checkpoint's generation config is swapped for
    an empty one for the call (`generate` fills every unset field from it)."""
    from transformers import GenerationConfig

    hf_model = sharding.hf_model(model)
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf_model.generation_config = saved


class RolloutEngine(Protocol):
    """What samples an RL stage's responses. `generate`: response ids after each prompt's ids, up to and
    including the first EOS. `update_weights`: called after every optimizer step of the policy (an engine that
    holds its own copy of the weights, e.g. vLLM, loads them here). The trainer recomputes the log-probs of what
    was sampled with the training policy (`response_logprobs`), so an engine cannot bias the importance ratio."""

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[int]]: ...

    def update_weights(self, policy: torch.nn.Module) -> None: ...


class HFRolloutEngine:
    """transformers' `generate` with the KV cache, on the training policy itself (a sharded policy is gathered
    once per call, in the compute dtype: FSDP all-gathers in its `MixedPrecisionPolicy`'s dtype, bf16 under
    `mixed_precision: bf16`), under the training precision: its weights are always current."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, training: Any, device: torch.device) -> None:
        self.policy, self.tokenizer, self.training, self.device = policy, tokenizer, training, device

    @property
    def sharded(self) -> bool:
        """Every worker must then run the same forwards (a gather is a collective)."""
        return sharding.is_sharded(unwrap(self.policy))

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[int]]:
        tokenizer = self.tokenizer
        query, query_mask = pad(prompt_ids, tokenizer.pad_token_id, side="left", device=self.device)
        model = unwrap(self.policy)
        model.eval()
        with sharding.gathered(model), optim.autocast(self.training, self.device), \
                without_checkpoint_generation_config(model):
            output = model.generate(input_ids=query, attention_mask=query_mask,
                                    generation_config=sampling.generation_config(tokenizer))
        model.train()
        response = output[:, query.size(1) :]
        lengths = response_mask(response, tokenizer.eos_token_id).sum(1)
        return [tokens[: int(length)].tolist() for tokens, length in zip(response, lengths, strict=True)]

    def update_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy  # the training module itself: nothing to copy


def row_chunks(size: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, size, chunk)]

