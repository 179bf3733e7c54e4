"""KubeRay RayJobs (ray.io/v1): get, watch to the end, delete, free the cluster, read the pods' logs.

A RayJob succeeded only when `jobDeploymentStatus` is `Complete` **and** `jobStatus` is `SUCCEEDED`:
`jobStatus` alone can say RUNNING or SUCCEEDED while the deployment is still running or already failed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_jobs.core import exit_codes
from rlhf_jobs.pipeline.backends.kube import Clients, field, unless_absent, with_retries

GROUP, VERSION = "ray.io", "v1"
RAYJOBS, RAYCLUSTERS = "rayjobs", "rayclusters"
CONFIG_HASH = "rlhf-jobs.io/config-hash"

# status.jobDeploymentStatus (KubeRay's JobDeploymentStatus)
NEW = ""
INITIALIZING = "Initializing"
RUNNING = "Running"
COMPLETE = "Complete"
FAILED = "Failed"
VALIDATION_FAILED = "ValidationFailed"
SUSPENDED = "Suspended"
RETRYING = "Retrying"
WAITING = "Waiting"
FINISHED = frozenset({COMPLETE, FAILED, VALIDATION_FAILED})
NOT_STARTED = frozenset({NEW, INITIALIZING})
# status.jobStatus (Ray's JobStatus)
SUCCEEDED = "SUCCEEDED"
# Ray's job supervisor puts the driver's exit code in the message KubeRay copies to status.message.
DRIVER_EXIT = re.compile(r"Job entrypoint command failed with exit code (-?\d+)")
# Failure reasons that mean the cluster went away under the job (KubeRay could not reach the head's dashboard for
# 5 minutes: its node was lost), not that the stage failed: the stage resumes from its checkpoint on a new one.
LOST_CLUSTER_REASONS = frozenset({"JobStatusCheckTimeoutExceeded"})
DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds when a pod template sets none
DELETE_MARGIN_S = 120.0  # beyond the pods' grace period: KubeRay stopping the job, finalizers, the API server


class StageFailed(RuntimeError):
    """A RayJob ended without success, or could not be watched to its end. `exit_code` is what the pipeline
    exits with (exit_codes.py): the driver's own 2 (bad input), 3 (out of memory) or 75 (preempted: run again),
    else 1."""

    def __init__(self, message: str, exit_code: int = exit_codes.STAGE_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure_exit_code(status: dict[str, Any]) -> int:
    """The pipeline's exit code for a RayJob that ended without success, from its status."""
    if status.get("jobDeploymentStatus") == VALIDATION_FAILED:
        return exit_codes.BAD_INPUT  # KubeRay refused the spec the chart rendered from the values
    if status.get("reason") in LOST_CLUSTER_REASONS:
        return exit_codes.PREEMPTED
    driver = DRIVER_EXIT.search(status.get("message") or "")
    return exit_codes.of_driver(int(driver.group(1)) if driver else None)


def termination_grace(job: dict[str, Any] | None) -> float:
    """The longest terminationGracePeriodSeconds of a RayJob's pod templates: how long deleting it may take."""
    spec = (job or {}).get("spec") or {}
    cluster = spec.get("rayClusterSpec") or {}
    templates = [(cluster.get("headGroupSpec") or {}).get("template"), spec.get("submitterPodTemplate"),
                 *((group or {}).get("template") for group in cluster.get("workerGroupSpecs") or [])]
    graces = [((template or {}).get("spec") or {}).get("terminationGracePeriodSeconds") for template in templates]
    return float(max((grace for grace in graces if grace is not None), default=DEFAULT_GRACE_S))


def deployment_status(job: dict[str, Any] | None) -> str:
    return ((job or {}).get("status") or {}).get("jobDeploymentStatus", NEW)


def is_finished(job: dict[str, Any] | None) -> bool:
    return deployment_status(job) in FINISHED


def config_hash(job: dict[str, Any] | None) -> str | None:
    """The chart's `rlhf-jobs.io/config-hash` annotation: sha256 of the stage's rendered config."""
    return (((job or {}).get("metadata") or {}).get("annotations") or {}).get(CONFIG_HASH)


def describe_status(status: dict[str, Any]) -> str:
    parts = [f"{key}={status[key]}" for key in ("jobDeploymentStatus", "jobStatus", "reason") if status.get(key)]
    if status.get("message"):
        parts.append(f"message: {status['message']}")
    return ", ".join(parts) or "no status yet"


class RayJobs:
    """The RayJobs of one namespace."""

    def __init__(self, clients: Clients, namespace: str, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clients, self.namespace, self.sleep, self.clock = clients, namespace, sleep, clock

    def get(self, name: str) -> dict[str, Any] | None:
        return unless_absent(lambda: self.clients.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, RAYJOBS, name), sleep=self.sleep, what=f"get RayJob {name}")

    def delete(self, name: str, job: dict[str, Any] | None = None) -> None:
        """Delete a RayJob (its RayCluster and submitter Job go with it) and wait until it is gone: as long as its
        pods' grace period (`job`, the RayJob as read; a running driver gets it to write its checkpoint) plus a
        margin, by the clock."""
        unless_absent(lambda: self.clients.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, RAYJOBS, name, propagation_policy="Foreground"), sleep=self.sleep)
        self._wait_gone(lambda: self.get(name), f"RayJob {self.namespace}/{name}",
                        termination_grace(job) + DELETE_MARGIN_S)

    def free_cluster(self, job: dict[str, Any]) -> str | None:
        """Delete a finished RayJob's RayCluster now instead of after `ttlSecondsAfterFinished`, and wait until
        it is gone, so that the next stage's pods get its CPUs/GPUs. The RayJob object (its status) stays."""
        cluster = (job.get("status") or {}).get("rayClusterName")
        if not cluster:
            return None
        get = lambda: unless_absent(lambda: self.clients.custom.get_namespaced_custom_object(  # noqa: E731
            GROUP, VERSION, self.namespace, RAYCLUSTERS, cluster), sleep=self.sleep)
        unless_absent(lambda: self.clients.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, RAYCLUSTERS, cluster, propagation_policy="Foreground"),
            sleep=self.sleep)
        self._wait_gone(get, f"RayCluster {self.namespace}/{cluster}", termination_grace(job) + DELETE_MARGIN_S)
        return cluster

    def _wait_gone(self, get: Callable[[], Any], what: str, wait_seconds: float, poll_seconds: float = 2.0) -> None:
        started = self.clock()
        while get() is not None:
            if self.clock() - started >= wait_seconds:
                raise StageFailed(f"{what} is still being deleted after {wait_seconds:.0f}s (its pods' grace period "
                                  f"plus {DELETE_MARGIN_S:.0f}s): kubectl -n {self.namespace} get pods to see why")
            self.sleep(poll_seconds)

    def logs_tail(self, name: str, lines: int = 40) -> str:
        """The last lines of the job driver's output and of the head (and, in K8sJobMode, submitter) pods' logs,
        for a failure message. The driver's output comes from the Ray dashboard through the API server's
        service proxy (`services/proxy`), which works in every submission mode."""
        status = (self.get(name) or {}).get("status") or {}
        cluster, job_id = status.get("rayClusterName", ""), status.get("jobId", "")
        sections = []
        if cluster and job_id:
            try:
                answer = with_retries(lambda: self.clients.core.connect_get_namespaced_service_proxy_with_path(
                    f"{cluster}-head-svc:dashboard", self.namespace, path=f"api/jobs/{job_id}/logs"),
                    sleep=self.sleep)
                text = json.loads(answer).get("logs", "") if isinstance(answer, str) else str(answer)
                tail = "\n".join(text.rstrip().splitlines()[-lines:])
                sections.append(f"--- job {job_id} driver output (last {lines} lines) ---\n{tail}")
            except Exception as err:
                sections.append(f"--- job {job_id} driver output unavailable: {err}")
        selectors = {"submitter": f"job-name={name}", "head": f"ray.io/cluster={cluster},ray.io/node-type=head"}
        for role, selector in selectors.items():
            try:
                pods = with_retries(lambda s=selector: self.clients.core.list_namespaced_pod(
                    self.namespace, label_selector=s), sleep=self.sleep)
                for pod in field(pods, "items") or []:
                    pod_name = field(field(pod, "metadata"), "name")
                    text = with_retries(lambda p=pod_name: self.clients.core.read_namespaced_pod_log(
                        p, self.namespace, tail_lines=lines), sleep=self.sleep)
                    sections.append(f"--- {role} pod {pod_name} (last {lines} lines) ---\n{text.rstrip()}")
            except Exception as err:
                sections.append(f"--- {role} pod logs unavailable: {err}")
        return "\n".join(sections) if sections else "(no driver output or pod logs found)"


# ---- watching one RayJob to its end ----------------------------------------------------------------


@dataclass
class WatchSettings:
    poll_seconds: float = 5.0
    appear_timeout: float = 120.0  # the RayJob must exist this long after install
    initializing_timeout: float = 1800.0  # pods pending (image pull, resources, PVC) for longer = stuck
    deadline: float | None = None  # absolute clock value: the pipeline timeout


def watch_rayjob(clients: Clients, namespace: str, name: str, stage: str, settings: WatchSettings,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 out: Callable[[str], None] = print) -> dict[str, Any]:
    """Poll the RayJob until it succeeds (returns it) or fails (raises StageFailed)."""
    jobs = RayJobs(clients, namespace, sleep, clock)
    start = clock()
    seen, shown, initializing_since = False, None, None
    while True:
        now = clock()
        if settings.deadline is not None and now > settings.deadline:
            raise StageFailed(f"{stage}: pipeline timeout reached while RayJob {name} was {shown or 'not started'}")
        job = jobs.get(name)
        if job is None:
            if seen:
                raise StageFailed(f"{stage}: RayJob {namespace}/{name} was deleted while it ran")
            if now - start > settings.appear_timeout:
                raise StageFailed(f"{stage}: RayJob {namespace}/{name} did not appear "
                                  f"{settings.appear_timeout:.0f}s after the Helm install")
            sleep(settings.poll_seconds)
            continue
        seen = True
        status = job.get("status") or {}
        deployment, job_status = status.get("jobDeploymentStatus", NEW), status.get("jobStatus", "")
        line = f"{deployment or 'Pending'} / {job_status or '-'}"
        if line != shown:
            out(f"   [{stage}] {line}  ({_elapsed(now - start)})")
            shown = line
        if deployment == COMPLETE and job_status == SUCCEEDED:
            return job
        if deployment in (FAILED, VALIDATION_FAILED) or (deployment == COMPLETE and job_status):
            raise StageFailed(f"{stage}: RayJob {namespace}/{name} ended without success: {describe_status(status)}",
                              failure_exit_code(status))
        if deployment in NOT_STARTED:
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

