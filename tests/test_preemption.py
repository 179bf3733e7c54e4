"""Preemption: SIGTERM to a real `rlhf-jobs train` mid-epoch (sent by the preStop hook, as on Kubernetes)
stops it after the current step with a checkpoint; the re-run continues from that step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from conftest import REPO, local_config, write_config

from rlhf_jobs.engine import launcher, preemption, stop_notice


def train_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r["split"] == "train"]


def sigterm_after_a_step(command: list[str], metrics: Path, log: Path) -> int:
    """Start `command` (from the repo root, output to `log`), SIGTERM it once it has logged a training step; its exit
    code."""
    run = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while run.poll() is None and time.monotonic() < deadline and not train_steps(metrics):
        time.sleep(0.1)
    assert run.poll() is None, log.read_text()[-3000:]
    os.kill(run.pid, signal.SIGTERM)
    return run.wait(timeout=60)


def test_hook_with_no_driver_returns_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preemption.PID_DIR_ENV, str(tmp_path))
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers" / "999999999").write_text("a driver that is gone\n")
    start = time.monotonic()
    assert preemption.main(["--wait", "30"]) == 0
    assert time.monotonic() - start < 2 and not any((tmp_path / "drivers").iterdir()), "stale pid file removed"


def test_requested_is_false_outside_a_run() -> None:
    assert stop_notice.stop_requested() is False


# ---- issue 28 item 3: the worker preStop drains this machine's node through the GCS, fast and loud ------------

# The worker pods' preStop command (tests/test_chart.py checks the chart renders exactly this).
WORKER_PRE_STOP = ["python", "-m", preemption.__name__, "--drain", "--wait", "290", "--deadline", "300"]


def worker_pre_stop() -> list[str]:
    """The chart's worker preStop command where helm is there, else the one test_chart.py holds it to."""
    import shutil

    if shutil.which("helm") is None:
        return list(WORKER_PRE_STOP)
    from chart_helpers import one, pod_templates, render

    template = pod_templates(one(render("rlhf-sft"), "RayJob"))["worker"]
    return template["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]


def run_hook(argv: list[str], env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    assert argv[:2] == ["python", "-m"], argv
    started = time.monotonic()
    hook = subprocess.run([sys.executable, *argv[1:], *extra], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    return hook, time.monotonic() - started


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch):
    """A real Ray cluster on this machine (GCS, raylets), started with Ray's own test utility."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # one Ray per machine, as on a real node (see the drained-node test below)
        ray.shutdown()
    for name in (*launcher.LOCAL_RAY_ENV, launcher.LOCAL_RAY_MARKER):
        monkeypatch.delenv(name, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def node_state(gcs_address: str, node_id: str) -> str:
    """ALIVE, DRAINING (the GCS holds a drain request for it) or DEAD."""
    from ray._raylet import GcsClient

    gcs = GcsClient(address=gcs_address)
    if any(node.hex() == node_id if hasattr(node, "hex") else node == node_id
           for node in gcs.get_draining_nodes(timeout=10)):
        return "DRAINING"
    info = next(info for key, info in gcs.get_all_node_info(timeout=10).items() if key.hex() == node_id)
    return "DEAD" if info.state == 1 else "ALIVE"


def test_worker_pre_stop_drains_this_machines_node_on_a_real_cluster(ray_cluster) -> None:
    """The chart's worker preStop, run as the pod runs it, against a real Ray cluster: it finds this machine's
    raylet of that cluster (other Ray clusters may run here too), drains its node through the GCS, says so, and
    returns at once (no Ray Train worker runs on it). The drained node, idle, shuts down."""
    node_id = ray_cluster.head_node.node_id
    # RAY_ADDRESS spelt otherwise than the raylet's --gcs-address (KubeRay's names the head Service): the hook asks
    # that GCS which of this machine's raylets is its node.
    port = ray_cluster.gcs_address.rpartition(":")[2]
    hook, seconds = run_hook(worker_pre_stop(), {"RAY_ADDRESS": f"localhost:{port}", "HOSTNAME": "w-1"})
    assert hook.returncode == 0, hook.stderr
    assert f"drained Ray node {node_id} (GCS localhost:{port}) for preemption" in hook.stderr
    deadline = time.monotonic() + 30
    while (state := node_state(ray_cluster.gcs_address, node_id)) == "ALIVE" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state in ("DRAINING", "DEAD"), state
    print(f"drain hook: {seconds:.1f} s, node {state}")


def test_worker_pre_stop_fails_fast_and_loud_where_the_gcs_does_not_answer(tmp_path: Path) -> None:
    """`ray drain-node` without a node id started a Ray driver in the hook (blocked 40+ s by an unreachable GCS)
    and its errors went to /dev/null: the hook burnt the grace period and said nothing. Now: one line on stderr, a
    non-zero exit (a FailedPreStopHook event), within the timeout, for a GCS that refuses connections, one that
    accepts and never answers, and a pod where no raylet of the cluster runs."""
    import socket

    node = "ab" * 28
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP connections, never speaks gRPC
    try:
        cases = {
            "refused": ({"RAY_ADDRESS": refused}, ("--node-id", node),
                        f"draining node {node}: cannot reach the Ray GCS at {refused}"),
            "silent": ({"RAY_ADDRESS": f"127.0.0.1:{silent.getsockname()[1]}"}, ("--node-id", node, "--timeout", "2"),
                       f"draining node {node}: the Ray GCS at 127.0.0.1:{silent.getsockname()[1]} did not answer"),
            # Other Ray clusters may run on this machine: their raylets are not the cluster's, whose GCS cannot answer.
            "no raylet": ({"RAY_ADDRESS": refused}, (),
                          (f"no Ray node of the cluster at {refused} runs on this machine",
                           f"cannot reach the Ray GCS at {refused}")),
        }
        for name, (env, extra, messages) in cases.items():
            hook, seconds = run_hook(worker_pre_stop(), env, *extra)
            assert hook.returncode == 1, (name, hook.returncode, hook.stderr)
            messages = (messages,) if isinstance(messages, str) else messages
            assert any(message in hook.stderr for message in messages), (name, hook.stderr)
            assert hook.stderr.startswith("rlhf-jobs preStop: "), (name, hook.stderr)
            assert seconds < 15, (name, seconds)
    finally:
        silent.close()


@pytest.mark.slow
def test_sigterm_mid_epoch_stops_after_the_step_and_the_rerun_continues_there(tiny_model: Path,
                                                                             tmp_path: Path) -> None:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"].update(epochs=2, logging_steps=1)  # 7 steps per epoch; checkpoints only at epoch ends
    path = str(write_config(tmp_path / "sft.yaml", config))
    env = {**os.environ, preemption.PID_DIR_ENV: str(tmp_path / "pids")}
    metrics = tmp_path / "out" / "metrics.jsonl"
    command = [sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", path]

    log = tmp_path / "first.log"
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while first.poll() is None and max(train_steps(metrics), default=0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, log.read_text()[-3000:]
    signalled_after, signalled_at = max(train_steps(metrics)), time.time()
    assert signalled_after < 7, "mid-epoch"

    # What Kubernetes runs in the head pod before SIGTERM: SIGTERM the registered drivers, wait for them.
    hook = subprocess.run([sys.executable, "-m", "rlhf_jobs.engine.preemption", "--wait", "240"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert hook.returncode == 0, hook.stderr
    assert first.wait(timeout=30) == 75, log.read_text()[-3000:]  # EX_TEMPFAIL: run it again
    output = log.read_text()
    stopped = re.search(r"stopped after step (\d+) \(preempted\)", output)
    assert stopped, output[-3000:]
    stopped_at = int(stopped.group(1))
    done_before_stop = max(train_steps(metrics))
    assert stopped_at == done_before_stop, "the checkpoint holds every step the run did"
    stop_record = next(json.loads(line) for line in metrics.read_text().splitlines()
                       if json.loads(line)["split"] == "train" and json.loads(line)["step"] == stopped_at)
    latency = stop_record["time"] - signalled_at
    assert signalled_after <= stopped_at and latency < 10, "the step in progress ends the run (a tiny step: ~0.3 s)"
    assert (tmp_path / "out" / "checkpoints" / f"step-{stopped_at:08d}" / "complete.json").is_file()
    assert not any((tmp_path / "pids" / "drivers").iterdir()), "the driver unregistered itself"

    second_log = tmp_path / "second.log"
    second = subprocess.run(command, cwd=REPO, env=env, stdout=second_log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, timeout=400)
    assert second.returncode == 0, second_log.read_text()[-3000:]
    # 7 steps per epoch: under load the stop can land in the second epoch
    assert re.search(rf"resuming at epoch \d, step {stopped_at}/14", second_log.read_text())
    steps = train_steps(metrics)
    steps_lost = done_before_stop - stopped_at  # steps the first run did that the second had to redo
    assert steps_lost == 0 and sorted(steps) == list(range(1, 15)), steps
    assert (tmp_path / "model" / "rlhf_stage.json").is_file()
    print(f"SIGTERM after step {signalled_after}: stopped after step {stopped_at} ({latency:.1f} s later), "
          f"steps lost {steps_lost}")


@pytest.mark.slow
def test_a_drained_node_stops_the_run_after_its_step_and_it_continues_on_another_node(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a worker pod's preStop does (the chart's `python -m rlhf_jobs.engine.preemption --drain`) on a real 3-node
    Ray cluster: the run stops after the step in progress with a checkpoint, the hook returns once the node's training
    worker has exited, and the driver, not told to go, starts the run again on a replacement node (as KubeRay would
    add), from that step. Three raylets run on this one machine, so the hook is told which node is "this pod's"."""
    from ray.cluster_utils import Cluster
    # One Ray per machine, as on a real node: Cluster.shutdown resets this process's KV client under an
    # in-process Ray left by earlier tests (the next in-process run starts a new one), and the cluster's
    # raylets, started from this process, must not inherit the in-process settings (no preemption watcher).
    if ray.is_initialized():
        ray.shutdown()
    for name in (*launcher.LOCAL_RAY_ENV, launcher.LOCAL_RAY_MARKER):
        monkeypatch.delenv(name, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        doomed = cluster.add_node(num_cpus=1)
        config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out",
                              checkpoint_dir=tmp_path / "model")
        config["Training"].update(epochs=1, logging_steps=1, num_training_workers=1)
        path = str(write_config(tmp_path / "sft.yaml", config))
        env = {**os.environ, "RAY_ADDRESS": cluster.address, preemption.PID_DIR_ENV: str(tmp_path / "pids")}
        metrics, log = tmp_path / "out" / "metrics.jsonl", tmp_path / "train.log"
        run = subprocess.Popen([sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", path],
                               cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        deadline = time.monotonic() + 300
        while run.poll() is None and max(train_steps(metrics), default=0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, log.read_text()[-3000:]
        drained_after = max(train_steps(metrics))
        argv = worker_pre_stop()
        hook = subprocess.Popen([sys.executable, *argv[1:], "--node-id", doomed.node_id, "--wait", "120"], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cluster.add_node(num_cpus=1)  # the replacement pod
        _, hook_err = hook.communicate(timeout=200)
        assert hook.returncode == 0, hook_err
        assert f"drained Ray node {doomed.node_id}" in hook_err
        assert run.wait(timeout=400) == 0, log.read_text()[-3000:]
        output = log.read_text()
        stopped = re.search(r"stopped after step (\d+) \(preempted\)", output)
        assert stopped and "a node of this run is being drained" in output, output[-3000:]
        stopped_at = int(stopped.group(1))
        assert drained_after <= stopped_at and f"resuming at epoch 1, step {stopped_at}/" in output
        steps = train_steps(metrics)
        assert sorted(steps) == list(range(1, max(steps) + 1)), f"each step once: 0 steps lost ({steps})"
        assert (tmp_path / "model" / "rlhf_stage.json").is_file()
        print(f"drain after step {drained_after}: stopped after step {stopped_at}, continued on the new node")
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_preempted_stage_ends_the_local_pipeline_with_75_and_the_rerun_resumes(tiny_model: Path,
                                                                                 tmp_path: Path) -> None:
    """Issue 28 item 1: a preempted stage surfaces as exit code 75 from `rlhf-jobs pipeline` (the runner Job retries
    exactly that code), here with the local backend; the same command again continues the stage from its
    checkpoint. (tests/test_kuberay.py checks the kuberay backend.)"""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--in-process",
               "--workdir", str(workdir), "--base-model", str(tiny_model), "--stages", "sft",
               "--set", "Training.num_training_workers=1", "--set", "sft.Training.epochs=1",
               "--set", "sft.Training.logging_steps=1", "--set", "sft.Training.batch_size=4"]
    log = tmp_path / "first.log"
    assert sigterm_after_a_step(command, workdir / "sft-output" / "metrics.jsonl", log) == 75, log.read_text()[-3000:]
    stopped = int(re.search(r"sft: stopped after step (\d+) \(preempted\)", log.read_text()).group(1))
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "== sft: resume" in second.stdout and f"step {stopped}/" in second.stdout + second.stderr


def test_the_pre_stop_hooks_start_without_torch_or_ray() -> None:
    """The hooks run inside a pod's grace period: `python -m rlhf_jobs.engine.preemption` must start in a second
    (importing torch, which the worker side of the preemption notice once pulled in, took seconds under load)."""
    script = ("import sys, runpy; sys.argv = ['preemption', '--wait', '0']\n"
              "try:\n    runpy.run_module('rlhf_jobs.engine.preemption', run_name='__main__')\n"
              "except SystemExit:\n    pass\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'transformers'))[:3])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, preemption.PID_DIR_ENV: "/nonexistent-rlhf-jobs-pids"})
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
