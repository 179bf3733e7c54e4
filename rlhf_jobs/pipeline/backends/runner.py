"""The pipeline runner: `rlhf-jobs pipeline --backend kuberay` as a Kubernetes Job inside the cluster.

A three-stage run takes hours; the runner takes the laptop out of it. `--in-cluster` writes the values files
into a Secret (they may carry tokens) and starts a Job, with the trainer image (which carries helm and the chart),
that runs the same pipeline command with the ServiceAccount of the k8s/rbac chart (`make rbac`). `rlhf-jobs
status` reads the run's record from anywhere; running the same command again replaces a finished runner Job, and
the new one resumes: finished stages are skipped, a running RayJob of the same config is re-attached to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jobs.core import exit_codes
from rlhf_jobs.pipeline.backends import permissions, rewards
from rlhf_jobs.pipeline.backends.kube import Clients, ClusterUnavailable, field, unless_absent, with_retries
from rlhf_jobs.pipeline.backends.rayjob import DEFAULT_GRACE_S, DELETE_MARGIN_S

SERVICE_ACCOUNT = "rlhf-submitter"  # k8s/rbac/values.yaml serviceAccountName
VALUES_DIR = "/etc/rlhf-runner"
CONTAINER = "pipeline"
# Runner pods that may end with exit code 75 (a stage preempted, or the API server unreachable) before the Job
# fails: each preemption of a stage's head pod costs one. Evicted runner pods do not count (podFailurePolicy).
RETRIES = 10


def pod_failure_policy() -> dict[str, Any]:
    """Who retries what (helm/README.md): the runner pod's own eviction is not a failure (a new pod re-attaches to
    the running RayJob); a deterministic failure (exit 1, 2, 3) fails the Job at once instead of running the stage
    again on the cluster's GPUs; a preempted stage (exit 75) is retried, and the new pod resumes it."""
    def on_exit(action: str, codes: tuple[int, ...]) -> dict[str, Any]:
        return {"action": action, "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(codes)}}

    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        on_exit("FailJob", exit_codes.DETERMINISTIC),
        on_exit("Count", (exit_codes.PREEMPTED,)),
    ]}


class RunnerActive(ClusterUnavailable):
    """A runner Job of this run is still running; nothing was changed."""


def runner_name(run: str) -> str:
    return f"rlhf-{run}-runner"


def pipeline_args(namespace: str, run: str, values: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The command the runner pod runs: the pipeline, with the values files where the Secret mounts them."""
    args = ["rlhf-jobs", "pipeline", "--backend", "kuberay", "--namespace", namespace, "--run", run]
    for index, _ in enumerate(values):
        args += ["--values", f"{VALUES_DIR}/values-{index}.yaml"]
    return [*args, *extra]


def shipped_rewards(found: Mapping[str, rewards.StageRewards]) -> tuple[dict[str, str], list[str]]:
    """The reward-function files of the stages to run, for the runner's Secret (mounted at VALUES_DIR), and the
    `--set` arguments that point each stage's config at them there. In the pod the pipeline reads them as local
    files and mounts them in the stage's pods under the same names (their digest is already in them)."""
    files: dict[str, str] = {}
    args: list[str] = []
    for stage, stage_rewards in found.items():
        files.update(stage_rewards.files)
        references = []
        for reference in stage_rewards.references:
            target, _, function = reference.rpartition(":")
            name = target.rpartition("/")[2]
            shipped = target == f"{rewards.REWARDS_DIR}/{name}" and name in stage_rewards.files
            references.append(f"{VALUES_DIR}/{name}:{function}" if shipped else reference)
        args += ["--set", f"{stage}.General.{rewards.KEY}={json.dumps(references)}"]
    return files, args


def manifests(namespace: str, run: str, image: str, values: Mapping[str, str], extra: Sequence[str] = (),
              service_account: str = SERVICE_ACCOUNT, pull_policy: str = "IfNotPresent",
              files: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The runner's Secret (the values files, by position, and `files`: reward-function sources) and Job."""
    name = runner_name(run)
    labels = {"app.kubernetes.io/name": "rlhf-jobs", "app.kubernetes.io/component": "pipeline-runner",
              "app.kubernetes.io/part-of": "rlhf-jobs", "app.kubernetes.io/managed-by": "rlhf-jobs",
              "rlhf-jobs.io/run": run}
    secret = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "stringData": {**{f"values-{index}.yaml": text for index, text in enumerate(values.values())},
                       **(files or {})},
    }
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": pipeline_args(namespace, run, list(values), extra),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "values", "mountPath": VALUES_DIR, "readOnly": True}],
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            # A pod lost with its node or preempted with its stage: the next one resumes where the record says.
            "backoffLimit": RETRIES,
            "podFailurePolicy": pod_failure_policy(),
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": service_account,
                    "automountServiceAccountToken": True,  # in-cluster config: the submitter talks to the API
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "values", "secret": {"secretName": name}}],
                },
            },
        },
    }
    return [secret, job]


def job_state(job: Any) -> str:
    """`running`, `succeeded` or `failed` from a Job's status."""
    status = field(job, "status") or {}
    if field(status, "active"):
        return "running"
    for condition in field(status, "conditions") or []:
        if field(condition, "status") == "True" and field(condition, "type") in ("Complete", "Failed"):
            return "succeeded" if field(condition, "type") == "Complete" else "failed"
    return "running" if not (field(status, "succeeded") or field(status, "failed")) else "failed"


def termination_grace_of_pods(job: Any) -> float:
    """The grace period of a Job's pods (Kubernetes' default when its template sets none)."""
    pod = field(field(field(job, "spec"), "template"), "spec")
    grace = field(pod, "terminationGracePeriodSeconds") or field(pod, "termination_grace_period_seconds")
    return float(grace if grace is not None else DEFAULT_GRACE_S)


def read_job(clients: Clients, namespace: str, run: str, sleep: Callable[[float], None] = time.sleep) -> Any:
    return unless_absent(lambda: clients.batch.read_namespaced_job(runner_name(run), namespace), sleep=sleep)


def submit(clients: Clients, objects: list[dict[str, Any]], sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> str:
    """Create the runner's Secret and Job, replacing a finished Job of the same run; refuse a running one."""
    secret, job = objects
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    run = job["metadata"]["labels"]["rlhf-jobs.io/run"]
    problems = []
    if unless_absent(lambda: clients.core.read_namespace(namespace), sleep=sleep) is None:
        problems.append(f"namespace {namespace!r} not found: kubectl create namespace {namespace}")
    else:
        account = job["spec"]["template"]["spec"]["serviceAccountName"]
        if unless_absent(lambda: clients.core.read_namespaced_service_account(account, namespace),
                         sleep=sleep) is None:
            problems.append(f"ServiceAccount {namespace}/{account} not found: make rbac NAMESPACE={namespace} "
                            f"(helm upgrade --install rlhf-rbac k8s/rbac -n {namespace})")
        problems += permissions.missing(clients.authz, namespace, permissions.START_RUNNER, sleep=sleep)
    if problems:
        raise ClusterUnavailable("the cluster is not ready; nothing was created:\n  " + "\n  ".join(problems))
    existing = read_job(clients, namespace, run, sleep)
    if existing is not None:
        state = job_state(existing)
        if state == "running":
            raise RunnerActive(f"runner Job {namespace}/{name} is still running: kubectl logs -n {namespace} -f "
                               f"job/{name}; stop it with kubectl delete job -n {namespace} {name}")
        print(f"deleting the {state} runner Job {name}; the new one resumes where it stopped")
        unless_absent(lambda: clients.batch.delete_namespaced_job(name, namespace, propagation_policy="Foreground"),
                      sleep=sleep)
        wait_seconds = termination_grace_of_pods(existing) + DELETE_MARGIN_S
        started = clock()
        while read_job(clients, namespace, run, sleep) is not None:
            if clock() - started >= wait_seconds:
                raise ClusterUnavailable(f"runner Job {namespace}/{name} is still being deleted after "
                                         f"{wait_seconds:.0f}s")
            sleep(2.0)
    replaced = unless_absent(lambda: clients.core.replace_namespaced_secret(name, namespace, secret), sleep=sleep)
    if replaced is None:
        with_retries(lambda: clients.core.create_namespaced_secret(namespace, secret), sleep=sleep)
    with_retries(lambda: clients.batch.create_namespaced_job(namespace, job), sleep=sleep)
    return name
