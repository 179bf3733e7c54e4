"""DPO: preference tuning of the SFT policy on chosen/rejected pairs, without a reward model or rollouts.

Read it top to bottom. The training loop is the supervised one (`supervised.py`: data order, gradient
accumulation, DDP/FSDP, LoRA, checkpoints and resume on another number of workers); this file supplies the
task: how a pair is tokenised, what a batch is, the reference, and the loss.

- **Records** are the reward model's (`prompt` | `instruction` [+ `context`], `chosen`, `rejected`), prompts in the
  format every stage shares (`core/prompts.py`). Each side is `[BOS] prompt + response + EOS`, tokenised as SFT
  does (one text, split at the prompt's last character by token offsets); EOS ends the response, since a policy
  must learn to stop. For our instruction prompts and the GPT-2 tokenizer these are exactly the token ids TRL
  1.12's DPOTrainer builds (it tokenises `prompt` and `prompt + completion + EOS text` and splits by the prompt's
  token count; `tests/test_dpo.py` checks the ids).
- **Too long** (more than `Dataset.max_length` tokens): the prompt loses its start (as the reward model and PPO
  cut), down to half the length budget; a response that still does not fit loses its end (as SFT cuts). Both are
  counted. TRL keeps the start of prompt + completion instead, cutting the end of the response first (and its
  EOS). A pair whose two sides are the same tokens (the same text, or texts that differ only beyond the cut) is
  dropped and counted; an empty chosen or rejected is an error naming its line.
- **Log-probabilities**: the sum over the response tokens (EOS included, prompt masked) of log π(token), no
  length normalisation. Chosen and rejected sequences go through one forward, packed padding-free where the
  model keeps packed sequences apart (`engine/packing.py`), else right-padded; the LM head runs only at the
  positions that predict a response token, and the log-softmax is computed in fp32 a chunk of positions at a
  time (`engine/logprobs.py`). Dropout is off in the policy and the reference (TRL's default), so the first
  step's loss is log 2 exactly when the policy starts as the reference.
- **Reference**: the starting model, frozen — a second copy in the compute dtype (`mixed_precision`), sharded
  like the policy under FSDP; with LoRA, the policy with its adapter disabled (one base model per worker). With
  `Training.precompute_reference` its log-probs of every train and held-out pair are computed once before
  training (each worker its share, then summed over the workers), kept with every checkpoint (so a resume, on
  any number of workers, reads them instead of recomputing) and the reference model is freed.
- **Loss** per pair, with Δ = (π_c − ref_c) − (π_r − ref_r), the mean over all pairs of the optimizer step:
  `sigmoid` −logσ(βΔ), with `label_smoothing` ε conservative DPO −(1−ε)logσ(βΔ) − ε·logσ(−βΔ) (TRL 1.12's
  sigmoid ignores ε; cDPO is the pre-1.0 DPOTrainer's formula); `ipo` ((π_c − ref_c)/n_c − (π_r − ref_r)/n_r −
  1/(2β))², n the response tokens (TRL's length-normalised form); `hinge` relu(1 − βΔ).
- **Metrics**: `loss`, `rewards_chosen` / `rewards_rejected` (the implicit rewards β(π − ref), means),
  `margin` (their mean difference), `accuracy` (share of pairs whose chosen reward is higher) over each logging
  window; on the held-out pairs at the start, every `eval_steps`, at each epoch's end: `eval_loss`,
  `eval_accuracy`, `eval_margin`, `eval_rewards_chosen`, `eval_rewards_rejected`.
"""

from __future__ import annotations

import gc
import hashlib
import math
from array import array
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_jobs.algorithms import supervised
from rlhf_jobs.core.config import DPOTraining, StageConfig
from rlhf_jobs.core.data import DPO_SCHEMA, clip_text
from rlhf_jobs.core.errors import DataError
from rlhf_jobs.core.prompts import join_response, record_prompt
from rlhf_jobs.engine import optim, packing, sharding
from rlhf_jobs.engine.adapters import disabled_adapter
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.distributed import is_distributed
from rlhf_jobs.engine.logprobs import selective_log_softmax
from rlhf_jobs.engine.models import bos_ids, load_causal_lm, load_tokenizer, unwrap
from rlhf_jobs.engine.worker import Worker, progress

STAGE = "dpo"
IGNORE_INDEX = -100


# ---- the loss ------------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from summed response log-probs; rewards = β(π − ref).

    `chosen_tokens` / `rejected_tokens`: response tokens per sequence (ipo divides by them).
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo normalises by the response lengths: pass chosen_tokens and rejected_tokens")
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---- driver: records to token ids ------------------------------------------------------------------------------


def split_tokens(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS) of prompt + response tokenised as one text, split where the tokens start
    inside the response (character offsets, as SFT labels them)."""
    encoded = tokenizer(join_response(prompt, response), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundary = next((i for i, (start, _) in enumerate(offsets) if start >= len(prompt)), len(ids))
    return ids[:boundary], [*ids[boundary:], tokenizer.eos_token_id]


def tokenize_dpo(record: dict[str, Any], tokenizer: Any, style: str, max_length: int) -> dict[str, Any]:
    """Both sides of a pair as `[BOS] prompt + response + EOS` ids, with where each response starts, at most
    `max_length` tokens: the prompt keeps its end (down to half the budget), a response its start."""
    record = {key: clip_text(value, max_length, "head" if key in ("chosen", "rejected") else "tail")
              if isinstance(value, str) else value for key, value in record.items()}  # a 40 MB text costs nothing
    prompt = record_prompt(record, style, tokenizer)
    bos = bos_ids(tokenizer)
    sides = {side: split_tokens(tokenizer, prompt, record[side]) for side in ("chosen", "rejected")}
    room = max(max_length - len(bos), 2)
    prompt_length = max(len(p) for p, _ in sides.values())
    longest = max(len(r) for _, r in sides.values())
    kept_prompt = min(prompt_length, max(room - longest, room // 2))
    response_room = room - kept_prompt
    example: dict[str, Any] = {"truncated": kept_prompt < prompt_length, "response_truncated": response_room < longest}
    for side, (prompt_ids, response_ids) in sides.items():
        prompt_ids = prompt_ids[len(prompt_ids) - min(kept_prompt, len(prompt_ids)) :]
        example[f"{side}_ids"] = [*bos, *prompt_ids, *response_ids[:response_room]]
        example[f"{side}_start"] = len(bos) + len(prompt_ids)
    return example


def drop_identical(examples: list[dict[str, Any]], name: str, max_length: int) -> list[dict[str, Any]]:
    """Pairs whose chosen and rejected are the same tokens teach nothing (Δ is 0 whatever the policy): dropped,
    with one line saying how many; none left is an error."""
    kept = [e for e in examples if e["chosen_ids"] != e["rejected_ids"]]
    if len(kept) < len(examples):
        print(f"{name}: {len(examples) - len(kept)} of {len(examples)} pair(s) dropped: chosen and rejected are the "
              f"same (after cutting to Dataset.max_length={max_length} tokens)", flush=True)
    if not kept:
        raise DataError(f"{name}: every pair's chosen equals its rejected; nothing to learn a preference from")
    return kept


def report_response_truncation(examples: list[dict[str, Any]], name: str, max_length: int) -> None:
    cut = sum(bool(e.pop("response_truncated", False)) for e in examples)
    if cut:
        print(f"{name}: {cut} of {len(examples)} pair(s) have a response longer than Dataset.max_length={max_length} "
              "leaves it beside its prompt (at most half the length): the response's end is cut", flush=True)


def fingerprint(data: dict[str, Any]) -> str:
    """A digest of every pair's token ids, train and held-out: precomputed reference log-probs belong to it."""
    digest = hashlib.sha256()
    for split in ("train", "eval"):
        for example in data.get(split) or []:
            for side in ("chosen", "rejected"):
                digest.update(array("q", [example[f"{side}_start"], *example[f"{side}_ids"]]).tobytes())
        digest.update(split.encode())
    return digest.hexdigest()


# ---- the task ---------------------------------------------------------------------------------------------


def full_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


class DPOTask:
    """The DPO stage as a `supervised.SupervisedTask`: one item is one pair."""

    stage = STAGE
    lora_task = "CAUSAL_LM"
    items_name = "pairs"
    eval_keys = ("pairs", "correct", "margin", "loss", "chosen_rewards", "rejected_rewards")
    window_keys = ("pairs", "correct", "margin", "chosen_rewards", "rejected_rewards")
    packed = False  # until the loop has checked the model (`supervised.choose_packing`; padded batches are exact)
    rows: packing.RowPlan | None = None
    per_position = staticmethod(full_logits)

    def __init__(self) -> None:
        self.training: DPOTraining | None = None
        self.reference: torch.nn.Module | None = None  # a frozen copy; None with LoRA or precomputed log-probs
        self.precomputed: dict[str, Any] | None = None  # {"fingerprint", "train": (N, 2), "eval": (M, 2) | None}
        self.window: dict[str, float] = dict.fromkeys(self.window_keys, 0.0)

    # -- driver

    def prepare(self, config: StageConfig) -> dict[str, Any]:
        dataset = config.Dataset
        data = supervised.prepare_examples(config, DPO_SCHEMA, tokenize_dpo, clip_texts=False)
        names = {"train": dataset.train_file, "eval": dataset.validation_file or "validation split"}
        for split, examples in data.items():
            if examples is None:
                continue
            report_response_truncation(examples, names[split], dataset.max_length)
            kept = drop_identical(examples, names[split], dataset.max_length)
            data[split] = [{**example, "split": split, "index": index} for index, example in enumerate(kept)]
        # What precomputed reference log-probs are checked against on a resume (only they need it).
        return {**data, "fingerprint": fingerprint(data) if config.Training.precompute_reference else None}

    # -- worker: models

    def build(self, config: StageConfig, worker: Worker) -> tuple[Any, Any]:
        general, training = config.General, config.Training
        self.training = training
        path = supervised.start_model(config)
        self.tokenizer = load_tokenizer(path, general.trust_remote_code)
        model = load_causal_lm(path, self.tokenizer, general.trust_remote_code, dropout=False,
                               dtype=sharding.load_dtype(training))
        return model, self.tokenizer

    def load_reference(self, config: StageConfig, worker: Worker) -> torch.nn.Module:
        """The starting model again, frozen, in the compute dtype, distributed like the policy."""
        general, training = config.General, config.Training
        return sharding.load_prepared(
            lambda: load_causal_lm(supervised.start_model(config), self.tokenizer, general.trust_remote_code,
                                   dropout=False, dtype=sharding.frozen_dtype(training)).eval().requires_grad_(False),
            training, worker, trainable=False)

    def start(self, model: torch.nn.Module, config: StageConfig, worker: Worker, saved: dict[str, Any] | None,
              data: dict[str, Any]) -> None:
        """The reference: a frozen copy, the policy's base (LoRA), or its log-probs computed once (and kept)."""
        training = config.Training
        if not training.precompute_reference:
            if not training.lora:
                self.reference = self.load_reference(config, worker)
            return
        stored = ((saved or {}).get("task") or {}).get("reference_logps")
        if stored is not None:
            if stored["fingerprint"] != data["fingerprint"]:
                raise DataError(
                    f"Dataset.train_file: the pairs are not those this run started with ({config.General.output_dir} "
                    "holds a checkpoint with the reference log-probs of other token ids): restore the data, or "
                    "start over (--fresh)")
            self.precomputed = stored
            progress(worker, self.stage, "reference log-probs from the checkpoint (computed before step 1)")
            return
        reference = None if training.lora else self.load_reference(config, worker)
        table: dict[str, Any] = {"fingerprint": data["fingerprint"]}
        for split in ("train", "eval"):
            examples = data.get(split)
            table[split] = None if not examples else self.reference_table(model, reference, examples, worker)
        self.precomputed = table
        del reference
        gc.collect()
        if worker.device.type == "cuda":
            torch.cuda.empty_cache()
        progress(worker, self.stage, f"reference log-probs of {len(data['train'])} train and "
                                     f"{len(data.get('eval') or [])} held-out pairs computed; reference freed")

    @torch.no_grad()
    def reference_table(self, model: torch.nn.Module, reference: torch.nn.Module | None,
                        examples: list[dict[str, Any]], worker: Worker) -> torch.Tensor:
        """(pairs, 2) reference log-probs (chosen, rejected) of `examples`: each worker computes every
        `world_size`-th pair, the workers' tables are summed. Under FSDP every worker runs as many forwards."""
        training = self.training
        assert training is not None
        values = torch.zeros(len(examples), 2, dtype=torch.float32, device=worker.device)
        mine = list(range(worker.rank, len(examples), worker.world_size))
        chunks = [mine[start : start + training.batch_size] for start in range(0, len(mine), training.batch_size)]
        module = unwrap(model)
        if sharding.is_sharded(module) or (reference is not None and sharding.is_sharded(reference)):
            most = math.ceil(math.ceil(len(examples) / worker.world_size) / training.batch_size)
            chunks += [[]] * (most - len(chunks))
        module.eval()
        try:
            for chunk in chunks:
                batch = supervised.to_device(self.collate([examples[i] for i in chunk] or examples[:1]),
                                             worker.device)
                with optim.autocast(training, worker.device):
                    logps = self.live_reference_logps(module, reference, batch)
                if chunk:
                    values[chunk] = logps.float().view(2, -1).T
        finally:
            module.train()
        if is_distributed():
            torch.distributed.all_reduce(values)
        return values.cpu()

    # -- worker: batches

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen sequences first, then rejected ones, packed into rows or right-padded; `targets` holds the next
        token where it is a response token (else -100), `sequence` which sequence each position belongs to."""
        sides = [(e[f"{side}_ids"], e[f"{side}_start"]) for side in ("chosen", "rejected") for e in examples]
        sequences = [ids for ids, _ in sides]
        targets = [[ids[t + 1] if t + 1 >= start else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
                   for ids, start in sides]
        owner = [[index] * len(ids) for index, (ids, _) in enumerate(sides)]
        batch: dict[str, torch.Tensor] = {
            "response_tokens": torch.tensor([len(ids) - start for ids, start in sides], dtype=torch.float32)}
        if self.packed:
            rows = self.rows.pack(sequences)
            batch |= {"input_ids": rows.input_ids, "position_ids": rows.position_ids,
                      "targets": rows.place(targets, IGNORE_INDEX), "sequence": rows.place(owner, -1)}
        else:
            input_ids, attention_mask = pad(sequences, self.tokenizer.pad_token_id)
            batch |= {"input_ids": input_ids, "attention_mask": attention_mask,
                      "targets": pad(targets, IGNORE_INDEX)[0], "sequence": pad(owner, -1)[0]}
        if self.precomputed is not None and examples:
            table = self.precomputed[examples[0]["split"]]
            rows = table[torch.tensor([e["index"] for e in examples])]
            batch["reference"] = torch.cat([rows[:, 0], rows[:, 1]])
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["response_tokens"].size(0) // 2

    # -- worker: log-probs and the loss

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed response log-probs of every sequence of the batch (fp32), the LM head on response positions only."""
        keep = batch["targets"] != IGNORE_INDEX
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        logits = packing.lm_logits(model, inputs, keep)
        chunk = self.training.logprob_chunk_size if self.training else 256
        token_logps = selective_log_softmax(logits, batch["targets"][keep], 1.0, chunk)
        sequences = batch["response_tokens"].size(0)
        return torch.zeros(sequences, dtype=torch.float32, device=token_logps.device).index_add(
            0, batch["sequence"][keep], token_logps)

    @torch.no_grad()
    def live_reference_logps(self, policy: torch.nn.Module, reference: torch.nn.Module | None,
                             batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if reference is not None:
            return self.sequence_logps(reference, batch)
        module = unwrap(policy)
        with disabled_adapter(module):
            return self.sequence_logps(module, batch)

    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference" in batch:
            return batch["reference"]
        return self.live_reference_logps(model, self.reference, batch)

    def pair_losses(self, model: torch.nn.Module,
                    batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        training = self.training
        assert training is not None
        reference = self.reference_logps(model, batch)
        policy = self.sequence_logps(model, batch)
        pairs = policy.size(0) // 2
        tokens = batch["response_tokens"]
        return dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], training.beta,
                        training.loss_type, training.label_smoothing, tokens[:pairs], tokens[pairs:])

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, chosen, rejected = self.pair_losses(model, batch)
        for key, value in self.statistics(chosen, rejected).items():
            self.window[key] += value
        return losses.sum()

    @staticmethod
    def statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
        return {"pairs": float(chosen.size(0)), "correct": (chosen > rejected).sum().item(),
                "margin": (chosen - rejected).sum().item(), "chosen_rewards": chosen.sum().item(),
                "rejected_rewards": rejected.sum().item()}

    # -- worker: metrics

    def window_sums(self) -> dict[str, float]:
        sums, self.window = self.window, dict.fromkeys(self.window_keys, 0.0)
        return sums

    def window_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        return {"rewards_chosen": sums["chosen_rewards"] / pairs, "rewards_rejected": sums["rejected_rewards"] / pairs,
                "margin": sums["margin"] / pairs, "accuracy": sums["correct"] / pairs}

    def eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        losses, chosen, rejected = self.pair_losses(model, batch)
        return {**self.statistics(chosen, rejected), "loss": losses.sum().item()}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        return {"eval_loss": sums["loss"] / pairs, "eval_accuracy": sums["correct"] / pairs,
                "eval_margin": sums["margin"] / pairs, "eval_rewards_chosen": sums["chosen_rewards"] / pairs,
                "eval_rewards_rejected": sums["rejected_rewards"] / pairs}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the tensors: the precomputed reference log-probs."""
        return {"reference_logps": self.precomputed} if self.precomputed is not None else {}

    def marker_extras(self, eval_metrics: dict[str, float]) -> dict[str, Any]:
        return {}


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    return supervised.train_supervised(loop_config, DPOTask())


def train(config: StageConfig, stop_at_step: int | None = None, in_process: bool = False) -> Any:
    return supervised.run(config, DPOTask(), train_loop, stop_at_step, in_process)
