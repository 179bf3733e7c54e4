"""Peak memory per worker and throughput of SFT, the reward model, DPO, PPO and GRPO on a random-init
Llama-architecture model of a given size: full fine-tuning, LoRA and FSDP, and TRL's PPO at the
same settings (`make bench-memory`; a benchmark, not a test). GRPO's rows are compared with PPO's of the same
variant in the same run (the same sequences per rollout: PPO's 8 prompts, GRPO's 2 prompts × 4 completions).

Every run is a fresh process with its own Ray. Peak memory per worker:
- CPU: the resident set of each Ray Train worker process, sampled from /proc every half second
  (`VmHWM`, the kernel's own high-water mark, so no peak between samples is missed); the worker's
  own figure (`memory_peak_gib` in metrics.jsonl, its `ru_maxrss`) is shown beside it;
- GPU (`--device cuda`): `torch.cuda.max_memory_allocated` of each worker (`memory_peak_gib`).
TRL runs in one process; its peak is that process's. Throughput: label tokens/s (SFT), pairs/s
(RM), seconds per iteration (PPO), as in `run_all.py` (first window left out).

The machine is shared (24 GiB for everything here): a run whose processes together hold more
than `--limit-gib` is stopped and shown as over the limit, instead of waking the OOM killer.

    python bench/memory.py --size 300m                      # every stage and variant, and TRL's PPO
    python bench/memory.py --size 1b --stages ppo --variants lora --no-trl
    python bench/memory.py --size 300m --stages ppo,grpo --variants full,lora --no-trl   # GRPO against PPO
    python bench/memory.py --size 750m --stages grpo --variants fsdp+bf16 --no-trl --limit-gib 22
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import DATA, PPO_FILE, REPO, RM_FILE, SFT_FILE, SIZES, Settings, write_repeated, write_section

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
# variant -> (workers, Training keys). LoRA as the README recommends it; FSDP needs two workers to shard.
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "full": (1, {}),
    "lora": (1, {"lora": {"r": 16}}),
    # The memory knob the out-of-memory advice names first, on both: activations no longer decide the ratio.
    "full+gc": (1, {"gradient_checkpointing": True}),
    "lora+gc": (1, {"lora": {"r": 16}, "gradient_checkpointing": True}),
    # As real checkpoints train (README): bf16 compute, frozen weights (reference, reward model, LoRA's bases) in
    # bf16, trained weights fp32 masters; with gradient checkpointing.
    "full+bf16": (1, {"mixed_precision": "bf16", "gradient_checkpointing": True}),
    "lora+bf16": (1, {"lora": {"r": 16}, "mixed_precision": "bf16", "gradient_checkpointing": True}),
    "ddp": (2, {}),  # full copies on each of 2 workers: what FSDP is compared with (issue 14)
    "ddp+bf16": (2, {"mixed_precision": "bf16", "gradient_checkpointing": True}),
    "fsdp": (2, {"strategy": "fsdp"}),
    "fsdp+bf16": (2, {"strategy": "fsdp", "mixed_precision": "bf16", "gradient_checkpointing": True}),
    "lora+fsdp": (2, {"lora": {"r": 16}, "strategy": "fsdp"}),
}
DEFAULT_VARIANTS = ("full", "lora", "fsdp")
# What a variant's peak is divided by in the table (same knobs, everything trained, one copy per worker).
BASELINE = {"lora+gc": "full+gc", "lora+bf16": "full+bf16", "fsdp": "ddp", "fsdp+bf16": "ddp+bf16", "lora+fsdp": "ddp"}
TRAIN_WORKER = "ray::RayTrainWorker"


def settings_for(size: str) -> Settings:
    """Short runs: memory peaks within the first steps; throughput from the windows after the first."""
    base = SIZES.get(size, SIZES["300m"])
    return dataclasses.replace(base, size=size, sft_steps=4, rm_steps=4, logging_steps=2, ppo_iterations=3,
                               ppo_batch_size=8, ppo_mini_batch_size=8, ppo_epochs=1, max_new_tokens=16,
                               grpo_prompts=2, num_generations=4, grpo_iterations=3,
                               threads=1, extra_rows=False)


def device_training(device: str) -> dict[str, Any]:
    if device == "cuda":  # the way a GPU run is configured: bf16 autocast, frozen models in bf16
        return {"resources_per_worker": {"CPU": 1, "GPU": 1}, "mixed_precision": "bf16"}
    return {}


# ---- one run, in its own process ---------------------------------------------------------------------------


def model_dir(size: str, work: Path, device: str) -> Path:
    """A random-init Llama of `size`, stored in bf16 (as real checkpoints are) on GPU, fp32 on CPU."""
    from rlhf_jobs.tools import tiny_model

    dtype = "bfloat16" if device == "cuda" else "float32"
    path = work / f"llama-{size}-{dtype}"
    if not (path / "config.json").exists():
        tiny_model.build_llama(path, size, dtype=dtype)
    return path


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import ours
    from common import metrics_records

    settings, work = Settings(**spec["settings"]), Path(spec["work"])
    workers, training = VARIANTS[spec["variant"]]
    training = {**training, **device_training(spec["device"])}
    model = Path(spec["model"])
    run_dir = work / f"{spec['stage']}-{spec['variant']}"
    data = work / "data"
    if spec["stage"] == "ppo":
        config = ours.ppo_config(settings, model, DATA / PPO_FILE, run_dir, workers, training)
    elif spec["stage"] == "grpo":  # grpo_prompts in all: the same global batch on 1 or 2 workers
        config = ours.grpo_config(settings, model, DATA / PPO_FILE, run_dir, workers, training)
    else:
        source, steps = (SFT_FILE, settings.sft_steps) if spec["stage"] == "sft" else (RM_FILE, settings.rm_steps)
        train_file = write_repeated(DATA / source, data / f"{spec['stage']}.jsonl", steps * settings.batch_size * 2)
        config = ours.supervised_config(spec["stage"], settings, model, train_file, run_dir, workers, training)
    ours.train(config)
    records = metrics_records(Path(config.General.output_dir))
    logged = max((r.get("memory_peak_gib") or 0.0 for r in records), default=float("nan"))
    if spec["stage"] in ("ppo", "grpo"):
        figures = ours.rl_figures(config)
        result = {"logged_gib": logged, "rate": figures["seconds_per_iteration"], "unit": "s/iteration",
                  "rollout_tokens_per_second": figures["tokens_per_second"]}
    else:
        items = "tokens" if spec["stage"] == "sft" else "pairs"
        result = {"logged_gib": logged, "rate": ours.supervised_rate(config, items), "unit": f"{items}/s"}
    ours.drop_weights(config)  # as run_all.py: a 0.47B PPO run leaves several GB of models and checkpoints
    return result


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch
    import trl_side

    settings = Settings(**spec["settings"])
    torch.set_num_threads(settings.threads)
    lora = VARIANTS[spec["variant"]][1].get("lora")
    figures = trl_side.ppo(settings, Path(spec["model"]), DATA / PPO_FILE, Path(spec["work"]) / "ppo-trl", lora=lora)
    return {"logged_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rate": figures["seconds_per_iteration"], "unit": "s/iteration"}


# ---- the parent: start, watch, stop ------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), command)
    return found


def _descendants(root: int, processes: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def watch(spec: dict[str, Any], limit_gib: float) -> dict[str, Any]:
    """Run `spec` in a child process; per-worker peak RSS from /proc; stop it past `limit_gib` in all."""
    command = [sys.executable, __file__, "--one", json.dumps(spec)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, bufsize=1)
    output: list[str] = []
    peaks: dict[int, int] = {}  # pid -> VmHWM (KiB) of the measured processes
    over = 0.0
    os.set_blocking(child.stdout.fileno(), False)
    family: list[int] = [child.pid]
    try:
        while child.poll() is None:
            time.sleep(0.5)
            output.extend(child.stdout.readlines())
            processes = _processes()
            family = _descendants(child.pid, processes)
            for pid in family:
                command = processes.get(pid, (0, ""))[1]
                if (pid == child.pid) if spec["kind"] == "trl" else command.startswith(TRAIN_WORKER):
                    peaks[pid] = max(peaks.get(pid, 0), _status_kib(pid, "VmHWM"))
            total = sum(_status_kib(pid, "VmRSS") for pid in family) / 2**20
            if total > limit_gib:
                over = total
                break
    finally:  # past the limit, or this process is being stopped: the run's own processes go too, by id
        if child.poll() is None:
            for pid in reversed(family):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    child.wait()
    output.extend(child.stdout.readlines() if child.stdout else [])
    lines = [line for line in output if line.startswith("RESULT ")]
    result: dict[str, Any] = {"sampled_gib": max(peaks.values(), default=0) / 2**20, "workers": len(peaks)}
    if over:
        result["error"] = (f"stopped: its processes held {over:.1f} GiB (> --limit-gib {limit_gib:g}), "
                           f"{result['sampled_gib']:.2f} GiB per worker by then")
    elif child.returncode or not lines:
        tail = "".join(output[-30:])
        result["error"] = f"failed (exit {child.returncode})"
        sys.stderr.write(tail)
    else:
        result.update(json.loads(lines[-1].removeprefix("RESULT ")))
    return result


def run_matrix(size: str, stages: list[str], variants: list[str], device: str, trl: bool, limit_gib: float,
               work: Path) -> list[dict[str, Any]]:
    settings = settings_for(size)
    model = model_dir(size, work, device)
    runs = [("ours", stage, variant) for stage in stages for variant in variants]
    if trl and "ppo" in stages and device == "cpu":
        runs += [("trl", "ppo", variant) for variant in variants if VARIANTS[variant][0] == 1]
    rows = []
    for kind, stage, variant in runs:
        spec = {"kind": kind, "stage": stage, "variant": variant, "device": device, "model": str(model),
                "work": str(work / kind), "settings": dataclasses.asdict(settings)}
        started = time.perf_counter()
        result = watch(spec, limit_gib)
        row = {"kind": kind, "stage": stage, "variant": variant, "workers": VARIANTS[variant][0], **result,
               "seconds": time.perf_counter() - started}
        rows.append(row)
        print(format_row(row, device), flush=True)
    return rows


# ---- output ---------------------------------------------------------------------------------------------------


def peak(row: dict[str, Any], device: str) -> float:
    """The figure the table compares: sampled RSS on CPU (the worker's own figure if none), GPU allocation on GPU."""
    if device == "cuda":
        return row.get("logged_gib", float("nan"))
    return row.get("sampled_gib") or row.get("logged_gib", float("nan"))


def format_row(row: dict[str, Any], device: str) -> str:
    who = "TRL" if row["kind"] == "trl" else "ours"
    if "error" in row:
        return f"{row['stage']:<4} {who:<4} {row['variant']:<9} {row['workers']}w  {row['error']}"
    return (f"{row['stage']:<4} {who:<4} {row['variant']:<9} {row['workers']}w  "
            f"peak {peak(row, device):6.2f} GiB/worker (logged {row.get('logged_gib', float('nan')):.2f})  "
            f"{row['rate']:.4g} {row['unit']}")


def table(rows: list[dict[str, Any]], device: str) -> str:
    memory = "peak GPU memory allocated per worker (GiB)" if device == "cuda" else "peak RSS per worker (GiB)"
    lines = [f"| stage | trainer | variant | workers | {memory} | worker's own figure (GiB) | throughput | "
             "peak / baseline |", "|---|---|---|---:|---:|---:|---|---:|"]
    measured = {(r["kind"], r["stage"], r["variant"]): peak(r, device) for r in rows if "error" not in r}
    for r in rows:
        who = "TRL" if r["kind"] == "trl" else "ours"
        if "error" in r:
            lines.append(f"| {r['stage']} | {who} | {r['variant']} | {r['workers']} | {r['error']} | | | |")
            continue
        base = measured.get((r["kind"], r["stage"], BASELINE.get(r["variant"], "full")))
        ratio = f"{peak(r, device) / base:.2f}" if base else ""
        ppo = measured.get((r["kind"], "ppo", r["variant"])) if r["stage"] == "grpo" else None
        ratio += f"{'; ' if ratio else ''}{peak(r, device) / ppo:.2f} of PPO's" if ppo else ""
        lines.append(f"| {r['stage']} | {who} | {r['variant']} | {r['workers']} | {peak(r, device):.2f} | "
                     f"{r.get('logged_gib', float('nan')):.2f} | {r['rate']:.4g} {r['unit']} | {ratio} |")
    return "\n".join(lines)


def write_results(path: Path, rows: list[dict[str, Any]], size: str, device: str, command: str,
                  seconds: float) -> None:
    settings = settings_for(size)
    text = f"""## Memory per worker (`make bench-memory`)

Latest figures from `{command}` ({seconds / 60:.0f} min), {device.upper()}, a random-init Llama-architecture model
of size `{size}` (`rlhf_jobs.tools.tiny_model.build_llama`). Full = every weight trained (DDP), LoRA = `Training.lora:
{{r: 16}}` on all linear layers, FSDP = `Training.strategy: fsdp` over 2 workers. SFT/RM: batch
{settings.batch_size}, max length {settings.max_length}, {settings.sft_steps} steps; PPO: {settings.ppo_batch_size}
prompts, {settings.max_new_tokens} new tokens, {settings.ppo_epochs} PPO epoch, {settings.ppo_iterations} iterations;
GRPO: {settings.grpo_prompts} prompts × {settings.num_generations} completions (the same sequences per rollout), \
{settings.max_new_tokens} new tokens, one update, KL {settings.grpo_kl_coeff} in the loss (a reference model), \
{settings.grpo_iterations} iterations; DPO: the RM's pairs, batch and steps; {settings.threads} thread per worker.
One run each (a memory peak does not vary between runs the way a rate does).

{table(rows, device)}
"""
    stages = sorted({r["stage"] for r in rows})
    named = "" if stages == ["ppo"] else "-" + "-".join(stages)  # the older sections are PPO's alone
    write_section(path, f"memory-{device}-{size}{named}-{'-'.join(sorted({r['variant'] for r in rows}))}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="300m", help="a key of tiny_model.LLAMA_SHAPES (tiny, 300m, 1b...)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's PPO")
    parser.add_argument("--limit-gib", type=float, default=20.0, help="stop a run whose processes hold more")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-memory")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec in this process
    args = parser.parse_args()
    for name, value in (("TRL_EXPERIMENTAL_SILENCE", "1"), ("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0"),
                        ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    if args.one:
        spec = json.loads(args.one)
        result = run_trl(spec) if spec["kind"] == "trl" else run_ours(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `watch`'s cleanup when stopped
    stages, variants = args.stages.split(","), args.variants.split(",")
    for name, chosen, known in (("stage", stages, STAGES), ("variant", variants, VARIANTS)):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(unknown)}; expected {', '.join(known)}")
    started = time.perf_counter()
    rows = run_matrix(args.size, stages, variants, args.device, not args.no_trl, args.limit_gib,
                      args.workdir.resolve())
    command = ("python bench/memory.py " + " ".join(sys.argv[1:])).strip()
    write_results(args.output, rows, args.size, args.device, command, time.perf_counter() - started)
    print("\n" + table(rows, args.device))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
