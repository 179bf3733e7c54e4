"""The supervised training loop SFT, the reward model and DPO share.

A stage supplies a `SupervisedTask` (model, tokenised data, summed loss, evaluation sums); this
loop does the rest the same way for all:

- **Data order.** Each epoch is a seeded permutation of the training examples (padded with its
  first examples to a multiple of the worker count). An optimizer step takes the next
  `batch_size × gradient_accumulation_steps × workers` examples; worker `r` gets every
  `workers`-th of each micro-batch's slice (DistributedSampler's assignment). The position is a
  count of examples, so a run resumes on another number of workers where it stopped.
- **Loss weighting.** Each item (a label token in SFT, a pair for the RM) weighs the same
  whatever micro-batch, accumulation step or worker it lands in: the summed loss of a micro-batch
  is divided by the number of items in the whole optimizer step across all workers (counted
  before the first forward), times the worker count (DDP and FSDP average gradients over workers).
- **Distribution** (`sharding.load_prepared`): DDP or FSDP (loaded sharded: no worker holds a full fp32 copy),
  optional LoRA, gradient checkpointing, fp32 master weights, autocast, a gradient scaler for fp16.
- **Checkpoints** (`train_state.TrainState`): every `save_steps` and at each epoch's end, and when
  the run is told to stop (`control.StopControl`); a rerun with the same `output_dir` resumes.
  Dropout is reseeded per step and rank, so a resumed run computes what an uninterrupted one does.
- **Evaluation** at the start, at each epoch's end (and every `eval_steps` where the stage's Training has
  them) on the unwrapped model (a DDP wrapper would broadcast buffers and hang a
  worker with no batch); under FSDP every worker runs the same number of batches.
- The final model (gathered, merged, in the save dtype) is written atomically to `checkpoint_dir`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from rlhf_jobs.core.config import StageConfig, TrainingBase
from rlhf_jobs.core.data import RecordSchema, load_splits, report_truncation
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.engine import export, launcher, optim, packing, sharding
from rlhf_jobs.engine.adapters import Task, add_lora
from rlhf_jobs.engine.control import StopControl, stopped
from rlhf_jobs.engine.distributed import all_reduce_max, all_reduce_sum, global_items_divisor, peak_memory_gib
from rlhf_jobs.engine.divergence import StepCheck, check_final_weights
from rlhf_jobs.engine.models import load_tokenizer, stored_dtype, unwrap
from rlhf_jobs.engine.train_state import ModelState, TrainState
from rlhf_jobs.engine.worker import Worker, progress, setup_worker
from rlhf_jobs.store.checkpoints import write_atomically
from rlhf_jobs.store.metrics_log import MetricsLogger


class SupervisedTask(Protocol):
    stage: str
    lora_task: Task
    tokenizer: Any  # set by `build`
    packed: bool  # whether batches are packed padding-free (`choose_packing`)
    rows: Any  # the `packing.RowPlan` packed batches are laid out by
    items_name: str  # what `count` counts: "tokens", "pairs"
    eval_keys: tuple[str, ...]  # the keys `eval_sums` returns

    def prepare(self, config: StageConfig) -> dict[str, list[Any] | None]:
        """On the driver, before Ray starts: read, validate and tokenise {"train", "eval"} examples."""

    def build(self, config: StageConfig, worker: Worker) -> tuple[torch.nn.Module, Any]:
        """On each worker: (model with fp32 weights, tokenizer), loaded with `engine.models` (under FSDP also on the
        meta device first: `sharding.load_prepared`)."""

    def per_position(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's outputs at every position (`packing.packing_is_exact` compares them packed and padded)."""

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]: ...

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Items the loss of `batch` sums over."""

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed (not averaged) loss of the batch's items."""

    def eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sums over one evaluation batch; added up over batches and workers, then `eval_metrics`."""

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def marker_extras(self, eval_metrics: dict[str, float]) -> dict[str, Any]:
        """Stage facts for `rlhf_stage.json` that later stages read (e.g. reward statistics)."""


# A task may also have (the loop checks with getattr; SFT and the RM have none of these):
# - `start(model, config, worker, saved, data)`: on each worker once the model is distributed and the checkpoint
#   (`saved`, None on a fresh start) loaded, before the first evaluation (DPO: its reference);
# - `state() -> dict`: what the task adds to every checkpoint (`saved["task"]` on resume);
# - `window_keys` and `window_sums() -> dict` (sums since the last call, reset by it), `window_metrics(sums)`:
#   statistics of the training steps, added up over the logging window and the workers (DPO: rewards, accuracy).


def start_model(config: StageConfig) -> str:
    """The model a supervised stage starts from: the first set General key of its trained model (the SFT/RM
    `base_model`; DPO's `model_pretrain`, else `model_name`)."""
    from rlhf_jobs.core.stages import get

    return get(config.stage).trained[0].name(config.General)


def window_metrics(task: SupervisedTask, worker: Worker) -> dict[str, float]:
    """A task's own training statistics over the logging window, summed over the workers (every rank calls it)."""
    keys = getattr(task, "window_keys", ())
    if not keys:
        return {}
    sums = task.window_sums()  # type: ignore[attr-defined]
    reduced = all_reduce_sum([sums.get(key, 0.0) for key in keys], worker.device)
    return task.window_metrics(dict(zip(keys, reduced, strict=True)))  # type: ignore[attr-defined]


# ---- data order -----------------------------------------------------------------------------------


def epoch_order(n_examples: int, epoch: int, seed: int, world_size: int) -> list[int]:
    """A seeded permutation, padded with its head to a multiple of the worker count."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order + order[: -n_examples % world_size]


def step_micro_batches(order: list[int], consumed: int, batch_size: int, accumulation: int,
                       worker: Worker) -> tuple[list[list[int]], int]:
    """This worker's micro-batches (example indices) for the optimizer step after `consumed` examples of
    the epoch, and how many examples the step takes over all workers."""
    span = batch_size * worker.world_size
    window = order[consumed : consumed + span * accumulation]
    return [window[start : start + span][worker.rank :: worker.world_size]
            for start in range(0, len(window), span)], len(window)


def steps_per_epoch(n_examples: int, batch_size: int, accumulation: int, world_size: int) -> int:
    return math.ceil(math.ceil(n_examples / world_size) * world_size / (batch_size * accumulation * world_size))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


# ---- driver ---------------------------------------------------------------------------------------------


def prepare_examples(
    config: StageConfig, schema: RecordSchema, tokenize: Callable[[dict[str, Any], Any, str, int], dict[str, Any]],
    clip_texts: bool = True,
) -> dict[str, list[dict[str, Any]] | None]:
    """Driver side of SFT and the RM: validated splits, each record tokenised by `tokenize`.

    `tokenize(record, tokenizer, prompt_format, max_length)` builds one example. `clip_texts=False`: texts are
    not cut to what max_length tokens can cover first (`data.clip_text`; then `tokenize` does it, per field).
    """
    general, dataset = config.General, config.Dataset
    tokenizer = load_tokenizer(start_model(config), general.trust_remote_code)
    train, evaluation = load_splits(dataset.train_file, dataset.validation_file,
                                    dataset.validation_split_percentage, schema, config.Training.seed,
                                    max_tokens=dataset.max_length if clip_texts else None)

    def tokenize_all(records: Any, name: str) -> list[dict[str, Any]]:
        examples = list(records.map(
            lambda record: tokenize(record, tokenizer, dataset.prompt_format, dataset.max_length),
            remove_columns=records.column_names, num_proc=dataset.preprocessing_num_workers,
            desc=f"tokenizing {name}",
        ))
        return report_truncation(examples, name, "Dataset.max_length", dataset.max_length, schema.keep)

    return {
        "train": tokenize_all(train, dataset.train_file),
        "eval": tokenize_all(evaluation, dataset.validation_file or "validation split")
        if evaluation is not None else None,
    }


def run(config: StageConfig, task: SupervisedTask, train_loop: Any, stop_at_step: int | None = None,
        in_process: bool = False) -> Any:
    """Driver: prepare the data (errors surface here, before Ray starts), then train."""
    data = task.prepare(config)
    return launcher.run_trainer(config, train_loop, data=data, stop_at_step=stop_at_step, in_process=in_process)


# ---- worker -------------------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, task: SupervisedTask, examples: list[Any], batch_size: int,
             worker: Worker) -> dict[str, float]:
    """Every evaluation example once across workers, on the unwrapped model."""
    module = unwrap(model)
    shard = examples[worker.rank :: worker.world_size]
    batches = [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]
    padding: list[list[Any]] = []
    if sharding.is_sharded(module):  # every rank must run the same forwards (they all-gather parameters)
        most = math.ceil(math.ceil(len(examples) / worker.world_size) / batch_size)
        padding = [examples[:1]] * (most - len(batches))
    sums: dict[str, float] = {}
    module.eval()
    for index, chunk in enumerate(batches + padding):
        batch_sums = task.eval_sums(module, to_device(task.collate(chunk), worker.device))
        if index < len(batches):
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + value
    module.train()
    keys = task.eval_keys  # the same on every worker, even one without a batch
    return task.eval_metrics(dict(zip(keys, all_reduce_sum([sums.get(k, 0.0) for k in keys], worker.device),
                                      strict=True)))


def load_model(task: SupervisedTask, config: StageConfig, worker: Worker) -> tuple[torch.nn.Module, Any]:
    """(the task's model with its LoRA adapters, distributed: `sharding.load_prepared`, the tokenizer); the task
    knows whether its batches are packed."""
    training = config.Training
    built: dict[str, Any] = {}

    def build() -> torch.nn.Module:
        model, built["tokenizer"] = task.build(config, worker)
        return add_lora(model, training.lora, task.lora_task) if training.lora else model

    model = sharding.load_prepared(build, training, worker)
    choose_packing(task, model, training, worker)
    return model, built["tokenizer"]


def choose_packing(task: SupervisedTask, model: torch.nn.Module, training: TrainingBase, worker: Worker) -> None:
    """Whether `task` packs its batches padding-free (`Training.padding_free`, where the model keeps packed sequences
    apart), checked on the distributed model: under FSDP every worker runs the check's forwards."""
    module = unwrap(model)
    task.packed = training.padding_free and packing.packing_is_exact(
        module, task.per_position, task.tokenizer.pad_token_id, sharding.hf_model(module).config.vocab_size)
    sharding.reshard(module)  # FSDP keeps the root's parameters gathered after a forward: the optimizer needs shards
    task.rows = packing.RowPlan.for_model(module)
    if training.padding_free and not task.packed:
        progress(worker, task.stage, packing.NOT_EXACT.format(model=type(sharding.hf_model(module)).__name__))


def resumed_accumulation(saved: dict[str, Any], training: TrainingBase, worker: Worker) -> int:
    """Gradient accumulation that keeps the checkpoint's global batch when a run resumes on another
    number of workers (2 workers × batch 4 → 1 worker × batch 4 × accumulation 2), so steps, schedule
    and data position mean what they meant."""
    global_batch = saved["global_batch"]
    per_pass = training.batch_size * worker.world_size
    if global_batch == per_pass * training.gradient_accumulation_steps:
        return training.gradient_accumulation_steps
    if global_batch % per_pass:
        raise ConfigError(
            f"Training.num_training_workers: the checkpoint was written with a global batch of {global_batch} "
            f"sequences, which {worker.world_size} worker(s) × batch_size {training.batch_size} cannot make up; "
            "resume with a worker count that divides it, or start over (--on-config-change restart)"
        )
    accumulation = global_batch // per_pass
    progress(worker, "train", f"resuming on {worker.world_size} worker(s): gradient_accumulation_steps "
                              f"{training.gradient_accumulation_steps} -> {accumulation} keeps the global batch "
                              f"of {global_batch}")
    return accumulation


def accumulate_gradients(model: torch.nn.Module, task: SupervisedTask, micro_batches: list[dict[str, torch.Tensor]],
                         training: TrainingBase, worker: Worker,
                         scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
    """Backward passes of one optimizer step: (this worker's summed loss, items of the step on all workers).

    Every item weighs 1 / (items of the step on all workers): the summed loss of each micro-batch is
    divided by that count, times the worker count because DDP and FSDP average gradients over workers.
    """
    step_items, divisor = global_items_divisor(sum(task.count(b) for b in micro_batches), worker.device)
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        with sharding.gradient_sync(model, index == len(micro_batches) - 1), optim.autocast(training, worker.device):
            loss = task.loss_sum(model, batch)
            scaled = loss / divisor
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.item()
    return loss_sum, step_items


def train_supervised(loop_config: dict[str, Any], task: SupervisedTask) -> dict[str, Any] | None:
    """Worker: the training loop itself. Returns {STOPPED_METRIC, "reason"} when it stopped early (Ray Train
    hands rank 0's return value to the driver; `Result.metrics` only holds a checkpoint's metrics)."""
    config, worker = setup_worker(loop_config)
    general, training = config.General, config.Training
    train_examples, eval_examples = loop_config["data"]["train"], loop_config["data"]["eval"]
    model, tokenizer = load_model(task, config, worker)

    optimizer = optim.build_optimizer(model, training)
    store = TrainState(general.output_dir, worker)
    tensors = {"model": ModelState(model, optimizer, trainable_only=training.lora is not None)}
    saved = store.load(tensors)
    if hasattr(task, "start"):
        task.start(model, config, worker, saved, loop_config["data"])
    batch_size = training.batch_size
    accumulation = resumed_accumulation(saved, training, worker) if saved else training.gradient_accumulation_steps
    per_epoch = steps_per_epoch(len(train_examples), batch_size, accumulation, worker.world_size)
    total_steps = per_epoch * training.epochs
    if training.max_train_steps:
        total_steps = min(total_steps, training.max_train_steps)
    scheduler = optim.build_scheduler(optimizer, training, total_steps)
    scaler = optim.grad_scaler(training, worker.device)
    step, epoch, consumed = 0, 0, 0
    if saved:
        optim.restore_scheduler(scheduler, saved["scheduler"])
        if scaler and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        step, epoch, consumed = saved["step"], saved["epoch"], saved["consumed"]
        progress(worker, task.stage, f"resuming at epoch {epoch + 1}, step {step}/{total_steps}")

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        import ray.train

        extra = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                 "step": step, "epoch": epoch, "consumed": consumed,
                 "global_batch": batch_size * accumulation * worker.world_size,
                 **({"task": task.state()} if hasattr(task, "state") else {})}
        store.save(step, tensors, extra)
        ray.train.report({"step": step, **metrics})

    logger = MetricsLogger(general.output_dir, task.stage, worker.is_main, config, loop_config.get("tracking"))
    eval_metrics: dict[str, float] = {}

    def run_evaluation(at_step: int) -> dict[str, float]:
        if not eval_examples:
            return {}
        with torch.no_grad(), optim.autocast(training, worker.device):
            metrics = evaluate(model, task, eval_examples, batch_size, worker)
        logger.log(at_step, metrics, split="eval")
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        progress(worker, task.stage, f"eval at step {at_step}: {shown}")
        return metrics

    if saved is None:
        eval_metrics = run_evaluation(0)
    model.train()
    stop = StopControl(worker, loop_config.get("stop_at_step"))
    eval_every = getattr(training, "eval_steps", None)  # a stage's Training may evaluate every N steps (DPO)
    check_step = StepCheck(task.stage, training, worker, general.output_dir)
    window = {"loss": 0.0, "items": 0.0, "start": time.perf_counter()}
    progress(worker, task.stage, f"{len(train_examples)} train examples, {worker.world_size} worker(s), "
                                 f"{per_epoch} steps/epoch, {total_steps} steps")
    while step < total_steps:
        order = epoch_order(len(train_examples), epoch, training.seed, worker.world_size)
        indices, taken = step_micro_batches(order, consumed, batch_size, accumulation, worker)
        micro_batches = [to_device(task.collate([train_examples[i] for i in chunk]), worker.device)
                         for chunk in indices]
        # Dropout masks depend on (step, rank) only: a resumed run draws what an uninterrupted one did.
        torch.manual_seed(training.seed + 1_000_003 * (step + 1) + worker.rank)
        loss_sum, step_items = accumulate_gradients(model, task, micro_batches, training, worker, scaler)
        optim.step([(optimizer, model)], training, scaler,
                   check=lambda norms, at=step + 1, loss=loss_sum, items=step_items: check_step(at, loss, items, norms))
        scheduler.step()
        step, consumed = step + 1, consumed + taken
        epoch_ended = consumed >= len(order)
        if epoch_ended:
            epoch, consumed = epoch + 1, 0

        window["loss"] += loss_sum
        window["items"] += step_items
        if step % training.logging_steps == 0 or step == total_steps:
            (loss_total,) = all_reduce_sum([window["loss"]], worker.device)
            (memory,) = all_reduce_max([peak_memory_gib(worker.device)], worker.device)
            elapsed = time.perf_counter() - window["start"]
            metrics = {
                "loss": loss_total / max(window["items"], 1.0), "learning_rate": scheduler.get_last_lr()[0],
                "epoch": epoch + consumed / len(order),
                f"{task.items_name}_per_second": window["items"] / max(elapsed, 1e-9),
                "memory_peak_gib": memory, **window_metrics(task, worker),
            }
            logger.log(step, metrics)
            progress(worker, task.stage,
                     f"epoch {min(epoch + 1, training.epochs)}/{training.epochs} step {step}/{total_steps} "
                     f"loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.2e} "
                     f"{metrics[f'{task.items_name}_per_second']:.0f} {task.items_name}/s")
            window = {"loss": 0.0, "items": 0.0, "start": time.perf_counter()}

        stop_reason = stop.should_stop(step) if step < total_steps else None
        if epoch_ended or step == total_steps or (eval_every and step % eval_every == 0):
            eval_metrics = run_evaluation(step)
        if epoch_ended or step == total_steps:
            save_checkpoint(eval_metrics)
        elif (training.save_steps and step % training.save_steps == 0) or stop_reason:
            save_checkpoint({})
        if stop_reason:
            return stopped(worker, task.stage, step, stop_reason, logger)

    if saved is not None and not eval_metrics:
        eval_metrics = run_evaluation(step)
    logger.close()
    marker = {"stage": task.stage, "config": config.to_dict(), "step": step, "metrics": eval_metrics,
              **task.marker_extras(eval_metrics)}
    save_final_model(config, model, tokenizer, marker, worker, task.stage)
    return None


def save_final_model(config: StageConfig, model: torch.nn.Module, tokenizer: Any, marker: dict[str, Any],
                     worker: Worker, stage: str) -> None:
    """Every rank calls it (a sharded model is gathered); rank 0 writes checkpoint_dir atomically."""
    general = config.General
    module = export.gathered_model(model, worker)
    if not worker.is_main:
        return
    check_final_weights(module, stage, general.output_dir)
    dtype = export.save_dtype(config.Training, stored_dtype(start_model(config), general.trust_remote_code))
    final = export.exportable(module, config.Training, dtype)

    def write(directory: Any) -> None:
        final.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    path = write_atomically(general.checkpoint_dir, write, marker)
    progress(worker, stage, f"final model written to {path}")
