"""The Helm chart (helm/): lint, render every stage and every ci/ scenario, validate what it renders
against the KubeRay v1.7.0 RayJob CRD and the Kubernetes schemas, and check that bad values fail
with clear messages.

Needs `helm` on PATH (install: ../shared/tools/install-helm-kubectl). The KubeRay CRDs are read from
$RLHF_KUBERAY_CRD_DIR (default ../shared/kuberay).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from chart_helpers import (
    CHART,
    CI_VALUES,
    CRD_DIR_ENV,
    HELM,
    KUBERAY_VERSION,
    MAX_RAYJOB_NAME,
    RAYJOB_CRD_FILE,
    REPO,
    STAGES,
    STAGES_FILE,
    HelmError,
    by_kind,
    core_errors,
    crd_dir,
    crd_errors,
    dumps,
    helm,
    one,
    pod_templates,
    rayjob_metadata_errors,
    render,
    render_error,
)

pytestmark = [
    pytest.mark.helm,
    pytest.mark.skipif(HELM is None, reason="helm is not on PATH (install it: ../shared/tools/install-helm-kubectl)"),
]

CONFIG_PATH = "/etc/rlhf-jobs/config.yaml"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
SCENARIOS = [None, *CI_VALUES]
SCENARIO_IDS = ["defaults", *(path.name.removesuffix("-values.yaml") for path in CI_VALUES)]


def values_of(scenario: Path | None) -> dict:
    """The chart values of a scenario, as Helm merges them (enough for the keys the tests read)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    if scenario is not None:
        _merge(merged, yaml.safe_load(scenario.read_text()) or {})
    return merged


def _merge(base: dict, override: dict) -> None:
    for key, value in override.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def rendered(stage: str, scenario: Path | None, release: str | None = None, sets: tuple[str, ...] = ()):
    return render(release or f"rlhf-{stage}", (scenario,) if scenario else (), sets)


def stage_config(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])


def expected_resources(per_worker: dict) -> dict:
    """resources_per_worker -> container requests/limits (the chart's mapping)."""
    expected = {"cpu": _quantity(per_worker["CPU"])}
    if per_worker.get("memory") is not None:
        expected["memory"] = _quantity(per_worker["memory"])
    if per_worker.get("GPU"):
        expected["nvidia.com/gpu"] = str(math.ceil(per_worker["GPU"]))
    return expected


def _quantity(value: int | float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


@pytest.fixture(scope="module")
def crd_file() -> Path:
    path = crd_dir() / RAYJOB_CRD_FILE
    if not path.is_file():
        if os.environ.get(CRD_DIR_ENV):
            pytest.fail(f"{CRD_DIR_ENV}={os.environ[CRD_DIR_ENV]}: no {RAYJOB_CRD_FILE} there")
        pytest.skip(f"KubeRay CRDs not found in ../shared/kuberay, nor in {path.parent} (helm pull of the "
                    f"kuberay-operator chart {KUBERAY_VERSION} failed: offline?); set {CRD_DIR_ENV} to a directory "
                    f"with {RAYJOB_CRD_FILE}")
    return path


# ---- lint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_helm_lint(stage: str, scenario: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--set", f"stage={stage}"]
    if scenario:
        args += ["-f", str(scenario)]
    out = helm(*args)
    assert "0 chart(s) failed" in out


def test_values_documented() -> None:
    """Every top-level key of values.yaml has a `# --` comment (helm-docs), on it or on each of its children."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        if not line or line.startswith((" ", "#", "-")) or ":" not in line:
            continue
        key = line.split(":")[0]
        commented = number > 0 and any(
            previous.startswith("# --") for previous in _comment_block(lines, number)
        )
        if not commented and not _children_documented(lines, number):
            undocumented.append(key)
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"


def _comment_block(lines: list[str], number: int) -> list[str]:
    block = []
    index = number - 1
    while index >= 0 and lines[index].lstrip().startswith("#"):
        block.append(lines[index].lstrip())
        index -= 1
    return block


def _children_documented(lines: list[str], number: int) -> bool:
    children = []
    for index in range(number + 1, len(lines)):
        line = lines[index]
        if line and not line.startswith(" ") and not line.startswith("#"):
            break
        if line.startswith("  ") and not line.startswith("   ") and not line.lstrip().startswith(("#", "-")):
            children.append(index)
    return bool(children) and all(
        any(comment.startswith("# --") for comment in _comment_block(lines, index)) for index in children
    )


# ---- what every stage and scenario renders --------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_valid_against_kuberay_crd(stage: str, scenario: Path | None, crd_file: Path) -> None:
    objects = rendered(stage, scenario)
    rayjob = one(objects, "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    errors = crd_errors(rayjob) + rayjob_metadata_errors(rayjob)
    assert not errors, f"RayJob invalid against {crd_file}:\n" + "\n".join(errors)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_core_objects_valid(stage: str, scenario: Path | None) -> None:
    objects = rendered(stage, scenario)
    kinds = by_kind(objects)
    assert set(kinds) <= {"RayJob", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount",
                          "PodDisruptionBudget"}, set(kinds)
    for obj in objects:
        if obj["kind"] != "RayJob":
            errors = core_errors(obj)
            assert not errors, f"{obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_workers_request_exactly_resources_per_worker(stage: str, scenario: Path | None) -> None:
    objects = rendered(stage, scenario)
    config = stage_config(objects)
    training = config["Training"]
    per_worker = training["resources_per_worker"]
    # The config that runs is the one the scenario asked for.
    values = values_of(scenario)
    assert per_worker == values["configs"][stage]["Training"]["resources_per_worker"]

    cluster = one(objects, "RayJob")["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    workers = training["num_training_workers"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
    (container,) = group["template"]["spec"]["containers"]
    expected = expected_resources(per_worker)
    assert container["resources"] == {"requests": expected, "limits": expected}
    # Ray sees whole CPUs/GPUs, consistent with the pod's.
    assert group["rayStartParams"]["num-cpus"] == str(math.ceil(per_worker["CPU"]))
    assert group["rayStartParams"]["num-gpus"] == str(math.ceil(per_worker.get("GPU", 0)))
    # The head does no training work.
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0"
    assert head_params["num-gpus"] == "0"
    assert cluster["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_entrypoint_config_and_mounts(stage: str, scenario: Path | None) -> None:
    objects = rendered(stage, scenario)
    values = values_of(scenario)
    mount = values["storage"]["mountPath"]
    run = values["run"]
    rayjob = one(objects, "RayJob")
    configmap = one(objects, "ConfigMap")
    assert rayjob["spec"]["entrypoint"] == (
        f"rlhf-jobs train {stage} --config_path {CONFIG_PATH} --on-config-change restart")
    assert rayjob["spec"]["submissionMode"] == "HTTPMode"

    claim = values["storage"]["existingClaim"] or f"rlhf-{run}-checkpoints"
    templates = pod_templates(rayjob)
    assert set(templates) == {"head", "worker"}
    for group, template in templates.items():
        spec = template["spec"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim, group
        assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"], group
        (container,) = spec["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["checkpoints"]["mountPath"] == mount, group
        assert mounts["config"]["mountPath"] == str(Path(CONFIG_PATH).parent), group
        suffix = "-gpu" if values["image"].get("variant") == "gpu" else ""
        assert container["image"] == f"{values['image']['repository']}:{CHART_META['appVersion']}{suffix}", group
        assert container["imagePullPolicy"] == values["image"]["pullPolicy"], group
        # Secure defaults; the volume is writable by the image's uid 1000.
        assert spec["securityContext"]["runAsNonRoot"] is True, group
        assert spec["securityContext"]["fsGroup"] == 1000, group
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, group
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, group
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], group
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", group
        assert mounts["dshm"]["mountPath"] == "/dev/shm", group
        # The object-storage mirror and model cache on an emptyDir, where $RLHF_JOBS_CACHE_DIR points.
        assert "emptyDir" in volumes["cache"], group
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RLHF_JOBS_CACHE_DIR"] == mounts["cache"]["mountPath"] == values["cache"]["mountPath"], group
    submitter = pod_templates(one(render(f"rlhf-{stage}", sets=("job.submissionMode=K8sJobMode",)), "RayJob"))
    assert submitter["submitter"]["spec"]["restartPolicy"] == "Never"

    config = stage_config(objects)
    general = config["General"]
    assert general["checkpoint_dir"] == f"{mount}/{run}/{stage}"
    assert general["output_dir"] == f"{mount}/{run}/work/{stage}"
    if stage == "ppo":
        assert general["model_pretrain"] == f"{mount}/{run}/sft"
        assert general["rm_pretrain"] == f"{mount}/{run}/rm"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_labels_names_and_config_hash(stage: str, scenario: Path | None) -> None:
    release = f"rlhf-{stage}"
    objects = rendered(stage, scenario)
    run = values_of(scenario)["run"]
    expected = {
        "app.kubernetes.io/name": CHART_META["name"],
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/version": CHART_META["appVersion"],
        "helm.sh/chart": f"{CHART_META['name']}-{CHART_META['version']}",
        "rlhf-jobs.io/stage": stage,
        "rlhf-jobs.io/run": run,
    }
    rayjob = one(objects, "RayJob")
    labelled = [obj["metadata"] for obj in objects] + [
        template["metadata"] for template in pod_templates(rayjob).values()
    ]
    for metadata in labelled:
        labels = metadata["labels"]
        assert {key: labels.get(key) for key in expected} == expected, dumps(metadata)

    assert rayjob["metadata"]["name"] == release
    assert len(rayjob["metadata"]["name"]) <= MAX_RAYJOB_NAME
    configmap = one(objects, "ConfigMap")
    digest = hashlib.sha256(configmap["data"]["config.yaml"].encode()).hexdigest()
    assert rayjob["metadata"]["annotations"]["rlhf-jobs.io/config-hash"] == digest
    assert configmap["metadata"]["annotations"]["rlhf-jobs.io/config-hash"] == digest


def test_config_hash_follows_the_config() -> None:
    base = one(render("rlhf-sft"), "RayJob")["metadata"]["annotations"]["rlhf-jobs.io/config-hash"]
    changed = one(render("rlhf-sft", sets=("configs.sft.Training.epochs=1",)), "RayJob")
    other_run = one(render("rlhf-sft", sets=("run=exp2",)), "RayJob")
    assert changed["metadata"]["annotations"]["rlhf-jobs.io/config-hash"] != base
    assert other_run["metadata"]["annotations"]["rlhf-jobs.io/config-hash"] != base  # paths differ


def test_long_release_name_truncated_to_kuberay_limit(crd_file: Path) -> None:
    release = "rlhf-" + "a" * 41 + "-exp-rm"  # 53 characters, Helm's limit; the 47th is a "-"
    assert len(release) == 53
    rayjob = one(render(release), "RayJob")
    name = rayjob["metadata"]["name"]
    assert len(name) <= MAX_RAYJOB_NAME
    assert name == release[:46]
    assert not rayjob_metadata_errors(rayjob)
    assert rayjob["metadata"]["labels"]["rlhf-jobs.io/stage"] == "rm"


# ---- stage selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "sets", "stage"),
    [
        ("rlhf-sft", (), "sft"),
        ("exp1-rm", (), "rm"),
        ("team-a-exp1-ppo", (), "ppo"),
        ("trainer", ("stage=rm",), "rm"),
        ("rlhf-sft", ("stage=ppo",), "ppo"),  # an explicit stage wins over the name
    ],
)
def test_stage_from_value_or_release_name(release: str, sets: tuple[str, ...], stage: str) -> None:
    objects = render(release, sets=sets)
    rayjob = one(objects, "RayJob")
    assert rayjob["spec"]["entrypoint"].startswith(f"rlhf-jobs train {stage} ")
    assert rayjob["metadata"]["labels"]["rlhf-jobs.io/stage"] == stage
    assert set(stage_config(objects)) == {"General", "Dataset", "Training"}
    assert stage_config(objects)["General"]["checkpoint_dir"].endswith(f"/{stage}")


@pytest.mark.parametrize("release", ["trainer", "rlhf-sft-x", "rlhf-kto"])
def test_stage_unknown_fails_clearly(release: str) -> None:
    message = render_error(release)
    assert f'the release name "{release}" does not end in -sft, -rm, -ppo, -dpo or -grpo' in message
    assert "--set stage=sft|rm|ppo|dpo|grpo" in message


# ---- the shared PVC -------------------------------------------------------------------------------


def test_pvc_created_by_sft_release_and_shared_by_rm_and_ppo() -> None:
    claims = {}
    for stage in STAGES:
        objects = render(f"rlhf-{stage}", sets=("run=exp7",))
        claims[stage] = one(objects, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "volumes"
        ][0]["persistentVolumeClaim"]["claimName"]
        pvcs = by_kind(objects).get("PersistentVolumeClaim", [])
        if stage == "sft":
            (pvc,) = pvcs
            assert pvc["metadata"]["name"] == "rlhf-exp7-checkpoints"
            assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
            assert pvc["spec"]["resources"]["requests"]["storage"] == DEFAULTS["storage"]["size"]
            assert "storageClassName" not in pvc["spec"]  # the cluster's default class
        else:
            assert pvcs == [], f"the {stage} release must not own the run's PVC"
    assert set(claims.values()) == {"rlhf-exp7-checkpoints"}


@pytest.mark.parametrize(
    ("sets", "created"),
    [
        (("stage=rm", "storage.create=true"), True),
        (("stage=sft", "storage.create=false"), False),
        (("stage=sft", "storage.existingClaim=mine"), False),
        (("stage=sft", "storage.create=true", "storage.existingClaim=mine"), False),
    ],
)
def test_pvc_create_modes(sets: tuple[str, ...], created: bool) -> None:
    objects = render("trainer", sets=sets)
    assert bool(by_kind(objects).get("PersistentVolumeClaim")) is created


def test_existing_claim_scenario_creates_nothing() -> None:
    scenario = CHART / "ci" / "existing-pvc-values.yaml"
    for stage in STAGES:
        objects = rendered(stage, scenario)
        assert "PersistentVolumeClaim" not in by_kind(objects)
        assert one(objects, "ServiceAccount")["metadata"]["name"] == f"rlhf-{stage}"


def test_storage_class_values() -> None:
    pvc = one(render("rlhf-sft", sets=("storage.storageClassName=fast",)), "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast"
    pvc = one(render("rlhf-sft", sets=("storage.storageClassName=-",)), "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == ""


# ---- GPU, scheduling and job settings -------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_gpu_scenario(stage: str) -> None:
    objects = rendered(stage, CHART / "ci" / "gpu-values.yaml")
    assert stage_config(objects)["Training"]["resources_per_worker"] == {"CPU": 8, "GPU": 1}
    cluster = one(objects, "RayJob")["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"cpu": "8", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {"cpu": "8", "nvidia.com/gpu": "1"}
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "tolerations" not in head["template"]["spec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_fractional_cpu_and_byte_memory() -> None:
    objects = render("rlhf-sft", sets=(
        "configs.sft.Training.resources_per_worker.CPU=0.5",
        "configs.sft.Training.resources_per_worker.memory=2147483648",
    ))
    (group,) = one(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "0.5", "memory": "2147483648"}
    assert group["rayStartParams"]["num-cpus"] == "1"
    assert "nvidia.com/gpu" not in resources["limits"]
    objects = render("rlhf-sft", sets=("configs.sft.Training.resources_per_worker.GPU=0.5",))
    (group,) = one(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["rayStartParams"]["num-gpus"] == "1"


def test_scheduling_values_merge(crd_file: Path) -> None:
    objects = render("rlhf-sft", sets=("job.submissionMode=K8sJobMode",
        "nodeSelector.pool=train", "worker.nodeSelector.zone=a",
        "tolerations[0].key=shared,tolerations[0].operator=Exists",
        "worker.tolerations[0].key=only-workers,worker.tolerations[0].operator=Exists",
        "priorityClassName=batch-low", "imagePullSecrets[0].name=regcred",
        "head.allowTraining=true", "head.rayStartParams.object-store-memory=100000000",
        "env[0].name=HF_HUB_OFFLINE,env[0].value=1", "envFrom[0].secretRef.name=hf-token",
    ))
    templates = pod_templates(one(objects, "RayJob"))
    worker, head = templates["worker"]["spec"], templates["head"]["spec"]
    assert worker["nodeSelector"] == {"pool": "train", "zone": "a"}
    assert head["nodeSelector"] == {"pool": "train"}
    assert [t["key"] for t in worker["tolerations"]] == ["shared", "only-workers"]
    assert [t["key"] for t in head["tolerations"]] == ["shared"]
    for spec in (worker, head, templates["submitter"]["spec"]):
        assert spec["priorityClassName"] == "batch-low"
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    cluster = one(objects, "RayJob")["spec"]["rayClusterSpec"]
    params = cluster["headGroupSpec"]["rayStartParams"]
    assert "num-cpus" not in params and params["object-store-memory"] == "100000000"
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert head["containers"][0]["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert not crd_errors(one(objects, "RayJob"))


def test_job_settings(crd_file: Path) -> None:
    rayjob = one(render("rlhf-sft", sets=(
        "job.activeDeadlineSeconds=7200", "job.backoffLimit=2", "job.suspend=true",
        "job.ttlSecondsAfterFinished=60", "job.extraArgs={--seed,7}", "submitter.backoffLimit=5",
        "job.submissionMode=K8sJobMode",
        "job.labels.kueue\\.x-k8s\\.io/queue-name=team-a",
    )), "RayJob")
    spec = rayjob["spec"]
    assert spec["activeDeadlineSeconds"] == 7200
    assert spec["backoffLimit"] == 2
    assert spec["suspend"] is True
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 60
    assert spec["submitterConfig"] == {"backoffLimit": 5}
    assert spec["entrypoint"] == (
        f"rlhf-jobs train sft --config_path {CONFIG_PATH} --on-config-change restart '--seed' '7'")
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert not crd_errors(rayjob)


def test_no_cluster_shutdown_drops_ttl() -> None:
    spec = one(render("rlhf-sft", sets=("job.shutdownAfterJobFinishes=false",)), "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is False
    assert "ttlSecondsAfterFinished" not in spec  # KubeRay rejects a TTL without shutdown


@pytest.mark.parametrize("mode", ["SidecarMode", "HTTPMode", "InteractiveMode"])
def test_other_submission_modes_have_no_submitter_pod(mode: str, crd_file: Path) -> None:
    rayjob = one(render("rlhf-rm", sets=(f"job.submissionMode={mode}",)), "RayJob")
    assert rayjob["spec"]["submissionMode"] == mode
    assert "submitterPodTemplate" not in rayjob["spec"]  # KubeRay rejects it in SidecarMode
    assert "submitterConfig" not in rayjob["spec"]
    assert not crd_errors(rayjob)


def test_chain_stages_off_leaves_ppo_pretrain_null() -> None:
    general = stage_config(render("rlhf-ppo", sets=("chainStages=false",)))["General"]
    assert general["model_pretrain"] is None
    assert general["rm_pretrain"] is None
    general = stage_config(render("rlhf-ppo", sets=("configs.ppo.General.model_pretrain=/models/sft",)))["General"]
    assert general["model_pretrain"] == "/models/sft"
    assert general["rm_pretrain"].endswith("/default/rm")


def test_notes_tell_how_to_watch_and_read_logs() -> None:
    out = helm("install", "rlhf-sft", str(CHART), "--dry-run=client", "--namespace", "ml")
    notes = out.split("NOTES:", 1)[1]
    assert "kubectl get rayjob rlhf-sft -n ml -w" in notes
    assert "ray job logs --follow $(kubectl get rayjob rlhf-sft -n ml -o jsonpath='{.status.jobId}')" in notes
    k8s_job = helm("install", "rlhf-sft", str(CHART), "--dry-run=client", "--namespace", "ml",
                   "--set", "job.submissionMode=K8sJobMode").split("NOTES:", 1)[1]
    assert "kubectl logs -n ml -f job/rlhf-sft" in k8s_job
    assert "helm install rlhf-rm ./helm -n ml --set run=default" in notes


# ---- bad values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("stage=kto",), "at '/stage': value must be one of '', 'sft', 'rm', 'ppo', 'dpo'"),
        (("configs.sft.Training.num_training_workers=-1",),
         "at '/configs/sft/Training/num_training_workers': exclusiveMinimum: got -1, want 0"),
        (("configs.sft.Training.num_training_workers=two",),
         "at '/configs/sft/Training/num_training_workers': got string, want integer"),
        (("configs.rm.Training.resources_per_worker.CPU=0",),
         "at '/configs/rm/Training/resources_per_worker/CPU': exclusiveMinimum"),
        (("configs.ppo.Training.resources_per_worker.memory=lots",),
         "at '/configs/ppo/Training/resources_per_worker/memory'"),
        (("configs.sft.Training.resources_per_worker.TPU=1",),
         "at '/configs/sft/Training/resources_per_worker': additional properties 'TPU' not allowed"),
        (("image.pullPolicy=Sometimes",),
         "at '/image/pullPolicy': value must be one of 'IfNotPresent', 'Always', 'Never'"),
        (("replicas=3",), "additional properties 'replicas' not allowed"),
        (("storage.accessModes[0]=RWX",), "at '/storage/accessModes/0': value must be one of 'ReadWriteOnce'"),
        (("storage.create=maybe",), "at '/storage/create': value must be one of true, false, 'auto'"),
        (("run=Exp_1",), "at '/run': 'Exp_1' does not match pattern"),
        (("job.submissionMode=Batch",), "at '/job/submissionMode': value must be one of 'K8sJobMode'"),
        (("job.activeDeadlineSeconds=0",), "at '/job/activeDeadlineSeconds': minimum: got 0, want 1"),
        (("job.backoffLimit=-1",), "at '/job/backoffLimit': minimum: got -1, want 0"),
        (("shm.enabled=yes",), "at '/shm/enabled': got string, want boolean"),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else None,
)
def test_bad_values_rejected_by_schema(sets: tuple[str, ...], message: str) -> None:
    error = render_error("rlhf-sft", sets=sets)
    assert "values don't meet the specifications of the schema" in error
    assert message in error, error


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("job.suspend=true", "job.shutdownAfterJobFinishes=false"),
         "job.suspend: true needs job.shutdownAfterJobFinishes: true"),
        (("job.submissionMode=InteractiveMode", "job.backoffLimit=1"),
         "job.backoffLimit must be 0 with job.submissionMode: InteractiveMode"),
    ],
)
def test_bad_combinations_fail(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error("rlhf-sft", sets=sets)


# ---- the chart's training configs and the trainers' rules ----------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("stage", STAGES)
def test_rendered_config_passes_the_trainer_validator(stage: str, scenario: Path | None, tmp_path: Path) -> None:
    config_module = pytest.importorskip("rlhf_jobs.core.loading")
    path = tmp_path / "config.yaml"
    path.write_text(one(rendered(stage, scenario), "ConfigMap")["data"]["config.yaml"])
    config = config_module.load_config(path, stage, paths=False)
    rendered_training = yaml.safe_load(path.read_text())["Training"]
    assert config.Training.num_training_workers == rendered_training["num_training_workers"]


def test_trainer_rejects_what_the_chart_cannot_know(tmp_path: Path) -> None:
    """The generated schema checks every key and type, the chart's checks the rules across keys (chart_rules.py); a
    number given as a string (`--set x=-1e-3`: Helm reads only integers as numbers), which the schema lets through as
    a numeric string, is bounded by the trainer at start (`rlhf-jobs check-config` on the rendered file)."""
    config_module = pytest.importorskip("rlhf_jobs.core.loading")
    path = tmp_path / "config.yaml"
    objects = render("rlhf-sft", sets=("configs.sft.Training.learning_rate=-1e-3",))
    path.write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
    with pytest.raises(config_module.ConfigError, match=r"Training\.learning_rate: Input should be greater than 0"):
        config_module.load_config(path, "sft", paths=False)


# ---- issue 12/17: the stage-config schema is generated from the config models ----------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("configs.sft.Training.batch_size=-1",), "at '/configs/sft/Training/batch_size': exclusiveMinimum"),
        (("configs.sft.Training.learning_rat=1e-4",),
         "at '/configs/sft/Training': additional properties 'learning_rat' not allowed"),
        (("configs.sft.Training.epochs=two",), "at '/configs/sft/Training/epochs': got string, want integer"),
        (("configs.rm.Dataset.prompt_format=markdown",), "at '/configs/rm/Dataset/prompt_format'"),
        (("configs.ppo.Training.kl_estimator=k2",), "at '/configs/ppo/Training/kl_estimator'"),
        (("configs.ppo.Training.gamma=2",), "at '/configs/ppo/Training/gamma'"),
        (("configs.ppo.General.rm_name=null",), "at '/configs/ppo/General': missing property 'rm_name'"),
        (("configs.sft.Genral.base_model=x",), "additional properties 'Genral' not allowed"),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else None,
)
def test_bad_training_configs_fail_at_template_time(sets: tuple[str, ...], message: str) -> None:
    """Issue 17: `helm template` rendered batch_size -1, learning_rat and epochs "two" without a word."""
    error = render_error("rlhf-sft", sets=sets)
    assert "values don't meet the specifications of the schema" in error
    assert message in error, error


def test_chart_filled_paths_may_be_empty_or_null_and_numbers_may_be_strings() -> None:
    """What the chart allows, the schema allows: `output_dir: ""` and null are filled in; `--set x=0.5` is a string."""
    objects = render("rlhf-ppo", sets=("configs.ppo.General.output_dir=null", "configs.ppo.General.model_pretrain=",
                                       "configs.ppo.Training.learning_rate=2e-5"))
    general = stage_config(objects)["General"]
    assert general["output_dir"].endswith("/work/ppo") and general["model_pretrain"].endswith("/sft")


def test_values_schema_is_generated_from_the_config_models(tmp_path: Path) -> None:
    """`make schema` leaves the committed file unchanged; a stale file (a config key the models lack) is found."""
    from rlhf_jobs.core import stages
    from rlhf_jobs.tools import chart_schema

    assert chart_schema.main(["--check"]) == 0, "helm/values.schema.json is stale: run `make schema`"
    stale = yaml.safe_load((CHART / "values.schema.json").read_text())
    training = stale["$defs"]["config.PPOTraining"]["properties"]
    training["kl_coef"] = training.pop("kl_coeff")
    path = tmp_path / "values.schema.json"
    path.write_text(chart_schema.render(stale))
    assert chart_schema.main(["--check", "--schema", str(path)]) == 1
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    # Every field of every stage's config is in the schema, under the names the trainers read.
    for stage, config_type in ((name, entry.config_type) for name, entry in stages.REGISTRY.items()):
        for section, info in config_type.model_fields.items():
            if section == "stage":
                continue
            (ref,) = {v["$ref"] for k, v in _properties(schema, f"config.{stage}").items() if k == section}
            fields = _properties(schema, ref.rsplit("/", 1)[1])
            assert set(fields) == set(info.annotation.model_fields), (stage, section)


def _properties(schema: dict, name: str) -> dict:
    definition = schema["$defs"][name]
    return {key: _ref_of(value) for key, value in definition["properties"].items()}


def _ref_of(value: dict) -> dict:
    if "$ref" in value:
        return value
    for option in value.get("anyOf", []) + value.get("allOf", []):
        if "$ref" in option:
            return option
    return value


def test_default_data_paths_exist_in_the_repo() -> None:
    """The defaults point at files the image copies from the repository (examples/data)."""
    prefix = "/home/ray/rlhf-jobs/"
    if not any((REPO / "examples" / "data").glob("*.jsonl")):
        pytest.skip("examples/data has no sample data yet")
    for stage in STAGES:
        location = DEFAULTS["configs"][stage]["Dataset"]["train_file"]
        assert location.startswith(prefix)
        assert (REPO / location.removeprefix(prefix)).is_file(), location


def test_crd_validation_catches_mistakes(crd_file: Path) -> None:
    """The CRD check is not vacuous: wrong types and unknown fields (pruned or refused by the API server) fail."""
    rayjob = one(render("rlhf-sft"), "RayJob")
    bad = yaml.safe_load(yaml.safe_dump(rayjob))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resourcez"] = {}
    bad["spec"]["shutdownAfterJobFinish"] = True
    errors = "\n".join(crd_errors(bad))
    assert "rayClusterSpec.workerGroupSpecs.0.replicas: '2' is not of type 'integer'" in errors
    assert "'resourcez' was unexpected" in errors
    assert "'shutdownAfterJobFinish' was unexpected" in errors
    bad_pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "Bad_Name"},
               "spec": {"accessModes": ["RWX"], "resources": {"requests": {"storage": "lots"}}}}
    errors = "\n".join(core_errors(bad_pvc))
    assert "metadata.name: 'Bad_Name' does not match" in errors
    assert "spec.accessModes.0: 'RWX' is not one of" in errors
    assert "spec.resources.requests.storage: 'lots' does not match" in errors


# ---- issue 18: faults a real cluster would trip on ---------------------------------------------------


def make_dry_run(*args: str) -> str:
    """The commands a make target would run (`make -n`), with this repo's Makefile."""
    import subprocess

    result = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
    return result.stdout


def test_trainer_entrypoint_restarts_on_a_changed_config_by_default() -> None:
    """Fault 2: on the PVC, `<run>/work/<stage>` of an older config must be moved aside, not resumed."""
    for stage in STAGES:
        entrypoint = one(render(f"rlhf-{stage}"), "RayJob")["spec"]["entrypoint"]
        assert entrypoint == f"rlhf-jobs train {stage} --config_path {CONFIG_PATH} --on-config-change restart"
    refuse = one(render("rlhf-sft", sets=("job.onConfigChange=refuse",)), "RayJob")["spec"]["entrypoint"]
    assert refuse.endswith("--on-config-change refuse")
    assert "value must be one of 'refuse', 'restart'" in render_error("rlhf-sft", sets=("job.onConfigChange=keep",))


@pytest.mark.parametrize("stage", STAGES)
def test_gpu_scenario_runs_the_gpu_image_that_make_images_builds(stage: str) -> None:
    """Fault 3: gpu-values.yaml ran the CPU image; it must run what `make images VARIANT=gpu` tags."""
    build = make_dry_run("images", "VARIANT=gpu", "BASE_IMAGE=x")
    built = build.split(" -t ", 1)[1].split()[0]
    assert built == f"rlhf-jobs:{CHART_META['appVersion']}-gpu"
    objects = rendered(stage, CHART / "ci" / "gpu-values.yaml")
    for group, template in pod_templates(one(objects, "RayJob")).items():
        assert template["spec"]["containers"][0]["image"] == built, group
    # `make deploy-* HELM_VALUES=helm/ci/gpu-values.yaml` sets image.tag; the variant still applies.
    objects = render("rlhf-sft", (CHART / "ci" / "gpu-values.yaml",), ("image.tag=0.2.0",))
    assert pod_templates(one(objects, "RayJob"))["head"]["spec"]["containers"][0]["image"] == "rlhf-jobs:0.2.0-gpu"


@pytest.mark.parametrize("run", ["default", "exp1"])
@pytest.mark.parametrize("stage", STAGES)
def test_make_deploy_names_releases_like_the_submitter(stage: str, run: str) -> None:
    """Fault 4: `make deploy-sft RUN=exp1` and `make pipeline RUN=exp1` must manage the same release."""
    from rlhf_jobs.pipeline.backends.helm import release_name

    commands = make_dry_run(f"deploy-{stage}", f"RUN={run}")
    helm_line = next(line for line in commands.splitlines() if "upgrade --install" in line)
    assert helm_line.split("upgrade --install ", 1)[1].split()[0] == release_name(stage, run)


def kuberay_head_service_selector(service: str, rayjob: dict, cluster: str) -> dict[str, str]:
    """The selector KubeRay 1.7.0 gives a head Service (common/service.go BuildServiceForHeadPod): its default
    head labels, each overridden by the head pod's label of that key. The RayCluster controller passes the
    head pod template's labels; the RayJob controller's own `<rayjob>-head-svc` passes none."""
    defaults = {"ray.io/cluster": cluster, "ray.io/node-type": "head", "ray.io/identifier": f"{cluster}-head",
                "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    if service == f"{cluster}-head-svc":
        labels = pod_templates(rayjob)["head"]["metadata"]["labels"]
        return {key: labels.get(key, value) for key, value in defaults.items()}
    assert service == f"{rayjob['metadata']['name']}-head-svc", service
    return defaults


def test_port_forward_in_notes_selects_the_head_pod() -> None:
    """Fault 5: NOTES.txt's port-forward must name a Service whose selector matches the head pod."""
    import re

    out = helm("install", "rlhf-sft", str(CHART), "--dry-run=client", "--namespace", "ml")
    notes = out.split("NOTES:", 1)[1]
    rayjob = one(render("rlhf-sft", namespace="ml"), "RayJob")
    cluster = "rlhf-sft-x7k2p"  # status.rayClusterName: the RayJob's name plus a random suffix
    line = next(line for line in notes.splitlines() if "kubectl port-forward" in line)
    service = re.search(r"svc/(.+?-head-svc)", line).group(1)
    service = service.replace("$(kubectl get rayjob rlhf-sft -n ml -o jsonpath='{.status.rayClusterName}')", cluster)
    head_pod = {**pod_templates(rayjob)["head"]["metadata"]["labels"], "ray.io/cluster": cluster,
                "ray.io/node-type": "head", "ray.io/identifier": f"{cluster}-head",
                "app.kubernetes.io/created-by": "kuberay-operator"}
    selector = kuberay_head_service_selector(service, rayjob, cluster)
    assert selector.items() <= head_pod.items(), f"{service} selects {selector}; the head pod has {head_pod}"
    assert "rayClusterName" in line


@pytest.mark.parametrize("mode", ["K8sJobMode", "HTTPMode"])
def test_submitter_mounts_neither_the_pvc_nor_the_config(mode: str) -> None:
    """Risk: a ReadWriteOnce PVC mounted by a submitter pod on another node is a Multi-Attach error."""
    rayjob = one(render("rlhf-sft", sets=(f"job.submissionMode={mode}",)), "RayJob")
    submitter = rayjob["spec"].get("submitterPodTemplate")
    if mode == "HTTPMode":
        assert submitter is None
        return
    spec = submitter["spec"]
    assert "volumes" not in spec and "volumeMounts" not in spec["containers"][0], dumps(spec)


def test_long_runs_default_to_http_mode() -> None:
    """Long runs: HTTPMode has no `ray job logs --follow` stream whose drop fails a running job (KubeRay #4921)."""
    spec = one(render("rlhf-sft"), "RayJob")["spec"]
    assert spec["submissionMode"] == "HTTPMode"
    assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec
    gpu = one(rendered("sft", CHART / "ci" / "gpu-values.yaml"), "RayJob")["spec"]
    assert gpu["submissionMode"] == "HTTPMode" and gpu["backoffLimit"] >= 1


# ---- issue 11 item 5: the chart's stage configs are configs/local's, outside resources and paths ------

# Keys that may differ between a laptop's config and the chart's: where files are, and what each worker gets.
MAY_DIFFER = {"General": None, "Dataset": {"train_file", "validation_file"},
              "Training": {"num_training_workers", "resources_per_worker"}}


@pytest.mark.parametrize("stage", STAGES)
def test_chart_configs_equal_configs_local_outside_resources_and_paths(stage: str) -> None:
    local = yaml.safe_load((REPO / "configs" / "local" / f"{stage}.yaml").read_text())
    chart = DEFAULTS["configs"][stage]
    for section, allowed in MAY_DIFFER.items():
        if allowed is None:
            continue
        mine = {k: v for k, v in chart.get(section, {}).items() if k not in allowed}
        theirs = {k: v for k, v in local.get(section, {}).items() if k not in allowed}
        assert mine == theirs, f"configs.{stage}.{section} in helm/values.yaml drifted from configs/local/{stage}.yaml"
    assert set(chart) == set(local)


# ---- issue 16 (chart side): object storage, credentials, trackers, preemption -------------------------


def _containers(objects: list[dict]) -> dict[str, dict]:
    templates = pod_templates(one(objects, "RayJob"))
    return {group: template["spec"]["containers"][0] for group, template in templates.items()}


def test_remote_storage_fills_paths_there_and_needs_no_pvc(crd_file: Path) -> None:
    sets = ("run=exp3", "storage.remote=s3://bucket/rlhf/", "storage.credentialsSecret=s3-creds",
            "storage.endpointURL=http://minio.minio:9000", "storage.region=eu-west-1")
    for stage in STAGES:
        objects = render(f"rlhf-{stage}", sets=sets)
        assert "PersistentVolumeClaim" not in by_kind(objects), stage
        general = stage_config(objects)["General"]
        assert general["checkpoint_dir"] == f"s3://bucket/rlhf/exp3/{stage}"
        assert general["output_dir"] == f"s3://bucket/rlhf/exp3/work/{stage}"
        if stage == "ppo":
            assert (general["model_pretrain"], general["rm_pretrain"]) == ("s3://bucket/rlhf/exp3/sft",
                                                                           "s3://bucket/rlhf/exp3/rm")
        for group, template in pod_templates(one(objects, "RayJob")).items():
            assert "checkpoints" not in {v["name"] for v in template["spec"]["volumes"]}, group
            container = template["spec"]["containers"][0]
            assert {"secretRef": {"name": "s3-creds"}} in container["envFrom"], group
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["AWS_ENDPOINT_URL"] == "http://minio.minio:9000" and env["AWS_REGION"] == "eu-west-1"
        configmap = one(objects, "ConfigMap")["data"]["config.yaml"]
        assert "AWS_" not in configmap and "s3-creds" not in configmap, "credentials never go into the ConfigMap"
        assert not crd_errors(one(objects, "RayJob"))
    set_args = [arg for item in sets for arg in ("--set", item)]
    assert "no PVC" in helm("install", "rlhf-sft", str(CHART), "--dry-run=client", *set_args)
    # An existing claim may still be mounted (e.g. datasets on a volume) beside remote checkpoints.
    objects = render("rlhf-sft", sets=(*sets, "storage.existingClaim=data"))
    assert "checkpoints" in {v["name"] for v in pod_templates(one(objects, "RayJob"))["head"]["spec"]["volumes"]}


def test_trackers_from_values_and_secrets(crd_file: Path) -> None:
    objects = render("rlhf-rm", sets=(
        "tracking.mlflow.trackingURI=http://mlflow.mlflow:5000", "tracking.mlflow.experimentName=rlhf",
        "tracking.mlflow.credentialsSecret=mlflow-creds", "tracking.wandb.project=rlhf", "tracking.wandb.entity=team",
        "tracking.wandb.mode=offline", "tracking.wandb.apiKeySecret=wandb-key", "envFrom[0].secretRef.name=hf-token"))
    for group, container in _containers(objects).items():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow:5000" and env["MLFLOW_EXPERIMENT_NAME"] == "rlhf"
        assert (env["WANDB_PROJECT"], env["WANDB_ENTITY"], env["WANDB_MODE"]) == ("rlhf", "team", "offline")
        assert [f["secretRef"]["name"] for f in container["envFrom"]] == ["mlflow-creds", "wandb-key", "hf-token"]
        assert "WANDB_API_KEY" not in env and "MLFLOW_TRACKING_PASSWORD" not in env, group
    # None of it by default.
    for container in _containers(render("rlhf-rm")).values():
        assert not {e["name"] for e in container["env"]} & {"MLFLOW_TRACKING_URI", "WANDB_PROJECT", "AWS_REGION"}
        assert "envFrom" not in container
    assert not crd_errors(one(objects, "RayJob"))
    assert "at '/tracking/wandb/mode'" in render_error("rlhf-rm", sets=("tracking.wandb.mode=sometimes",))


def test_preemption_grace_period_and_drain_on_stop(crd_file: Path) -> None:
    objects = render("rlhf-ppo", sets=("preemption.terminationGracePeriodSeconds=900",))
    templates = pod_templates(one(objects, "RayJob"))
    assert templates["head"]["spec"]["terminationGracePeriodSeconds"] == 900
    assert templates["worker"]["spec"]["terminationGracePeriodSeconds"] == 900
    command = templates["worker"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["python", "-m", "rlhf_jobs.engine.preemption", "--drain", "--wait", "890", "--deadline", "900"]
    # Head: the preStop hook stops the driver after its step (grace period less 10 s), and `ray job stop` waits
    # the grace period before SIGKILL; workers run no driver, so neither is set there.
    head = templates["head"]["spec"]["containers"][0]
    assert head["lifecycle"]["preStop"]["exec"]["command"] == [
        "python", "-m", "rlhf_jobs.engine.preemption", "--wait", "890"]
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": "900"} in head["env"]
    worker_env = {e["name"] for e in templates["worker"]["spec"]["containers"][0]["env"]}
    assert "RAY_JOB_STOP_WAIT_TIME_S" not in worker_env
    assert not crd_errors(one(objects, "RayJob"))
    defaults = pod_templates(one(render("rlhf-ppo"), "RayJob"))
    default = defaults["worker"]["spec"]
    grace = DEFAULTS["preemption"]["terminationGracePeriodSeconds"]
    assert default["terminationGracePeriodSeconds"] == grace > 30
    head = defaults["head"]["spec"]["containers"][0]
    assert head["lifecycle"]["preStop"]["exec"]["command"][-2:] == ["--wait", str(grace - 10)]
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(grace)} in head["env"]
    off = pod_templates(one(render("rlhf-ppo", sets=("preemption.drainOnStop=false",)), "RayJob"))["worker"]
    assert "lifecycle" not in off["spec"]["containers"][0]
    off = pod_templates(one(render("rlhf-ppo", sets=("preemption.stopDriverOnStop=false",)), "RayJob"))["head"]
    assert "lifecycle" not in off["spec"]["containers"][0]
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(grace)} in off["spec"]["containers"][0]["env"]
    # The user's `env` comes later, so it may override the wait (Kubernetes keeps the last of a name).
    head_env = pod_templates(one(render("rlhf-ppo", sets=("env[0].name=RAY_JOB_STOP_WAIT_TIME_S", "env[0].value=60")),
                                 "RayJob"))["head"]["spec"]["containers"][0]["env"]
    assert [e["value"] for e in head_env if e["name"] == "RAY_JOB_STOP_WAIT_TIME_S"][-1] == "60"
    assert "minimum: got 10, want 30" in render_error("rlhf-ppo", sets=("preemption.terminationGracePeriodSeconds=10",))


def test_head_pre_stop_is_the_preemption_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's preStop command is `python -m rlhf_jobs.engine.preemption` with arguments its parser takes: with no
    driver registered in the pod (a finished job's cluster) it returns 0 at once."""
    import time

    from rlhf_jobs.engine import preemption

    command = pod_templates(one(render("rlhf-sft"), "RayJob"))["head"]["spec"]["containers"][0]["lifecycle"]
    argv = command["preStop"]["exec"]["command"]
    assert argv[:3] == ["python", "-m", preemption.__name__]
    monkeypatch.setenv(preemption.PID_DIR_ENV, str(tmp_path))
    started = time.monotonic()
    assert preemption.main(argv[3:]) == 0
    assert time.monotonic() - started < 5


def test_worker_pre_stop_is_the_preemption_cli_with_drain() -> None:
    """Issue 28 item 3: the worker preStop is `python -m rlhf_jobs.engine.preemption --drain ...`
    (tests/test_preemption.py runs it against a real Ray cluster), not `ray drain-node` without a node id, whose
    errors went to /dev/null; its arguments parse with the module's own parser (test_preemption.WORKER_PRE_STOP is
    this command)."""
    from rlhf_jobs.engine import preemption

    lifecycle = pod_templates(one(render("rlhf-sft"), "RayJob"))["worker"]["spec"]["containers"][0]["lifecycle"]
    argv = lifecycle["preStop"]["exec"]["command"]
    assert argv == ["python", "-m", "rlhf_jobs.engine.preemption", "--drain", "--wait", "290", "--deadline", "300"]
    assert argv[:3] == ["python", "-m", preemption.__name__]
    args = preemption.build_parser().parse_args(argv[3:])
    grace = DEFAULTS["preemption"]["terminationGracePeriodSeconds"]
    assert args.drain and (args.wait, args.deadline, args.node_id) == (grace - 10, grace, None)


def test_python_modules_are_named_in_one_place() -> None:
    """Every `python -m rlhf_jobs.<module>` the pods run comes from one helper: moving a module is a one-line edit."""
    import re

    templates = "\n".join(path.read_text() for path in (CHART / "templates").iterdir())
    assert re.findall(r"rlhf_jobs\.[a-z_.]+", templates) == ["rlhf_jobs.engine.preemption"], "name the module once"


# ---- issue 18: where the KubeRay CRDs come from, and helm's minimum version ------------------------------


def test_crds_fetched_from_the_operator_chart_into_a_cache(tmp_path: Path) -> None:
    """A user's clone has no ../shared/kuberay: the CRDs come from the operator chart's crds/, cached once."""
    from chart_helpers import fetch_crds

    source = shared_crds_or_skip()
    pulls = []

    def fake_pull(destination: Path, version: str) -> None:  # what `helm pull --untar` leaves
        pulls.append(version)
        crds = destination / "kuberay-operator" / "crds"
        crds.mkdir(parents=True)
        (crds / "ray.io_rayjobs.yaml").write_text((source / RAYJOB_CRD_FILE).read_text())
        (crds / "ray.io_rayclusters.yaml").write_text("kind: CustomResourceDefinition\n")

    cache = tmp_path / "kuberay-1.7.0"
    assert fetch_crds(cache, pull=fake_pull) == cache
    assert fetch_crds(cache, pull=fake_pull) == cache
    assert pulls == [KUBERAY_VERSION], "pulled once, then read from the cache"
    assert sorted(p.name for p in cache.iterdir()) == ["crd-rayclusters.ray.io.yaml", RAYJOB_CRD_FILE]
    with pytest.raises(FileNotFoundError, match=r"no crds/ray\.io_rayjobs\.yaml"):
        fetch_crds(tmp_path / "empty", pull=lambda destination, version: None)


def shared_crds_or_skip() -> Path:
    from chart_helpers import DEFAULT_CRD_DIR

    if not (DEFAULT_CRD_DIR / RAYJOB_CRD_FILE).is_file():
        pytest.skip("needs a CRD to copy from ../shared/kuberay")
    return DEFAULT_CRD_DIR


def _fake_helm(tmp_path: Path, version: str) -> str:
    binary = tmp_path / f"helm-{version}"
    binary.write_text(f"#!/bin/sh\necho {version}\n")
    binary.chmod(0o755)
    return str(binary)


@pytest.mark.parametrize(
    ("version", "ok"), [("v3.9.4", False), ("v3.10.3", False), ("v3.11.0", True), ("v4.1.4", True)])
def test_helm_minimum_version_is_checked(tmp_path: Path, version: str, ok: bool) -> None:
    from rlhf_jobs.pipeline.backends.helm import MIN_VERSION, Helm, HelmError

    assert MIN_VERSION == (3, 11, 0)  # --set-json (3.10); helm template's default Kubernetes 1.26 (3.11)
    helm_cli = Helm(binary=_fake_helm(tmp_path, version))
    if ok:
        helm_cli.check_version()
    else:
        plain = version.lstrip("v")
        expected = rf"helm-{version} {plain} is too old: rlhf-jobs needs Helm 3\.11\.0 or later"
        with pytest.raises(HelmError, match=expected):
            helm_cli.check_version()


def test_dry_run_says_it_needs_helm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--dry-run` needs no cluster, but it renders with helm: the message says so."""
    from rlhf_jobs.cli import main
    from rlhf_jobs.pipeline.backends import helm as helm_module

    original = helm_module.Helm.__init__

    def no_helm(self, chart=None, binary="helm"):
        original(self, chart, binary="no-such-helm-binary")

    helm_module.Helm.__init__ = no_helm
    try:
        assert main(["pipeline", "--backend", "kuberay", "--dry-run"]) == 2
    finally:
        helm_module.Helm.__init__ = original
    error = capsys.readouterr().err
    assert "not found on PATH: the kuberay backend renders the chart with Helm, even for --dry-run" in error


# ---- issue 12 (chart side): the stage registry, generated into the chart ------------------------------


def test_stage_file_is_generated_from_the_registry(tmp_path: Path) -> None:
    """helm/files/stages.json is the registry's stages in pipeline order with their inputs, and the schema's `stage`
    enum lists them; `make schema` leaves both as they are, and a stale stage file is found."""
    import json

    from rlhf_jobs.core import stages
    from rlhf_jobs.tools import chart_schema

    assert chart_schema.main(["--check"]) == 0, "helm/files/stages.json or values.schema.json is stale: make schema"
    written = json.loads(STAGES_FILE.read_text())
    assert [entry["name"] for entry in written["stages"]] == list(stages.NAMES) == list(STAGES)
    assert {entry["name"]: entry["inputs"] for entry in written["stages"]} == {
        name: dict(stage.inputs) for name, stage in stages.REGISTRY.items()}
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["stage"]["enum"] == ["", *stages.NAMES]
    stale = json.loads(STAGES_FILE.read_text())
    stale["stages"][-1]["inputs"].pop(next(iter(stale["stages"][-1]["inputs"])))
    path = tmp_path / "stages.json"
    path.write_text(chart_schema.render(stale))
    assert chart_schema.main(["--check", "--stages", str(path)]) == 1
    assert chart_schema.main(["--check", "--stages", str(tmp_path / "missing.json")]) == 1


def _chart_with_stages(tmp_path: Path, entries: list[dict]) -> Path:
    """A copy of the chart whose stage file lists `entries`."""
    import json
    import shutil

    chart = tmp_path / "helm"
    shutil.copytree(CHART, chart)
    (chart / "files" / "stages.json").write_text(json.dumps({"stages": entries}))
    return chart


def _template(chart: Path, release: str, *sets: str) -> list[dict]:
    args = ["template", release, str(chart), "--namespace", "rlhf"]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def test_templates_take_stages_and_chaining_from_the_stage_file(tmp_path: Path) -> None:
    """Nothing in the templates names a stage: one more stage in the stage file gets its release-name suffix, its
    inputs filled from the earlier stages, the next-stage line after the last; the first stage creates the PVC."""
    registry = json.loads(STAGES_FILE.read_text())["stages"]
    chart = _chart_with_stages(tmp_path / "more", [*registry, {"name": "kto", "inputs": {"model_pretrain": "sft"}}])
    objects = _template(chart, "rlhf-kto", "run=exp1")
    rayjob = one(objects, "RayJob")
    assert rayjob["spec"]["entrypoint"].startswith("rlhf-jobs train kto --config_path ")
    assert rayjob["metadata"]["labels"]["rlhf-jobs.io/stage"] == "kto"
    assert stage_config(objects)["General"] == {"checkpoint_dir": "/mnt/rlhf/exp1/kto",
                                                "output_dir": "/mnt/rlhf/exp1/work/kto",
                                                "model_pretrain": "/mnt/rlhf/exp1/sft"}
    assert "PersistentVolumeClaim" not in by_kind(objects)
    notes = helm("install", f"rlhf-{registry[-1]['name']}", str(chart), "--dry-run=client", "--namespace",
                 "rlhf").split("NOTES:", 1)[1]
    assert "Next stage: helm install rlhf-kto ./helm -n rlhf --set run=default" in notes
    try:
        _template(chart, "trainer")
        raise AssertionError("rendered without a stage")
    except HelmError as err:
        names = [entry["name"] for entry in registry]
        listed = ", ".join(f"-{name}" for name in names)
        assert f'the release name "trainer" does not end in {listed} or -kto' in str(err)
        assert f"--set stage={'|'.join(names)}|kto" in str(err)

    # Another order and no chaining: the first stage's release creates the PVC, PPO's inputs stay as values say.
    reordered = [{**entry, "inputs": {}} for entry in (registry[1], registry[0], *registry[2:])]
    chart = _chart_with_stages(tmp_path / "reordered", reordered)
    assert one(_template(chart, f"rlhf-{reordered[0]['name']}"), "PersistentVolumeClaim")
    assert "PersistentVolumeClaim" not in by_kind(_template(chart, "rlhf-sft"))
    general = stage_config(_template(chart, "rlhf-ppo"))["General"]
    assert general["model_pretrain"] == DEFAULTS["configs"]["ppo"]["General"]["model_pretrain"]

    (chart / "files" / "stages.json").unlink()
    try:
        _template(chart, "rlhf-sft")
        raise AssertionError("rendered without files/stages.json")
    except HelmError as err:
        assert "the chart has no files/stages.json (the stage registry): run `make schema`" in str(err)


def test_report_to_may_be_one_name_as_the_trainer_reads_it(tmp_path: Path) -> None:
    """`report_to: none` is what the trainers take (one name or a list); the generated schema refused it."""
    config_module = pytest.importorskip("rlhf_jobs.core.loading")
    path = tmp_path / "config.yaml"
    path.write_text(one(render("rlhf-sft", sets=("configs.sft.Training.report_to=none",)), "ConfigMap")["data"][
        "config.yaml"])
    assert config_module.load_config(path, "sft", paths=False).Training.report_to == ["none"]
    for bad in ("configs.sft.Training.report_to=neptune", "configs.sft.Training.report_to={tensorboard,neptune}"):
        assert "at '/configs/sft/Training/report_to'" in render_error("rlhf-sft", sets=(bad,))


# ---- issue 14 (chart side): FSDP on Kubernetes ----------------------------------------------------------

FSDP_SCENARIO = CHART / "ci" / "gpu-fsdp-values.yaml"


@pytest.mark.parametrize("stage", STAGES)
def test_gpu_fsdp_scenario(stage: str) -> None:
    """One Ray Train worker per GPU, several of them, all mounting read-write the one ReadWriteMany claim where every
    rank writes its checkpoint shard (output_dir/checkpoints/step-N/), /dev/shm of 16Gi."""
    objects = rendered(stage, FSDP_SCENARIO)
    config = stage_config(objects)
    training = config["Training"]
    assert (training["strategy"], training["mixed_precision"], training["gradient_checkpointing"]) == (
        "fsdp", "bf16", True)
    assert training["num_training_workers"] > 1 and training["resources_per_worker"]["GPU"] == 1
    rayjob = one(objects, "RayJob")
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == training["num_training_workers"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["rayStartParams"]["num-gpus"] == "1"  # so Ray places exactly one worker, one NCCL rank, per GPU
    values = values_of(FSDP_SCENARIO)
    assert config["General"]["output_dir"].startswith(values["storage"]["mountPath"] + "/")
    for name, template in pod_templates(rayjob).items():
        spec = template["spec"]
        (container,) = spec["containers"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "rlhf-default-checkpoints", name
        assert not volumes["checkpoints"]["persistentVolumeClaim"].get("readOnly"), name
        assert mounts["checkpoints"] == {"name": "checkpoints", "mountPath": values["storage"]["mountPath"]}, name
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}, name
        assert container["image"].endswith("-gpu"), name
    if stage == STAGES[0]:
        assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    if stage == "ppo":
        assert training["lora"]["target_modules"] == "all-linear"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
def test_shm_leaves_room_in_the_worker_memory_limit(scenario: Path | None) -> None:
    """A memory-backed /dev/shm counts against the container's memory limit: it must be well below it."""
    config_module = pytest.importorskip("rlhf_jobs.core.config")
    values = values_of(scenario)
    for stage in STAGES:
        memory = values["configs"][stage]["Training"]["resources_per_worker"].get("memory")
        if memory is None or not values["shm"]["enabled"]:
            continue
        shm, limit = (config_module.memory_bytes(q) for q in (values["shm"]["sizeLimit"], memory))
        assert shm <= limit / 2, f"{stage}: shm.sizeLimit {values['shm']['sizeLimit']} of a {memory} worker"


def _values_file(tmp_path: Path, name: str, values: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _term(match_labels: dict | None = None, **fields: object) -> dict:
    """A pod affinity term on kubernetes.io/hostname selecting the worker pods (or `match_labels`)."""
    selector = {"matchLabels": match_labels if match_labels is not None else {"app.kubernetes.io/component": "worker"}}
    return {"topologyKey": "kubernetes.io/hostname", "labelSelector": selector, **fields}


def _anti_affinity(match_labels: dict | None = None, **fields: object) -> dict:
    """worker.affinity with one required anti-affinity term."""
    term = _term(match_labels, **fields)
    return {"worker": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}}


def test_storage_that_the_pods_cannot_share_fails(tmp_path: Path) -> None:
    """ReadWriteOncePod (one pod) and ReadWriteOnce with workers forced onto separate nodes cannot hold a run whose
    head and workers all write to the volume: refused at template time, not pods Pending or ContainerCreating."""
    message = render_error("rlhf-sft", sets=("storage.accessModes[0]=ReadWriteOncePod",))
    assert "storage.accessModes [ReadWriteOncePod] lets one pod mount the run's PVC, and the head and the 2" in message
    spread = _values_file(tmp_path, "spread", _anti_affinity())
    message = render_error("rlhf-sft", (spread,), ("configs.sft.Training.num_training_workers=4",))
    assert "storage.accessModes [ReadWriteOnce] is mounted by one node at a time" in message
    assert "puts the 4 workers on 4 nodes" in message
    # The shared `affinity` applies to the workers too (when worker.affinity is empty).
    shared = _values_file(tmp_path, "shared", {"affinity": _anti_affinity()["worker"]["affinity"]})
    assert "one node at a time" in render_error("rlhf-rm", (shared,))
    # The FSDP scenario with its ReadWriteMany volume swapped for ReadWriteOnce, workers one per node.
    fsdp_rwo = _values_file(tmp_path, "fsdp-rwo", {**_anti_affinity(), "storage": {"accessModes": ["ReadWriteOnce"]}})
    assert "puts the 8 workers on 8 nodes" in render_error("rlhf-ppo", (FSDP_SCENARIO, fsdp_rwo))
    assert one(render("rlhf-ppo", (FSDP_SCENARIO,)), "RayJob")


@pytest.mark.parametrize(
    ("name", "values", "sets"),
    [
        ("rwx", _anti_affinity(), ("storage.accessModes[0]=ReadWriteMany",)),
        ("one-worker", _anti_affinity(), ("configs.sft.Training.num_training_workers=1",)),
        ("existing-claim", _anti_affinity(), ("storage.existingClaim=mine",)),
        ("remote", _anti_affinity(), ("storage.remote=s3://bucket/rlhf",)),
        ("other-pods", _anti_affinity({"app": "other"}), ()),
        ("other-run", _anti_affinity({"rlhf-jobs.io/run": "exp2"}), ()),
        ("expressions", _anti_affinity({}, labelSelector={"matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["worker"]}]}), ()),
        ("other-namespace", _anti_affinity(namespaces=["elsewhere"]), ()),
        ("zone", _anti_affinity(topologyKey="topology.kubernetes.io/zone"), ()),
        ("preferred", {"worker": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": _term()}]}}}}, ()),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_storage_check_gives_no_verdict_where_the_pods_may_share_the_volume(
    tmp_path: Path, name: str, values: dict, sets: tuple[str, ...]
) -> None:
    """ReadWriteMany, one worker, a claim the chart does not describe, object storage, anti-affinity that selects other
    pods, in other namespaces or over wider topologies, expressions it does not interpret, preferences: all render."""
    one(render("rlhf-sft", (_values_file(tmp_path, name, values),), sets), "RayJob")


def test_fsdp_on_object_storage_with_a_cache_volume(tmp_path: Path, crd_file: Path) -> None:
    """helm/README's recipe: storage.remote (each pod uploads its shards from a local mirror) and the mirror and model
    cache ($RLHF_JOBS_CACHE_DIR) on a size-limited emptyDir rather than the container's writable layer."""
    recipe = CHART / "README.md"
    block = recipe.read_text().split("  ```yaml\n  cache:\n", 1)[1].split("  ```\n", 1)[0]
    values = yaml.safe_load("cache:\n" + "\n".join(line.removeprefix("  ") for line in block.splitlines()))
    values["storage"] = {"remote": "s3://bucket/rlhf", "credentialsSecret": "rlhf-s3"}
    objects = render("rlhf-ppo", (FSDP_SCENARIO, _values_file(tmp_path, "cache", values)))
    assert "PersistentVolumeClaim" not in by_kind(objects)
    assert stage_config(objects)["General"]["output_dir"] == "s3://bucket/rlhf/default/work/ppo"
    rayjob = one(objects, "RayJob")
    worker = pod_templates(rayjob)["worker"]["spec"]
    (container,) = worker["containers"]
    cache = next(mount for mount in container["volumeMounts"] if mount["name"] == "cache")
    assert {"name": "RLHF_JOBS_CACHE_DIR", "value": cache["mountPath"]} in container["env"]
    assert next(v for v in worker["volumes"] if v["name"] == "cache")["emptyDir"]["sizeLimit"]
    assert not crd_errors(rayjob)


# ---- chart follow-ups to issue 16: the head's preStop and stop wait, the cache volume ----------------------------


def test_cache_volume_values(crd_file: Path) -> None:
    """$RLHF_JOBS_CACHE_DIR (storage.py's mirror and model cache) is an emptyDir mounted in the head and worker pods,
    never in the submitter; it can be moved, size-limited or turned off."""
    objects = render("rlhf-rm", sets=("cache.mountPath=/scratch/rlhf", "cache.sizeLimit=50Gi",
                                      "job.submissionMode=K8sJobMode"))
    rayjob = one(objects, "RayJob")
    templates = pod_templates(rayjob)
    for group in ("head", "worker"):
        spec = templates[group]["spec"]
        (container,) = spec["containers"]
        assert {"name": "cache", "mountPath": "/scratch/rlhf"} in container["volumeMounts"], group
        assert {"name": "cache", "emptyDir": {"sizeLimit": "50Gi"}} in spec["volumes"], group
        assert {"name": "RLHF_JOBS_CACHE_DIR", "value": "/scratch/rlhf"} in container["env"], group
    submitter = templates["submitter"]["spec"]
    assert "volumes" not in submitter and "RLHF_JOBS_CACHE_DIR" not in dumps(submitter)
    assert not crd_errors(rayjob)
    default = pod_templates(one(render("rlhf-rm"), "RayJob"))["worker"]["spec"]
    assert {"name": "cache", "emptyDir": {}} in default["volumes"]  # no size limit unless asked
    off = one(render("rlhf-rm", sets=("cache.enabled=false",)), "RayJob")
    assert "RLHF_JOBS_CACHE_DIR" not in dumps(off) and "cache" not in dumps(off)
    assert not crd_errors(off)
    # The recipe this replaces (extraVolumes + extraVolumeMounts named `cache`) would make a duplicate volume, which
    # the API server rejects only when KubeRay creates the pods: refused at install time instead.
    assert "name a volume `cache`" in render_error("rlhf-rm", sets=("extraVolumes[0].name=cache",
                                                                      "extraVolumes[0].emptyDir.sizeLimit=1Gi"))
    one(render("rlhf-rm", sets=("cache.enabled=false", "extraVolumes[0].name=cache",
                                "extraVolumes[0].emptyDir.sizeLimit=1Gi")), "RayJob")
    assert "at '/cache/sizeLimit'" in render_error("rlhf-rm", sets=("cache.sizeLimit=lots",))
    assert "at '/cache/mountPath'" in render_error("rlhf-rm", sets=("cache.mountPath=relative",))


# ---- issue 28 item 4: a ReadWriteOnce volume on a multi-node cluster ------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In/NotIn/Exists/DoesNotExist) on `labels`."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def _colocation_terms(template: dict) -> list[dict]:
    affinity = template["spec"].get("affinity", {})
    return affinity.get("podAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])


def test_read_write_once_volume_puts_the_runs_pods_on_one_node(tmp_path: Path, crd_file: Path) -> None:
    """The default ReadWriteOnce PVC with no affinity let the head and workers land on several nodes: Multi-Attach,
    pods stuck in ContainerCreating. Now every stage's head and workers of a run carry a required pod affinity on the
    run label and kubernetes.io/hostname (the first pod goes anywhere, the rest follow it); the runner and other runs'
    pods are not selected, the submitter (no volume) is free, and a user's own affinity is kept."""
    from rlhf_jobs.pipeline.backends import runner

    objects = {stage: render(f"rlhf-{stage}", sets=("run=exp1", "job.submissionMode=K8sJobMode")) for stage in STAGES}
    pods = {(stage, group): template for stage, rendered_objects in objects.items()
            for group, template in pod_templates(one(rendered_objects, "RayJob")).items()}
    other_run = pod_templates(one(render("rlhf-sft", sets=("run=exp2",)), "RayJob"))["worker"]
    _, runner_job = runner.manifests("rlhf", "exp1", "img", {})
    for (stage, group), template in pods.items():
        terms = _colocation_terms(template)
        if group == "submitter":
            assert terms == [], "the submitter mounts no volume"
            continue
        (term,) = terms
        assert term["topologyKey"] == "kubernetes.io/hostname"
        ray_pods = [(key, other) for key, other in pods.items() if key[1] != "submitter"]
        assert all(_selects(term["labelSelector"], other["metadata"]["labels"]) for _, other in ray_pods), stage
        assert not _selects(term["labelSelector"], pods[(stage, "submitter")]["metadata"]["labels"])
        assert not _selects(term["labelSelector"], runner_job["spec"]["template"]["metadata"]["labels"])
        assert not _selects(term["labelSelector"], other_run["metadata"]["labels"])
    for rendered_objects in objects.values():
        assert not crd_errors(one(rendered_objects, "RayJob"))
    # A user's affinity is kept, the term added to it.
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
    worker = pod_templates(one(render("rlhf-sft", (_values_file(tmp_path, "mine", {"worker": {"affinity": mine}}),)),
                               "RayJob"))["worker"]
    assert worker["spec"]["affinity"]["nodeAffinity"] == mine["nodeAffinity"] and len(_colocation_terms(worker)) == 1


@pytest.mark.parametrize(("sets", "colocated"), [
    (("storage.accessModes[0]=ReadWriteMany",), False),
    (("storage.accessModes={ReadWriteOnce,ReadWriteMany}",), False),
    (("storage.existingClaim=team",), False),  # its access modes are not visible to the chart
    (("storage.existingClaim=team", "storage.colocatePods=true"), True),
    (("storage.colocatePods=false",), False),
    (("storage.remote=s3://bucket/rlhf",), False),
    (("storage.remote=s3://bucket/rlhf", "storage.colocatePods=true"), False),  # no PVC mounted
], ids=["rwx", "rwo+rwx", "existing", "existing-forced", "off", "remote", "remote-forced"])
def test_colocation_only_where_a_read_write_once_volume_needs_it(sets: tuple[str, ...], colocated: bool) -> None:
    templates = pod_templates(one(render("rlhf-sft", sets=sets), "RayJob"))
    assert bool(_colocation_terms(templates["worker"])) == bool(_colocation_terms(templates["head"])) == colocated


def test_pre_running_deadline_and_access_modes_without_write(crd_file: Path) -> None:
    """KubeRay 1.7's preRunningDeadlineSeconds fails a RayJob whose pods never start (Helm users had no deadline at
    all); an access-mode list with no write mode cannot hold checkpoints and fails at install time."""
    rayjob = one(render("rlhf-sft", sets=("job.preRunningDeadlineSeconds=900",)), "RayJob")
    assert rayjob["spec"]["preRunningDeadlineSeconds"] == 900 and not crd_errors(rayjob)
    assert "preRunningDeadlineSeconds" not in one(render("rlhf-sft"), "RayJob")["spec"]
    assert "at '/job/preRunningDeadlineSeconds'" in render_error("rlhf-sft", sets=("job.preRunningDeadlineSeconds=0",))
    message = render_error("rlhf-sft", sets=("storage.accessModes[0]=ReadOnlyMany",))
    assert "storage.accessModes [ReadOnlyMany] has no write mode" in message
    one(render("rlhf-sft", sets=("storage.accessModes[0]=ReadOnlyMany", "storage.existingClaim=data")), "RayJob")


# ---- issue 28 item 6: for clusters where an eviction is not a reason to stop ---------------------------------------


def test_eviction_protection_is_offered_and_off_by_default(crd_file: Path) -> None:
    """A PodDisruptionBudget with maxUnavailable 0 over the stage's head and worker pods (not the submitter, not
    another release's pods), and the autoscalers' do-not-evict annotations on them; neither by default."""
    sets = ("evictionProtection.podDisruptionBudget=true", "evictionProtection.doNotEvictAnnotations=true",
            "job.submissionMode=K8sJobMode")
    objects = render("rlhf-rm", sets=sets)
    budget = one(objects, "PodDisruptionBudget")
    assert not core_errors(budget) and budget["spec"]["maxUnavailable"] == 0
    templates = pod_templates(one(objects, "RayJob"))
    selector = budget["spec"]["selector"]
    assert _selects(selector, templates["head"]["metadata"]["labels"])
    assert _selects(selector, templates["worker"]["metadata"]["labels"])
    assert not _selects(selector, templates["submitter"]["metadata"]["labels"])
    other = pod_templates(one(render("rlhf-sft", sets=sets), "RayJob"))["worker"]
    assert not _selects(selector, other["metadata"]["labels"]), "another stage's pods are its own release's business"
    for group in ("head", "worker"):
        annotations = templates[group]["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert "annotations" not in templates["submitter"]["metadata"]
    assert not crd_errors(one(objects, "RayJob"))
    default = render("rlhf-rm")
    assert "PodDisruptionBudget" not in by_kind(default) and "safe-to-evict" not in dumps(default)


# ---- issue 25 (Kubernetes): reward-function files reach the pods ---------------------------------------------


def projected_files(pod_spec: dict, mount_path: str, objects: list[dict]) -> dict[str, str]:
    """The files a pod sees under `mount_path`, as the kubelet lays out its configMap or projected volume."""
    (container,) = pod_spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    sources = volume["projected"]["sources"] if "projected" in volume else [{"configMap": volume["configMap"]}]
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    files = {}
    for source in sources:
        data = config_maps[source["configMap"]["name"]]
        items = source["configMap"].get("items") or [{"key": key, "path": key} for key in data]
        files.update({f"{mount_path}/{item['path']}": data[item["key"]] for item in items})
    return files


def test_reward_function_files_are_mounted_read_only_in_head_and_worker_pods(tmp_path: Path, crd_file: Path) -> None:
    """`--set-file rewardFunctions.my_rewards\\.py=./my_rewards.py` puts the file in a ConfigMap that head and worker
    pods see at /etc/rlhf-jobs/rewards/my_rewards.py (rewards.REWARDS_DIR, where the submitter points configs), next
    to config.yaml in one read-only volume; the submitter pod has none of it; bad file names fail at install."""
    from rlhf_jobs.pipeline.backends import rewards

    source = tmp_path / "my_rewards.py"
    source.write_text("def correct(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    out = helm("template", "rlhf-ppo", str(CHART), "--namespace", "rlhf", "--set", "job.submissionMode=K8sJobMode",
               "--set-file", f"rewardFunctions.my_rewards\\.py={source}")
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "rlhf-ppo-rewards"]
    assert config_map["data"] == {"my_rewards.py": source.read_text()} and not core_errors(config_map)
    rayjob = one(objects, "RayJob")
    for group, template in pod_templates(rayjob).items():
        if group == "submitter":
            assert "volumes" not in template["spec"] and "rewards" not in dumps(template)
            continue
        files = projected_files(template["spec"], "/etc/rlhf-jobs", objects)
        assert files[f"{rewards.REWARDS_DIR}/my_rewards.py"] == source.read_text(), group
        assert yaml.safe_load(files[CONFIG_PATH]) == stage_config(render("rlhf-ppo")), group
        (mount,) = [m for m in template["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/rlhf-jobs"]
        assert mount["readOnly"] is True
    assert not crd_errors(rayjob)
    for bad in ("my-rewards.py", "rewards", "2fast.py"):
        error = render_error("rlhf-ppo", sets=(f"rewardFunctions.{bad.replace('.', chr(92) + '.')}=x",))
        assert f"invalid propertyName '{bad}'" in error, error
    assert "rewards" not in dumps(render("rlhf-ppo")), "nothing without rewardFunctions"


# ---- issue 29 item 10: the trainer's rules across keys, and object storage nothing reads, fail at helm template ------


def _chart_view(stage: str, changes: dict) -> dict:
    """The stage config the trainer would get from the chart's defaults with `changes` to its Training section (a
    values file, merged as Helm does: null removes a key the defaults have, and stays null where they have none),
    paths filled in as the chart does."""
    config = yaml.safe_load(yaml.safe_dump(DEFAULTS["configs"][stage]))
    for key, value in changes.items():
        if value is None and key in config["Training"]:
            del config["Training"][key]
        else:
            config["Training"][key] = value
    for key, value in config["General"].items():
        if value == "":
            config["General"][key] = f"/mnt/rlhf/default/{key}"
    return config


def _violations(rule, stage: str) -> list[dict]:
    """Changes to a stage's default config that break `rule` as the trainer states it (several, where the rule's
    operands fall back on other keys), and one that keeps it."""
    section = DEFAULTS["configs"][stage]["Training"]
    base = {key: section.get(key) for key in (*rule.a, *rule.b)}
    b_value = next((base[key] for key in rule.b if base.get(key)), None) or 8
    if rule.kind == "not_both":
        return [{rule.a[0]: 0.1 if "ratio" in rule.a[0] else 3, rule.b[0]: 3 if "steps" in rule.b[0] else 0.1}]
    if rule.kind == "one_of":
        return [{rule.a[0]: None, rule.b[0]: None}]
    if rule.kind == "at_most":
        return [{rule.a[0]: b_value + 1}]
    return [{rule.a[0]: b_value + 1}, {rule.b[0]: 6, rule.a[0]: 4} if len(rule.b) > 1 else {rule.a[0]: b_value - 1}]


def test_cross_field_rules_fail_at_template_time_as_the_trainer_states_them(tmp_path: Path) -> None:
    """PPO mini_batch_size not dividing the batch, warmup_ratio with warmup_steps, rollout_batch_size above
    experience_batch_size, gradient_accumulation_steps not dividing the mini-batch rendered; the trainer refused them
    only after the cluster had started. Each rule of chart_rules.py, on every stage it applies to: `helm template`
    and `validate_config` (on what the chart would render) agree, with the trainer's message."""
    from rlhf_jobs.core import stages
    from rlhf_jobs.core.errors import ConfigError
    from rlhf_jobs.core.loading import validate_config
    from rlhf_jobs.tools import chart_rules

    refused: list[str] = []
    for stage, entry in stages.REGISTRY.items():
        training = chart_rules.sections(entry.config_type)["Training"]
        for rule in (rule for rule in chart_rules.RULES if issubclass(training, rule.owner)):
            for changes in _violations(rule, stage):
                view = _chart_view(stage, changes)
                try:
                    validate_config(view, stage, paths=False)
                    trainer_error = None
                except ConfigError as err:
                    trainer_error = str(err)
                values = _values_file(tmp_path, f"{stage}-{len(refused)}-{rule.kind}",
                                      {"configs": {stage: {"Training": changes}}})
                try:
                    render(f"rlhf-{stage}", (values,))
                    chart_error = None
                except HelmError as err:
                    chart_error = str(err)
                assert (trainer_error is None) == (chart_error is None), (stage, changes, trainer_error, chart_error)
                if trainer_error:
                    message = trainer_error.split("Training: ", 1)[1].removesuffix(f" (got {changes!r})")
                    assert f"configs.{stage}.Training: {message} (the {stage} trainer would refuse" in chart_error
                    refused.append(message)
        one(render(f"rlhf-{stage}"), "RayJob")  # the defaults keep every rule
    # every violation was one: each stage's warmup, and the 6 of each RL stage (PPO, GRPO)
    assert len(refused) == len(stages.REGISTRY) + 6 * 2, refused


def test_every_cross_field_rule_of_the_trainers_is_in_the_chart() -> None:
    """The chart's checks and the trainers' validators stay in step: a model validator of any registry stage's config
    (GRPO's, DPO's...) that chart_rules.py neither states nor excuses in TRAINER_ONLY fails here; `make schema` wrote
    them into files/stages.json."""
    from rlhf_jobs.core import stages
    from rlhf_jobs.tools import chart_rules, chart_schema

    assert chart_schema.main(["--check"]) == 0, "helm/files/stages.json is stale: make schema"
    for rule in chart_rules.RULES:
        assert rule.kind in chart_rules.KINDS
        assert rule.validator in rule.owner.__pydantic_decorators__.model_validators, rule
    missing = []
    for stage, entry in stages.REGISTRY.items():
        for model in _models(entry.config_type):
            for validator in model.__pydantic_decorators__.model_validators:
                stated = any(rule.validator == validator and issubclass(model, rule.owner)
                             for rule in chart_rules.RULES)
                owner = next(base for base in model.__mro__ if validator in vars(base))
                if not stated and f"{owner.__name__}.{validator}" not in chart_rules.TRAINER_ONLY:
                    missing.append(f"{stage}: {owner.__name__}.{validator}")
    assert not missing, f"add their rules to rlhf_jobs/tools/chart_rules.py (or TRAINER_ONLY): {missing}"
    written = {entry["name"]: entry["checks"] for entry in json.loads(STAGES_FILE.read_text())["stages"]}
    assert written == {name: chart_rules.stage_checks(entry.config_type) for name, entry in stages.REGISTRY.items()}


def _models(model: type) -> list[type]:
    """A config model and every model nested in it (sections, LoRA, resources)."""
    from pydantic import BaseModel

    found = [model]
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in found:
                found += [m for m in _models(candidate) if m not in found]
    return found


@pytest.mark.parametrize(("remote", "ok"), [
    ("s3://bucket", True), ("s3://bucket/rlhf/", True), ("gs://bucket/rlhf", False), ("file:///data", False),
    ("s3:/bucket/rlhf", False), ("s3:bucket/rlhf", False), ("s3://", False), ("S3://bucket", False),
])
def test_remote_storage_only_of_a_scheme_the_trainers_read(remote: str, ok: bool) -> None:
    """`storage.remote: gs://...` rendered, and nothing reads gs:// (storage.SCHEMES): the pattern is generated from
    what storage.py reads, so an unknown scheme or a malformed URL fails at `helm template`."""
    from rlhf_jobs.store import storage
    from rlhf_jobs.tools import chart_schema

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["storage"]["properties"]["remote"]["pattern"] == chart_schema.remote_pattern()
    assert storage.SCHEMES == ("s3",) or "gs" in chart_schema.remote_pattern()
    if ok:
        assert stage_config(render("rlhf-sft", sets=(f"storage.remote={remote}",)))["General"]["output_dir"].startswith(
            remote.rstrip("/") + "/default/")
    else:
        assert "at '/storage/remote'" in render_error("rlhf-sft", sets=(f"storage.remote={remote}",))
