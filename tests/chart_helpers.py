"""Helpers for the Helm chart tests: render with `helm template`, validate against the KubeRay CRD
and against small Kubernetes schemas for the core objects.

`kubectl create --dry-run=client` cannot validate offline (it downloads the OpenAPI document from a
server), so the core objects the chart renders (ConfigMap, PersistentVolumeClaim, ServiceAccount) are
checked against the subset of the Kubernetes API schema written below: the fields the chart sets,
object metadata rules (DNS names, label syntax) and no unknown fields.

The KubeRay CRDs are read from `$RLHF_KUBERAY_CRD_DIR` when set (e.g. the CRDs of a given cluster:
`kubectl get crd rayjobs.ray.io -o yaml > DIR/crd-rayjobs.ray.io.yaml`), else from `../shared/kuberay` next to
the repository where it exists, else from a cache (`~/.cache/rlhf-jobs/kuberay-<version>`) filled once from the
KubeRay operator's Helm chart (`helm pull`, its `crds/`) where the network allows. They are never copied into
the repository.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM = shutil.which("helm")
STAGES_FILE = CHART / "files" / "stages.json"
# The registry's stages as the chart knows them (generated from rlhf_jobs/core/stages.py by `make schema`).
STAGES = tuple(stage["name"] for stage in json.loads(STAGES_FILE.read_text())["stages"])

CRD_DIR_ENV = "RLHF_KUBERAY_CRD_DIR"
DEFAULT_CRD_DIR = REPO.parent / "shared" / "kuberay"
RAYJOB_CRD_FILE = "crd-rayjobs.ray.io.yaml"
KUBERAY_VERSION = "1.7.0"
KUBERAY_CHART_REPO = "https://ray-project.github.io/kuberay-helm/"
# The operator chart's CRD files, under the names the tests read.
OPERATOR_CRDS = {"ray.io_rayjobs.yaml": RAYJOB_CRD_FILE, "ray.io_rayclusters.yaml": "crd-rayclusters.ray.io.yaml"}

# The longest RayJob name KubeRay accepts (it appends 6 characters to name the RayCluster, max 53).
MAX_RAYJOB_NAME = 47
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_KEY = (  # optional DNS-subdomain prefix + "/", then a name of at most 63 characters
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"


class HelmError(RuntimeError):
    """`helm` exited non-zero; the message is its stderr."""


def helm(*args: str) -> str:
    """Run helm; its stdout, or HelmError with its stderr."""
    assert HELM, "helm is not on PATH"
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


@functools.cache
def _template(release: str, values: tuple[str, ...], sets: tuple[str, ...], namespace: str) -> str:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for path in values:
        args += ["-f", path]
    for item in sets:
        args += ["--set", item]
    return helm(*args)


def render(
    release: str, values: tuple[str | Path, ...] | list[str | Path] = (), sets: tuple[str, ...] | list[str] = (),
    namespace: str = "rlhf",
) -> list[dict[str, Any]]:
    """`helm template RELEASE ./helm -f VALUES... --set SETS...` as a list of objects (cached)."""
    text = _template(release, tuple(str(v) for v in values), tuple(sets), namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(release: str, values: tuple[str | Path, ...] = (), sets: tuple[str, ...] = ()) -> str:
    """The error message of a render that must fail."""
    try:
        render(release, values, sets)
    except HelmError as err:
        return str(err)
    raise AssertionError(f"helm template {release} {values} {sets} rendered; expected an error")


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


# ---- KubeRay CRD ----------------------------------------------------------------------------------


def crd_cache_dir(version: str = KUBERAY_VERSION) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rlhf-jobs" / f"kuberay-{version}"


def helm_pull_operator_chart(destination: Path, version: str = KUBERAY_VERSION) -> None:
    """`helm pull` the KubeRay operator chart, untarred into `destination` (raises HelmError offline)."""
    helm("pull", "kuberay-operator", "--repo", KUBERAY_CHART_REPO, "--version", version, "--untar",
         "--untardir", str(destination))


def fetch_crds(cache: Path, pull=helm_pull_operator_chart, version: str = KUBERAY_VERSION) -> Path:
    """The operator chart's CRDs in `cache` (pulled once); raises HelmError or FileNotFoundError when they
    cannot be had."""
    if (cache / RAYJOB_CRD_FILE).is_file():
        return cache
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pull(Path(tmp), version)
        crds = Path(tmp) / "kuberay-operator" / "crds"
        found = {name: crds / name for name in OPERATOR_CRDS if (crds / name).is_file()}
        if "ray.io_rayjobs.yaml" not in found:
            raise FileNotFoundError(f"no crds/ray.io_rayjobs.yaml in kuberay-operator {version}")
        cache.mkdir(parents=True, exist_ok=True)
        for name, path in found.items():
            shutil.copyfile(path, cache / f".{OPERATOR_CRDS[name]}.tmp")
            os.replace(cache / f".{OPERATOR_CRDS[name]}.tmp", cache / OPERATOR_CRDS[name])
    return cache


@functools.cache
def crd_dir() -> Path:
    """$RLHF_KUBERAY_CRD_DIR, else ../shared/kuberay, else the cache (fetched where the network allows);
    a directory without the CRD makes the CRD tests skip and say where they looked."""
    if os.environ.get(CRD_DIR_ENV):
        return Path(os.environ[CRD_DIR_ENV]).resolve()
    if (DEFAULT_CRD_DIR / RAYJOB_CRD_FILE).is_file():
        return DEFAULT_CRD_DIR.resolve()
    cache = crd_cache_dir()
    if HELM:
        try:
            return fetch_crds(cache)
        except (HelmError, FileNotFoundError, subprocess.TimeoutExpired):
            pass
    return cache


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected, as the API server does with strict field validation
    (kubectl's default): every object schema that lists `properties` and does not preserve unknown
    fields gets `additionalProperties: false`."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(path: str, version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(Path(path).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = strict(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
            jsonschema.Draft7Validator.check_schema(schema)
            return jsonschema.Draft7Validator(schema)
    raise LookupError(f"{path}: no version {version}")


def crd_errors(obj: dict[str, Any], crd_file: str = RAYJOB_CRD_FILE) -> list[str]:
    """Problems of `obj` against the CRD's openAPIV3Schema for its apiVersion (empty list: valid)."""
    version = obj["apiVersion"].split("/")[-1]
    validator = _crd_validator(str(crd_dir() / crd_file), version)
    return [_describe(error) for error in validator.iter_errors(obj)]


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{path}: {error.message}"


# ---- core Kubernetes objects (subset of the API schema) -------------------------------------------

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABELS = {
    "type": "object",
    "propertyNames": {"pattern": LABEL_KEY, "maxLength": 316},
    "additionalProperties": {"type": "string", "pattern": LABEL_VALUE, "maxLength": 63},
}
_ANNOTATIONS = {"type": "object", "propertyNames": {"pattern": LABEL_KEY}, "additionalProperties": {"type": "string"}}


def _metadata(name_pattern: str = DNS1123_SUBDOMAIN, max_length: int = 253) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": name_pattern, "maxLength": max_length},
            "namespace": {"type": "string", "pattern": DNS1035_LABEL, "maxLength": 63},
            "labels": _LABELS,
            "annotations": _ANNOTATIONS,
        },
    }


def _object(api_version: str, kind: str, extra: dict[str, Any], metadata: dict[str, Any] | None = None):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": metadata or _metadata(),
            **extra,
        },
    }


CORE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ConfigMap": _object("v1", "ConfigMap", {
        "data": {"type": "object", "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$", "maxLength": 253},
                 "additionalProperties": {"type": "string"}},
        "binaryData": _STRING_MAP,
        "immutable": {"type": "boolean"},
    }),
    "PersistentVolumeClaim": _object("v1", "PersistentVolumeClaim", {
        "spec": {
            "type": "object",
            "required": ["accessModes", "resources"],
            "additionalProperties": False,
            "properties": {
                "accessModes": {"type": "array", "minItems": 1, "items": {
                    "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
                "storageClassName": {"type": "string"},
                "volumeMode": {"enum": ["Filesystem", "Block"]},
                "volumeName": {"type": "string"},
                "selector": {"type": "object"},
                "resources": {
                    "type": "object",
                    "required": ["requests"],
                    "additionalProperties": False,
                    "properties": {
                        "requests": {"type": "object", "required": ["storage"], "additionalProperties": False,
                                     "properties": {"storage": {"type": "string", "pattern": QUANTITY}}},
                        "limits": {"type": "object"},
                    },
                },
            },
        },
    }),
    "PodDisruptionBudget": _object("policy/v1", "PodDisruptionBudget", {
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector"],
            "properties": {
                "minAvailable": {"type": ["integer", "string"]},
                "maxUnavailable": {"type": ["integer", "string"]},
                "unhealthyPodEvictionPolicy": {"enum": ["IfHealthyBudget", "AlwaysAllow"]},
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": _LABELS,
                    "matchExpressions": {"type": "array", "items": {
                        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                        "properties": {"key": {"type": "string", "pattern": LABEL_KEY},
                                       "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                       "values": {"type": "array", "items": {"type": "string"}}}}},
                }},
            },
            "not": {"required": ["minAvailable", "maxUnavailable"]},
        },
    }),
    "ServiceAccount": _object("v1", "ServiceAccount", {
        "automountServiceAccountToken": {"type": "boolean"},
        "imagePullSecrets": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "secrets": {"type": "array"},
    }),
}


def core_errors(obj: dict[str, Any]) -> list[str]:
    """Problems of a core object against CORE_SCHEMAS (empty list: valid)."""
    schema = CORE_SCHEMAS.get(obj.get("kind", ""))
    if schema is None:
        return [f"no schema for kind {obj.get('kind')!r}"]
    return [_describe(error) for error in jsonschema.Draft7Validator(schema).iter_errors(obj)]


def rayjob_metadata_errors(obj: dict[str, Any]) -> list[str]:
    """RayJob metadata as KubeRay checks it: a DNS-1035 label of at most 47 characters, valid labels."""
    schema = _metadata(DNS1035_LABEL, MAX_RAYJOB_NAME)
    return [_describe(error) for error in jsonschema.Draft7Validator(schema).iter_errors(obj["metadata"])]


def pod_templates(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The RayJob's pod templates: head, worker (the one group) and submitter when rendered."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    (group,) = cluster["workerGroupSpecs"]
    templates["worker"] = group["template"]
    if "submitterPodTemplate" in spec:
        templates["submitter"] = spec["submitterPodTemplate"]
    return templates


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
