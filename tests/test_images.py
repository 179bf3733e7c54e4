"""The trainer image (images/Dockerfile): what KubeRay needs inside it, and a Ray cluster of containers.

Needs a Docker engine (`../shared/tools/start-docker` gives one here); skipped with the reason where
`docker info` fails. The image is built once per session with the `images` make target (cached
layers make that seconds after the first build). On this machine the base image is the local
`local/python:3.11-slim-bookworm` ($RLHF_BASE_IMAGE, which CI exports), since no registry answers.
$RLHF_TEST_IMAGE names an already built image to test instead of building one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
IMAGE_REPO = os.environ.get("IMAGE_REPO", "rlhf-jobs")
IMAGE_TAG = os.environ.get("IMAGE_TAG", "0.1.0")
IMAGE = f"{IMAGE_REPO}:{IMAGE_TAG}"
LOCAL_BASE_IMAGE = "local/python:3.11-slim-bookworm"
SHARED = "/mnt/rlhf"  # the named volume standing in for the PVC, at the same path in every container
IN_IMAGE = "/home/ray/rlhf-jobs"


def pins() -> dict[str, str]:
    """name -> pinned version from pyproject.toml's dependencies."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1).lower(): m.group(2) for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)(?:\[.*\])?==(.+)", d))}


def docker(
    *args: str, check: bool = True, timeout: float = 300, stdin: str | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` CLI on PATH (run ../shared/tools/start-docker, or install Docker)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out: the Docker engine does not answer"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        return f"no Docker engine answers `docker info` ({last}); start one with ../shared/tools/start-docker"
    if shutil.which("make") is None:
        return "no `make` on PATH (the image is built with `make images`)"
    return None


def base_image() -> str | None:
    """$RLHF_BASE_IMAGE, else the local stand-in where it exists, else the Dockerfile's default."""
    if os.environ.get("RLHF_BASE_IMAGE"):
        return os.environ["RLHF_BASE_IMAGE"]
    if docker("image", "inspect", LOCAL_BASE_IMAGE, check=False).returncode == 0:
        return LOCAL_BASE_IMAGE
    return None


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the CPU image with `make images` (the target's recipe, from images/images.mk)."""
    reason = docker_problem()
    if reason:
        pytest.skip(reason)
    if prebuilt := os.environ.get("RLHF_TEST_IMAGE"):  # opt-in: test an image built elsewhere, skip the build
        docker("image", "inspect", prebuilt)
        return prebuilt
    args = ["make", "-C", str(REPO), "-f", "images/images.mk", "images", f"IMAGE_REPO={IMAGE_REPO}",
            f"IMAGE_TAG={IMAGE_TAG}", "VARIANT=cpu"]
    if base := base_image():
        args.append(f"BASE_IMAGE={base}")
    log = tmp_path_factory.mktemp("image") / "build.log"
    started = time.monotonic()
    with log.open("w") as out:
        # A cold build downloads ray, transformers & co.; with the layer cache it takes seconds.
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=3600, check=False)
    tail = "\n".join(log.read_text().splitlines()[-60:])
    assert result.returncode == 0, f"{' '.join(args)} failed (log {log}):\n{tail}"
    print(f"\nbuilt {IMAGE} in {time.monotonic() - started:.0f}s")
    return IMAGE


def run_in(image: str, script: str, user: str = "1000", timeout: float = 300) -> str:
    return docker("run", "--rm", "--user", user, image, "bash", "-c", script, timeout=timeout).stdout


# ---- (1) the image ---------------------------------------------------------------------------------


def test_image_config_runs_as_ray(image: str) -> None:
    config = yaml.safe_load(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] in ("1000", "1000:1000"), config["User"]  # numeric, so runAsNonRoot can check it
    assert config["WorkingDir"] == "/home/ray"
    path = next(e for e in config["Env"] if e.startswith("PATH="))
    assert "/opt/venv/bin" in path


def test_user_home_and_tools(image: str) -> None:
    out = run_in(image, 'set -e; id -u; id -g; id -un; echo "$HOME"; pwd; '
                        'touch "$HOME/.write-test"; command -v bash wget ray rlhf-jobs')
    uid, gid, name, home, cwd, *tools = out.split()
    assert (uid, name, home, cwd) == ("1000", "ray", "/home/ray", "/home/ray")
    assert gid == "1000"  # the chart's runAsGroup and fsGroup
    assert [Path(t).name for t in tools] == ["bash", "wget", "ray", "rlhf-jobs"]


def test_image_has_the_lora_extra(image: str) -> None:
    """Training.lora needs peft: the image installs pyproject's `lora` extra, at its pin."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lora"]
    for requirement in extra:
        name, version = requirement.split("==")
        out = run_in(image, f"python -c 'import importlib.metadata as m; print(m.version(\"{name}\"))'")
        assert out.strip() == version, requirement


def test_image_has_the_tracker_clients(image: str) -> None:
    """Training.report_to: mlflow / wandb need their clients: the image installs pyproject's `mlflow` and `wandb`
    extras, at versions their requirements allow, and both import."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = [*extras["mlflow"], *extras["wandb"]]
    script = ("import importlib.metadata as m, sys; from packaging.requirements import Requirement; "
              "import mlflow, wandb; "
              "bad = [r for r in map(Requirement, sys.argv[1:]) if not r.specifier.contains(m.version(r.name))]; "
              "print('bad', bad)")
    out = run_in(image, shlex.join(["python", "-c", script, *requirements]))
    assert out.strip().endswith("bad []"), out


def test_entrypoints_and_pinned_stack(image: str) -> None:
    out = run_in(image, "set -e; rlhf-jobs --help; ray --version; "
                        'python -c "import torch, transformers, datasets; '
                        "print('versions', torch.__version__, transformers.__version__, datasets.__version__)\"")
    assert "tiny-model" in out and "train" in out  # the CLI's help lists its commands
    pinned = pins()
    assert re.search(rf"ray, version {re.escape(pinned['ray'])}\b", out), out
    torch_v, transformers_v, datasets_v = out.split("versions ", 1)[1].split()[:3]
    assert torch_v == f"{pinned['torch']}+cpu"
    assert (transformers_v, datasets_v) == (pinned["transformers"], pinned["datasets"])


def test_login_shell_keeps_the_venv_on_path(image: str) -> None:
    # KubeRay runs `/bin/bash -lc -- "ulimit -n 65536; ray start ..."`; /etc/profile must not lose /opt/venv/bin.
    out = docker("run", "--rm", "--user", "1000", image, "/bin/bash", "-lc", "--",
                 "ulimit -n 65536; command -v ray rlhf-jobs python").stdout.split()
    assert out == ["/opt/venv/bin/ray", "/opt/venv/bin/rlhf-jobs", "/opt/venv/bin/python"], out


def test_bundled_examples_configs_and_tiny_model(image: str) -> None:
    out = run_in(image, f"set -e; cd {IN_IMAGE}; ls examples/data configs tiny-model; "
                        "test -w tiny-model && echo writable")
    for name in ("sample_finetune_data.jsonl", "sample_rm_data.jsonl", "sample_ppo_data.jsonl",
                 "config.json", "model.safetensors", "tokenizer.json"):
        assert name in out.split(), f"{name} missing in {IN_IMAGE}:\n{out}"
    assert "writable" in out


def test_no_build_tools_or_pip_cache(image: str) -> None:
    probe = ("for t in gcc cc g++ make; do command -v $t || true; done; "
             "ls -d /root/.cache/pip /home/ray/.cache/pip /tmp/ca.pem /wheels /dist /reqs 2>/dev/null || true")
    out = run_in(image, probe, user="0").split()
    base = docker("image", "inspect", "--format", "{{index .Config.Labels \"org.opencontainers.image.base.name\"}}",
                  image).stdout.strip()
    from_base = run_in(base, probe, user="0").split() if base and base != "<no value>" else []
    assert sorted(set(out) - set(from_base)) == [], f"left in the image: {out}"


# ---- (2) a Ray cluster of containers, as KubeRay starts it -----------------------------------------


@pytest.fixture
def ray_cluster(image: str) -> Iterator[dict[str, Any]]:
    """A network, one named volume at /mnt/rlhf, a head (0 CPUs) and two 1-CPU workers."""
    run_id = uuid.uuid4().hex[:8]
    names = {"network": f"rlhf-test-{run_id}", "volume": f"rlhf-test-{run_id}",
             "head": f"rlhf-test-{run_id}-head", "workers": [f"rlhf-test-{run_id}-worker-{i}" for i in (1, 2)]}
    common = ["--network", names["network"], "--volume", f"{names['volume']}:{SHARED}", "--shm-size", "512m",
              "--env", "RAY_USAGE_STATS_ENABLED=0", "--label", f"rlhf-test={run_id}"]
    # As KubeRay starts Ray: a login bash running `ulimit -n 65536; ray start ... --block`. The object
    # store stays small here: three nodes share one machine's memory.
    def ray_start(*args: str) -> list[str]:
        command = f"ulimit -n 65536; ray start --block --object-store-memory={300 * 2**20} {' '.join(args)}"
        return ["/bin/bash", "-lc", "--", command]

    try:
        docker("network", "create", names["network"])
        docker("volume", "create", names["volume"])
        # A fresh named volume is root-owned: hand it to uid 1000, as an initContainer or fsGroup would.
        docker("run", "--rm", "--user", "0", "--volume", f"{names['volume']}:{SHARED}", image,
               "chown", "1000:1000", SHARED)
        docker("run", "--detach", "--name", names["head"], "--hostname", "head", "--network-alias", "head",
               *common, image, *ray_start("--head", "--num-cpus=0", "--port=6379", "--dashboard-host=0.0.0.0"))
        wait_for(lambda: docker("exec", names["head"], "wget", "-q", "-O", "-",
                                "http://localhost:8265/api/gcs_healthz", check=False).returncode == 0,
                 "the head's dashboard (:8265)", names["head"])
        for worker in names["workers"]:
            docker("run", "--detach", "--name", worker, *common, image,
                   *ray_start("--address=head:6379", "--num-cpus=1"))
        wait_for(lambda: "2.0 CPU" in docker("exec", names["head"], "ray", "status", check=False).stdout,
                 "two 1-CPU workers to join", names["head"])
        yield names
    finally:
        remove_cluster(names)


def remove_cluster(names: dict[str, Any]) -> None:
    """Remove a container cluster's head, workers, network and volume (whatever of them exists)."""
    containers = [names["head"], *names["workers"]]
    subprocess.run(["docker", "rm", "--force", "--volumes", *containers], capture_output=True, check=False)
    subprocess.run(["docker", "network", "rm", names["network"]], capture_output=True, check=False)
    subprocess.run(["docker", "volume", "rm", "--force", names["volume"]], capture_output=True, check=False)


def wait_for(ready: Callable[[], bool], what: str, container: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(2)
    logs = docker("logs", "--tail", "40", container, check=False)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{logs.stdout}\n{logs.stderr}")


def test_sft_through_ray_job_submit_on_a_container_cluster(image: str, ray_cluster: dict[str, Any]) -> None:
    head = ray_cluster["head"]
    config = yaml.safe_load((REPO / "configs" / "local" / "sft.yaml").read_text())
    config["General"].update(base_model=f"{IN_IMAGE}/tiny-model", output_dir=f"{SHARED}/sft/output",
                             checkpoint_dir=f"{SHARED}/sft/model")
    config["Dataset"].update(train_file=f"{IN_IMAGE}/examples/data/sample_finetune_data.jsonl",
                             validation_file=None)
    config["Training"].update(epochs=1, num_training_workers=2, resources_per_worker={"CPU": 1})
    # The config lies on the shared volume, as the chart's ConfigMap/PVC would hand it to the job.
    docker("exec", "-i", head, "bash", "-c", f"mkdir -p {SHARED}/sft && cat > {SHARED}/sft/sft.yaml",
           stdin=yaml.safe_dump(config, sort_keys=False))

    # The submitter: another container of the image, like KubeRay's RayJob submitter pod.
    submission_id = f"sft-{uuid.uuid4().hex[:6]}"
    submit = docker("run", "--rm", "--network", ray_cluster["network"], "--env", "RAY_USAGE_STATS_ENABLED=0",
                    image, "ray", "job", "submit", "--address", "http://head:8265", "--submission-id",
                    submission_id, "--", "rlhf-jobs", "train", "sft", "--config_path", f"{SHARED}/sft/sft.yaml",
                    check=False, timeout=900)
    status = docker("exec", head, "ray", "job", "status", "--address", "http://localhost:8265", submission_id,
                    check=False)
    assert submit.returncode == 0 and "succeeded" in status.stdout.lower(), (
        f"job {submission_id}:\n{status.stdout}\n{status.stderr}\n--- submit output\n"
        f"{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}"
    )

    # The final model is on the shared volume; all three containers see the same files.
    listing = docker("exec", ray_cluster["workers"][1], "ls", "-n", f"{SHARED}/sft/model").stdout
    for name in ("config.json", "model.safetensors", "rlhf_stage.json"):
        assert name in listing, f"{name} not in {SHARED}/sft/model:\n{listing}"
    marker = json.loads(docker("exec", head, "cat", f"{SHARED}/sft/model/rlhf_stage.json").stdout)
    assert marker["stage"] == "sft", marker
    assert docker("exec", head, "test", "-s", f"{SHARED}/sft/output/metrics.jsonl", check=False).returncode == 0


# ---- (3) what the in-cluster pipeline runner needs -----------------------------------------------------


def test_image_carries_helm_and_the_chart_for_the_runner(image: str) -> None:
    """The runner Job runs `rlhf-jobs pipeline --backend kuberay` in the image: helm and the chart must be there."""
    from rlhf_jobs.pipeline.backends.helm import MIN_VERSION

    out = run_in(image, "set -e; helm version --template '{{ .Version }}'; echo; echo $RLHF_JOBS_CHART; "
                        "rlhf-jobs pipeline --backend kuberay --dry-run --run exp1 > /tmp/m.yaml; "
                        "grep -c '^kind: RayJob' /tmp/m.yaml; "
                        "rlhf-jobs pipeline --backend kuberay --run exp1 --in-cluster --dry-run | grep -c '^kind: Job'")
    version, chart, rayjobs, jobs = out.split()
    assert tuple(int(p) for p in version.lstrip("v").split("+")[0].split(".")) >= MIN_VERSION
    assert chart == f"{IN_IMAGE}/helm"
    assert (rayjobs, jobs) == ("3", "1")


# ---- (4) the GPU variant: CUDA torch from PyPI on the same Python base ---------------------------------

GPU_IMAGE = f"{IMAGE_REPO}:{IMAGE_TAG}-gpu"


@pytest.fixture(scope="session")
def gpu_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`make images VARIANT=gpu` (about 6.5 GB, 10 minutes cold here): built when $RLHF_BUILD_GPU_IMAGE=1,
    tested when it exists; `make test-docker-gpu` does both."""
    reason = docker_problem()
    if reason:
        pytest.skip(reason)
    if os.environ.get("RLHF_BUILD_GPU_IMAGE") == "1":
        args = ["make", "-C", str(REPO), "-f", "images/images.mk", "images", f"IMAGE_REPO={IMAGE_REPO}",
                f"IMAGE_TAG={IMAGE_TAG}", "VARIANT=gpu"]
        if base := base_image():
            args.append(f"BASE_IMAGE={base}")
        log = tmp_path_factory.mktemp("gpu-image") / "build.log"
        with log.open("w") as out:
            result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=3600, check=False)
        assert result.returncode == 0, f"{' '.join(args)} failed:\n" + "\n".join(log.read_text().splitlines()[-60:])
    elif docker("image", "inspect", GPU_IMAGE, check=False).returncode != 0:
        pytest.skip(f"{GPU_IMAGE} is not built: make test-docker-gpu (or RLHF_BUILD_GPU_IMAGE=1) builds it")
    return GPU_IMAGE


def test_gpu_image_has_cuda_torch_and_nccl_and_runs_as_ray(gpu_image: str) -> None:
    probe = ('import torch, torch.distributed as dist; '
             'print(torch.__version__, torch.version.cuda, dist.is_nccl_available(), '
             '".".join(map(str, torch.cuda.nccl.version())))')
    out = run_in(gpu_image, f"set -e; id -u; python -c '{probe}'; rlhf-jobs --help >/dev/null && echo cli-ok; "
                            "command -v ray helm")
    uid, torch_version, cuda, nccl_available, nccl, cli, ray, helm_bin = out.split()
    assert uid == "1000" and cli == "cli-ok"
    assert torch_version.split("+")[0] == pins()["torch"] and not torch_version.endswith("+cpu")
    assert cuda != "None" and nccl_available == "True" and nccl.count(".") == 2
    assert (ray, helm_bin) == ("/opt/venv/bin/ray", "/usr/local/bin/helm")
    labels = yaml.safe_load(docker("image", "inspect", "--format", "{{json .Config.Labels}}", gpu_image).stdout)
    assert labels["io.rlhf-jobs.variant"] == "gpu"


# ---- (5) the three stages under the memory limits the kind values give the pods -------------------------

KIND_VALUES = REPO / "helm" / "ci" / "kind-values.yaml"


def quantity_bytes(value: str | int) -> int:
    from rlhf_jobs.core.config import memory_bytes

    return memory_bytes(value)


def kind_limits() -> dict[str, int]:
    """Memory limits of the head and worker pods under helm/ci/kind-values.yaml (workers: resources_per_worker)."""
    values = yaml.safe_load(KIND_VALUES.read_text())
    workers = {values["configs"][s]["Training"]["resources_per_worker"]["memory"] for s in ("sft", "rm", "ppo")}
    assert len(workers) == 1, workers
    return {"head": quantity_bytes(values["head"]["resources"]["limits"]["memory"]),
            "worker": quantity_bytes(workers.pop()), "shm": quantity_bytes(values["shm"]["sizeLimit"])}


def chart_config(stage: str) -> str:
    """The stage's config.yaml as the chart renders it with the kind values (paths under /mnt/rlhf/default)."""
    if shutil.which("helm") is None:
        pytest.skip("helm is not on PATH")
    out = subprocess.run(["helm", "template", f"rlhf-{stage}", str(REPO / "helm"), "-f", str(KIND_VALUES)],
                         capture_output=True, text=True, check=True).stdout
    (config_map,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]
    return config_map["data"]["config.yaml"]


def working_set(container: str) -> int:
    """What the kubelet and `kubectl top` count against a pod's limit: usage less inactive page cache."""
    out = docker("exec", container, "bash", "-c", "cat /sys/fs/cgroup/memory/memory.usage_in_bytes "
                 "/sys/fs/cgroup/memory/memory.stat 2>/dev/null || { cat /sys/fs/cgroup/memory.current; "
                 "sed 's/^inactive_file/total_inactive_file/' /sys/fs/cgroup/memory.stat; }", check=False).stdout
    lines = out.split("\n")
    if not lines or not lines[0].strip().isdigit():
        return 0
    stat = dict(line.split() for line in lines[1:] if len(line.split()) == 2)
    return int(lines[0]) - int(stat.get("total_inactive_file", 0))


class PeakSampler:
    """Polls the containers' working sets every `interval` seconds in a thread; `peaks` holds the maxima."""

    def __init__(self, containers: list[str], interval: float = 1.0) -> None:
        import threading

        self.containers, self.interval = containers, interval
        self.peaks = dict.fromkeys(containers, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for container in self.containers:
                self.peaks[container] = max(self.peaks[container], working_set(container))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def limited_cluster(image: str) -> Iterator[dict[str, Any]]:
    """Head and two workers started as KubeRay starts them (`--memory` = the container's limit, no object-store
    size given) under the kind values' memory limits, without swap."""
    limits = kind_limits()
    run_id = uuid.uuid4().hex[:8]
    names = {"network": f"rlhf-mem-{run_id}", "volume": f"rlhf-mem-{run_id}", "head": f"rlhf-mem-{run_id}-head",
             "workers": [f"rlhf-mem-{run_id}-worker-{i}" for i in (1, 2)], "limits": limits}

    def start(name: str, role: str, *ray_args: str) -> None:
        memory = limits[role]
        command = f"ulimit -n 65536; ray start --block --memory={memory} {' '.join(ray_args)}"
        docker("run", "--detach", "--name", name, "--network", names["network"], "--volume",
               f"{names['volume']}:{SHARED}", "--shm-size", str(limits["shm"]), "--memory", f"{memory}b",
               "--memory-swap", f"{memory}b", "--env", "RAY_USAGE_STATS_ENABLED=0", "--label", f"rlhf-test={run_id}",
               *(["--hostname", "head", "--network-alias", "head"] if role == "head" else []),
               image, "/bin/bash", "-lc", "--", command)

    try:
        docker("network", "create", names["network"])
        docker("volume", "create", names["volume"])
        docker("run", "--rm", "--user", "0", "--volume", f"{names['volume']}:{SHARED}", image,
               "chown", "1000:1000", SHARED)
        start(names["head"], "head", "--head", "--num-cpus=0", "--port=6379", "--dashboard-host=0.0.0.0")
        wait_for(lambda: docker("exec", names["head"], "wget", "-q", "-O", "-",
                                "http://localhost:8265/api/gcs_healthz", check=False).returncode == 0,
                 "the head's dashboard (:8265)", names["head"])
        for worker in names["workers"]:
            start(worker, "worker", "--address=head:6379", "--num-cpus=1")
        wait_for(lambda: "2.0 CPU" in docker("exec", names["head"], "ray", "status", check=False).stdout,
                 "two 1-CPU workers to join", names["head"], timeout=300)
        yield names
    finally:
        remove_cluster(names)


def test_three_stages_fit_the_kind_memory_limits(image: str, limited_cluster: dict[str, Any]) -> None:
    """SFT, RM and PPO with the chart's configs and the kind values' limits: none is OOM-killed, and the peak
    working sets (printed; figures in README) stay under 80% of each limit."""
    head, workers, limits = limited_cluster["head"], limited_cluster["workers"], limited_cluster["limits"]
    peaks: dict[str, dict[str, int]] = {}
    for stage in ("sft", "rm", "ppo"):
        docker("exec", "-i", head, "bash", "-c", f"mkdir -p {SHARED}/etc && cat > {SHARED}/etc/{stage}.yaml",
               stdin=chart_config(stage))
        submission_id = f"{stage}-{uuid.uuid4().hex[:6]}"
        with PeakSampler([head, *workers]) as sampler:
            submit = docker("run", "--rm", "--network", limited_cluster["network"], "--env",
                            "RAY_USAGE_STATS_ENABLED=0", image, "ray", "job", "submit", "--address", "http://head:8265",
                            "--submission-id", submission_id, "--", "rlhf-jobs", "train", stage, "--config_path",
                            f"{SHARED}/etc/{stage}.yaml", "--on-config-change", "restart", check=False, timeout=1200)
        killed = {c: docker("inspect", "--format", "{{.State.OOMKilled}} {{.State.Running}}", c).stdout.strip()
                  for c in (head, *workers)}
        status = docker("exec", head, "ray", "job", "status", "--address", "http://localhost:8265", submission_id,
                        check=False).stdout
        assert submit.returncode == 0 and "succeeded" in status.lower(), (
            f"{stage}: {status}\ncontainers (OOMKilled Running): {killed}\n{submit.stdout[-5000:]}\n"
            f"{submit.stderr[-2000:]}")
        assert all(state == "false true" for state in killed.values()), killed
        peaks[stage] = {"head": sampler.peaks[head], "worker": max(sampler.peaks[w] for w in workers)}
    report = {stage: {role: f"{value / 2**20:.0f}Mi" for role, value in roles.items()}
              for stage, roles in peaks.items()}
    print(f"\npeak working set under limits head {limits['head'] / 2**20:.0f}Mi, "
          f"worker {limits['worker'] / 2**20:.0f}Mi: {json.dumps(report)}")
    for stage, roles in peaks.items():  # at least 20% headroom under each limit
        assert roles["head"] < 0.8 * limits["head"] and roles["worker"] < 0.8 * limits["worker"], (stage, report)
