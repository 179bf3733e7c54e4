"""The Helm CLI, driven from Python: the chart in `helm/` is the single source of truth."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhf_jobs.core.errors import UserError
from rlhf_jobs.core.paths import REPO_CHART

# The chart: $RLHF_JOBS_CHART (the image sets it: /home/ray/rlhf-jobs/helm), else the repository's helm/.
CHART_ENV = "RLHF_JOBS_CHART"
# The oldest Helm the submitter and the chart work with: `--set-json` needs 3.10, and `helm template` checks the
# chart's `kubeVersion: >=1.26.0-0` against the Kubernetes version Helm was built with, which is 1.26 from Helm 3.11
# on (3.9.4 renders everything, values.schema.json's $refs included, only with --kube-version; checked here).
MIN_VERSION = (3, 11, 0)
# Helm keeps release records in ConfigMaps, not Secrets: the runner's Role then needs no access to Secrets, which
# hold the namespace's S3, W&B and Hugging Face credentials (every `helm` rlhf-jobs runs, and the Makefile's).
HELM_DRIVER = "configmap"


class HelmError(UserError, RuntimeError):
    """helm is missing, or a helm command failed (its stderr is the message)."""


def release_name(stage: str, run: str) -> str:
    """`rlhf-<stage>` for the default run, `rlhf-<run>-<stage>` otherwise (the chart reads the suffix)."""
    return f"rlhf-{stage}" if run == "default" else f"rlhf-{run}-{stage}"


def config_sets(stage: str, overrides: Sequence[str]) -> list[str]:
    """Pipeline overrides (`[stage.]Section.key=VALUE`, VALUE as YAML) as `--set-json` for the chart."""
    from rlhf_jobs.core.loading import parse_override
    from rlhf_jobs.pipeline.plan import split_overrides

    sets = []
    for text in split_overrides(overrides, stage):
        keys, value = parse_override(text)
        sets.append(f"configs.{stage}.{'.'.join(keys)}={json.dumps(value)}")
    return sets


class Helm:
    def __init__(self, chart: str | Path | None = None, binary: str = "helm") -> None:
        self.chart = str(chart or os.environ.get(CHART_ENV) or REPO_CHART)
        self.binary = binary

    def version(self) -> tuple[int, int, int]:
        out = self._run(["version", "--template", "{{ .Version }}"]).strip()
        match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", out)
        if not match:
            raise HelmError(f"cannot read the version of {self.binary}: {out!r}")
        return int(match.group(1)), int(match.group(2)), int(match.group(3))

    def check_version(self) -> None:
        """Fail with one clear line where helm is missing or older than MIN_VERSION."""
        found = self.version()
        if found < MIN_VERSION:
            need = ".".join(map(str, MIN_VERSION))
            raise HelmError(f"{self.binary} {'.'.join(map(str, found))} is too old: rlhf-jobs needs Helm {need} or "
                            f"later (--set-json, kubeVersion >=1.26 in helm template); https://helm.sh/docs/intro/install/")

    def _run(self, args: Sequence[str]) -> str:
        if shutil.which(self.binary) is None:
            raise HelmError(f"{self.binary} not found on PATH: the kuberay backend renders the chart with Helm, even "
                            f"for --dry-run; install Helm {'.'.join(map(str, MIN_VERSION))}+ "
                            "(https://helm.sh/docs/intro/install/)")
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, check=False,
                                env={**os.environ, "HELM_DRIVER": HELM_DRIVER})
        if result.returncode != 0:
            raise HelmError(f"helm {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def _value_args(self, run: str, values: Sequence[str], sets: Sequence[str]) -> list[str]:
        args = ["--set-string", f"run={run}"]
        for path in values:
            args += ["--values", path]
        for item in sets:
            args += ["--set-json", item]
        return args

    def template(self, release: str, namespace: str, run: str, values: Sequence[str] = (),
                 sets: Sequence[str] = ()) -> list[dict[str, Any]]:
        out = self._run(["template", release, self.chart, "--namespace", namespace,
                         *self._value_args(run, values, sets)])
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def upgrade_install(self, release: str, namespace: str, run: str, values: Sequence[str] = (),
                        sets: Sequence[str] = ()) -> None:
        self._run(["upgrade", "--install", release, self.chart, "--namespace", namespace,
                   *self._value_args(run, values, sets)])

    def uninstall(self, release: str, namespace: str) -> bool:
        try:
            self._run(["uninstall", release, "--namespace", namespace])
        except HelmError as err:
            if "not found" in str(err):
                return False
            raise
        return True
