"""What every RL stage's training loop does around its iterations: resume, prompt stream, held-out evaluation
cadence, checkpoints, metrics and stop requests. An algorithm supplies the iteration itself.

A resume (same `output_dir`) restores the tensors (`train_state`), the optimizer's state, the iteration and the
position in the prompt stream; on another number of workers the per-worker batch is re-derived so that the
checkpoint's global batch and global minibatch stay (`rollout.resumed_layout`), so iterations, schedule and prompt
position mean what they meant. Held-out prompts are scored at the start (split `eval`, step 0), every `eval_steps`
iterations and at the end; Ray Train checkpoints are written every `save_steps` (default `eval_steps`) iterations,
at the end and when a stop is requested (`--stop-at-step`, SIGTERM, a drained node).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rlhf_jobs.algorithms.rl.rollout import prompt_batch, resumed_layout
from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.engine.control import StopControl, stopped
from rlhf_jobs.engine.train_state import TrainState
from rlhf_jobs.engine.worker import Worker, progress
from rlhf_jobs.store.metrics_log import MetricsLogger


class IterationRun:
    """One RL run's bookkeeping on one worker: how many iterations, where it stands, when to evaluate and save.

    `tensors` (name -> `train_state.ModelState`) are restored from the newest checkpoint on construction; the caller
    then builds its schedules over `updates` and passes what else resumes (`state`, `restore`) to `resume`."""

    def __init__(self, stage: str, config: StageConfig, worker: Worker, loop_config: dict[str, Any],
                 tensors: dict[str, Any], prompt_count: int) -> None:
        general = config.General
        self.stage, self.config, self.worker, self.tensors = stage, config, worker, tensors
        self.store = TrainState(general.output_dir, worker)
        self.saved = self.store.load(tensors)
        self.training = training = resumed_layout(self.saved, config.Training, worker, stage)
        batch_size = training.experience_batch_size
        self.global_batch = batch_size * worker.world_size
        self.global_mini_batch = (training.mini_batch_size or batch_size) * worker.world_size
        self.iterations = training.training_iteration or training.epochs * math.ceil(prompt_count / self.global_batch)
        self.updates = self.iterations * (self.global_batch // self.global_mini_batch) * training.ppo_epochs
        self.iteration, self.position = 0, 0
        self.save_steps = training.save_steps or training.eval_steps
        self.prompt_count = prompt_count
        self.state: Callable[[], dict[str, Any]] = dict
        self.evaluate: Callable[[int], dict[str, float]] = lambda at: {}
        self.eval_metrics: dict[str, float] = {}
        self.logger: MetricsLogger | None = None
        self.stop: StopControl | None = None
        self.stop_at_step = loop_config.get("stop_at_step")
        self.tracking = loop_config.get("tracking")

    def resume(self, state: Callable[[], dict[str, Any]], restore: Callable[[dict[str, Any]], None]) -> None:
        """`state()`: what a checkpoint keeps besides the tensors (schedules, scaler, ...); `restore` loads it back
        from a checkpoint, after which the run continues where that one stopped."""
        self.state = state
        if self.saved:
            restore(self.saved)
            self.iteration = self.saved["iteration"]
            self.position = self.saved.get("prompt_position", self.iteration * self.global_batch)
            progress(self.worker, self.stage, f"resuming at iteration {self.iteration}/{self.iterations}")
        self.logger = MetricsLogger(self.config.General.output_dir, self.stage, self.worker.is_main, self.config,
                                    self.tracking)

    def start(self, evaluate: Callable[[], dict[str, float]], summary: Callable[[dict[str, float]], str]) -> None:
        """Score the held-out prompts before the first iteration (not on a resume); `summary` phrases the
        scores for the progress line."""

        def scored(at: int) -> dict[str, float]:
            metrics = evaluate()
            if metrics:
                self.logger.log(at, metrics, split="eval")
                progress(self.worker, self.stage, f"eval at iteration {at}: {summary(metrics)}")
            return metrics

        self.evaluate = scored
        progress(self.worker, self.stage, f"{self.prompt_count} prompts, {self.worker.world_size} worker(s) × "
                                          f"{self.training.experience_batch_size} per rollout, {self.iterations} "
                                          "iterations")
        self.eval_metrics = scored(self.iteration) if self.saved is None else {}
        self.stop = StopControl(self.worker, self.stop_at_step)

    @property
    def running(self) -> bool:
        return self.iteration < self.iterations

    def seed(self) -> None:
        """Seeded per iteration and rank: responses differ across workers, and a resumed run samples the same."""
        torch.manual_seed(self.training.seed + 100_003 * self.iteration + self.worker.rank)

    def prompts(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This worker's share of the iteration's prompts (`rollout.prompt_batch`)."""
        return prompt_batch(examples, self.worker, self.training.seed, self.position, self.global_batch)

    def advance(self) -> None:
        """The iteration's update is done: count it and move past its prompts."""
        self.iteration, self.position = self.iteration + 1, self.position + self.global_batch

    @property
    def epoch(self) -> float:
        return self.position / self.prompt_count

    def end_iteration(self, metrics: dict[str, float]) -> dict[str, Any] | None:
        """Log the iteration's metrics, evaluate and checkpoint when due; the loop's return value when a stop was
        requested (with a checkpoint written), else None."""
        iteration = self.iteration
        self.logger.log(iteration, metrics)
        stop_reason = self.stop.should_stop(iteration) if iteration < self.iterations else None
        if iteration % self.training.eval_steps == 0 or iteration == self.iterations:
            self.eval_metrics = self.evaluate(iteration)
        if iteration % self.save_steps == 0 or iteration == self.iterations or stop_reason:
            self.save_checkpoint({**metrics, **self.eval_metrics})
        if stop_reason:
            return stopped(self.worker, self.stage, iteration, stop_reason, self.logger)
        return None

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train

        self.store.save(self.iteration, self.tensors, {**self.state(), "iteration": self.iteration,
                                                       "prompt_position": self.position,
                                                       "global_batch": self.global_batch,
                                                       "global_mini_batch": self.global_mini_batch})
        ray.train.report({"iteration": self.iteration, **metrics})

    def finish(self) -> dict[str, float]:
        """After the last iteration: the final held-out scores (evaluated now if the last iteration did not), and
        the metrics log closed."""
        if not self.eval_metrics:
            self.eval_metrics = self.evaluate(self.iteration)
        self.logger.close()
        return self.eval_metrics
