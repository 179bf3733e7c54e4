"""Kind-cluster integration: the three stages as real RayJobs, chained through the PVC.

Run with `make test-kind` (or `pytest -m kind`) where Docker, kind, helm and kubectl exist and
images can be pulled (kindest/node, the KubeRay operator). It creates or reuses the kind
cluster $KIND_CLUSTER, installs the operator and loads our image ($IMAGE_REPO:$IMAGE_TAG, built
with `make images`), then runs the submitter with helm/ci/kind-values.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kind

REPO = Path(__file__).resolve().parents[1]
CLUSTER = os.environ.get("KIND_CLUSTER", "rlhf-jobs")
IMAGE = f"{os.environ.get('IMAGE_REPO', 'rlhf-jobs')}:{os.environ.get('IMAGE_TAG', '0.1.0')}"
NAMESPACE = os.environ.get("NAMESPACE", "rlhf")
CONTEXT = f"kind-{CLUSTER}"


ASKED = "RLHF_KIND_TESTS"  # `make test-kind` sets it: a plain `make test` never starts a kind cluster


def _missing_prerequisite() -> str | None:
    if os.environ.get(ASKED) != "1":
        return f"kind tests run only when asked: make test-kind (or {ASKED}=1 pytest -m kind)"
    for tool in ("docker", "kind", "helm", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (kind tests need Docker, kind, helm and kubectl: see README 'Kubernetes')"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "no Docker engine answers `docker info`"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False).returncode != 0:
        return f"image {IMAGE} is not built (make images)"
    return None


def sh(*args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def cluster() -> str:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    # kind-up creates or reuses the cluster, installs the pinned operator and loads the image.
    sh("make", "-C", str(REPO), "kind-up", f"KIND_CLUSTER={CLUSTER}", f"IMAGE_REPO={IMAGE.split(':')[0]}",
       f"IMAGE_TAG={IMAGE.split(':')[1]}")
    return CONTEXT


def kind_stages(environ: dict[str, str] = os.environ) -> list[str]:
    """The stages the e2e runs as one pipeline: $RLHF_KIND_STAGES (make test-kind KIND_STAGES=sft,rm), else all."""
    from rlhf_jobs.pipeline.plan import STAGES, parse_stages

    return parse_stages(environ["RLHF_KIND_STAGES"]) if environ.get("RLHF_KIND_STAGES") else list(STAGES)


def submitter(run: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))}
    sh("kubectl", "config", "use-context", CONTEXT)
    return subprocess.run(
        [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "kuberay", "--namespace", NAMESPACE,
         "--run", run, "--values", str(REPO / "helm" / "ci" / "kind-values.yaml"),
         "--stages", ",".join(kind_stages()), "--set", "Training.num_training_workers=1", *extra],
        capture_output=True, text=True, timeout=3600, env=env, check=False,
    )


def read_on_pvc(run: str, path: str) -> str:
    """Read a file from the run's checkpoint PVC through a short-lived pod running our image."""
    pod = f"rlhf-read-{uuid.uuid4().hex[:6]}"
    claim = f"rlhf-{run}-checkpoints"
    overrides = {"spec": {
        "securityContext": {"runAsUser": 1000, "fsGroup": 1000},
        "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": claim}}],
        "containers": [{"name": "read", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                        "command": ["cat", f"/mnt/rlhf/{run}/{path}"],
                        "volumeMounts": [{"name": "ckpt", "mountPath": "/mnt/rlhf"}]}]}}
    result = sh("kubectl", "--context", CONTEXT, "-n", NAMESPACE, "run", pod, "--rm", "-i", "--restart=Never",
                f"--image={IMAGE}", f"--overrides={json.dumps(overrides)}", "--quiet")
    return result.stdout


def test_kind_tests_run_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ASKED, raising=False)
    assert "only when asked: make test-kind" in _missing_prerequisite()


@pytest.fixture
def run_name(cluster: str) -> Iterator[str]:
    """A fresh run name; afterwards its releases, record and checkpoint PVC are deleted."""
    run = f"kind{uuid.uuid4().hex[:6]}"
    yield run
    sh(sys.executable, "-m", "rlhf_jobs.cli", "delete", "--namespace", NAMESPACE, "--run", run, check=False)
    sh("kubectl", "--context", CONTEXT, "-n", NAMESPACE, "delete", "pvc", f"rlhf-{run}-checkpoints",
       "--ignore-not-found", "--wait=false", check=False)


def test_the_stages_succeed_chain_and_rerun_skips(run_name: str) -> None:
    from rlhf_jobs.core import stages

    run, ran = run_name, kind_stages()
    first = submitter(run)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    for stage in ran:
        assert f"== {stage}: run" in first.stdout
        job = sh("kubectl", "--context", CONTEXT, "-n", NAMESPACE, "get", "rayjob", "-l",
                 f"rlhf-jobs.io/run={run},rlhf-jobs.io/stage={stage}", "-o", "json")
        status = json.loads(job.stdout)["items"][0]["status"]
        assert (status["jobDeploymentStatus"], status["jobStatus"]) == ("Complete", "SUCCEEDED")
        marker = json.loads(read_on_pvc(run, f"{stage}/rlhf_stage.json"))
        assert marker["stage"] == stage
        general = marker["config"]["General"]
        for key, source in stages.get(stage).inputs.items():  # each stage read its inputs' final models
            assert general[key] == f"/mnt/rlhf/{run}/{source}", (stage, key)

    again = submitter(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"== {stage}: skip" in again.stdout for stage in ran)
    status = sh(sys.executable, "-m", "rlhf_jobs.cli", "status", "--namespace", NAMESPACE, "--run", run)
    assert status.stdout.count("succeeded") == len(ran)
