"""The supervised training loop SFT and the reward model share.

A stage supplies a `SupervisedTask` (model, tokenised data, loss, evaluation); this loop
does the rest the same way for both: DDP, distributed sampling, gradient accumulation,
clipping, schedule, logging, evaluation per epoch, Ray Train checkpoints every
`save_steps` (or epoch) with mid-epoch resume, and the final atomic `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler

from rlhf_jobs import launcher, optim, train_state
from rlhf_jobs.checkpoints import write_atomically
from rlhf_jobs.config import StageConfig
from rlhf_jobs.data import RecordSchema, load_splits
from rlhf_jobs.distributed import all_reduce_sum
from rlhf_jobs.metrics_log import MetricsLogger
from rlhf_jobs.models import load_tokenizer, unwrap
from rlhf_jobs.worker import Worker, batches, progress, setup_worker


class SupervisedTask(Protocol):
    stage: str

    def prepare(self, config: StageConfig) -> dict[str, list[Any] | None]:
        """On the driver, before Ray starts: read, validate and tokenise {"train", "eval"} examples."""

    def build(self, config: StageConfig, worker: Worker) -> tuple[Any, Any]:
        """On each worker: (model, tokenizer)."""

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean loss of the batch and how many items (tokens, pairs) it averaged."""

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, worker: Worker) -> dict[str, float]: ...

    def items_name(self) -> str:
        """What `loss` counts, for the throughput figure (`tokens`, `pairs`)."""

    def marker_extras(self, eval_metrics: dict[str, float]) -> dict[str, Any]:
        """Stage facts for `rlhf_stage.json` that later stages read (e.g. reward statistics)."""


def train_loader(examples: list[Any], task: SupervisedTask, batch_size: int, worker: Worker, seed: int) -> DataLoader:
    """A reshuffled (per epoch, via set_epoch) shard of the training examples for this worker."""
    sampler = DistributedSampler(examples, num_replicas=worker.world_size, rank=worker.rank, shuffle=True, seed=seed)
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=task.collate)


def eval_loader(examples: list[Any], task: SupervisedTask, batch_size: int, worker: Worker) -> DataLoader:
    """Every evaluation example exactly once across workers (DistributedSampler would pad with repeats)."""
    return DataLoader(examples[worker.rank :: worker.world_size], batch_size=batch_size, collate_fn=task.collate)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def prepare_examples(
    config: StageConfig, schema: RecordSchema, tokenize: Callable[[dict[str, Any], Any, str, int], dict[str, Any]]
) -> dict[str, list[dict[str, Any]] | None]:
    """Driver side of SFT and the RM: validated splits, each record tokenised by `tokenize`.

    `tokenize(record, tokenizer, prompt_format, max_length)` builds one example.
    """
    general, dataset = config.General, config.Dataset
    tokenizer = load_tokenizer(general.base_model, general.trust_remote_code)
    train, evaluation = load_splits(dataset.train_file, dataset.validation_file,
                                    dataset.validation_split_percentage, schema, config.Training.seed)

    def tokenize_all(records: Any, name: str) -> list[dict[str, Any]]:
        return list(records.map(
            lambda record: tokenize(record, tokenizer, dataset.prompt_format, dataset.max_length),
            remove_columns=records.column_names, num_proc=dataset.preprocessing_num_workers,
            desc=f"tokenizing {name}",
        ))

    return {
        "train": tokenize_all(train, dataset.train_file),
        "eval": tokenize_all(evaluation, dataset.validation_file or "validation split")
        if evaluation is not None else None,
    }


def run(config: StageConfig, task: SupervisedTask, train_loop: Any) -> Any:
    """Driver: prepare the data (errors surface here, before Ray starts), then train."""
    data = task.prepare(config)
    return launcher.run_trainer(config, train_loop, data=data)


def train_supervised(loop_config: dict[str, Any], task: SupervisedTask) -> None:
    """Worker: the training loop itself."""
    import ray.train.torch

    config, worker = setup_worker(loop_config)
    general, training = config.General, config.Training
    train_examples, eval_examples = loop_config["data"]["train"], loop_config["data"]["eval"]
    model, tokenizer = task.build(config, worker)
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = ray.train.torch.prepare_model(model)

    loader = train_loader(train_examples, task, training.batch_size, worker, training.seed)
    evaluation_loader = eval_loader(eval_examples, task, training.batch_size, worker) if eval_examples else None
    accumulation = training.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(loader) / accumulation)
    total_steps = steps_per_epoch * training.epochs
    if training.max_train_steps:
        total_steps = min(total_steps, training.max_train_steps)
    optimizer = optim.build_optimizer(model, training)
    scheduler = optim.build_scheduler(optimizer, training, total_steps)
    fp16_on_cuda = training.mixed_precision == "fp16" and worker.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16_on_cuda else None

    epoch, batches_done, step = 0, 0, 0
    state = train_state.load_train_state()
    if state:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        progress(worker, task.stage, f"resuming at epoch {epoch + 1}, step {step}/{total_steps}")

    logger = MetricsLogger(general.output_dir, task.stage, worker.is_main)
    eval_metrics: dict[str, float] = {}

    def evaluate(at_step: int) -> dict[str, float]:
        if evaluation_loader is None:
            return {}
        model.eval()
        with torch.no_grad(), optim.autocast(training, worker.device):
            metrics = task.evaluate(model, evaluation_loader, worker)
        model.train()
        logger.log(at_step, metrics, split="eval")
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        progress(worker, task.stage, f"eval at step {at_step}: {shown}")
        return metrics

    def snapshot() -> dict[str, Any]:
        return {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "batches_done": batches_done,
            "step": step,
        }

    if state is None:
        eval_metrics = evaluate(0)
    model.train()
    window_loss, window_batches, window_items, window_start = 0.0, 0, 0, time.perf_counter()
    progress(
        worker, task.stage,
        f"{len(train_examples)} train examples, {training.num_training_workers} worker(s), "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps",
    )
    while epoch < training.epochs and step < total_steps:
        loader.sampler.set_epoch(epoch)
        micro = 0
        for micro, batch in enumerate(batches(loader, batches_done), start=batches_done + 1):
            last_micro = micro % accumulation == 0 or micro == len(loader)
            batch = to_device(batch, worker.device)
            # DDP all-reduces gradients only on the micro-batch that ends an accumulation.
            sync = model.no_sync() if not last_micro and hasattr(model, "no_sync") else contextlib.nullcontext()
            with sync, optim.autocast(training, worker.device):
                loss, items = task.loss(model, batch)
                scaled = loss / accumulation
                (scaler.scale(scaled) if scaler else scaled).backward()
            window_loss += loss.item()
            window_batches += 1
            window_items += items
            batches_done = micro
            if not last_micro:
                continue
            if scaler:
                scaler.unscale_(optimizer)
            if training.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % training.logging_steps == 0 or step == total_steps:
                loss_sum, count, items_sum = all_reduce_sum(
                    [window_loss, window_batches, window_items], worker.device
                )
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": loss_sum / max(count, 1), "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": epoch + micro / len(loader),
                    f"{task.items_name()}_per_second": items_sum / max(elapsed, 1e-9),
                }
                logger.log(step, metrics)
                progress(
                    worker, task.stage,
                    f"epoch {epoch + 1}/{training.epochs} step {step}/{total_steps} "
                    f"loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.2e} "
                    f"{metrics[f'{task.items_name()}_per_second']:.0f} {task.items_name()}/s",
                )
                window_loss, window_batches, window_items, window_start = 0.0, 0, 0, time.perf_counter()
            if step >= total_steps:
                break
            if training.save_steps and step % training.save_steps == 0:
                train_state.report_checkpoint(worker, {"step": step}, snapshot)
        # The epoch ended, or training did: evaluate and checkpoint at the boundary.
        if batches_done >= len(loader):
            epoch, batches_done = epoch + 1, 0
        eval_metrics = evaluate(step)
        train_state.report_checkpoint(worker, {"step": step, **eval_metrics}, snapshot)

    if state is not None and not eval_metrics:
        eval_metrics = evaluate(step)
    logger.close()
    if worker.is_main:
        final = unwrap(model)
        marker = {
            "stage": task.stage, "config": config.to_dict(), "step": step,
            "metrics": eval_metrics, **task.marker_extras(eval_metrics),
        }

        def write(directory: Any) -> None:
            final.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        path = write_atomically(general.checkpoint_dir, write, marker)
        progress(worker, task.stage, f"final model written to {path}")
