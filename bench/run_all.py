"""Benchmark against TRL: SFT tokens/s, reward-model pairs/s, DPO pairs/s, PPO s/iteration and rollout tokens/s,
and the fixed cost of Ray Train, at two model sizes. Prints the tables and writes bench/RESULTS.md (`make bench`).

Same model, records, prompt text, batch size, max length, steps and optimizer on both sides, on CPU
in fp32, the same torch threads per training process (common.SIZES). Ours runs through
`rlhf_jobs.train.train` on 1 Ray Train worker (and, as an extra line at the tiny size, 2 workers);
TRL runs in this process. Runs alternate (ours, TRL, TRL, ours, ...) `--repeats` times and the
medians are reported, because the machine may be shared. See bench/README.md for the definitions.

    python bench/run_all.py                      # both sizes, everything, 3 repeats
    python bench/run_all.py --sizes tiny --stages sft,ray --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import ours
import torch
import trl_side
from common import (
    DATA,
    MODELS,
    PPO_FILE,
    REPO,
    RM_FILE,
    SFT_FILE,
    SIZES,
    Settings,
    build_model,
    median,
    write_repeated,
    write_section,
)

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "ray")  # "ray" runs at the tiny size only: a fixed cost, not the model's

# Why we are slower where we are, and what would close it: measured (see bench/README.md), not guessed.
SLOWER_NOTES = {
    "SFT": (
        "both sides run the LM head only at labelled positions (TRL 1.12's default `chunked_nll`; ours gathers "
        "the hidden states at the labels inside the module DDP wraps); ours also packs sequences into rows without "
        "padding (exact: checked against padded outputs at start) and runs GPT-2's tanh GELU as one fused op. "
        "Where a row still shows ours slower, `bench/profile_sft_step.py` times the step's parts in one process."
    ),
    "Reward model": (
        "both sides train with dropout off (TRL's `disable_dropout=True` default). Ours packs chosen and "
        "rejected sequences without padding and reads each sequence's last token; if this row shows ours "
        "slower, profile the step as bench/profile_sft_step.py does for SFT."
    ),
    "DPO": (
        "both sides run chosen and rejected in one forward with dropout off and the reference as a second frozen "
        "copy; ours packs the sequences without padding and runs the LM head only at response positions (TRL 1.12 "
        "forces padding-free off for DPO and computes logits at every position). If this row shows ours slower, "
        "profile the step as bench/profile_sft_step.py does for SFT."
    ),
    "GRPO": (
        "`bench/profile_grpo_step.py --size 300m --iterations 3` (one process, 2 threads): generation 4.0 s "
        "(28%), the rollout's policy forward for the old log-probs 2.0 s (14%), the reference forward 1.9 s "
        "(14%), the reward function 0.001 s, the update 6.5 s (45%). TRL 1.12 skips the old log-probs when "
        "each batch gets one update (`num_iterations=1`, one step per generation): the ratio's denominator is "
        "the detached current log-probs. Ours always computes them, so that `ppo_epochs` > 1 and several "
        "minibatches stay exact and `first_update_max_log_ratio` checks that every iteration starts on-policy. "
        "Without that forward ours would be ~12.3 s against TRL's 12.8 (~0.96x); the rest is the same HF "
        "generate and the same forward/backward on both sides. What would close the gap to 0.8x: skip the "
        "old-log-prob forward when the run makes one update per rollout (entropy and KL then taken in the "
        "update's forward), and faster generation (a bf16 KV cache, or an inference engine such as vLLM on GPU)."
    ),
    "PPO": (
        "the update, the policy's and the critic's forward and backward over prompt and response, is most of "
        "an iteration (`bench/profile_ppo_step.py`: 70% at the tiny size, 51% at 300M) — compute both sides do, "
        "ours with the LM head at response positions only. Our rollout does one more policy forward than TRL's "
        "(TRL takes the old log-probs from `generate`'s logits, which keeps batch × new tokens × vocabulary "
        "logits in memory; ours recomputes them in chunks at response positions) and re-tokenises the text for "
        "the reward model, which lets the reward model have its own tokenizer. At 300M that forward is 1.0 s of "
        "our 6.6 s rollout (generation 2.7 s, policy/reference/critic forwards 1.0 s each, reward model 0.8 s), "
        "which is why our rollout tokens/s is below TRL's there while our iteration is still shorter."
    ),
    "Ray Train": (
        "the fixed cost is start-up and tear-down, not the steps (the steady-state line is the same loop on a "
        "worker and in-process): `ray.init` starts GCS, raylet, dashboard and agent processes; then Ray Train's "
        "controller starts as a new process (it no longer imports torch: `rlhf_jobs.engine.ray_backend`), reserves the "
        "placement group and starts the worker and a synchronisation actor, each a fresh process; the worker "
        "imports torch and transformers (6-9 s on this machine's two cores, shared with the others starting), "
        "sets up the process group and loads the model. Local mode pays none of these: one process, imports "
        "done by the driver. Counted with `ray_overhead.py --processes`: the processes Ray and Ray Train start "
        "before our loop runs use about 20 CPU seconds (Ray's services ~6, controller ~3, synchronisation actor "
        "~2.5, the worker's start and imports ~8): 10 s of both cores before the first step, the bar's whole +10 s. "
        "Tried and not kept: idle workers started ahead (`RAY_prestart_worker_first_driver`) are not taken by "
        "Ray Train's controller or workers even when no Ray Train variable makes their runtime environments "
        "differ, so Ray's `preload_python_modules` cannot import torch ahead for them. What avoids it: Ray Train's "
        "local mode for one-worker runs, the `local mode` column here, offered as `rlhf-jobs train --in-process` "
        "(no worker processes, at the price of Ray's out-of-memory handling and failure restarts), or more "
        "cores for the start-up processes to overlap."
    ),
}


def machine() -> dict[str, str]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    versions = {name: metadata.version(name) for name in ("torch", "transformers", "trl", "accelerate", "ray")}
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "cpu": f"{os.cpu_count()} × {cpu}", "python": platform.python_version(), **versions}


def alternate(repeats: int, *runs: Callable[[], Any]) -> list[list[Any]]:
    """Each run once per repeat, the order reversed every other repeat: no side always goes first."""
    results: list[list[Any]] = [[] for _ in runs]
    for repeat in range(repeats):
        order = list(range(len(runs)))
        for index in order if repeat % 2 == 0 else reversed(order):
            results[index].append(runs[index]())
    return results


def bench_supervised(stage: str, settings: Settings, model: Path, train_file: Path, work: Path,
                     repeats: int) -> list[dict[str, Any]]:
    make_config = {"sft": ours.sft_config, "rm": ours.rm_config, "dpo": ours.dpo_config}[stage]
    items = "tokens" if stage == "sft" else "pairs"
    trl_run = {"sft": trl_side.sft, "rm": trl_side.rm, "dpo": trl_side.dpo}[stage]
    counter = iter(range(10**6))

    def ours_run(workers: int) -> float:
        run_dir = work / f"{stage}-{settings.size}-ours-{workers}w-{next(counter)}"
        config = make_config(settings, model, train_file, run_dir, workers)
        ours.train(config)
        rate = ours.supervised_rate(config, items)
        ours.drop_weights(config)
        return rate

    trl_dir = work / f"{stage}-{settings.size}-trl"
    runs = [lambda: ours_run(1), lambda: trl_run(settings, model, train_file, trl_dir)]
    if stage == "sft" and settings.extra_rows:  # TRL's default chunked_nll: the LM head on label positions only
        runs.append(lambda: trl_side.sft(settings, model, train_file, trl_dir, loss_type="nll"))
    ours_1, trl, *trl_same = alternate(repeats, *runs)
    ours_2 = [ours_run(2) for _ in range(repeats)] if settings.extra_rows else []
    name = {"sft": "SFT training", "rm": "Reward model", "dpo": "DPO"}[stage]
    unit = "label tokens/s" if stage == "sft" else "pairs/s"
    rows = [row(f"{name} ({unit}, higher is better)", median(ours_1), median(trl), ours_1, trl, higher_is_better=True)]
    if trl_same:
        same = "TRL with loss_type='nll' (logits at every position, as ours)"
        rows.append(row(f"{name}, {same} ({unit})", median(ours_1), median(trl_same[0]), ours_1, trl_same[0],
                        higher_is_better=True))
    if ours_2:
        rows.append(row(f"{name}, ours on 2 workers × 1 CPU ({unit})", median(ours_2), median(trl), ours_2, trl,
                        higher_is_better=True))
    return rows


def bench_ppo(settings: Settings, model: Path, work: Path, repeats: int) -> list[dict[str, Any]]:
    try:
        from rlhf_jobs.algorithms import ppo  # noqa: F401
    except ImportError as err:
        print(f"PPO: skipped, rlhf_jobs.algorithms.ppo does not import ({err})")
        return [{"name": "PPO", "skipped": f"rlhf_jobs.algorithms.ppo does not import: {err}"}]
    try:
        import trl.experimental.ppo
    except ImportError as err:
        print(f"PPO: skipped, trl.experimental.ppo does not import ({err})")
        return [{"name": "PPO", "skipped": f"trl.experimental.ppo does not import: {err}"}]
    train_file = DATA / PPO_FILE
    counter = iter(range(10**6))

    def ours_run(workers: int) -> dict[str, float]:
        run_dir = work / f"ppo-{settings.size}-ours-{workers}w-{next(counter)}"
        return ours.train_for_figures(ours.ppo_config(settings, model, train_file, run_dir, workers))

    trl_dir = work / f"ppo-{settings.size}-trl"
    ours_1, trl = alternate(repeats, lambda: ours_run(1), lambda: trl_side.ppo(settings, model, train_file, trl_dir))
    ours_2 = [ours_run(2) for _ in range(repeats)] if settings.extra_rows else []

    length = f"{median(pick(ours_1, 'response_length')):.1f} vs {median(pick(trl, 'response_length')):.1f}"
    rows = [
        compare("PPO seconds per iteration (lower is better)",
                ours_1, trl, "seconds_per_iteration", higher_is_better=False),
        compare(f"PPO rollout tokens/s (response length {length})",
                ours_1, trl, "tokens_per_second", higher_is_better=True),
    ]
    if ours_2:
        rows.append(compare(f"PPO seconds per iteration, ours on 2 workers (2 × {settings.ppo_batch_size} prompts per "
                            "iteration)", ours_2, trl, "seconds_per_iteration", higher_is_better=False))
    return rows


def bench_grpo(settings: Settings, model: Path, work: Path, repeats: int) -> list[dict[str, Any]]:
    """Ours against TRL's GRPOTrainer: the same prompts, G, new tokens, batch and reward function, one update per
    batch, HF generate on both sides (`ours.grpo_config`, `trl_side.grpo`)."""
    train_file = DATA / PPO_FILE
    counter = iter(range(10**6))

    def ours_run(workers: int) -> dict[str, float]:
        run_dir = work / f"grpo-{settings.size}-ours-{workers}w-{next(counter)}"
        return ours.train_for_figures(ours.grpo_config(settings, model, train_file, run_dir, workers))

    trl_dir = work / f"grpo-{settings.size}-trl"
    ours_1, trl = alternate(repeats, lambda: ours_run(1), lambda: trl_side.grpo(settings, model, train_file, trl_dir))

    length = f"{median(pick(ours_1, 'response_length')):.1f} vs {median(pick(trl, 'response_length')):.1f}"
    rollout, update = median(pick(ours_1, "rollout_seconds")), median(pick(ours_1, "update_seconds"))
    return [
        compare("GRPO seconds per iteration (lower is better)",
                ours_1, trl, "seconds_per_iteration", higher_is_better=False),
        compare(f"GRPO rollout tokens/s (completion length {length}; ours: rollout {rollout:.2g} s + update "
                f"{update:.2g} s per iteration)", ours_1, trl, "tokens_per_second", higher_is_better=True),
    ]


def bench_ray(settings: Settings, model: Path, train_file: Path, work: Path, repeats: int) -> list[dict[str, Any]]:
    """Each run in a fresh process: `ray` pays Ray's start-up, `local` runs the loop in-process."""

    def child(mode: str) -> dict[str, float]:
        command = [sys.executable, str(Path(__file__).with_name("ray_overhead.py")), "--mode", mode,
                   "--model", str(model), "--train-file", str(train_file), "--run-dir", str(work / f"ray-{mode}"),
                   "--steps", str(settings.sft_steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise RuntimeError(f"ray_overhead.py --mode {mode} failed (exit {done.returncode})")
        return json.loads(lines[-1].removeprefix("RESULT "))

    with_ray, local = alternate(repeats, lambda: child("ray"), lambda: child("local"))

    rows = []
    for key, label, higher in (
        ("wall_seconds", f"SFT {settings.sft_steps} steps, wall from ray.init to fit() returning (s)", False),
        ("ray_init_seconds", "of which ray.init (local mode: importing ray.train) (s)", False),
        ("worker_start_seconds", "fit() to our loop running (controller, worker process, its imports) (s)", False),
        ("first_window_seconds", f"start to the end of the first {settings.logging_steps} steps (s)", False),
        ("after_last_step_seconds", "last step to fit() returning (final checkpoint and model, teardown) (s)", False),
        ("shutdown_seconds", "ray.shutdown() after fit() (s)", False),
        ("process_seconds", "the whole process: imports, data, ray.init, training, shut-down (s)", False),
        ("tokens_per_second", "steady state (label tokens/s)", True),
    ):
        rows.append(row(f"Ray Train 1 worker vs local mode: {label}", median(pick(with_ray, key)),
                        median(pick(local, key)), pick(with_ray, key), pick(local, key), higher_is_better=higher,
                        against="local mode"))
    return rows


def row(name: str, ours_value: float, other: float, ours_runs: list[float], other_runs: list[float],
        higher_is_better: bool, against: str = "TRL") -> dict[str, Any]:
    ratio = ours_value / other if other else float("nan")
    slower = ratio < 0.97 if higher_is_better else ratio > 1.03
    return {"name": name, "ours": ours_value, "other": other, "ratio": ratio, "ours_runs": ours_runs,
            "other_runs": other_runs, "against": against, "slower": slower}


def pick(results: list[dict[str, float]], key: str) -> list[float]:
    """One figure of every run."""
    return [r[key] for r in results]


def compare(name: str, ours_runs: list[dict[str, float]], other_runs: list[dict[str, float]], key: str,
            higher_is_better: bool) -> dict[str, Any]:
    """The `row` of one figure (`key`) of every run on both sides, medians compared."""
    mine, other = pick(ours_runs, key), pick(other_runs, key)
    return row(name, median(mine), median(other), mine, other, higher_is_better=higher_is_better)


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| measure | ours | TRL (or local mode) | ours / TRL | runs: ours ; other |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | |")
            continue
        runs = ", ".join(map(fmt, r["ours_runs"])) + " ; " + ", ".join(map(fmt, r["other_runs"]))
        ratio = f"{r['ratio']:.2f}"
        if r["name"].endswith("(s)"):  # start-up costs: the difference says more than the ratio
            ratio += f" ({r['ours'] - r['other']:+.1f} s)"
        lines.append(f"| {r['name']} | {fmt(r['ours'])} | {fmt(r['other'])} | {ratio} | {runs} |")
    return "\n".join(lines)


def settings_lines(settings: Settings) -> str:
    minibatches = settings.ppo_batch_size // settings.ppo_mini_batch_size
    return f"""- Model: {MODELS[settings.size]}; CPU, fp32, AdamW,
  {settings.threads} torch thread(s) per training process.
- SFT / RM: batch {settings.batch_size} sequences / {settings.stage_batch_size("rm")} pairs, max length \
{settings.max_length}, {settings.sft_steps} / {settings.rm_steps} steps, windows of {settings.logging_steps} steps, \
cosine schedule with {settings.warmup_ratio:.0%} warm-up.
- DPO: the RM's pairs, batch and steps, beta {settings.dpo_beta}, sigmoid loss, learning rate \
{settings.dpo_learning_rate:g}, the reference a second frozen copy of the model.
- PPO: {settings.ppo_batch_size} prompts per rollout, {settings.max_new_tokens} new tokens, {settings.ppo_epochs} PPO \
epochs × {minibatches} minibatch(es), {settings.ppo_iterations} iterations.
- GRPO: {settings.grpo_prompts} prompts × {settings.num_generations} completions per iteration, \
{settings.max_new_tokens} new tokens, one update per batch, token-mean loss, KL {settings.grpo_kl_coeff} (k3) in the \
loss, learning rate {settings.grpo_learning_rate:g}, {settings.grpo_iterations} iterations, reward \
`common.length_reward`."""


def section_name(stages: list[str] | None) -> str:
    """`throughput` for a run of every stage; a run of some stages writes its own section beside it."""
    return "throughput" if not stages or set(stages) == set(STAGES) else "throughput-" + "-".join(stages)


def write_results(path: Path, results: dict[str, list[dict[str, Any]]], info: dict[str, str], repeats: int,
                  command: str, seconds: float, stages: list[str] | None = None) -> None:
    """RESULTS.md: one section per model size (`results`: size -> rows)."""
    rows = [r for size_rows in results.values() for r in size_rows]
    notes = [f"- **{prefix}**: {text}" for prefix, text in SLOWER_NOTES.items()
             if any(r.get("slower") and r["name"].startswith(prefix) for r in rows)]
    sections = "\n".join(f"""
### Model: {size}

{settings_lines(SIZES[size])}

{table(size_rows)}
""" for size, size_rows in results.items())
    title = "" if section_name(stages) == "throughput" else f": {', '.join(stages or [])}"
    text = f"""## Throughput against TRL (`make bench`){title}

Latest figures from `{command}` ({seconds / 60:.0f} min). Reproduce with `make bench`, or
`.venv-bench/bin/python bench/run_all.py` in a venv holding `pip install -e '.[bench]'` (trl==1.12.0).

- Date: {info['date']}; machine: {info['cpu']}; Python {info['python']}
- Versions: torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']},
  accelerate {info['accelerate']}, ray {info['ray']}
- Each figure is the median of {repeats} runs, ours and TRL alternating; every run's figure is listed.
  Ratio = ours / TRL: above 1 is better for ours for rates, below 1 for seconds.
{sections}"""
    if notes:
        text += "\n### Where we are slower, and why\n\n" + "\n".join(notes) + "\n"
    write_section(path, section_name(stages), text)


def bench_size(size: str, stages: list[str], work: Path, repeats: int) -> list[dict[str, Any]]:
    settings = SIZES[size]
    torch.set_num_threads(settings.threads)  # TRL runs here; ours sets the same in each worker
    model = build_model(size, work)
    # One epoch holds every timed step, so our per-epoch checkpoint comes after them (TRL saves nothing).
    data = work / "data"
    sft_file = write_repeated(DATA / SFT_FILE, data / f"sft-{size}.jsonl", settings.sft_steps * settings.batch_size)
    rm_file = write_repeated(DATA / RM_FILE, data / f"rm-{size}.jsonl",
                             settings.rm_steps * settings.stage_batch_size("rm"))
    rows: list[dict[str, Any]] = []
    if "sft" in stages:
        rows += bench_supervised("sft", settings, model, sft_file, work, repeats)
    if "rm" in stages:
        rows += bench_supervised("rm", settings, model, rm_file, work, repeats)
    if "dpo" in stages:  # the reward model's pairs: the same records, batch and steps
        rows += bench_supervised("dpo", settings, model, rm_file, work, repeats)
    if "ppo" in stages:
        rows += bench_ppo(settings, model, work, repeats)
    if "grpo" in stages:
        rows += bench_grpo(settings, model, work, repeats)
    if "ray" in stages and size == "tiny":
        rows += bench_ray(settings, model, sft_file, work, repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {','.join(SIZES)}")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--from-json", type=Path, help="rewrite --output from a results.json of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_results(args.output, saved["results"], saved["info"], saved["repeats"], saved["command"],
                      saved["seconds"], saved.get("stages"))
        for size, rows in saved["results"].items():
            print(f"\n{size}\n{table(rows)}")
        return
    sizes = [s for s in args.sizes.split(",") if s]
    stages = [s for s in args.stages.split(",") if s]
    for name, chosen, known in (("size", sizes, SIZES), ("stage", stages, STAGES)):
        unknown = set(chosen) - set(known)
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(sorted(unknown))}; expected {', '.join(known)}")

    for name, value in (("TRL_EXPERIMENTAL_SILENCE", "1"), ("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0"),
                        ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    started = time.perf_counter()
    work = args.workdir.resolve()
    results = {size: bench_size(size, stages, work, args.repeats) for size in sizes}

    command = ("python bench/run_all.py " + " ".join(sys.argv[1:])).strip()
    seconds, info = time.perf_counter() - started, machine()
    saved = {"results": results, "info": info, "settings": {size: dataclasses.asdict(SIZES[size]) for size in sizes},
             "repeats": args.repeats, "command": command, "seconds": seconds, "stages": stages}
    (work / "results.json").write_text(json.dumps(saved, indent=1))
    write_results(args.output, results, info, args.repeats, command, seconds, stages)
    for size, rows in results.items():
        print(f"\n{size}\n{table(rows)}")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
