"""One SFT run of our loop, with Ray Train workers (`--mode ray`) or in Ray Train V2's local mode
(`--mode local`, what `rlhf-jobs train --in-process` does: `ScalingConfig(num_workers=0)` runs the
same train function in this process, no Ray started, no worker actor). run_all.py starts it in a
fresh process per run, so Ray's start-up and shut-down are part of what `ray` measures. Prints one
`RESULT {json}` line; with `--processes` also where the time goes: every process Ray starts for the
run, when it appeared and the CPU seconds it used.

    python bench/ray_overhead.py --mode ray --model runs/bench/model-tiny \\
        --train-file runs/bench/data/sft-tiny.jsonl --run-dir runs/bench/ray-overhead --steps 60 --processes
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the imports: a fresh process pays them in both modes

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import Settings, metrics_records  # noqa: E402
from ours import sft_config, supervised_rate  # noqa: E402

from rlhf_jobs.algorithms import sft  # noqa: E402
from rlhf_jobs.engine import launcher  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessWatch:
    """This process's descendants (Ray's services and actors): when each appeared, its name and CPU seconds."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.start = interval, time.perf_counter()
        self.seen: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            parents, info = {}, {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                parents[int(entry)] = int(fields[1])
                info[int(entry)] = (command, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
            now = time.perf_counter() - self.start
            for pid, (command, cpu) in info.items():
                ancestor, depth = parents.get(pid, 0), 0
                while ancestor not in (me, 0, 1) and depth < 8:
                    ancestor, depth = parents.get(ancestor, 0), depth + 1
                if ancestor != me:
                    continue
                entry = self.seen.setdefault(pid, {"pid": pid, "appeared": round(now, 2), "name": ""})
                entry["cpu_seconds"] = cpu
                name = _process_name(command)  # a Ray worker renames itself once it knows its actor
                if name and (not entry["name"].startswith("ray::") or entry["name"] == "ray::IDLE"):
                    entry["name"] = name
            self._stop.wait(self.interval)

    def report(self) -> list[dict[str, Any]]:
        return sorted(self.seen.values(), key=lambda e: e["appeared"])


def _process_name(command: list[bytes]) -> str:
    words = [w.decode(errors="replace") for w in command if w]
    if not words:
        return ""
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]  # ray::RayTrainWorker.run_train_fn -> ray::RayTrainWorker
    scripts = [w for w in words[1:] if w.endswith(".py") or "/ray/" in w]
    return "/".join(Path(scripts[0] if scripts else words[0]).parts[-2:])


def timed_loop(loop_config: dict[str, Any]) -> None:
    """Our SFT loop, noting when it started on the worker (after the worker imported it)."""
    started = time.time()
    sft.train_loop(loop_config)
    Path(loop_config["config"]["General"]["output_dir"], "loop_started.json").write_text(json.dumps(started))


def run(mode: str, model: Path, train_file: Path, run_dir: Path, settings: Settings,
        watch: bool) -> dict[str, Any]:
    config = sft_config(settings, model, train_file, run_dir, workers=1)
    data = sft.SFTTask().prepare(config)  # the driver's data preparation: the same in both modes
    start = time.perf_counter()
    started_at = time.time()
    watcher = ProcessWatch() if watch else None
    if watcher:
        watcher.__enter__()
    if mode == "ray":
        launcher.init_ray(config.Training)
        ray_ready = time.perf_counter()
        launcher.run_trainer(config, timed_loop, data=data)
        fitted = time.perf_counter()
        import ray

        ray.shutdown()
    else:  # what `rlhf-jobs train --in-process` runs
        ray_ready = time.perf_counter()
        launcher.run_trainer(config, timed_loop, data=data, in_process=True)
        fitted = time.perf_counter()
    end = time.perf_counter()
    if watcher:
        watcher.__exit__()
    output = Path(config.General.output_dir)
    records = metrics_records(output)
    loop_started = json.loads((output / "loop_started.json").read_text()) - started_at
    last_log = records[-1]["time"] - started_at if records else float("nan")
    result: dict[str, Any] = {
        "process_seconds": end - PROCESS_START,  # interpreter start to the end, Ray's shut-down included
        "wall_seconds": fitted - start,  # from before ray.init to fit() returning
        "ray_init_seconds": ray_ready - start,
        # from fit() to the train function running on the worker (controller and worker start, imports)
        "worker_start_seconds": loop_started - (ray_ready - start),
        # from the start to the end of the first logging window (model load, worker start, first steps)
        "first_window_seconds": records[0]["time"] - started_at if records else float("nan"),
        # from the last step's log to fit() returning (final checkpoint, model save, worker teardown)
        "after_last_step_seconds": fitted - start - last_log,
        "shutdown_seconds": end - fitted,
        "tokens_per_second": supervised_rate(config, "tokens"),
    }
    if watcher:
        result["processes"] = watcher.report()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ray", "local"), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=Settings.sft_steps)
    parser.add_argument("--processes", action="store_true", help="also list the processes Ray starts")
    args = parser.parse_args()
    result = run(args.mode, args.model, args.train_file, args.run_dir, Settings(sft_steps=args.steps),
                 args.processes)
    if args.processes:
        print(f"{'appeared (s)':>12} {'CPU (s)':>8}  process")
        for entry in result["processes"]:
            print(f"{entry['appeared']:12.2f} {entry['cpu_seconds']:8.2f}  {entry['name'] or entry['pid']}")
        print("phases: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("_seconds")))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
