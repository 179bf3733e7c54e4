"""The KubeRay submitter against recorded RayJob status sequences, with a fake Kubernetes API.

The fake stands at the client boundary: it implements the few methods of the `kubernetes`
client objects the submitter calls, and raises the client's own `ApiException`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from rlhf_jobs.cli import run_kuberay_pipeline
from rlhf_jobs.pipeline.backends.helm import config_sets, release_name
from rlhf_jobs.pipeline.backends.kube import Clients, with_retries
from rlhf_jobs.pipeline.backends.kuberay import KubeRayBackend, PreflightError
from rlhf_jobs.pipeline.backends.rayjob import StageFailed, WatchSettings, watch_rayjob
from rlhf_jobs.pipeline.plan import PipelineOptions, plan, run_pipeline

NS = "rlhf"


def status(deployment: str = "", job: str = "", **extra: str) -> dict[str, Any]:
    return {"jobDeploymentStatus": deployment, "jobStatus": job, "rayClusterName": "c-1", **extra}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeCustom:
    """RayJobs whose `get` replays a status sequence; the last entry repeats. RayClusters are gone once deleted.

    An entry may be an ApiException (raised once) or "DELETED" (the object is gone).
    """

    def __init__(self) -> None:
        self.sequences: dict[str, list[Any]] = {}
        self.annotations: dict[str, dict[str, str]] = {}
        self.deleted: list[str] = []
        self.deleted_clusters: list[str] = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version) == ("ray.io", "v1") and plural in ("rayjobs", "rayclusters")
        if plural == "rayclusters":
            raise ApiException(status=404, reason="Not Found")
        sequence = self.sequences.get(name)
        if not sequence:
            raise ApiException(status=404, reason="Not Found")
        entry = sequence.pop(0) if len(sequence) > 1 else sequence[0]
        if isinstance(entry, ApiException):
            raise entry
        if entry == "DELETED":
            self.sequences.pop(name)
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name, "annotations": self.annotations.get(name, {})}, "status": entry}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        if plural == "rayclusters":
            self.deleted_clusters.append(name)
            return
        self.deleted.append(name)
        self.sequences.pop(name, None)


class FakeCore:
    def __init__(self, namespaces=(NS,)) -> None:
        self.namespaces = set(namespaces)
        self.config_maps: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}
        self.created: list[str] = []

    def read_namespace(self, name):
        if name not in self.namespaces:
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name}}

    def read_namespaced_config_map(self, name, namespace):
        if name not in self.config_maps:
            raise ApiException(status=404, reason="Not Found")
        return self.config_maps[name]

    def replace_namespaced_config_map(self, name, namespace, body):
        if name not in self.config_maps:
            raise ApiException(status=404, reason="Not Found")
        self.config_maps[name] = body

    def create_namespaced_config_map(self, namespace, body):
        self.created.append(body["metadata"]["name"])
        self.config_maps[body["metadata"]["name"]] = body

    def list_namespaced_pod(self, namespace, label_selector):
        role = "submitter" if label_selector.startswith("job-name") else "head"
        return {"items": [{"metadata": {"name": f"{role}-pod"}}]}

    def read_namespaced_pod_log(self, name, namespace, tail_lines):
        return f"log of {name}: Traceback ... CUDA out of memory\n"

    def connect_get_namespaced_service_proxy_with_path(self, name, namespace, path):
        assert name.endswith("-head-svc:dashboard") and path.startswith("api/jobs/"), (name, path)
        return json.dumps({"logs": "step 1\nValueError: the driver failed\n"})

    def delete_namespaced_config_map(self, name, namespace):
        if self.config_maps.pop(name, None) is None:
            raise ApiException(status=404, reason="Not Found")

    def replace_namespaced_secret(self, name, namespace, body):
        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        self.secrets[name] = body

    def create_namespaced_secret(self, namespace, body):
        self.created.append(body["metadata"]["name"])
        self.secrets[body["metadata"]["name"]] = body


class FakeApiext:
    def __init__(self, installed: bool = True) -> None:
        self.installed = installed

    def read_custom_resource_definition(self, name):
        if not self.installed:
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name}}


class FakeAuthz:
    def __init__(self, denied: set[tuple[str, str]] = frozenset()) -> None:
        self.denied = denied
        self.reviews: list[tuple[str, str, str | None, str, str | None, str | None]] = []

    def create_self_subject_access_review(self, review):
        attributes = review.spec.resource_attributes
        self.reviews.append((attributes.group, attributes.resource, attributes.subresource, attributes.verb,
                             attributes.name, attributes.namespace))
        resource = attributes.resource + (f"/{attributes.subresource}" if attributes.subresource else "")
        allowed = (attributes.verb, resource) not in self.denied
        return argparse.Namespace(status=argparse.Namespace(allowed=allowed))


class FakeHelm:
    """Renders a minimal RayJob + ConfigMap per stage, the RayJob annotated with the config's hash as the chart
    does; `upgrade_install` makes the RayJob appear with the next recorded status sequence of its stage."""

    binary = "helm"

    def __init__(self, custom: FakeCustom, runs: dict[str, list[list[Any]]]) -> None:
        self.custom, self.runs, self.installs, self.install_sets = custom, runs, [], []

    def check_version(self) -> None:
        pass

    def template(self, release, namespace, run, values=(), sets=()):
        stage = release.rsplit("-", 1)[1]
        general = {"output_dir": f"/mnt/rlhf/{run}/work/{stage}", "checkpoint_dir": f"/mnt/rlhf/{run}/{stage}"}
        if stage == "ppo":
            general.update(model_name="m", rm_name="m", model_pretrain=f"/mnt/rlhf/{run}/sft",
                           rm_pretrain=f"/mnt/rlhf/{run}/rm")
        else:
            general["base_model"] = "m"
        config = {"General": general, "Dataset": {"train_file": f"/data/{stage}.jsonl"}, "Training": {}}
        for item in sets:  # --set-json configs.<stage>.Section.key=value (and chart settings such as job.*)
            path, value = item.split("=", 1)
            if path.startswith("configs."):
                section, key = path.split(".")[2:]
                config[section][key] = json.loads(value)
        text = yaml.safe_dump(config)
        digest = hashlib.sha256(text.encode()).hexdigest()
        return [
            {"kind": "ConfigMap", "metadata": {"name": f"{release}-config"}, "data": {"config.yaml": text}},
            {"kind": "RayJob", "metadata": {"name": release, "annotations": {"rlhf-jobs.io/config-hash": digest}}},
        ]

    def upgrade_install(self, release, namespace, run, values=(), sets=()):
        self.installs.append(release)
        self.install_sets.append(list(sets))
        stage = release.rsplit("-", 1)[1]
        (rayjob,) = [m for m in self.template(release, namespace, run, values, sets) if m["kind"] == "RayJob"]
        self.custom.annotations[release] = rayjob["metadata"]["annotations"]
        self.custom.sequences[release] = list(self.runs[stage].pop(0))


def make_backend(runs: dict[str, list[list[Any]]], core: FakeCore | None = None, **clients: Any):
    clock = Clock()
    custom = clients["custom"](clock) if "custom" in clients else FakeCustom()
    fake = Clients(custom=custom, core=core or FakeCore(), apiext=clients.get("apiext", FakeApiext()),
                   authz=clients.get("authz", FakeAuthz()))
    helm = FakeHelm(custom, runs)
    settings = WatchSettings(poll_seconds=5, initializing_timeout=600, deadline=3600)
    backend = KubeRayBackend(fake, helm, NS, "default", watch=settings, sleep=clock.sleep, clock=clock)
    return backend, helm, fake, clock


def watch(sequence: list[Any], **settings: Any) -> dict[str, Any]:
    clock, custom = Clock(), FakeCustom()
    custom.sequences["job"] = sequence
    clients = Clients(custom=custom, core=FakeCore(), apiext=FakeApiext(), authz=FakeAuthz())
    return watch_rayjob(clients, NS, "job", "sft", WatchSettings(**settings), clock=clock, sleep=clock.sleep,
                        out=lambda line: None)


SUCCESS = [status(), status("Initializing"), status("Running", "PENDING"), status("Running", "RUNNING"),
           status("Complete", "SUCCEEDED")]


def test_success_needs_complete_and_succeeded() -> None:
    # jobStatus can say SUCCEEDED while the deployment is still running: keep watching.
    result = watch([status("Running", "RUNNING"), status("Running", "SUCCEEDED"), status("Complete", "SUCCEEDED")])
    assert result["status"]["jobDeploymentStatus"] == "Complete"
    assert watch(list(SUCCESS))["status"]["jobStatus"] == "SUCCEEDED"


def test_failure_carries_reason_and_message() -> None:
    failed = status("Failed", "FAILED", reason="AppFailed", message="Job entrypoint command failed with exit code 1")
    with pytest.raises(StageFailed, match=r"reason=AppFailed.*exit code 1"):
        watch([status("Running", "RUNNING"), failed])
    with pytest.raises(StageFailed, match="ValidationFailed"):
        watch([status("ValidationFailed", reason="ValidationFailed", message="invalid RayJob spec")])
    with pytest.raises(StageFailed, match="jobStatus=STOPPED"):
        watch([status("Running", "RUNNING"), status("Complete", "STOPPED")])


def test_deadline_exceeded_is_a_failure() -> None:
    with pytest.raises(StageFailed, match="DeadlineExceeded"):
        watch([status("Running", "RUNNING"), status("Failed", "", reason="DeadlineExceeded",
                                                      message="activeDeadlineSeconds reached")])


def test_stuck_in_initializing() -> None:
    with pytest.raises(StageFailed, match=r"stuck in Initializing for 10m0\ds.*kubectl -n rlhf get pods"):
        watch([status("Initializing")], initializing_timeout=600)


def test_deleted_mid_run() -> None:
    with pytest.raises(StageFailed, match="was deleted while it ran"):
        watch([status("Running", "RUNNING"), "DELETED"])


def test_never_appears() -> None:
    custom = FakeCustom()
    clock = Clock()
    clients = Clients(custom=custom, core=FakeCore(), apiext=FakeApiext(), authz=FakeAuthz())
    with pytest.raises(StageFailed, match="did not appear"):
        watch_rayjob(clients, NS, "job", "sft", WatchSettings(appear_timeout=60), clock=clock, sleep=clock.sleep,
                     out=lambda line: None)


def test_transient_api_errors_are_retried() -> None:
    flaky = [ApiException(status=503), ApiException(status=429), ApiException(status=0), *SUCCESS]
    assert watch(flaky)["status"]["jobStatus"] == "SUCCEEDED"


def test_forbidden_is_not_retried() -> None:
    with pytest.raises(ApiException) as info:
        watch([ApiException(status=403, reason="Forbidden"), *SUCCESS])
    assert info.value.status == 403


def test_retries_give_up_after_the_last_attempt() -> None:
    calls = []

    def always_down() -> None:
        calls.append(1)
        raise ApiException(status=500)

    with pytest.raises(ApiException):
        with_retries(always_down, sleep=lambda s: None, attempts=4)
    assert len(calls) == 4


def test_pipeline_timeout() -> None:
    with pytest.raises(StageFailed, match="pipeline timeout"):
        watch([status("Running", "RUNNING")], deadline=300)


def test_three_stages_chain_and_a_rerun_skips_them() -> None:
    backend, helm, fake, _ = make_backend({s: [list(SUCCESS)] for s in ("sft", "rm", "ppo")})
    run_pipeline(backend, PipelineOptions(check_paths=False))
    assert helm.installs == ["rlhf-sft", "rlhf-rm", "rlhf-ppo"]
    record = json.loads(fake.core.config_maps["rlhf-default-pipeline"]["data"]["record.json"])
    assert {s: e["status"] for s, e in record["stages"].items()} == dict.fromkeys(("sft", "rm", "ppo"), "succeeded")
    assert record["stages"]["rm"]["checkpoint"] == "/mnt/rlhf/default/rm"
    assert record["stages"]["ppo"]["config"]["General"]["model_pretrain"] == "/mnt/rlhf/default/sft"

    helm.installs.clear()
    run_pipeline(backend, PipelineOptions(check_paths=False))
    assert helm.installs == []


def test_failure_stops_the_chain_with_logs_and_the_rerun_resumes_there() -> None:
    failed = status("Failed", "FAILED", reason="AppFailed", message="entrypoint exited 1")
    runs = {"sft": [list(SUCCESS)], "rm": [[status("Running", "RUNNING"), failed], list(SUCCESS)],
            "ppo": [list(SUCCESS)]}
    backend, helm, fake, _ = make_backend(runs)
    with pytest.raises(StageFailed) as info:
        run_pipeline(backend, PipelineOptions(check_paths=False))
    message = str(info.value)
    assert "reason=AppFailed" in message and "entrypoint exited 1" in message
    assert "submitter pod submitter-pod" in message and "head pod head-pod" in message
    assert helm.installs == ["rlhf-sft", "rlhf-rm"]

    helm.installs.clear()
    run_pipeline(backend, PipelineOptions(check_paths=False))
    assert fake.custom.deleted == ["rlhf-rm"], "the failed RayJob is deleted so KubeRay runs a fresh one"
    assert helm.installs == ["rlhf-rm", "rlhf-ppo"]


def interrupted_record(backend: KubeRayBackend, options: PipelineOptions) -> None:
    """The record as a Ctrl-C during the watch leaves it: every planned stage "interrupted" under its config."""
    backend.save_record({"stages": {step.stage: {"status": "interrupted", "config_hash": step.config_hash}
                                    for step in plan(backend, options)}})


def test_rerun_reattaches_to_a_running_rayjob() -> None:
    backend, helm, fake, _ = make_backend({"sft": [list(SUCCESS)], "rm": [], "ppo": []})
    options = PipelineOptions(stages=["sft"], check_paths=False)
    helm.upgrade_install("rlhf-sft", NS, "default", sets=backend.sets("sft"))  # the first run's install
    fake.custom.sequences["rlhf-sft"] = [status("Running", "RUNNING"), status("Complete", "SUCCEEDED")]
    interrupted_record(backend, options)
    helm.installs.clear()
    run_pipeline(backend, options)
    assert helm.installs == [], "a running RayJob (e.g. after Ctrl-C) is watched, not reinstalled"
    assert fake.custom.deleted == []


def test_config_overrides_reach_the_chart_and_change_the_hash() -> None:
    assert config_sets("rm", ["rm.Training.epochs=2", "sft.Training.epochs=9", "Training.seed=1"]) == [
        "configs.rm.Training.epochs=2", "configs.rm.Training.seed=1"]
    backend, helm, _, _ = make_backend({s: [list(SUCCESS), list(SUCCESS)] for s in ("sft", "rm", "ppo")})
    run_pipeline(backend, PipelineOptions(check_paths=False))
    helm.installs.clear()
    run_pipeline(backend, PipelineOptions(check_paths=False, overrides=["rm.Training.epochs=2"]))
    assert helm.installs == ["rlhf-rm", "rlhf-ppo"]


def test_preflight_reports_every_problem_before_creating_anything() -> None:
    backend, helm, fake, _ = make_backend(
        {}, core=FakeCore(namespaces=()), apiext=FakeApiext(installed=False),
        authz=FakeAuthz(denied={("create", "rayjobs"), ("get", "pods/log")}))
    with pytest.raises(PreflightError) as info:
        backend.preflight()
    message = str(info.value)
    assert "namespace 'rlhf' not found" in message
    assert "rayjobs.ray.io is not installed" in message and "kuberay-operator" in message
    assert "not allowed to create rayjobs.ray.io" in message and "not allowed to get pods/log" in message
    assert "not allowed to list pods" not in message
    assert helm.installs == [] and fake.core.created == []


def test_cli_reports_preflight_failure_and_exits_nonzero(capsys) -> None:
    backend, _, _, _ = make_backend({}, apiext=FakeApiext(installed=False))
    args = argparse.Namespace(chart=None, stages="sft,rm,ppo", overrides=[], from_stage=None, dry_run=False,
                              namespace=NS, run="default", values=[], timeout=60, in_cluster=False, image=None)
    assert run_kuberay_pipeline(args, clients=backend.clients) == 2  # bad setup: running again would not help
    assert "KubeRay CRD rayjobs.ray.io is not installed" in capsys.readouterr().err


def test_release_names() -> None:
    assert release_name("ppo", "default") == "rlhf-ppo"
    assert release_name("rm", "exp1") == "rlhf-exp1-rm"


@pytest.mark.helm
def test_dry_run_renders_every_stage_from_the_real_chart_without_a_cluster(capsys) -> None:
    import shutil

    from rlhf_jobs.cli import main

    if shutil.which("helm") is None:
        pytest.skip("helm is not on PATH (../shared/tools/install-helm-kubectl installs it)")
    assert main(["pipeline", "--backend", "kuberay", "--dry-run", "--run", "exp1",
                 "--set", "ppo.Training.kl_coeff=0.2"]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    rayjobs = {d["metadata"]["labels"]["rlhf-jobs.io/stage"]: d for d in documents if d["kind"] == "RayJob"}
    assert set(rayjobs) == {"sft", "rm", "ppo"}
    assert rayjobs["ppo"]["metadata"]["name"] == "rlhf-exp1-ppo"
    configs = {d["metadata"]["labels"]["rlhf-jobs.io/stage"]: yaml.safe_load(d["data"]["config.yaml"])
               for d in documents if d["kind"] == "ConfigMap"}
    assert configs["ppo"]["General"]["model_pretrain"] == "/mnt/rlhf/exp1/sft"
    assert configs["ppo"]["General"]["rm_pretrain"] == "/mnt/rlhf/exp1/rm"
    assert configs["ppo"]["Training"]["kl_coeff"] == 0.2
    assert [d["kind"] for d in documents].count("PersistentVolumeClaim") == 1


# ---- issue 18: a changed config never re-attaches; a finished stage frees its cluster ----------------------


def test_changed_config_replaces_a_running_rayjob_instead_of_reattaching() -> None:
    """Fault 1: Ctrl-C, edit the config, re-run: the RayJob still running the old config is deleted and the new
    config installed; the record must never store the old job's success under the new config."""
    backend, helm, fake, _ = make_backend({"sft": [list(SUCCESS)], "rm": [], "ppo": []})
    options = PipelineOptions(stages=["sft"], check_paths=False)
    helm.upgrade_install("rlhf-sft", NS, "default", sets=backend.sets("sft"))  # the first run's install
    fake.custom.sequences["rlhf-sft"] = [status("Running", "RUNNING")]  # still running the old config
    interrupted_record(backend, options)
    helm.installs.clear()
    helm.runs["sft"] = [list(SUCCESS)]
    edited = PipelineOptions(stages=["sft"], check_paths=False, overrides=["sft.Training.epochs=2"])
    run_pipeline(backend, edited)
    assert fake.custom.deleted == ["rlhf-sft"], "the RayJob of the old config must be stopped"
    assert helm.installs == ["rlhf-sft"]
    record = json.loads(fake.core.config_maps["rlhf-default-pipeline"]["data"]["record.json"])
    assert record["stages"]["sft"]["config"]["Training"]["epochs"] == 2


def test_same_config_running_rayjob_with_another_hash_is_replaced_even_when_the_record_agrees() -> None:
    """Fault 1, from the cluster's side: the record says "resume", but the RayJob running was installed with
    another config (e.g. `make deploy-sft` with other values): its config-hash annotation tells."""
    backend, helm, fake, _ = make_backend({"sft": [list(SUCCESS)], "rm": [], "ppo": []})
    options = PipelineOptions(stages=["sft"], check_paths=False)
    interrupted_record(backend, options)
    fake.custom.sequences["rlhf-sft"] = [status("Running", "RUNNING")]
    fake.custom.annotations["rlhf-sft"] = {"rlhf-jobs.io/config-hash": "0" * 64}
    run_pipeline(backend, options)
    assert fake.custom.deleted == ["rlhf-sft"] and helm.installs == ["rlhf-sft"]


def test_finished_stage_frees_its_raycluster_before_the_next_stage() -> None:
    """Capacity: the next stage must not wait ttlSecondsAfterFinished for the finished stage's CPUs/GPUs."""
    backend, helm, fake, _ = make_backend({s: [list(SUCCESS)] for s in ("sft", "rm", "ppo")})
    order = []
    fake.custom.delete_namespaced_custom_object = _recording(fake.custom.delete_namespaced_custom_object, order)
    helm.upgrade_install = _recording(helm.upgrade_install, order)
    run_pipeline(backend, PipelineOptions(check_paths=False))
    assert order == ["install rlhf-sft", "delete rayclusters c-1", "install rlhf-rm", "delete rayclusters c-1",
                     "install rlhf-ppo", "delete rayclusters c-1"]


def _recording(method, calls: list[str]):
    def wrapper(*args, **kwargs):
        if method.__name__ == "upgrade_install":
            calls.append(f"install {args[0]}")
        else:
            calls.append(f"delete {args[3]} {args[4]}")
        return method(*args, **kwargs)

    wrapper.__name__ = method.__name__
    return wrapper


def test_failed_stage_message_has_the_driver_output_from_the_dashboard() -> None:
    """In HTTPMode there is no submitter pod: the driver's output comes through the API server's service proxy."""
    failed = status("Failed", "FAILED", reason="AppFailed", message="entrypoint exited 1", jobId="rlhf-sft-abc")
    backend, _, _, _ = make_backend({"sft": [[failed]], "rm": [], "ppo": []})
    with pytest.raises(StageFailed, match=r"(?s)job rlhf-sft-abc driver output.*ValueError: the driver failed"):
        run_pipeline(backend, PipelineOptions(stages=["sft"], check_paths=False))


def test_every_stage_installs_with_on_config_change_restart() -> None:
    """Fault 2: the pipeline's trainers move Ray checkpoints of another config aside instead of resuming them,
    whatever the user's values say (the chart's job.onConfigChange). Issue 28 item 1: the pipeline owns retrying a
    RayJob, so KubeRay's backoffLimit (which re-runs a config error as readily as a preemption) is 0."""
    backend, helm, _, _ = make_backend({s: [list(SUCCESS)] for s in ("sft", "rm", "ppo")})
    run_pipeline(backend, PipelineOptions(check_paths=False))
    assert all('job.onConfigChange="restart"' in sets for sets in helm.install_sets), helm.install_sets
    assert all("job.backoffLimit=0" in sets for sets in helm.install_sets), helm.install_sets


def test_from_stage_replaces_a_running_rayjob_of_the_same_config() -> None:
    """Fault 2: reset_stage was a no-op; a forced stage must get a new RayJob, not the running one."""
    backend, helm, fake, _ = make_backend({"sft": [list(SUCCESS)], "rm": [], "ppo": []})
    helm.upgrade_install("rlhf-sft", NS, "default", sets=backend.sets("sft"))
    fake.custom.sequences["rlhf-sft"] = [status("Running", "RUNNING")]
    options = PipelineOptions(stages=["sft"], check_paths=False, from_stage="sft")
    interrupted_record(backend, options)
    helm.installs.clear()
    helm.runs["sft"] = [list(SUCCESS)]
    run_pipeline(backend, options)
    assert fake.custom.deleted == ["rlhf-sft"] and helm.installs == ["rlhf-sft"]


# ---- issue 18: the pipeline runner in the cluster -------------------------------------------------------


class FakeBatch:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.created: list[str] = []

    def read_namespaced_job(self, name, namespace):
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return self.jobs[name]

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        if self.jobs.pop(name, None) is None:
            raise ApiException(status=404, reason="Not Found")

    def create_namespaced_job(self, namespace, body):
        self.created.append(body["metadata"]["name"])
        self.jobs[body["metadata"]["name"]] = {**body, "status": {"active": 1}}


class FakeCoreWithAccounts(FakeCore):
    def __init__(self, accounts=("rlhf-submitter",), **kwargs) -> None:
        super().__init__(**kwargs)
        self.accounts = set(accounts)

    def read_namespaced_service_account(self, name, namespace):
        if name not in self.accounts:
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name}}


def test_in_cluster_config_is_what_a_pod_uses(tmp_path, monkeypatch) -> None:
    """Inside the runner pod: the ServiceAccount token and the API server from the environment, no kubeconfig."""
    from kubernetes.config import incluster_config

    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token-123")
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    clients = Clients.from_environment()
    configuration = clients.core.api_client.configuration
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.api_key["BearerToken"] == "bearer sa-token-123"
    assert clients.batch is not None


def test_runner_job_runs_the_pipeline_and_a_reapply_resumes(tmp_path, capsys) -> None:
    """The runner's command is the pipeline command: parsed as the pod parses it, it runs the three stages against
    the API (the fake here); the same `--in-cluster` command again replaces the finished Job, and its pipeline
    skips what finished."""
    from rlhf_jobs.cli import build_parser

    values = tmp_path / "my-values.yaml"
    values.write_text("configs: {sft: {Training: {epochs: 1}}}\n")
    _backend, helm, fake, _ = make_backend({s: [list(SUCCESS)] for s in ("sft", "rm", "ppo")},
                                          core=FakeCoreWithAccounts())
    fake.batch = FakeBatch()
    cli = ["pipeline", "--backend", "kuberay", "--namespace", NS, "--run", "exp1", "--in-cluster",
           "--image", "registry.example/rlhf-jobs:0.1.0", "--values", str(values), "--set", "rm.Training.epochs=2"]
    args = build_parser().parse_args(cli)
    assert run_kuberay_pipeline(args, clients=fake, helm=helm) == 0
    assert fake.batch.created == ["rlhf-exp1-runner"]
    job = fake.batch.jobs["rlhf-exp1-runner"]
    assert "rlhf-exp1-runner" not in fake.core.config_maps, "values files may carry tokens: a Secret, not a ConfigMap"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rlhf-submitter" and pod["automountServiceAccountToken"] is True
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/rlhf-jobs:0.1.0"
    command = container["command"]
    assert command[:8] == ["rlhf-jobs", "pipeline", "--backend", "kuberay", "--namespace", NS, "--run", "exp1"]
    assert fake.core.secrets["rlhf-exp1-runner"]["stringData"] == {"values-0.yaml": values.read_text()}
    assert pod["volumes"] == [{"name": "values", "secret": {"secretName": "rlhf-exp1-runner"}}]
    assert "--in-cluster" not in command

    # In the pod: the same pipeline, against the API.
    pod_args = build_parser().parse_args(command[1:])
    assert pod_args.values == ["/etc/rlhf-runner/values-0.yaml"] and pod_args.overrides == ["rm.Training.epochs=2"]
    assert run_kuberay_pipeline(pod_args, clients=fake, helm=helm, sleep=lambda s: None) == 0
    record = json.loads(fake.core.config_maps["rlhf-exp1-pipeline"]["data"]["record.json"])
    assert {s: e["status"] for s, e in record["stages"].items()} == dict.fromkeys(("sft", "rm", "ppo"), "succeeded")

    # A second start while it runs is refused; once it ended, the same command replaces it and resumes.
    assert main_with(fake, helm, cli) == 2
    assert "is still running" in capsys.readouterr().err
    fake.batch.jobs["rlhf-exp1-runner"]["status"] = {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}
    assert run_kuberay_pipeline(args, clients=fake, helm=helm) == 0
    assert fake.batch.created == ["rlhf-exp1-runner", "rlhf-exp1-runner"]
    helm.installs.clear()
    assert run_kuberay_pipeline(pod_args, clients=fake, helm=helm, sleep=lambda s: None) == 0
    assert helm.installs == [], "the re-applied runner skips the finished stages"
    assert "== sft: skip" in capsys.readouterr().out

    # `rlhf-jobs status` from anywhere: the runner's state and the record.
    from rlhf_jobs.cli import show_status

    assert show_status(argparse.Namespace(namespace=NS, run="exp1"), clients=fake) == 0
    out = capsys.readouterr().out
    assert "runner Job rlhf-exp1-runner: running" in out and out.count("succeeded") == 3


def main_with(fake, helm, cli: list[str]) -> int:
    """`rlhf-jobs ...` as main() runs it (errors as one line, exit 2), with the fake cluster and helm."""
    import sys

    from rlhf_jobs import cli as cli_module
    from rlhf_jobs.core.errors import UserError

    args = cli_module.build_parser().parse_args(cli)
    try:
        return cli_module.run_kuberay_pipeline(args, clients=fake, helm=helm)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def test_runner_needs_the_service_account_of_the_rbac_chart() -> None:
    from rlhf_jobs.pipeline.backends import runner

    _backend, _helm, fake, _ = make_backend({}, core=FakeCoreWithAccounts(accounts=()))
    fake.batch = FakeBatch()
    with pytest.raises(runner.ClusterUnavailable, match="ServiceAccount rlhf/rlhf-submitter not found: make rbac "
                                                        "NAMESPACE=rlhf"):
        runner.submit(fake, runner.manifests(NS, "exp1", "img", {}), sleep=lambda s: None)
    assert fake.batch.created == [] and fake.core.created == [] and fake.core.secrets == {}


# ---- issue 28 item 1: exit codes that say what happened; item 2: deleting a RayJob waits by the clock ----------


def pipeline_args(**overrides: Any) -> argparse.Namespace:
    args = dict(chart=None, stages="sft,rm,ppo", overrides=[], from_stage=None, dry_run=False, namespace=NS,
                run="default", values=[], timeout=3600, in_cluster=False, image=None)
    return argparse.Namespace(**{**args, **overrides})


def driver_exit(code: int) -> dict[str, Any]:
    """The status KubeRay gives a RayJob whose driver exited with `code` (Ray's job supervisor writes the message)."""
    return status("Failed", "FAILED", reason="AppFailed", jobId="rlhf-sft-x",
                  message=f"Job entrypoint command failed with exit code {code}, last available logs (truncated to "
                          f"20,000 chars):\nstopped after step 12 (preempted); run the same command again")


@pytest.mark.parametrize(("final", "code"), [
    (driver_exit(75), 75),  # preempted with a checkpoint: the runner Job retries, the stage resumes
    (driver_exit(3), 3),  # out of memory
    (driver_exit(2), 2),  # a config problem only the trainer saw
    (driver_exit(1), 1),
    (driver_exit(137), 1),  # SIGKILL
    (status("ValidationFailed", reason="ValidationFailed", message="invalid RayJob spec"), 2),
    (status("Failed", "", reason="DeadlineExceeded", message="activeDeadlineSeconds reached"), 1),
    (status("Failed", "RUNNING", reason="JobStatusCheckTimeoutExceeded", message="dashboard unreachable"), 75),
], ids=["preempted", "oom", "bad-config", "failed", "killed", "validation", "deadline", "head-lost"])
def test_pipeline_exits_with_what_the_stage_driver_said(final: dict, code: int, capsys) -> None:
    """A preempted stage (its driver checkpointed and exited 75) must surface as 75 from `rlhf-jobs pipeline`, so that
    the runner Job retries it; a deterministic failure (1, 2, 3) must not look like one (issue 28 item 1)."""
    _, helm, fake, clock = make_backend({"sft": [[status("Running", "RUNNING"), final]]})
    assert run_kuberay_pipeline(pipeline_args(stages="sft"), clients=fake, helm=helm, sleep=clock.sleep) == code
    assert "RayJob rlhf/rlhf-sft ended without success" in capsys.readouterr().err


def test_an_api_server_outage_exits_75_to_be_run_again(capsys) -> None:
    """Retries of a 503 run out: nothing is lost (the RayJob keeps running), so the runner should try again."""
    _, helm, fake, clock = make_backend({"sft": [[ApiException(status=503)] * 10]})
    assert run_kuberay_pipeline(pipeline_args(stages="sft"), clients=fake, helm=helm, sleep=clock.sleep) == 75
    assert "the Kubernetes API server did not answer" in capsys.readouterr().err


def test_runner_job_fails_fast_on_deterministic_exits_and_retries_preemption() -> None:
    """The runner Job re-ran a config error (exit 2) three more times, each pod deleting the failed RayJob and running
    the stage again on the cluster's GPUs. Its podFailurePolicy now: an evicted runner pod is ignored, exit 1/2/3 fail
    the Job at once, exit 75 is retried (backoffLimit sized for preemptions); checked as the Job controller applies it
    (the first rule that matches decides), against a subset of the batch/v1 Job schema."""
    from rlhf_jobs.core import exit_codes
    from rlhf_jobs.pipeline.backends import runner

    _, job = runner.manifests(NS, "exp1", "img", {})
    spec = job["spec"]
    assert job_spec_errors(job) == []
    assert spec["backoffLimit"] >= 10 and spec["template"]["spec"]["restartPolicy"] == "Never"

    def action(exit_code: int | None = None, conditions: tuple[str, ...] = ()) -> str:
        for rule in spec["podFailurePolicy"]["rules"]:
            on_exit = rule.get("onExitCodes")
            if (on_exit and exit_code is not None and on_exit["containerName"] in (None, runner.CONTAINER)
                    and (exit_code in on_exit["values"]) == (on_exit["operator"] == "In")):
                return rule["action"]
            if any(c["type"] in conditions for c in rule.get("onPodConditions", [])):
                return rule["action"]
        return "Count"  # no rule matched: counted against backoffLimit

    assert action(143, ("DisruptionTarget",)) == "Ignore"  # evicted or preempted runner pod: a new one re-attaches
    for code in (exit_codes.STAGE_FAILED, exit_codes.BAD_INPUT, exit_codes.OUT_OF_MEMORY):
        assert action(code) == "FailJob", code
    assert action(exit_codes.PREEMPTED) == "Count"


def job_spec_errors(job: dict) -> list[str]:
    """The rules of batch/v1 Job validation the runner's podFailurePolicy must meet (apis/batch/validation)."""
    import jsonschema

    exit_rule = {"type": "object", "required": ["operator", "values"], "additionalProperties": False, "properties": {
        "containerName": {"type": "string"}, "operator": {"enum": ["In", "NotIn"]},
        "values": {"type": "array", "minItems": 1, "maxItems": 255, "uniqueItems": True,
                   "items": {"type": "integer", "not": {"const": 0}}}}}
    rule = {"type": "object", "required": ["action"], "additionalProperties": False, "properties": {
        "action": {"enum": ["FailJob", "FailIndex", "Ignore", "Count"]}, "onExitCodes": exit_rule,
        "onPodConditions": {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string"}, "status": {"enum": ["True", "False", "Unknown"]}}}}},
        "oneOf": [{"required": ["onExitCodes"]}, {"required": ["onPodConditions"]}]}
    schema = {"type": "object", "properties": {"spec": {"type": "object", "required": ["template"], "properties": {
        "backoffLimit": {"type": "integer", "minimum": 0},
        "podFailurePolicy": {"type": "object", "required": ["rules"], "additionalProperties": False,
                             "properties": {"rules": {"type": "array", "maxItems": 20, "items": rule}}},
        "template": {"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "restartPolicy": {"const": "Never"}}}}}}}}}
    errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(job)]
    containers = {c["name"] for c in job["spec"]["template"]["spec"]["containers"]}
    for item in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        name = item.get("onExitCodes", {}).get("containerName")
        if name is not None and name not in containers:
            errors.append(f"containerName {name!r} is not a container of the pod")
    return errors


class DeletingCustom(FakeCustom):
    """RayJobs that take `takes` seconds of the clock to go after a delete (their pods' grace period: a running
    driver writes its checkpoint); each get costs `get_seconds` of the clock (a slow API server)."""

    def __init__(self, clock: Clock, takes: float, get_seconds: float = 0.0, grace: int | None = None) -> None:
        super().__init__()
        self.clock, self.takes, self.get_seconds, self.gone_at, self.grace = clock, takes, get_seconds, {}, grace

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.clock.now += self.get_seconds
        if name in self.gone_at and self.clock.now < self.gone_at[name]:
            return {"metadata": {"name": name, "deletionTimestamp": "now"}, "spec": {}, "status": {}}
        job = super().get_namespaced_custom_object(group, version, namespace, plural, name)
        if self.grace is not None:
            job["spec"] = running_job(self.grace)["spec"]
        return job

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        super().delete_namespaced_custom_object(group, version, namespace, plural, name, propagation_policy)
        if plural == "rayjobs":
            self.gone_at[name] = self.clock.now + self.takes


def running_job(grace: int) -> dict[str, Any]:
    pod = {"spec": {"terminationGracePeriodSeconds": grace}}
    return {"metadata": {"name": "rlhf-sft"}, "status": status("Running", "RUNNING"),
            "spec": {"rayClusterSpec": {"headGroupSpec": {"template": pod}, "workerGroupSpecs": [{"template": pod}]}}}


def test_replacing_a_running_rayjob_waits_for_its_pods_grace_period() -> None:
    """Issue 28 item 2: the pods get 300 s (the head's preStop waits up to 290 s for the driver's checkpoint), but the
    delete gave up after 120 polls: "still being deleted" for every changed config of a running stage."""
    from rlhf_jobs.pipeline.backends.rayjob import RayJobs

    clock = Clock()
    custom = DeletingCustom(clock, takes=280.0)
    custom.sequences["rlhf-sft"] = [status("Running", "RUNNING")]
    jobs = RayJobs(Clients(custom=custom, core=FakeCore(), apiext=FakeApiext(), authz=FakeAuthz()), NS,
                   clock.sleep, clock)
    jobs.delete("rlhf-sft", running_job(grace=300))
    assert jobs.get("rlhf-sft") is None and 280 <= clock.now < 300

    # By the clock, not by counting polls: with a slow API server (10 s per get) the wait still ends at grace + margin.
    clock = Clock()
    custom = DeletingCustom(clock, takes=10_000.0, get_seconds=10.0)
    custom.sequences["rlhf-sft"] = [status("Running", "RUNNING")]
    jobs = RayJobs(Clients(custom=custom, core=FakeCore(), apiext=FakeApiext(), authz=FakeAuthz()), NS,
                   clock.sleep, clock)
    with pytest.raises(StageFailed, match=r"still being deleted after 420s \(its pods' grace period plus 120s\)"):
        jobs.delete("rlhf-sft", running_job(grace=300))
    assert 420 <= clock.now <= 440


def test_a_changed_config_replaces_the_running_rayjob_through_the_pipeline() -> None:
    """The same through the pipeline: the RayJob running the old config (grace 300 s) takes 250 s to go, then the new
    config is installed."""
    backend, helm, fake, clock = make_backend({"sft": [list(SUCCESS)], "rm": [], "ppo": []},
                                              custom=lambda clock: DeletingCustom(clock, takes=250.0, grace=300))
    fake.custom.sequences["rlhf-sft"] = [status("Running", "RUNNING")]
    fake.custom.annotations["rlhf-sft"] = {"rlhf-jobs.io/config-hash": "0" * 64}  # another config
    run_pipeline(backend, PipelineOptions(stages=["sft"], check_paths=False))
    assert fake.custom.deleted == ["rlhf-sft"] and helm.installs == ["rlhf-sft"] and clock.now >= 250


# ---- issue 28 item 5: least privilege, from one table ---------------------------------------------------------

# Kubernetes client methods the submitter calls -> (API group, resource, verb) as RBAC sees them.
CLIENT_GROUPS = {"core": "", "batch": "batch", "apiext": "apiextensions.k8s.io", "authz": "authorization.k8s.io"}
VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "replace": "update", "patch": "patch",
         "delete": "delete", "connect_get": "get"}
RESOURCES = {"config_map": "configmaps", "pod": "pods", "pod_log": "pods/log", "service_proxy_with_path":
             "services/proxy", "service_account": "serviceaccounts", "secret": "secrets", "job": "jobs",
             "namespace": "namespaces", "custom_resource_definition": "customresourcedefinitions",
             "self_subject_access_review": "selfsubjectaccessreviews"}
# Allowed without a Role: SelfSubjectAccessReviews (every authenticated user), reading the namespace (cluster-scoped;
# the preflight goes on when it is forbidden).
UNGRANTED = {("authorization.k8s.io", "selfsubjectaccessreviews", "create"), ("", "namespaces", "get")}


class Recording:
    """A Kubernetes client that records each call as (group, resource, verb), then makes it."""

    def __init__(self, client: str, inner: Any, calls: set) -> None:
        self.client, self.inner, self.calls = client, inner, calls

    def __getattr__(self, method: str):
        target = getattr(self.inner, method)

        def call(*args, **kwargs):
            if self.client == "custom":
                group, plural = args[0], args[3]
                verb = VERBS[method.split("_namespaced_")[0]]
                self.calls.add((group, plural, verb))
            else:
                verb = next(VERBS[v] for v in sorted(VERBS, key=len, reverse=True) if method.startswith(v + "_"))
                noun = method.split("_", 2 if method.startswith("connect_get") else 1)[-1]
                noun = noun.removeprefix("namespaced_")
                assert noun in RESOURCES, f"map {method} to its RBAC resource in RESOURCES"
                self.calls.add((CLIENT_GROUPS[self.client], RESOURCES[noun], verb))
            return target(*args, **kwargs)

        return call


def recording(clients: Clients, calls: set) -> Clients:
    return Clients(**{name: Recording(name, getattr(clients, name), calls) for name in
                      ("custom", "core", "apiext", "authz", "batch") if getattr(clients, name) is not None})


def granted(permissions_table, group: str, resource: str, verb: str) -> bool:
    return any(p.group == group and p.resource == resource and verb in p.verbs for p in permissions_table)


def test_every_api_call_of_the_submitter_and_the_runner_is_in_the_permission_table(tmp_path) -> None:
    """What the Role grants and the preflight checks is what the code calls: a pipeline that fails, is re-run (the
    failed RayJob deleted), succeeds and frees its clusters, `status`, `delete`; and starting the runner Job."""
    from rlhf_jobs.cli import show_status
    from rlhf_jobs.pipeline.backends import permissions, runner

    failed = driver_exit(1)
    runs = {"sft": [list(SUCCESS)], "rm": [[status("Running", "RUNNING"), failed], list(SUCCESS)],
            "ppo": [list(SUCCESS)]}
    _, helm, fake, clock = make_backend(runs, core=FakeCoreWithAccounts())
    fake.batch = FakeBatch()
    calls: set = set()
    clients = recording(fake, calls)
    args = pipeline_args()
    assert run_kuberay_pipeline(args, clients=clients, helm=helm, sleep=clock.sleep) == 1
    assert run_kuberay_pipeline(args, clients=clients, helm=helm, sleep=clock.sleep) == 0
    KubeRayBackend(clients, helm, NS, "default").delete_record()  # `rlhf-jobs delete` (its helm uninstall: below)
    assert ("", "pods/log", "get") in calls and ("ray.io", "rayjobs", "delete") in calls  # the paths ran
    assert {c for c in calls - UNGRANTED if not granted(permissions.PIPELINE, *c)} == set()

    calls.clear()
    assert show_status(argparse.Namespace(namespace=NS, run="default"), clients=clients) == 1  # record deleted
    assert {c for c in calls - UNGRANTED if not granted(permissions.STATUS, *c)} == set()

    calls.clear()
    runner.submit(clients, runner.manifests(NS, "exp1", "img", {"v.yaml": "run: exp1\n"}), sleep=lambda s: None)
    fake.batch.jobs["rlhf-exp1-runner"]["status"] = {"failed": 1}
    runner.submit(clients, runner.manifests(NS, "exp1", "img", {"v.yaml": "run: exp1\n"}), sleep=lambda s: None)
    assert {c for c in calls - UNGRANTED if not granted(permissions.START_RUNNER, *c)} == set()


def test_preflight_checks_every_permission_of_the_table() -> None:
    """The preflight asked about 10 verbs; configmaps get, rayclusters get and services/proxy get were missing.
    Now it asks about every verb of the table (cluster-scoped ones cluster-wide, with their resource names)."""
    from rlhf_jobs.pipeline.backends import permissions

    backend, _, fake, _ = make_backend({})
    backend.preflight()
    asked = {review[:5] for review in fake.authz.reviews}
    assert asked == {check for p in permissions.PIPELINE for check in p.checks()}
    assert {("", "configmaps", None, "get", None), ("ray.io", "rayclusters", None, "get", None),
            ("", "services", "proxy", "get", None)} <= asked
    crd = next(review for review in fake.authz.reviews if review[1] == "customresourcedefinitions")
    assert crd[4:] == ("rayjobs.ray.io", None)  # a name, and no namespace: cluster-scoped
    assert not {p.resource for p in permissions.PIPELINE} & {"secrets"}
    assert "delete" not in next(p for p in permissions.PIPELINE if p.resource == "persistentvolumeclaims").verbs


def rbac_objects(namespace: str) -> dict[str, dict]:
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("helm") is None:
        pytest.skip("helm is not on PATH (../shared/tools/install-helm-kubectl installs it)")
    chart = Path(__file__).parents[1] / "k8s" / "rbac"
    out = subprocess.run(["helm", "template", "rlhf-rbac", str(chart), "--namespace", namespace], check=True,
                         capture_output=True, text=True).stdout
    lint = subprocess.run(["helm", "lint", "--strict", str(chart), "--namespace", namespace], capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out) if doc}


def allows(rules: list[dict], group: str, resource: str, verb: str, name: str | None = None) -> bool:
    """Kubernetes' RBAC authorizer on one request (no wildcards in our rules: none are allowed)."""
    return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
               and (not rule.get("resourceNames") or name in rule["resourceNames"]) for rule in rules)


@pytest.mark.helm
@pytest.mark.parametrize("namespace", ["rlhf", "team-x"])
def test_rbac_chart_grants_exactly_the_permission_table_in_any_namespace(namespace: str) -> None:
    """k8s/rbac.yaml hard-coded namespace rlhf, let the runner read every Secret of it (S3, W&B, HF credentials) and
    delete PVCs. The k8s/rbac chart renders into the release's namespace what permissions.PIPELINE lists, no more,
    for the ServiceAccount the runner Job runs as; its ClusterRole is named per namespace (two namespaces' releases
    must not fight over one object)."""
    from rlhf_jobs.pipeline.backends import permissions, runner

    assert permissions.main(["--check"]) == 0, "k8s/rbac/files/permissions.json is stale: make schema"
    objects = rbac_objects(namespace)
    assert set(objects) == {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    account = objects["ServiceAccount"]["metadata"]
    assert (account["name"], account["namespace"]) == (runner.SERVICE_ACCOUNT, namespace)
    for kind in ("Role", "RoleBinding"):
        assert objects[kind]["metadata"]["namespace"] == namespace
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        assert objects[kind]["subjects"] == [{"kind": "ServiceAccount", "name": runner.SERVICE_ACCOUNT,
                                             "namespace": namespace}]
    assert namespace in objects["ClusterRole"]["metadata"]["name"]
    assert objects["ClusterRoleBinding"]["roleRef"]["name"] == objects["ClusterRole"]["metadata"]["name"]
    role, cluster_role = objects["Role"]["rules"], objects["ClusterRole"]["rules"]
    for permission in permissions.PIPELINE:
        for group, resource, sub, verb, name in permission.checks():
            rules = cluster_role if permission.cluster else role
            assert allows(rules, group, resource + (f"/{sub}" if sub else ""), verb, name), permission
    assert role == permissions.rules(permissions.PIPELINE, cluster=False)
    assert cluster_role == permissions.rules(permissions.PIPELINE, cluster=True)
    assert not allows(role, "", "secrets", "get") and not allows(role, "", "persistentvolumeclaims", "delete")
    assert "*" not in json.dumps([role, cluster_role])


@pytest.mark.helm
def test_helm_manages_only_kinds_the_table_grants(tmp_path) -> None:
    """Whatever the chart renders (every optional object on), Helm must be allowed to read, create, patch and delete
    it with the runner's Role; the PVC it never deletes."""
    from chart_helpers import render

    from rlhf_jobs.pipeline.backends import permissions

    sets = ("serviceAccount.create=true", "evictionProtection.podDisruptionBudget=true", "storage.create=true")
    kinds = {(doc["apiVersion"], doc["kind"]) for stage in ("sft", "ppo") for doc in render(f"rlhf-{stage}", sets=sets)}
    plural = {"RayJob": "rayjobs", "ConfigMap": "configmaps", "PersistentVolumeClaim": "persistentvolumeclaims",
              "ServiceAccount": "serviceaccounts", "PodDisruptionBudget": "poddisruptionbudgets"}
    assert {kind for _, kind in kinds} <= set(plural), kinds
    for api_version, kind in kinds:
        group = api_version.rpartition("/")[0]
        verbs = ("get", "create", "patch") if kind == "PersistentVolumeClaim" else permissions.HELM_MANAGED
        for verb in verbs:
            assert granted(permissions.PIPELINE, group, plural[kind], verb), (kind, verb)


def test_helm_keeps_its_release_records_in_config_maps(tmp_path) -> None:
    """Helm's default driver keeps releases in Secrets, so the Role had to read every Secret of the namespace. Every
    helm the submitter runs, and the Makefile's, uses the configmap driver."""
    import subprocess
    from pathlib import Path

    from rlhf_jobs.pipeline.backends.helm import Helm

    fake = tmp_path / "helm"
    fake.write_text("#!/bin/sh\necho \"$HELM_DRIVER $*\" >> \"$0.log\"\necho v3.14.0\n")
    fake.chmod(0o755)
    Helm(binary=str(fake)).upgrade_install("rlhf-sft", NS, "default")
    assert (tmp_path / "helm.log").read_text().startswith("configmap upgrade --install rlhf-sft")
    repo = Path(__file__).parents[1]
    for target in ("deploy-sft", "rbac"):
        subprocess.run(["make", "-C", str(repo), target, f"HELM={fake}"], check=True, capture_output=True,
                       env={"PATH": "/usr/bin:/bin", "HELM_DRIVER": "secret"})
    lines = (tmp_path / "helm.log").read_text().splitlines()
    assert lines[1].startswith("configmap upgrade --install rlhf-sft ./helm") and lines[2].startswith(
        "configmap upgrade --install rlhf-rbac k8s/rbac"), lines


# ---- issue 28 item 7 / issue 25: a new stage (grpo) deploys from the registry, with its reward-function files -----


def dry_run(capsys, *args: str) -> list[dict]:
    from rlhf_jobs.cli import main

    assert main(["pipeline", "--backend", "kuberay", "--dry-run", *args]) == 0, capsys.readouterr().err
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def of_stage(documents: list[dict], stage: str, kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind and d["metadata"]["labels"].get("rlhf-jobs.io/stage") == stage]


@pytest.mark.helm
def test_a_new_stage_deploys_from_the_registry_with_its_reward_function_files(tmp_path, monkeypatch, capsys) -> None:
    """`make deploy-grpo`, `helm install --set stage=grpo`, `pipeline --stages sft,grpo`: the grpo stage came with no
    chart edit beyond its default config block. The pipeline reads the local reward-function file its config names,
    mounts it in the stage's pods (rewardFunctions) and points the config there; a module reference passes
    unchanged."""
    import shutil
    import subprocess
    from pathlib import Path

    from chart_helpers import crd_errors, pod_templates
    from test_chart import projected_files

    from rlhf_jobs.pipeline.backends import rewards, runner

    if shutil.which("helm") is None:
        pytest.skip("helm is not on PATH")
    repo = Path(__file__).parents[1]
    chart = repo / "helm"
    make = subprocess.run(["make", "-n", "-C", str(repo), "deploy-grpo", "RUN=exp1"],
                          capture_output=True, text=True, check=True).stdout
    assert "upgrade --install rlhf-exp1-grpo ./helm " in make
    refused = subprocess.run(["make", "-n", "-C", str(repo), "deploy-kto"], capture_output=True, text=True)
    assert refused.returncode != 0 and "unknown stage 'kto': expected one of sft rm ppo dpo grpo" in refused.stderr
    manual = subprocess.run(["helm", "template", "my-release", str(chart), "--set", "stage=grpo", "--set", "run=exp1"],
                            capture_output=True, text=True, check=True).stdout
    general = yaml.safe_load(next(d for d in yaml.safe_load_all(manual) if d and d["kind"] == "ConfigMap")["data"][
        "config.yaml"])["General"]
    assert general["model_pretrain"] == "/mnt/rlhf/exp1/sft" and general["checkpoint_dir"] == "/mnt/rlhf/exp1/grpo"

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards").mkdir()
    source = "def correct(prompts, completions, **columns):\n    return [1.0] * len(completions)\n"
    (tmp_path / "rewards" / "my_rewards.py").write_text(source)
    values = tmp_path / "grpo.yaml"
    values.write_text(yaml.safe_dump({"configs": {"grpo": {"General": {
        "reward_functions": ["rewards/my_rewards.py:correct", "rlhf_jobs.core.stages:get"]}}}}))
    args = ["--chart", str(chart), "--run", "exp1", "--stages", "sft,grpo", "--values", str(values)]
    documents = dry_run(capsys, *args)
    assert {d["metadata"]["labels"]["rlhf-jobs.io/stage"] for d in documents if d["kind"] == "RayJob"} == {
        "sft", "grpo"}
    name = rewards.mounted_name(Path("my_rewards.py"), source)
    assert name.startswith("my_rewards_") and len(name) == len("my_rewards_12345678.py")
    (files,) = [d for d in of_stage(documents, "grpo", "ConfigMap") if d["metadata"]["name"].endswith("-rewards")]
    assert files["data"] == {name: source}
    (config_map,) = [d for d in of_stage(documents, "grpo", "ConfigMap") if "config.yaml" in d["data"]]
    general = yaml.safe_load(config_map["data"]["config.yaml"])["General"]
    assert general["reward_functions"] == [f"{rewards.REWARDS_DIR}/{name}:correct", "rlhf_jobs.core.stages:get"]
    assert general["model_pretrain"] == "/mnt/rlhf/exp1/sft"
    (rayjob,) = of_stage(documents, "grpo", "RayJob")
    for group in ("head", "worker"):
        files_seen = projected_files(pod_templates(rayjob)[group]["spec"], "/etc/rlhf-jobs", documents)
        assert files_seen[f"{rewards.REWARDS_DIR}/{name}"] == source, group
    assert not crd_errors(rayjob)
    assert not [d for d in of_stage(documents, "sft", "ConfigMap") if d["metadata"]["name"].endswith("-rewards")]

    # A changed file is a changed config (its mounted name, so the config's path, changes: the stage runs again); a
    # missing one is one line, exit 2, nothing created.
    changed = rewards.resolve("grpo", {"General": {"reward_functions": ["rewards/my_rewards.py:correct"]}})
    assert changed.files == {name: source}
    (tmp_path / "rewards" / "my_rewards.py").write_text(source + "# v2\n")
    assert rewards.resolve("grpo", {"General": {"reward_functions": ["rewards/my_rewards.py:correct"]}}).references != [
        f"{rewards.REWARDS_DIR}/{name}:correct"]
    (tmp_path / "rewards" / "my_rewards.py").write_text(source)
    from rlhf_jobs.cli import main

    values.write_text(values.read_text().replace("rewards/my_rewards.py", "rewards/missing.py"))
    assert main(["pipeline", "--backend", "kuberay", "--dry-run", *args]) == 2
    assert "configs.grpo.General.reward_functions: rewards/missing.py: file not found" in capsys.readouterr().err
    values.write_text(values.read_text().replace("rewards/missing.py", "rewards/my_rewards.py"))

    # --in-cluster: the file goes to the runner in its Secret, the config points there, and the runner's pipeline
    # mounts it in the stage's pods under the same name.
    runner_objects = dry_run(capsys, *args, "--in-cluster", "--image", "img")
    secret = next(d for d in runner_objects if d["kind"] == "Secret")
    assert secret["stringData"][name] == source
    command = next(d for d in runner_objects if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0][
        "command"]
    mounted = tmp_path / "runner-mount"  # what the pod sees at runner.VALUES_DIR
    mounted.mkdir()
    for key, text in secret["stringData"].items():
        (mounted / key).write_text(text)
    pod_args = [arg.replace(runner.VALUES_DIR, str(mounted)) for arg in command[2:]]
    assert f"{mounted}/{name}:correct" in " ".join(pod_args)
    in_pod = dry_run(capsys, *[arg for arg in pod_args if arg != "pipeline"], "--chart", str(chart))
    (files,) = [d for d in of_stage(in_pod, "grpo", "ConfigMap") if d["metadata"]["name"].endswith("-rewards")]
    assert files["data"] == {name: source}
    (config_map,) = [d for d in of_stage(in_pod, "grpo", "ConfigMap") if "config.yaml" in d["data"]]
    assert yaml.safe_load(config_map["data"]["config.yaml"])["General"]["reward_functions"] == [
        f"{rewards.REWARDS_DIR}/{name}:correct", "rlhf_jobs.core.stages:get"]


def test_the_local_pipelines_ppo_samples_survive_a_new_stage(tmp_path, monkeypatch) -> None:
    """`show_samples` unpacked every registry stage into (sft, rm, ppo): a fourth stage made it raise. It now reads
    the stage's own inputs (`Stage.compare_with`, `reward_key`)."""
    from rlhf_jobs import cli
    from rlhf_jobs.tools import generate

    asked = {}

    def compare(models, held_out, reward_model, limit=None):
        asked.update(models=models, held_out=held_out, reward_model=reward_model)
        return [], None

    monkeypatch.setattr(generate, "compare", compare)
    monkeypatch.setattr(generate, "table", lambda samples, answers=None: "")
    monkeypatch.setattr(generate, "write_jsonl", lambda samples, path: path)
    config = {"General": {"model_name": "base", "model_pretrain": "/w/sft", "rm_pretrain": "/w/rm",
                          "checkpoint_dir": "/w/ppo"}}
    cli.show_samples("ppo", config, tmp_path / "samples.jsonl")
    assert asked == {"models": ["/w/sft", "/w/ppo"], "held_out": "/w/ppo", "reward_model": "/w/rm"}


@pytest.mark.helm
def test_grpo_reads_the_reward_model_only_when_the_rm_stage_is_part_of_the_run(capsys) -> None:
    """GRPO's reward model is an optional input: the chart's chaining fills only required inputs (model_pretrain), the
    submitter points rm_pretrain at this run's rm stage with --set-json when rm runs in the pipeline."""
    import shutil

    if shutil.which("helm") is None:
        pytest.skip("helm is not on PATH")

    def grpo_general(stages: str) -> dict:
        documents = dry_run(capsys, "--run", "exp2", "--stages", stages)
        (config_map,) = [d for d in of_stage(documents, "grpo", "ConfigMap") if "config.yaml" in d["data"]]
        return yaml.safe_load(config_map["data"]["config.yaml"])["General"]

    alone = grpo_general("sft,grpo")
    assert alone["model_pretrain"] == "/mnt/rlhf/exp2/sft" and alone["rm_pretrain"] is None
    with_rm = grpo_general("sft,rm,grpo")
    assert with_rm["model_pretrain"] == "/mnt/rlhf/exp2/sft" and with_rm["rm_pretrain"] == "/mnt/rlhf/exp2/rm"
