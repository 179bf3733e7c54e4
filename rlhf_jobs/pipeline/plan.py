"""SFT -> reward model -> PPO as one pipeline, on a backend (local Ray, or KubeRay).

The pipeline resolves every stage's config (paths under one work directory, each stage's
`checkpoint_dir` wired into the next), decides which stages must run, and keeps a record
of what finished with which config, so that a re-run skips finished stages and continues
an interrupted one. Backends only run one stage and store the record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rlhf_jobs.core import stages as registry
from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.data import read_records
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.loading import (
    Origins,
    apply_overrides,
    check_data_paths,
    check_model_paths,
    read_config_file,
    validate_config,
)
from rlhf_jobs.store.checkpoints import require_stage
from rlhf_jobs.store.markers import MARKER

STAGES = registry.NAMES


class Backend(Protocol):
    """Where stages run, and where the pipeline record lives."""

    name: str

    def stage_paths(self, stage: str) -> tuple[str, str]:
        """(output_dir, checkpoint_dir) of `stage` as the trainer will see them."""

    def stage_configs(self, options: PipelineOptions) -> dict[str, dict[str, Any]]:
        """Every stage's resolved, validated training config (what the trainer will read)."""

    def load_record(self) -> dict[str, Any]: ...

    def save_record(self, record: dict[str, Any]) -> None: ...

    def reset_stage(self, stage: str) -> None:
        """Forget a stage's partial progress (its config changed, so resuming would be wrong)."""

    def run_stage(self, stage: str, config: dict[str, Any]) -> None:
        """Run one stage to completion; raise on failure."""


@dataclass
class StagePlan:
    stage: str
    config: dict[str, Any]
    config_hash: str
    action: str  # "run", "resume" or "skip"
    reason: str


@dataclass
class PipelineOptions:
    stages: Sequence[str] = registry.DEFAULT_PIPELINE
    config_dir: Path = Path("configs/local")
    overrides: Sequence[str] = ()
    base_model: str | None = None
    from_stage: str | None = None
    check_paths: bool = True
    check_models: bool = True  # False: the base model is not there yet (--tiny-model builds it after this check)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages {text!r}: expected a comma-separated subset of {','.join(STAGES)}")
    return [s for s in STAGES if s in stages]  # always in pipeline order


def split_overrides(overrides: Sequence[str], stage: str) -> list[str]:
    """`--set sft.Training.epochs=1` applies to sft only; `--set Training.epochs=1` to every stage."""
    return [applied for applied, _ in stage_overrides(overrides, stage)]


def stage_overrides(overrides: Sequence[str], stage: str) -> list[tuple[str, str]]:
    """(what applies to `stage`'s config, the --set as typed) for every --set that reaches `stage`."""
    selected = []
    for text in overrides:
        head, _, rest = text.partition(".")
        if head in STAGES:
            if head == stage:
                selected.append((rest, text))
        else:
            selected.append((text, text))
    return selected


def stage_origins(config_file: Path, overrides: Sequence[str], stage: str) -> Origins:
    """Blames a bad value on the --set as typed and the stage config it went into, else on that file."""
    selected = stage_overrides(overrides, stage)
    return Origins(str(config_file), [applied for applied, _ in selected],
                   shown=[f"--set {typed} (for {config_file})" for _, typed in selected])


def config_hash(config: dict[str, Any], upstream: Sequence[str]) -> str:
    """Hash of a stage's resolved config and of the configs of the stages it was built from."""
    payload = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve_configs(backend: Backend, options: PipelineOptions) -> dict[str, dict[str, Any]]:
    """The config of every stage that runs, with pipeline paths and its inputs wired, validated.

    A stage's inputs (`Stage.inputs` and `optional_inputs`, and a base model that names another stage's
    `checkpoint_dir` in the config files) read the final model of the producing stage in this pipeline when that
    stage runs now or ran in it before (it must have finished: checked before anything runs); otherwise the config's
    own value stays (a model elsewhere, or None: the base model as is, or no such model for an optional input). Only
    the stages that run need a config file.
    """
    available = set(options.stages) | set(backend.load_record().get("stages", {}))
    raw = {stage: read_config_file(path) for stage in registry.NAMES
           if (path := _config_file(options.config_dir, stage, required=stage in options.stages))}
    original_checkpoints = {stage: str(config.get("General", {}).get("checkpoint_dir", "")) for stage, config in
                            raw.items()}
    resolved = {}
    for stage in options.stages:
        config = copy.deepcopy(raw[stage])
        general = config.setdefault("General", {})
        output_dir, checkpoint_dir = backend.stage_paths(stage)
        general["output_dir"], general["checkpoint_dir"] = output_dir, checkpoint_dir
        for key in registry.get(stage).base_model_keys:
            producer = next((s for s, path in original_checkpoints.items()
                             if s != stage and path and general.get(key) == path), None)
            if producer in available:
                general[key] = backend.stage_paths(producer)[1]
            elif options.base_model and producer is None and (key not in general or general[key] is not None):
                general[key] = options.base_model  # an optional model set to null (GRPO's rm_name) stays so
        for key, producer in registry.get(stage).all_inputs.items():
            if producer in available:
                general[key] = backend.stage_paths(producer)[1]
        try:
            config = apply_overrides(config, split_overrides(options.overrides, stage))
        except ConfigError as err:
            raise ConfigError(f"{_config_file(options.config_dir, stage)}: {err}") from None
        resolved[stage] = config
    for stage in options.stages:
        source = stage_origins(_config_file(options.config_dir, stage), options.overrides, stage)
        config = validate_config(resolved[stage], stage, source=source, paths=False)
        if options.check_paths:
            # Every stage's data now; models for the stages that read no model this pipeline makes (the first
            # stage, or one whose input comes from elsewhere), before anything runs.
            check_data_paths(config, source)
            records = registry.get(stage).records
            read_records(config.Dataset.train_file, records)
            if config.Dataset.validation_file:
                read_records(config.Dataset.validation_file, records)
            if options.check_models:
                check_inputs(backend, options, stage, config, source)
    return resolved


def check_inputs(backend: Backend, options: PipelineOptions, stage: str, config: StageConfig,
                 source: Origins) -> None:
    """Before anything runs: every model the stage reads that no stage of this run makes is there (a model
    directory, a hub id, or for an input key a finished model of the stage that makes it)."""
    made_here = {backend.stage_paths(other)[1] for other in options.stages if other != stage}
    entry = registry.get(stage)
    keys = [key for key in entry.model_keys if getattr(config.General, key, None) not in made_here]
    inputs = entry.all_inputs
    check_model_paths(config, source, [key for key in keys if key not in inputs])
    for key in keys:
        location = getattr(config.General, key, None)
        if key in inputs and location:
            require_stage(location, inputs[key], f"{source.of(('General', key))}: General.{key}")


def upstream_stages(backend: Backend, stage: str, config: dict[str, Any]) -> set[str]:
    """The stages whose final models this stage's resolved config reads (its edges in the pipeline's graph)."""
    general = config.get("General", {})
    values = {str(general.get(key)) for key in registry.get(stage).model_keys if general.get(key)}
    return {other for other in registry.NAMES if other != stage and backend.stage_paths(other)[1] in values}


def _config_file(config_dir: Path, stage: str, required: bool = True) -> Path | None:
    for suffix in (".yaml", ".yml", ".json", ".conf"):
        path = Path(config_dir) / f"{stage}{suffix}"
        if path.is_file():
            return path
    if not required:
        return None
    raise ConfigError(f"{config_dir}: no {stage} config (expected {stage}.yaml, .json or .conf)")


def plan(backend: Backend, options: PipelineOptions) -> list[StagePlan]:
    """What each requested stage will do, and why.

    A stage's hash covers its resolved config and the hashes of the stages it reads from (this run's, or the
    recorded one of a stage finished before), so a change re-runs exactly the stages downstream of it. A stage
    recorded as succeeded whose final model lost its marker (a backend that sees final models: `stage_finished`)
    runs again, and so does every stage downstream of it (they were built on the model it replaces).
    """
    configs = backend.stage_configs(options)
    record = backend.load_record().get("stages", {})
    finished = getattr(backend, "stage_finished", None)
    hashes: dict[str, str] = {}
    plans: list[StagePlan] = []
    rerun: dict[str, str] = {options.from_stage: f"--from-stage {options.from_stage}"} if options.from_stage else {}
    for stage in options.stages:
        upstream = sorted(upstream_stages(backend, stage, configs[stage]))
        digest = config_hash(configs[stage], [hashes.get(s) or record.get(s, {}).get("config_hash", "") for s in
                                              upstream])
        hashes[stage] = digest
        why = rerun.get(stage) or next((rerun[s] for s in upstream_closure(backend, stage, configs) if s in rerun),
                                       None)
        previous = record.get(stage, {})
        same = previous.get("config_hash") == digest
        if why:
            action, reason = "run", why
        elif same and previous.get("status") == "succeeded" and finished is not None and not finished(stage):
            action, reason = "run", f"recorded as finished, but its final model has no {MARKER}"
            rerun[stage] = f"{stage} runs again"
        elif same and previous.get("status") == "succeeded":
            action, reason = "skip", "finished with the same config"
        elif same:
            action, reason = "resume", f"continuing ({previous.get('status')})"
        elif previous:
            action, reason = "run", "config or an earlier stage changed"
        else:
            action, reason = "run", "not run yet"
        plans.append(StagePlan(stage, configs[stage], digest, action, reason))
    return plans


def upstream_closure(backend: Backend, stage: str, configs: dict[str, dict[str, Any]]) -> set[str]:
    """Every stage this run's `stage` reads from, directly or through stages of this run."""
    found: set[str] = set()
    pending = list(upstream_stages(backend, stage, configs[stage]))
    while pending:
        other = pending.pop()
        if other not in found:
            found.add(other)
            if other in configs:
                pending.extend(upstream_stages(backend, other, configs[other]))
    return found


def run_pipeline(backend: Backend, options: PipelineOptions) -> dict[str, Any]:
    """Run the planned stages in order; returns the pipeline record.

    A backend with a `tracking_group` (local) groups its stages' tracker runs under that name."""
    from rlhf_jobs.store import trackers

    plans = plan(backend, options)
    group = getattr(backend, "tracking_group", None)
    if group is None:
        return _run_plans(backend, plans)
    report_to = {name for step in plans for name in trackers.report_to_of(step.config)}
    with trackers.pipeline_group(group, sorted(report_to)):
        return _run_plans(backend, plans)


def _run_plans(backend: Backend, plans: list[StagePlan]) -> dict[str, Any]:
    record = backend.load_record()
    record.setdefault("stages", {})
    record["backend"] = backend.name
    for step in plans:
        print(f"== {step.stage}: {step.action} ({step.reason})", flush=True)
        if step.action == "skip":
            continue
        if step.action == "run":
            backend.reset_stage(step.stage)
        entry = record["stages"].setdefault(step.stage, {})
        entry.update(status="running", config_hash=step.config_hash, started_at=time.time(), config=step.config,
                     checkpoint=step.config["General"]["checkpoint_dir"])
        entry.pop("seconds", None)
        backend.save_record(record)
        start = time.perf_counter()
        try:
            backend.run_stage(step.stage, step.config)
        except BaseException as err:
            # Ray Train turns Ctrl-C during fit() into an abort that ends in SystemExit.
            interrupted = isinstance(err, KeyboardInterrupt | SystemExit)
            entry.update(status="interrupted" if interrupted else "failed",
                         error=f"{type(err).__name__}: {err}"[-2000:])
            backend.save_record(record)
            raise
        entry.update(status="succeeded", seconds=round(time.perf_counter() - start, 1), finished_at=time.time())
        entry.pop("error", None)
        backend.save_record(record)
    return record
