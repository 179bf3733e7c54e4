"""Local backend: every stage on an in-process Ray, all files under one work directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.pipeline.plan import PipelineOptions, resolve_configs

RECORD_FILE = "pipeline.json"


class LocalBackend:
    name = "local"

    def __init__(self, workdir: str | Path, in_process: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        if self.workdir.exists() and not self.workdir.is_dir():
            raise ConfigError(f"--workdir: {workdir} is a file; expected a pipeline's work directory")
        self.tracking_group = self.workdir.name  # W&B group / MLflow parent run of the stages
        self.in_process = in_process  # each stage's one worker in this process (`rlhf-jobs train --in-process`)

    def stage_paths(self, stage: str) -> tuple[str, str]:
        return str(self.workdir / f"{stage}-output"), str(self.workdir / stage)

    def stage_configs(self, options: PipelineOptions) -> dict[str, dict[str, Any]]:
        configs = resolve_configs(self, options)
        if self.in_process:  # every stage that will run, before the first one starts
            from rlhf_jobs.train.preflight import check_in_process

            for stage in options.stages:
                try:
                    check_in_process(validate_config(configs[stage], stage, paths=False).Training)
                except ConfigError as err:
                    raise ConfigError(f"{stage} stage: {err}") from None
        return configs

    def stage_finished(self, stage: str) -> bool:
        """Whether the stage's final model is there with its marker: one whose marker is gone is not finished."""
        from rlhf_jobs.store.markers import read_marker

        try:
            marker = read_marker(self.stage_paths(stage)[1])
        except ValueError:  # a torn marker
            return False
        return marker is not None and marker.get("stage") == stage

    def load_record(self) -> dict[str, Any]:
        path = self.workdir / RECORD_FILE
        if not path.is_file():
            return {}
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            where = f"line {err.lineno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
            raise ConfigError(
                f"{path}: the pipeline record is damaged (not valid JSON, {where}); nothing was changed: move it "
                f"aside (mv {path} {path}.damaged) to start a new record, each stage then resuming from its last "
                "checkpoint"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("stages", {}), dict):
            raise ConfigError(f"{path}: the pipeline record is damaged (expected a JSON object with 'stages'); "
                              f"nothing was changed: move it aside (mv {path} {path}.damaged) to start a new record")
        return record

    def save_record(self, record: dict[str, Any]) -> None:
        """Write-then-rename, so an interrupt never leaves a torn record."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        temporary = self.workdir / f".{RECORD_FILE}.tmp"
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(temporary, self.workdir / RECORD_FILE)

    def reset_stage(self, stage: str) -> None:
        """Move the stage's old output_dir and final model aside (never deleted): it runs from scratch."""
        from rlhf_jobs.store.checkpoints import move_aside

        for path in map(Path, self.stage_paths(stage)):
            if path.exists():
                print(f"   moving {path} aside to {move_aside(path)} (an older config or a forced re-run)", flush=True)

    def run_stage(self, stage: str, config: dict[str, Any]) -> None:
        from rlhf_jobs.train import train

        validated = validate_config(config, stage, source=f"{self.workdir / RECORD_FILE} ({stage})")
        train(validated, on_config_change="restart", in_process=self.in_process)
