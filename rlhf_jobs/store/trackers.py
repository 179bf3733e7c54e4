"""Experiment trackers named in `Training.report_to`: MLflow and Weights & Biases.

`MetricsLogger` (rank 0) is the one call site: every record it appends to `metrics.jsonl` also goes
to each tracker, as `<split>/<name>` at the record's step. A run's parameters are its config (MLflow:
flattened, `Training.learning_rate`; W&B: the nested config), its name is the stage, and it carries the tags
`rlhf_jobs.stage` and `rlhf_jobs.group`. A resumed run continues the same tracker run (the ids are
kept in `output_dir/trackers.json`).

Stages of one pipeline share a group (`RLHF_JOBS_RUN_GROUP`, else `RLHF_JOBS_RUN`, which the chart
sets): one W&B group, and in MLflow one parent run (tag `rlhf_jobs.role=pipeline`, found or created
by the first stage) with the stages nested under it.

MLflow reads `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME` (default `rlhf-jobs`) and
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`; W&B reads `WANDB_PROJECT` (default
`rlhf-jobs`), `WANDB_ENTITY`, `WANDB_API_KEY`, `WANDB_MODE`, `WANDB_DIR`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from rlhf_jobs.core.errors import ConfigError

GROUP_ENV = "RLHF_JOBS_RUN_GROUP"
# Not secrets: what the driver knows that a worker on another node might not (secrets come from the pods' env).
FORWARDED_ENV = (GROUP_ENV, "RLHF_JOBS_RUN", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                 "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR")
PACKAGES = {"mlflow": ("mlflow", "rlhf-jobs[mlflow]"), "wandb": ("wandb", "rlhf-jobs[wandb]")}
DEFAULT_PROJECT = "rlhf-jobs"
RUNS_FILE = "trackers.json"


class TrackerError(ConfigError):
    """`Training.report_to` names a tracker that cannot be used here."""


def check(report_to: Sequence[str]) -> None:
    """Driver pre-flight: `none` alone, and every named tracker's package installed."""
    names = list(report_to)
    if "none" in names and len(names) > 1:
        raise TrackerError(f"Training.report_to: 'none' cannot be combined with other trackers (got {names})")
    for name in names:
        if name in PACKAGES:
            module, extra = PACKAGES[name]
            if _missing(module):
                raise TrackerError(
                    f"Training.report_to: {name} needs the {module} package, which is not installed "
                    f"(pip install '{extra}')"
                )
    if "wandb" in names and not _wandb_can_log():
        raise TrackerError("Training.report_to: wandb needs WANDB_API_KEY (on Kubernetes from a Secret), a "
                           "`wandb login`, or WANDB_MODE=offline")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # in sys.modules as None: cannot be imported
        return True


def _wandb_can_log() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def context() -> dict[str, str]:
    """Tracker settings in the driver's environment, handed to rank 0 with the loop config."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def report_to_of(config: Mapping[str, Any]) -> list[str]:
    """`Training.report_to` of a raw (dict) config, as a list (the default: tensorboard)."""
    value = config.get("Training", {}).get("report_to", ["tensorboard"])
    return [value] if isinstance(value, str) else list(value)


def group_of(settings: Mapping[str, str]) -> str | None:
    return settings.get(GROUP_ENV) or settings.get("RLHF_JOBS_RUN") or None


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"Training": {"epochs": 1}}` -> `{"Training.epochs": "1"}` (lists and None as JSON)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = value if isinstance(value, str) else json.dumps(value)
    return params


def numeric(metrics: Mapping[str, Any], split: str) -> dict[str, float]:
    return {f"{split}/{name}": float(value) for name, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


class Tracker(Protocol):
    run_id: str

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None: ...

    def close(self, finished: bool) -> None: ...


# ---- MLflow ----------------------------------------------------------------------------------------


class MLflowTracker:
    def __init__(self, stage: str, params: dict[str, str], settings: Mapping[str, str], run_id: str | None) -> None:
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.get("MLFLOW_TRACKING_URI"))
        self._running = RunStatus.to_string(RunStatus.RUNNING)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status=self._running)
            return
        experiment_id = self._experiment(settings.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT)
        group = group_of(settings)
        tags = {"rlhf_jobs.stage": stage, "rlhf_jobs.role": "stage"}
        if group:
            tags |= {"rlhf_jobs.group": group, "mlflow.parentRunId": self._parent(experiment_id, group)}
        self.run_id = self.client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self.client.create_experiment(name)

    def _parent(self, experiment_id: str, group: str) -> str:
        """The pipeline's parent run: found by its tags, or created by the first stage."""
        query = f"tags.`rlhf_jobs.group` = '{group}' and tags.`rlhf_jobs.role` = 'pipeline'"
        found = self.client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        tags = {"rlhf_jobs.group": group, "rlhf_jobs.role": "pipeline"}
        return self.client.create_run(experiment_id, run_name=group, tags=tags).info.run_id

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in numeric(metrics, split).items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def end_pipeline_run(group: str, finished: bool, tracking_uri: str | None = None,
                     experiment: str | None = None) -> None:
    """Mark the pipeline's MLflow parent run (if any) finished or failed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    found = client.get_experiment_by_name(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT)
    if found is None:
        return
    query = f"tags.`rlhf_jobs.group` = '{group}' and tags.`rlhf_jobs.role` = 'pipeline'"
    for run in client.search_runs([found.experiment_id], filter_string=query):
        client.set_terminated(run.info.run_id, status="FINISHED" if finished else "FAILED")


# ---- Weights & Biases ---------------------------------------------------------------------------------


class WandbTracker:
    def __init__(self, stage: str, params: Mapping[str, Any], settings: Mapping[str, str], run_id: str | None,
                 directory: Path) -> None:
        import wandb

        group = group_of(settings)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.get("WANDB_PROJECT") or DEFAULT_PROJECT, entity=settings.get("WANDB_ENTITY"),
            group=group, job_type=stage, name=f"{group}-{stage}" if group else stage, tags=[stage],
            config=dict(params), dir=str(directory), id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        values = numeric(metrics, split)
        if values:
            self.run.log({"step": step, **values})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


# ---- opening the trackers of a run ------------------------------------------------------------------


def open_trackers(report_to: Sequence[str], stage: str, config: Mapping[str, Any], settings: Mapping[str, str],
                  local_output: Path) -> list[Tracker]:
    """The trackers of this run (rank 0), resuming the tracker runs recorded in `local_output`."""
    for name, value in settings.items():  # the driver's settings, where this node has none
        os.environ.setdefault(name, value)
    saved_path = local_output / RUNS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    params = flat_params(config)
    trackers: dict[str, Tracker] = {}
    if "mlflow" in report_to:
        trackers["mlflow"] = MLflowTracker(stage, params, settings, saved.get("mlflow"))
    if "wandb" in report_to:
        trackers["wandb"] = WandbTracker(stage, config, settings, saved.get("wandb"), local_output)
    if trackers:
        local_output.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(json.dumps({name: t.run_id for name, t in trackers.items()}) + "\n")
    return list(trackers.values())


@contextmanager
def pipeline_group(name: str, report_to: Sequence[str]) -> Iterator[None]:
    """Stages run inside share the group `name`; the MLflow parent run ends with the pipeline."""
    previous = os.environ.get(GROUP_ENV)
    os.environ[GROUP_ENV] = name
    finished = False
    try:
        yield
        finished = True
    finally:
        if previous is None:
            os.environ.pop(GROUP_ENV, None)
        else:
            os.environ[GROUP_ENV] = previous
        if "mlflow" in report_to and importlib.util.find_spec("mlflow") is not None:
            end_pipeline_run(name, finished)
