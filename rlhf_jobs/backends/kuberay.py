"""KubeRay backend: one Helm release (one RayJob) per stage, chained through the shared PVC.

For each stage the submitter installs or upgrades the chart's release, then polls the RayJob
until it ends. A stage succeeded only when `jobDeploymentStatus` is `Complete` and
`jobStatus` is `SUCCEEDED`. The pipeline record lives in a ConfigMap per run, so re-running
the same command skips finished stages, re-attaches to a running RayJob, and restarts a
failed one (its trainer resumes from the Ray checkpoints on the PVC).

Everything that talks to the API server goes through four `kubernetes` client objects
(`CustomObjectsApi`, `CoreV1Api`, `ApiextensionsV1Api`, `AuthorizationV1Api`), which the
tests replace with a fake that replays recorded RayJob status sequences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from rlhf_jobs.backends.helm import Helm, HelmError, config_sets, release_name
from rlhf_jobs.config import ConfigError, validate_config
from rlhf_jobs.pipeline import PipelineOptions, parse_stages, run_pipeline
from rlhf_jobs.stages import NAMES as STAGES

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
CRD_NAME = "rayjobs.ray.io"
RECORD_KEY = "record.json"
RETRYABLE_STATUS = {0, 429, 500, 502, 503, 504}
OPERATOR_HINT = (
    "install the KubeRay operator: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && "
    "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 -n kuberay-system --create-namespace"
)


class StageFailed(RuntimeError):
    """A RayJob ended without success, or could not be watched to its end."""


class PreflightError(RuntimeError):
    """The cluster is not ready for the pipeline; nothing was created."""


def api_status(error: BaseException) -> int | None:
    """HTTP status of a kubernetes ApiException; 0 for connection errors; None for anything else."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(error, ApiException):
        return int(error.status or 0)
    if isinstance(error, HTTPError | ConnectionError | TimeoutError):
        return 0
    return None


def with_retries(call: Callable[[], Any], sleep: Callable[[float], None] = time.sleep, attempts: int = 6,
                 what: str = "Kubernetes API call") -> Any:
    """Retry transient API errors (429, 5xx, connection) with exponential backoff; others raise at once."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            status = api_status(err)
            if status not in RETRYABLE_STATUS or attempt == attempts:
                raise
            print(f"   {what}: transient error ({status or 'connection'}), retrying in {delay:.0f}s", flush=True)
            sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


@dataclass
class Clients:
    custom: Any
    core: Any
    apiext: Any
    authz: Any

    @classmethod
    def from_environment(cls) -> Clients:
        """In-cluster config when running in a pod, else the local kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, FileNotFoundError, TypeError) as err:
                raise PreflightError(
                    f"no Kubernetes cluster configured (no in-cluster config, no kubeconfig): {err}"
                ) from None
        return cls(client.CustomObjectsApi(), client.CoreV1Api(), client.ApiextensionsV1Api(),
                   client.AuthorizationV1Api())


# ---- watching one RayJob ------------------------------------------------------------------------


@dataclass
class WatchSettings:
    poll_seconds: float = 5.0
    appear_timeout: float = 120.0  # the RayJob must exist this long after install
    initializing_timeout: float = 1800.0  # pods pending (image pull, resources, PVC) for longer = stuck
    deadline: float | None = None  # absolute clock value: the pipeline timeout


def describe_status(status: dict[str, Any]) -> str:
    parts = [f"{key}={status[key]}" for key in ("jobDeploymentStatus", "jobStatus", "reason") if status.get(key)]
    if status.get("message"):
        parts.append(f"message: {status['message']}")
    return ", ".join(parts) or "no status yet"


def watch_rayjob(clients: Clients, namespace: str, name: str, stage: str, settings: WatchSettings,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 out: Callable[[str], None] = print) -> dict[str, Any]:
    """Poll the RayJob until it succeeds (returns its status) or fails (raises StageFailed)."""
    start = clock()
    seen, shown, initializing_since = False, None, None
    while True:
        now = clock()
        if settings.deadline is not None and now > settings.deadline:
            raise StageFailed(f"{stage}: pipeline timeout reached while RayJob {name} was {shown or 'not started'}")
        try:
            job = with_retries(
                lambda: clients.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
                sleep=sleep, what=f"get RayJob {name}",
            )
        except Exception as err:
            if api_status(err) != 404:
                raise
            if seen:
                raise StageFailed(f"{stage}: RayJob {namespace}/{name} was deleted while it ran") from None
            if now - start > settings.appear_timeout:
                raise StageFailed(f"{stage}: RayJob {namespace}/{name} did not appear "
                                  f"{settings.appear_timeout:.0f}s after the Helm install") from None
            sleep(settings.poll_seconds)
            continue
        seen = True
        status = job.get("status") or {}
        deployment, job_status = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
        line = f"{deployment or 'Pending'} / {job_status or '-'}"
        if line != shown:
            out(f"   [{stage}] {line}  ({_elapsed(now - start)})")
            shown = line
        if deployment == "Complete" and job_status == "SUCCEEDED":
            return status
        if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job_status):
            raise StageFailed(f"{stage}: RayJob {namespace}/{name} ended without success: {describe_status(status)}")
        if deployment in ("", "Initializing"):
            initializing_since = initializing_since if initializing_since is not None else now
            if now - initializing_since > settings.initializing_timeout:
                raise StageFailed(
                    f"{stage}: RayJob {namespace}/{name} stuck in {deployment or 'Pending'} for "
                    f"{_elapsed(now - initializing_since)}: check its pods (image pull, resources, PVC binding): "
                    f"kubectl -n {namespace} get pods -l ray.io/cluster={status.get('rayClusterName', name)}"
                )
        else:
            initializing_since = None
        sleep(settings.poll_seconds)


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


# ---- the backend --------------------------------------------------------------------------------


@dataclass
class RenderedStage:
    release: str
    rayjob: str
    config: dict[str, Any]
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

    @property
    def record_name(self) -> str:
        return f"rlhf-{self.run}-pipeline"

    # -- rendering (no cluster needed) --

    def render(self, stage: str, overrides: Sequence[str] = ()) -> RenderedStage:
        release = release_name(stage, self.run)
        manifests = self.helm.template(release, self.namespace, self.run, self.values, config_sets(stage, overrides))
        rayjobs = [m for m in manifests if m.get("kind") == "RayJob"]
        config_maps = [m for m in manifests if m.get("kind") == "ConfigMap" and "config.yaml" in (m.get("data") or {})]
        if len(rayjobs) != 1 or len(config_maps) != 1:
            raise HelmError(f"chart rendered {len(rayjobs)} RayJob(s) and {len(config_maps)} training "
                            f"ConfigMap(s) for {release}; expected one of each")
        config = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
        return RenderedStage(release, rayjobs[0]["metadata"]["name"], config, manifests)

    def stage_configs(self, options: PipelineOptions) -> dict[str, dict[str, Any]]:
        self.overrides = options.overrides
        configs = {}
        for stage in STAGES:
            rendered = self.rendered[stage] = self.render(stage, options.overrides)
            source = f"helm template {rendered.release} (configs.{stage})"
            try:
                validate_config(rendered.config, stage, source=source, paths=False)
            except ConfigError:
                if stage in options.stages:
                    raise
            configs[stage] = rendered.config
        return configs

    def stage_paths(self, stage: str) -> tuple[str, str]:
        general = self.rendered[stage].config["General"]
        return general["output_dir"], general["checkpoint_dir"]

    # -- cluster checks --

    def preflight(self) -> None:
        """Namespace, KubeRay CRD and RBAC, checked before anything is created."""
        from kubernetes import client

        problems = []
        try:
            with_retries(lambda: self.clients.core.read_namespace(self.namespace), sleep=self.sleep)
        except Exception as err:
            if api_status(err) == 404:
                problems.append(f"namespace {self.namespace!r} not found: kubectl create namespace {self.namespace}")
            elif api_status(err) != 403:  # may lack namespace read rights yet have everything else
                raise
        try:
            with_retries(lambda: self.clients.apiext.read_custom_resource_definition(CRD_NAME), sleep=self.sleep)
        except Exception as err:
            if api_status(err) == 404:
                problems.append(f"the KubeRay CRD {CRD_NAME} is not installed: {OPERATOR_HINT}")
            elif api_status(err) != 403:
                raise
        needed = [("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "get"), ("ray.io", "rayjobs", "delete"),
                  ("", "configmaps", "create"), ("", "configmaps", "update"), ("", "secrets", "create"),
                  ("", "persistentvolumeclaims", "create"), ("", "pods", "list"), ("", "pods/log", "get")]
        for group, resource, verb in needed:
            sub_resource = ""
            if "/" in resource:
                resource, sub_resource = resource.split("/")
            review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    namespace=self.namespace, group=group, resource=resource, subresource=sub_resource or None,
                    verb=verb)))
            answer = with_retries(lambda r=review: self.clients.authz.create_self_subject_access_review(r),
                                  sleep=self.sleep)
            if not answer.status.allowed:
                kind = f"{resource}.{group}" if group else resource
                problems.append(f"RBAC: not allowed to {verb} {kind}{'/' + sub_resource if sub_resource else ''} "
                                f"in namespace {self.namespace} (see k8s/rbac.yaml)")
        if problems:
            raise PreflightError("the cluster is not ready; nothing was created:\n  " + "\n  ".join(problems))

    # -- the pipeline record, in a ConfigMap --

    def load_record(self) -> dict[str, Any]:
        try:
            config_map = with_retries(
                lambda: self.clients.core.read_namespaced_config_map(self.record_name, self.namespace),
                sleep=self.sleep)
        except Exception as err:
            if api_status(err) == 404:
                return {}
            raise
        data = _field(config_map, "data") or {}
        return json.loads(data.get(RECORD_KEY, "{}"))

    def save_record(self, record: dict[str, Any]) -> None:
        body = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": self.record_name, "namespace": self.namespace,
                         "labels": {"app.kubernetes.io/managed-by": "rlhf-jobs", "rlhf-jobs.io/run": self.run}},
            "data": {RECORD_KEY: json.dumps(record, indent=2, default=str)},
        }
        try:
            with_retries(lambda: self.clients.core.replace_namespaced_config_map(
                self.record_name, self.namespace, body), sleep=self.sleep)
        except Exception as err:
            if api_status(err) != 404:
                raise
            with_retries(lambda: self.clients.core.create_namespaced_config_map(self.namespace, body),
                         sleep=self.sleep)

    # -- running a stage --

    def get_rayjob(self, name: str) -> dict[str, Any] | None:
        try:
            return with_retries(lambda: self.clients.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name), sleep=self.sleep)
        except Exception as err:
            if api_status(err) == 404:
                return None
            raise

    def delete_rayjob(self, name: str) -> None:
        """Delete a finished RayJob and wait until it is gone, so the next install starts a fresh one."""
        try:
            with_retries(lambda: self.clients.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"), sleep=self.sleep)
        except Exception as err:
            if api_status(err) != 404:
                raise
        for _ in range(120):
            if self.get_rayjob(name) is None:
                return
            self.sleep(1.0)
        raise StageFailed(f"RayJob {self.namespace}/{name} is still being deleted after 2 minutes")

    def reset_stage(self, stage: str) -> None:
        """Nothing to clear in the cluster: a re-run with a new config writes to the same PVC paths."""

    def run_stage(self, stage: str, config: dict[str, Any]) -> None:
        rendered = self.rendered[stage]
        existing = self.get_rayjob(rendered.rayjob)
        deployment = ((existing or {}).get("status") or {}).get("jobDeploymentStatus", "")
        if existing and deployment not in ("Complete", "Failed", "ValidationFailed"):
            print(f"   re-attaching to RayJob {self.namespace}/{rendered.rayjob} ({deployment or 'Pending'})")
        else:
            if existing:
                print(f"   deleting the finished RayJob {rendered.rayjob} ({deployment}) to start a new one")
                self.delete_rayjob(rendered.rayjob)
            print(f"   helm upgrade --install {rendered.release} -n {self.namespace}", flush=True)
            self.helm.upgrade_install(rendered.release, self.namespace, self.run, self.values,
                                      config_sets(stage, self.overrides))
        try:
            watch_rayjob(self.clients, self.namespace, rendered.rayjob, stage, self.watch,
                         clock=self.clock, sleep=self.sleep)
        except StageFailed as failure:
            raise StageFailed(f"{failure}\n{self.logs_tail(rendered.rayjob)}") from None

    def logs_tail(self, rayjob: str, lines: int = 40) -> str:
        """The last lines of the submitter and head pods' logs, for the failure message."""
        job = self.get_rayjob(rayjob) or {}
        cluster = (job.get("status") or {}).get("rayClusterName", "")
        selectors = {"submitter": f"job-name={rayjob}", "head": f"ray.io/cluster={cluster},ray.io/node-type=head"}
        sections = []
        for role, selector in selectors.items():
            try:
                pods = with_retries(lambda s=selector: self.clients.core.list_namespaced_pod(
                    self.namespace, label_selector=s), sleep=self.sleep)
                for pod in _field(pods, "items") or []:
                    pod_name = _field(_field(pod, "metadata"), "name")
                    text = with_retries(lambda p=pod_name: self.clients.core.read_namespaced_pod_log(
                        p, self.namespace, tail_lines=lines), sleep=self.sleep)
                    sections.append(f"--- {role} pod {pod_name} (last {lines} lines) ---\n{text.rstrip()}")
            except Exception as err:
                sections.append(f"--- {role} pod logs unavailable: {err}")
        return "\n".join(sections) if sections else "(no submitter or head pod found for logs)"


def _field(obj: Any, name: str) -> Any:
    """Attribute of a kubernetes model object, or key of a dict (the fake API returns dicts)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


# ---- commands -----------------------------------------------------------------------------------


def run_pipeline_command(args: argparse.Namespace, clients: Clients | None = None) -> int:
    helm = Helm(args.chart)
    options = PipelineOptions(stages=parse_stages(args.stages), overrides=args.overrides,
                              from_stage=args.from_stage, check_paths=False)
    if args.dry_run:
        backend = KubeRayBackend(None, helm, args.namespace, args.run, args.values)
        backend.stage_configs(options)
        for stage in options.stages:
            for manifest in backend.rendered[stage].manifests:
                sys.stdout.write("---\n" + yaml.safe_dump(manifest, sort_keys=False))
        return 0
    deadline = time.monotonic() + args.timeout
    try:
        backend = KubeRayBackend(clients or Clients.from_environment(), helm, args.namespace, args.run, args.values,
                                 watch=WatchSettings(deadline=deadline))
        backend.preflight()
        print(f"pipeline run {args.run!r} in namespace {args.namespace} (record: ConfigMap {backend.record_name})")
        run_pipeline(backend, options)
    except (PreflightError, StageFailed, HelmError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: running RayJobs keep running; re-run the same command to re-attach, "
              f"or `rlhf-jobs delete --namespace {args.namespace} --run {args.run}` to stop them", file=sys.stderr)
        return 130
    print(status_table(backend))
    return 0


def status_table(backend: KubeRayBackend) -> str:
    record = backend.load_record()
    rows = [("stage", "status", "seconds", "config", "checkpoint")]
    for stage, entry in record.get("stages", {}).items():
        rows.append((stage, entry.get("status", "-"), str(entry.get("seconds", "-")),
                     entry.get("config_hash", "-"), entry.get("checkpoint", "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    errors = [f"{s}: {e['error']}" for s, e in record.get("stages", {}).items() if e.get("error")]
    return "\n".join([f"run {backend.run!r} in {backend.namespace}:", *lines, *errors])


def status_command(args: argparse.Namespace, clients: Clients | None = None) -> int:
    backend = KubeRayBackend(clients or Clients.from_environment(), Helm(), args.namespace, args.run)
    if not backend.load_record():
        print(f"no pipeline run {args.run!r} in namespace {args.namespace}")
        return 1
    print(status_table(backend))
    return 0


def delete_command(args: argparse.Namespace, clients: Clients | None = None) -> int:
    """Uninstall a run's releases and its record; the checkpoint PVC is kept (the chart marks it so)."""
    clients = clients or Clients.from_environment()
    helm = Helm(args.chart)
    for stage in STAGES:
        release = release_name(stage, args.run)
        print(f"{release}: {'uninstalled' if helm.uninstall(release, args.namespace) else 'not installed'}")
    backend = KubeRayBackend(clients, helm, args.namespace, args.run)
    try:
        clients.core.delete_namespaced_config_map(backend.record_name, args.namespace)
        print(f"ConfigMap {backend.record_name}: deleted")
    except Exception as err:
        if api_status(err) != 404:
            raise
    print("the checkpoint PVC is kept; delete it with kubectl when its models are no longer needed")
    return 0
