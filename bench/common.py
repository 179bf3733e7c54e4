"""What both sides of the benchmark share: the models, the data, the settings, the windows.

Throughput is measured the same way for us and for TRL: the training run is cut into windows of
`LOGGING_STEPS` optimizer steps (PPO: one iteration); a window's rate is what it processed divided
by its wall time; the first window (warm-up) is dropped and the median of the others is reported.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
SFT_FILE, RM_FILE, PPO_FILE = "sample_finetune_data.jsonl", "sample_rm_data.jsonl", "sample_ppo_data.jsonl"


@dataclass(frozen=True)
class Settings:
    """One set of hyperparameters, given to both sides."""

    size: str = "tiny"  # the model: a key of MODELS
    sft_steps: int = 60
    rm_steps: int = 60
    ppo_iterations: int = 8
    batch_size: int = 8  # SFT sequences / RM pairs per step
    rm_batch_size: int | None = None  # RM pairs per step when not batch_size
    max_length: int = 256
    logging_steps: int = 5
    sft_learning_rate: float = 3e-3
    rm_learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    # PPO: 16 prompts per rollout, 2 minibatches of 8, 4 PPO epochs -> 8 optimizer steps per iteration
    ppo_batch_size: int = 16
    ppo_mini_batch_size: int = 8
    ppo_epochs: int = 4
    max_new_tokens: int = 24
    max_prompt_length: int = 96
    ppo_learning_rate: float = 1e-4
    kl_coeff: float = 0.1
    # GRPO: 8 prompts × 4 completions per iteration, one update per batch (TRL: num_iterations=1); KL to the
    # reference in the loss (k3, the GRPO paper's form), so the reference forward is part of the rollout.
    grpo_prompts: int = 8
    num_generations: int = 4
    grpo_iterations: int = 8
    grpo_learning_rate: float = 1e-5
    grpo_kl_coeff: float = 0.04
    # DPO: pairs per step and steps as the reward model's (stage_batch_size("dpo"), rm_steps).
    dpo_learning_rate: float = 5e-6
    dpo_beta: float = 0.1
    threads: int = 1  # torch threads per process/worker (ours: resources_per_worker.CPU)
    extra_rows: bool = True  # also ours on 2 workers, and TRL's SFT with loss_type="nll"

    def stage_batch_size(self, stage: str) -> int:
        return (self.rm_batch_size or self.batch_size) if stage in ("rm", "dpo") else self.batch_size


# The tiny model measures overheads; the 300M one a model where the matrix multiplies and the
# 32k-token LM head dominate. A 300M training step over 8 sequences took 25-60 s on this machine's
# two cores (TRL's, with other work running), so its runs are smaller, chosen to keep `make bench`
# around an hour: 4 SFT sequences / 2 RM pairs per step, 8 steps in windows of 2 (the first window
# still dropped); PPO with 4 prompts, 16 new tokens, one PPO epoch of one minibatch, 4 iterations;
# GRPO with 2 prompts × 4 completions of 16 new tokens, 4 iterations; DPO as the RM (2 pairs, 8 steps);
# and both cores for the one training process of each side (the same on both). 2 workers would
# need twice the memory and cores this machine has, so no extra rows there.
MODELS = {
    "tiny": "the tiny GPT-2 (`rlhf-jobs tiny-model`: 2 layers, 128 dims, BPE vocab 2048), 0.8M parameters",
    "300m": "a random-init Llama-architecture model (`tiny_model.build_llama(dir, \"300m\")`: 20 layers, "
            "1024 dims, 16 heads / 8 KV heads, vocab 32000, untied LM head), 302M parameters, stored in fp32",
}
SIZES = {
    "tiny": Settings(),
    "300m": Settings(
        size="300m", batch_size=4, rm_batch_size=2, sft_steps=8, rm_steps=8, logging_steps=2, ppo_iterations=4,
        ppo_batch_size=4, ppo_mini_batch_size=4, ppo_epochs=1, max_new_tokens=16, threads=2, extra_rows=False,
        grpo_prompts=2, grpo_iterations=4,
    ),
}


# The GRPO rows' reward: a Python function with TRL's signature (`fn(prompts, completions, **columns)`), the same
# on both sides. Near TARGET_WORDS words scores 0, further away less: random-init models' completions differ in
# length within a group, so advantages are not all zero.
TARGET_WORDS = 8


def length_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """-|words - TARGET_WORDS| / TARGET_WORDS for each completion."""
    return [-abs(len(completion.split()) - TARGET_WORDS) / TARGET_WORDS for completion in completions]


def build_model(size: str, work: Path) -> Path:
    """The benchmark's model of `size`, built once under `work` (random init, no hub)."""
    from rlhf_jobs.tools import tiny_model

    path = work / f"model-{size}"
    if not (path / "config.json").exists():
        if size == "tiny":
            tiny_model.build_tiny_model(path)
        else:  # fp32 on disk: both sides train fp32 on CPU, whatever the loader does with bf16 checkpoints
            tiny_model.build_llama(path, size, dtype="float32")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_repeated(source: Path, target: Path, records_needed: int) -> Path:
    """`source` repeated until it holds `records_needed` records, so the run is one epoch.

    One epoch means our loop's per-epoch evaluation/checkpoint falls after the timed steps.
    """
    records = read_jsonl(source)
    copies = -(-records_needed // len(records))
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for _ in range(copies):
            for record in records:
                handle.write(json.dumps(record) + "\n")
    return target


def windowed_rate(step_ends: list[float], start: float, items: list[float], window: int) -> float:
    """Median items/s over windows of `window` steps, leaving out the first (warm-up).

    `step_ends[i]` is when step i finished, `items[i]` what it processed, `start` when step 0 began.
    """
    rates = []
    previous = start
    for end in range(window, len(step_ends) + 1, window):
        elapsed = step_ends[end - 1] - previous
        rates.append(sum(items[end - window : end]) / max(elapsed, 1e-9))
        previous = step_ends[end - 1]
    return median(rates[1:] or rates)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def metrics_records(output_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    return [r for r in read_jsonl(path) if r.get("split") == split] if path.exists() else []


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the `name` section of a results file (between its markers), or append it.

    RESULTS.md holds the sections of several scripts (`run_all.py`: throughput, `memory.py`: memory);
    each rewrites its own and keeps the others.
    """
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    current = path.read_text() if path.exists() else ""
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        current = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        current = (current.rstrip() if current.strip() else TITLE) + "\n\n" + block
    path.write_text(current)


TITLE = "# Benchmark results\n\nHow each figure is measured: bench/README.md."
