"""Steps redone after a fault (`make bench-faults`; a measurement, not a test).

SFT on the tiny GPT-2, 2 workers × 1 CPU, a checkpoint every `--save-steps` steps, every step logged.
Each scenario starts a fresh run, waits until rank 0 has logged step `--at`, then:

- `sigint-driver`: SIGINT to the `rlhf-jobs train` process (Ctrl-C), then the same command again;
- `sigkill-driver`: SIGKILL to that process alone (its Ray dies with it), then the same command again;
- `sigkill-worker`: SIGKILL to one Ray Train worker; Ray Train restarts the worker group itself
  (`max_failures`) and the run goes on in the same command.

Steps redone = the last step logged before the fault − the step the run continued from (the step
before the first one logged again). The target is at most the checkpoint interval.

    python bench/faults.py                 # all three, --save-steps 5 --at 23
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("sigint-driver", "sigkill-driver", "sigkill-worker")


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record and isinstance(record.get("step"), int):
            steps.append(record["step"])
    return steps


def train_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_jobs.cli", "train", "sft", "--config_path", str(config)]


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the run ended (exit {process.returncode}) before step {step}")
        if any(s >= step for s in logged_steps(output_dir)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not logged in {timeout:.0f} s")


def train_workers(root: int) -> list[int]:
    """Ray Train worker processes under `root` (the driver's process tree)."""
    parents, commands = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                commands[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])

    def under(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 1)
        return False

    return [pid for pid, command in commands.items() if "RayTrainWorker" in command and under(pid)]


def scenario(name: str, model: Path, work: Path, save_steps: int, at: int) -> dict[str, object]:
    base = yaml.safe_load((REPO / "configs" / "local" / "sft.yaml").read_text())
    output_dir = work / name / "sft-output"
    base["General"].update(base_model=str(model), output_dir=str(output_dir), checkpoint_dir=str(work / name / "sft"))
    base["Dataset"]["train_file"] = str(REPO / base["Dataset"]["train_file"])
    base["Training"].update(save_steps=save_steps, logging_steps=1, epochs=8, max_failures=2)
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(base))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(work / f"{name}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(train_command(config), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for_step(process, output_dir, at)
    before = max(logged_steps(output_dir))
    if name == "sigkill-worker":
        workers = train_workers(process.pid)
        if not workers:
            raise RuntimeError("no Ray Train worker found under the driver")
        os.kill(workers[-1], signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGINT if name == "sigint-driver" else signal.SIGKILL)
        process.wait(timeout=300)
        if name == "sigkill-driver":
            time.sleep(5)  # the killed driver's Ray processes notice and exit
        process = subprocess.Popen(train_command(config), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    steps_before = len(logged_steps(output_dir))
    code = process.wait(timeout=900)
    steps = logged_steps(output_dir)
    last_before = max(steps[:steps_before])
    again = steps[steps_before:]
    continued_from = again[0] - 1 if again else None
    return {"scenario": name, "exit": code, "last step logged before": last_before, "at fault": before,
            "continued from": continued_from,
            "steps redone": None if continued_from is None else last_before - continued_from,
            "checkpoint interval": save_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--at", type=int, default=23, help="the fault comes once this step is logged")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-model"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "rlhf_jobs.cli", "tiny-model", "--output", str(model)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    for name in args.scenarios.split(","):
        print(json.dumps(scenario(name, model, work, args.save_steps, args.at)), flush=True)


if __name__ == "__main__":
    main()
