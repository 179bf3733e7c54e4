"""KubeRay backend: one Helm release (one RayJob) per stage, chained through the shared PVC.

For each stage the backend installs or upgrades the chart's release, watches the RayJob to its end,
then deletes the finished stage's RayCluster so the next stage gets its CPUs/GPUs at once. The pipeline
record lives in a ConfigMap per run, so re-running the same command skips finished stages,
re-attaches to a RayJob still running the same config, and replaces one that failed or runs another
config. Every stage's trainer runs with `--on-config-change restart`: a changed config moves the old
Ray checkpoints on the PVC aside instead of resuming them; the same config resumes.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf_jobs.core.loading import validate_config
from rlhf_jobs.core.stages import NAMES as STAGES
from rlhf_jobs.core.stages import get as get_stage
from rlhf_jobs.pipeline.backends import permissions, rewards
from rlhf_jobs.pipeline.backends.helm import Helm, HelmError, config_sets, release_name
from rlhf_jobs.pipeline.backends.kube import (
    FORBIDDEN,
    NOT_FOUND,
    Clients,
    ClusterUnavailable,
    api_status,
    field,
    unless_absent,
    with_retries,
)
from rlhf_jobs.pipeline.backends.rayjob import (
    COMPLETE,
    SUCCEEDED,
    RayJobs,
    StageFailed,
    WatchSettings,
    config_hash,
    deployment_status,
    is_finished,
    watch_rayjob,
)
from rlhf_jobs.pipeline.plan import PipelineOptions

CRD_NAME = "rayjobs.ray.io"
RECORD_KEY = "record.json"
OPERATOR_HINT = (
    "install the KubeRay operator: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && "
    "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 -n kuberay-system --create-namespace"
)
# What the pipeline sets in every stage's release, whatever the user's values say. The pipeline owns retrying a
# RayJob (helm/README.md, "Who retries what"): it tells a preempted stage (exit 75) from a deterministic failure,
# which KubeRay's own backoffLimit would run again.
PIPELINE_SETS = {"job.onConfigChange": "restart", "job.backoffLimit": 0}
RBAC_HINT = "grant them with the k8s/rbac chart: make rbac NAMESPACE={namespace}"


class PreflightError(ClusterUnavailable):
    """The cluster is not ready for the pipeline; nothing was created."""


@dataclass
class RenderedStage:
    release: str
    rayjob: str
    config: dict[str, Any]
    config_hash: str
    manifests: list[dict[str, Any]]


class KubeRayBackend:
    name = "kuberay"

    def __init__(self, clients: Clients | None, helm: Helm, namespace: str, run: str,
                 values: Sequence[str] = (), watch: WatchSettings | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.clients, self.helm, self.namespace, self.run = clients, helm, namespace, run
        self.values, self.watch = list(values), watch or WatchSettings()
        self.sleep, self.clock = sleep, clock
        self.rendered: dict[str, RenderedStage] = {}
        self.overrides: Sequence[str] = ()
        self.in_run: set[str] = set()  # the stages this run runs now or ran before (optional inputs read them)
        self.fresh: set[str] = set()  # stages whose existing RayJob must not be re-attached to
        self.rewards: dict[str, rewards.StageRewards] = {}  # reward-function files a stage's config names
        self._scratch: tempfile.TemporaryDirectory | None = None

    @property
    def record_name(self) -> str:
        return f"rlhf-{self.run}-pipeline"

    @property
    def rayjobs(self) -> RayJobs:
        return RayJobs(self.clients, self.namespace, self.sleep, self.clock)

    def sets(self, stage: str) -> list[str]:
        """--set-json arguments of a stage's release: its optional inputs (the chart chains only the required ones)
        pointed at the producing stages of this run, the pipeline's overrides and settings, and the config's
        reward-function paths pointed at the files mounted in the pods."""
        sets = [*self.optional_input_sets(stage), *config_sets(stage, self.overrides),
                *(f"{key}={json.dumps(value)}" for key, value in PIPELINE_SETS.items())]
        if stage in self.rewards:
            sets.append(f"configs.{stage}.General.{rewards.KEY}={json.dumps(self.rewards[stage].references)}")
        return sets

    def optional_input_sets(self, stage: str) -> list[str]:
        """`configs.<stage>.General.<key>=<checkpoint_dir of the producer>` for each optional input (GRPO's
        `rm_pretrain`) whose producing stage is part of this run, as the local pipeline wires it."""
        return [f"configs.{stage}.General.{key}={json.dumps(self.stage_paths(producer)[1])}"
                for key, producer in get_stage(stage).optional_inputs.items() if producer in self.in_run]

    def values_files(self, stage: str) -> list[str]:
        """--values files of a stage's release: the user's, then the reward-function files its config names (in a
        file: the sources may exceed what one command-line argument holds)."""
        if stage not in self.rewards:
            return self.values
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="rlhf-jobs-")
        path = Path(self._scratch.name) / f"{stage}-rewards.yaml"
        path.write_text(yaml.safe_dump({"rewardFunctions": self.rewards[stage].files}))
        return [*self.values, str(path)]

    # -- rendering (no cluster needed) --

    def render(self, stage: str, reward_files: bool = True) -> RenderedStage:
        """helm template of a stage's release; when its config names local reward-function files, again with them
        as `rewardFunctions` and the config's paths rewritten (rewards.py)."""
        self.rewards.pop(stage, None)
        rendered = self._template(stage)
        found = rewards.resolve(stage, rendered.config) if reward_files else None
        if found is None:
            return rendered
        self.rewards[stage] = found
        return self._template(stage)

    def _template(self, stage: str) -> RenderedStage:
        release = release_name(stage, self.run)
        manifests = self.helm.template(release, self.namespace, self.run, self.values_files(stage), self.sets(stage))
        rayjobs = [m for m in manifests if m.get("kind") == "RayJob"]
        config_maps = [m for m in manifests if m.get("kind") == "ConfigMap" and "config.yaml" in (m.get("data") or {})]
        if len(rayjobs) != 1 or len(config_maps) != 1:
            raise HelmError(f"chart rendered {len(rayjobs)} RayJob(s) and {len(config_maps)} training "
                            f"ConfigMap(s) for {release}; expected one of each")
        config = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
        return RenderedStage(release, rayjobs[0]["metadata"]["name"], config, config_hash(rayjobs[0]) or "",
                             manifests)

    def stage_configs(self, options: PipelineOptions) -> dict[str, dict[str, Any]]:
        """The rendered config of every stage that runs (the chart wires their inputs), validated."""
        self.overrides, self.rendered = options.overrides, {}
        recorded = self.load_record().get("stages", {}) if self.clients is not None else {}
        self.in_run = set(options.stages) | set(recorded)
        configs = {}
        for stage in options.stages:
            rendered = self.rendered[stage] = self.render(stage)
            validate_config(rendered.config, stage, source=f"helm template {rendered.release} (configs.{stage})",
                            paths=False)
            configs[stage] = rendered.config
        return configs

    def rendered_stage(self, stage: str) -> RenderedStage:
        """A stage's rendering (one the pipeline does not run: for its paths only, without reward files)."""
        if stage not in self.rendered:
            self.rendered[stage] = self.render(stage, reward_files=False)
        return self.rendered[stage]

    def stage_paths(self, stage: str) -> tuple[str, str]:
        general = self.rendered_stage(stage).config["General"]
        return general["output_dir"], general["checkpoint_dir"]

    # -- cluster checks --

    def preflight(self) -> None:
        """Namespace, KubeRay CRD and RBAC (every permission of permissions.PIPELINE), checked before anything is
        created; every problem at once."""
        problems = []
        checks = [(lambda: self.clients.core.read_namespace(self.namespace),
                   f"namespace {self.namespace!r} not found: kubectl create namespace {self.namespace}"),
                  (lambda: self.clients.apiext.read_custom_resource_definition(CRD_NAME),
                   f"the KubeRay CRD {CRD_NAME} is not installed: {OPERATOR_HINT}")]
        for call, missing in checks:
            try:
                with_retries(call, sleep=self.sleep)
            except Exception as err:
                if api_status(err) == NOT_FOUND:
                    problems.append(missing)
                elif api_status(err) != FORBIDDEN:  # may lack read rights on these yet have everything needed
                    raise
        denied = permissions.missing(self.clients.authz, self.namespace, permissions.PIPELINE, sleep=self.sleep)
        if denied:
            problems += [*denied, RBAC_HINT.format(namespace=self.namespace)]
        if problems:
            raise PreflightError("the cluster is not ready; nothing was created:\n  " + "\n  ".join(problems))

    # -- the pipeline record, in a ConfigMap --

    def load_record(self) -> dict[str, Any]:
        config_map = unless_absent(
            lambda: self.clients.core.read_namespaced_config_map(self.record_name, self.namespace), sleep=self.sleep)
        data = field(config_map, "data") or {}
        return json.loads(data.get(RECORD_KEY, "{}"))

    def save_record(self, record: dict[str, Any]) -> None:
        body = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": self.record_name, "namespace": self.namespace,
                         "labels": {"app.kubernetes.io/managed-by": "rlhf-jobs", "rlhf-jobs.io/run": self.run}},
            "data": {RECORD_KEY: json.dumps(record, indent=2, default=str)},
        }
        replaced = unless_absent(lambda: self.clients.core.replace_namespaced_config_map(
            self.record_name, self.namespace, body), sleep=self.sleep)
        if replaced is None:
            with_retries(lambda: self.clients.core.create_namespaced_config_map(self.namespace, body),
                         sleep=self.sleep)

    def delete_record(self) -> bool:
        return unless_absent(lambda: self.clients.core.delete_namespaced_config_map(
            self.record_name, self.namespace), sleep=self.sleep) is not None

    # -- running a stage --

    def reset_stage(self, stage: str) -> None:
        """The stage must run afresh (its config or an earlier stage changed, or --from-stage): never re-attach to
        its existing RayJob. Its trainer runs with `--on-config-change restart`, which moves Ray checkpoints of
        another config on the PVC aside (never deletes them) instead of resuming from them."""
        print(f"   {stage}: a new RayJob; its trainer moves Ray checkpoints of another config aside "
              f"(--on-config-change restart)", flush=True)
        self.fresh.add(stage)

    def run_stage(self, stage: str, config: dict[str, Any]) -> None:
        rendered, jobs = self.rendered[stage], self.rayjobs
        existing = jobs.get(rendered.rayjob)
        same = existing is not None and config_hash(existing) == rendered.config_hash and stage not in self.fresh
        deployment = deployment_status(existing)
        if same and deployment == COMPLETE and (existing.get("status") or {}).get("jobStatus") == SUCCEEDED:
            print(f"   RayJob {self.namespace}/{rendered.rayjob} already succeeded with this config")
            job = existing
        else:
            if same and not is_finished(existing):
                print(f"   re-attaching to RayJob {self.namespace}/{rendered.rayjob} ({deployment or 'Pending'})")
            else:
                if existing is not None:
                    why = deployment if is_finished(existing) else f"{deployment or 'Pending'}, another config"
                    print(f"   deleting RayJob {rendered.rayjob} ({why}) to start a new one", flush=True)
                    jobs.delete(rendered.rayjob, existing)
                print(f"   helm upgrade --install {rendered.release} -n {self.namespace}", flush=True)
                try:
                    self.helm.upgrade_install(rendered.release, self.namespace, self.run, self.values_files(stage),
                                              self.sets(stage))
                except HelmError as err:  # the values rendered (stage_configs): the cluster refused them
                    raise StageFailed(f"{stage}: {err}") from None
            try:
                job = watch_rayjob(self.clients, self.namespace, rendered.rayjob, stage, self.watch,
                                   clock=self.clock, sleep=self.sleep)
            except StageFailed as failure:
                raise StageFailed(f"{failure}\n{jobs.logs_tail(rendered.rayjob)}", failure.exit_code) from None
        self.fresh.discard(stage)
        cluster = jobs.free_cluster(job)
        if cluster:
            print(f"   deleted RayCluster {cluster}: its CPUs/GPUs are free for the next stage", flush=True)

    def uninstall(self) -> list[tuple[str, bool]]:
        """Uninstall every stage's release of the run (the PVC is kept: the chart marks it so)."""
        return [(release, self.helm.uninstall(release, self.namespace))
                for release in (release_name(stage, self.run) for stage in STAGES)]


def status_table(run: str, namespace: str, record: dict[str, Any]) -> str:
    rows = [("stage", "status", "seconds", "config", "checkpoint")]
    for stage, entry in record.get("stages", {}).items():
        rows.append((stage, entry.get("status", "-"), str(entry.get("seconds", "-")),
                     entry.get("config_hash", "-"), entry.get("checkpoint", "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    errors = [f"{s}: {e['error']}" for s, e in record.get("stages", {}).items() if e.get("error")]
    return "\n".join([f"run {run!r} in {namespace}:", *lines, *errors])
