"""Driver side of every stage: start (or join) Ray, check resources, run a Ray Train `TorchTrainer`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_jobs.core.config import StageConfig, TrainingBase
from rlhf_jobs.core.errors import OutOfMemory, ResourceError, RunStopped, TrainingDiverged, UserError
from rlhf_jobs.core.stages import get
from rlhf_jobs.engine import preemption
from rlhf_jobs.engine.control import STOPPED_METRIC
from rlhf_jobs.engine.logs import install_ray_log_filter, stop_ray_output
from rlhf_jobs.engine.ray_backend import LazyTorchConfig, NoRetryOfDeterministicFailures
from rlhf_jobs.store import identity, storage, trackers

RUN_NAME = "ray_train"


def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray Train's PreemptionWatcher polls node drains every 5 s by default; Ray Train passes this variable
    # from the driver to its controller, so a drain stops the run within about a second (preemption.py).
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")


# A Ray started in this process (no RAY_ADDRESS) lives and dies with this process, on one machine
# nobody drains. What it need not start (bench/ray_overhead.py measures each): the preemption
# watcher actor (it polls for node drains), idle worker processes started ahead (Ray Train's controller and
# workers never take them, even with an empty runtime env: measured), the dashboard's head modules (only Ray
# Train's placement-group cleaner, left out below, reads its state API). The controller polls the
# workers every 0.5 s instead of 2 s, so the end of a run is noticed sooner.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Set with LOCAL_RAY_ENV, so that a child process joining a real cluster (RAY_ADDRESS) drops them again:
# a drained node must stop its run there.
LOCAL_RAY_MARKER = "RLHF_JOBS_LOCAL_RAY_ENV"
_started_here = False  # whether this process started the Ray it uses


# glibc keeps freed blocks below its mmap threshold in the heap, and raises that threshold (up to 32 MiB)
# each time a large block is freed: the full weights FSDP frees after sharding, a decoder layer at a time,
# stay in the process. A fixed 1 MiB threshold returns every freed tensor above it to the system.
# Measured (bench/memory.py, 0.47B PPO, FSDP, 2 CPU workers): 9.6 GiB per worker while loading without it,
# 4.6 GiB with it. Only where sharding is meant to save host memory (FSDP on CPU): each large allocation
# then costs fresh pages from the kernel (its effect on step time was not measured). A value the user set wins.
SHARDED_CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def worker_env(training: TrainingBase) -> dict[str, str]:
    """Environment variables for the training worker processes."""
    if training.strategy != "fsdp" or training.use_gpu:
        return {}
    return {name: value for name, value in SHARDED_CPU_WORKER_ENV.items() if name not in os.environ}


def init_ray(training: TrainingBase) -> None:
    """Join the cluster in RAY_ADDRESS (KubeRay sets it), else start Ray in this process."""
    import ray

    global _started_here
    _quiet_ray_env()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        if os.environ.pop(LOCAL_RAY_MARKER, None):  # inherited from a parent that ran an in-process Ray
            for name in LOCAL_RAY_ENV:
                os.environ.pop(name, None)
        ray.init(log_to_driver=True)
        install_ray_log_filter()
        return
    if not any(name in os.environ for name in LOCAL_RAY_ENV):
        os.environ.update(LOCAL_RAY_ENV, **{LOCAL_RAY_MARKER: "1"})
    # address="local": a new in-process cluster, never one that `ray start` left running on this machine.
    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=True,
             logging_level="WARNING")
    install_ray_log_filter()
    _started_here = True
    check_local_resources(training, ray.cluster_resources())


def check_local_resources(training: TrainingBase, available: dict[str, float]) -> None:
    wanted = training.resources_per_worker.ray_resources()
    workers = training.num_training_workers
    for name, amount in wanted.items():
        if workers * amount > available.get(name, 0.0) + 1e-9:
            have = available.get(name, 0.0)
            shown = f"{have / 2**30:.1f} GiB" if name == "memory" else f"{have:g}"
            raise ResourceError(
                f"Training.num_training_workers × resources_per_worker.{name} = {workers} × "
                f"{amount:g} but this machine's Ray has {shown} {name}; lower them, e.g. "
                f"--set Training.resources_per_worker.{name}=... or Training.num_training_workers=..."
            )


MEMORY_WORDS = ("OutOfMemoryError", "out of memory", "memory pressure", "OOM")


def _memory_failure(error: BaseException) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError) or any(word in f"{type(error).__name__}: {error}" for word in MEMORY_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _last_peak_memory(output_dir: str) -> float | None:
    """The highest per-worker peak RSS the run logged (`memory_peak_gib` in metrics.jsonl), if any."""
    import json

    path = storage.location(output_dir).local / "metrics.jsonl"
    if not path.is_file():
        return None
    peaks = [json.loads(line).get("memory_peak_gib") for line in path.read_text().splitlines() if line.strip()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _killed_worker_memory(error: BaseException) -> float | None:
    """The memory (GiB) of the worker Ray's OOM killer chose, from its message."""
    import re

    used = [float(gb) * 1e9 / 2**30 for gb in re.findall(r"actual memory used=([0-9.]+)GB", str(error))]
    return max(used) if used else None


def out_of_memory(config: StageConfig, error: BaseException) -> OutOfMemory:
    training = config.Training
    peaks = [p for p in (_last_peak_memory(config.General.output_dir), _killed_worker_memory(error)) if p]
    peak = max(peaks) if peaks else None
    reached = f"after reaching {peak:.1f} GiB per worker" if peak else "before logging its memory"
    advice = [] if training.lora else ["LoRA (Training.lora: {r: 16})"]
    if training.strategy == "ddp" and training.num_training_workers > 1:
        advice.append("sharding (Training.strategy: fsdp)")
    advice.append(get(config.stage).memory_advice)
    if not training.gradient_checkpointing:
        advice.append("Training.gradient_checkpointing: true")
    advice.append("fewer workers per node (a larger resources_per_worker.memory)")
    return OutOfMemory(
        f"{config.stage}: the workers ran out of memory {reached}; try {', '.join(advice)}. "
        "The next run resumes from the last checkpoint."
    )


def absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """The config with local paths made absolute, so workers read the same files wherever they run: General's paths
    that exist here, and in lists of references `path/to/file.py:name` (GRPO's reward functions) the files that do."""
    general = dict(data["General"])
    for key, value in general.items():
        if isinstance(value, list):
            general[key] = [_absolute_reference(item) for item in value]
        if not isinstance(value, str) or "://" in value:
            continue
        if key in ("output_dir", "checkpoint_dir") or Path(value).exists():
            general[key] = str(Path(value).expanduser().resolve())
    return {**data, "General": general}


def _absolute_reference(item: Any) -> Any:
    """`path/to/file.py:name` with the file's absolute path when the file is here; anything else as it is."""
    if not isinstance(item, str) or "://" in item:
        return item
    target, colon, name = item.rpartition(":")
    if colon and target.endswith(".py") and Path(target).expanduser().is_file():
        return f"{Path(target).expanduser().resolve()}:{name}"
    return item


def trainer_class(in_process: bool = False) -> type:
    """Ray Train's `TorchTrainer`, which does not restart a run failed by a deterministic error (bad input, a
    non-finite loss: `ray_backend.NoRetryOfDeterministicFailures`); on a Ray started in this process, without
    what only a shared cluster needs.

    Left out there (each is an actor process on the critical path of every run's start):
    - the placement-group cleaner, which frees the workers' reservation if the controller dies while
      the cluster lives on (an in-process cluster dies with this process; the cleaner also fails on
      a machine where several Ray instances run);
    - the Ray Data dataset manager (we pass no Ray Datasets: each worker gets its examples through
      `train_loop_config`);
    - resource requests to Ray Data's autoscaling coordinator (an in-process cluster has no autoscaler).
    """
    from ray.train.torch import TorchTrainer

    if in_process:
        return TorchTrainer

    class NoRetryTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["failure_policy"] = NoRetryOfDeterministicFailures(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    if not _started_here:
        return NoRetryTorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class NoAutoscalerRequests(FixedScalingPolicy):
        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class LocalTorchTrainer(NoRetryTorchTrainer):
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["callbacks"] = [callback for callback in kwargs["callbacks"]
                                   if not isinstance(callback, (DatasetsCallback, PlacementGroupCleanerCallback))]
            if type(kwargs["scaling_policy"]) is FixedScalingPolicy:
                kwargs["scaling_policy"] = NoAutoscalerRequests(kwargs["scaling_policy"].scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return LocalTorchTrainer


def run_trainer(
    config: StageConfig,
    train_loop: Callable[[dict[str, Any]], None],
    data: dict[str, Any] | None = None,
    run_name: str = RUN_NAME,
    stop_at_step: int | None = None,
    in_process: bool = False,
) -> Any:
    """Run `train_loop` on `num_training_workers` Ray Train workers; resume from `output_dir`.

    `data` (prepared on the driver) reaches every worker through Ray's object store, so
    only the driver needs to reach the data files. Raises `RunStopped` when the run ended early
    with a checkpoint, `OutOfMemory` when its workers were killed for memory.
    `in_process`: the one worker is this process (Ray Train's local mode; `train.train` has run
    `preflight.check_in_process`): no Ray is started, the same loop runs here.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    training = config.Training
    if not in_process:
        init_ray(training)
    identity.record(config)  # creates a local output_dir; records the run's identity there
    storage_path, storage_filesystem = storage.location(config.General.output_dir).ray_storage()
    make_trainer = lambda: trainer_class(in_process)(  # noqa: E731  (one per attempt: a drained node's run restarts)
        train_loop,
        torch_config=LazyTorchConfig(),
        train_loop_config={"stage": config.stage, "config": absolute_paths(config.to_dict()), "data": data,
                           "stop_at_step": stop_at_step, "tracking": trackers.context(), "in_process": in_process},
        scaling_config=ScalingConfig(
            num_workers=0 if in_process else training.num_training_workers,  # 0: Ray Train's local mode
            use_gpu=training.use_gpu,
            resources_per_worker=None if in_process else training.resources_per_worker.ray_resources(),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(training)},
        ),
    )
    guard_type = preemption.InProcessGuard if in_process else preemption.DriverGuard
    with guard_type() as guard:  # SIGTERM: stop after the current step (preemption.py)
        while True:
            try:
                result = make_trainer().fit()
                if result.error:  # an aborted run can return instead of raising
                    raise result.error
            except Exception as err:
                failures = list(getattr(err, "worker_failures", {}).values())
                user_error = next((f for f in failures if isinstance(f, UserError | TrainingDiverged)), None)
                if user_error is not None:  # a problem only a worker could see: one line, not a traceback
                    stop_ray_output()
                    raise user_error from None
                if _memory_failure(err) or any(_memory_failure(f) for f in failures):
                    stop_ray_output()
                    raise out_of_memory(config, err) from None
                raise
            # A loop that stopped early returns {STOPPED_METRIC, "reason"} (Result.metrics only holds the
            # metrics of the last checkpoint Ray Train registered, and the loops register none).
            outcome = result.return_value if isinstance(result.return_value, dict) else {}
            if not guard.restart_after(outcome.get("reason")):
                break
    stopped = outcome.get(STOPPED_METRIC)
    if stopped is not None:
        raise RunStopped(config.stage, int(stopped), str(outcome.get("reason", "stopped")))
    return result
