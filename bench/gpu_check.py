"""SFT, the reward model, DPO, PPO and GRPO on one GPU, bf16, full fine-tuning and LoRA, on a random-init
Llama-architecture model built here (no hub): peak GPU memory and throughput of each (`make gpu-check`).

Each stage runs through `rlhf-jobs`' own trainers on one Ray Train worker holding the GPU
(`resources_per_worker: {CPU: 1, GPU: 1}`, `mixed_precision: bf16`; trainable weights fp32,
frozen ones bf16). Peak memory is the worker's `torch.cuda.max_memory_allocated`, as the loops log
it (`memory_peak_gib`); throughput is label tokens/s (SFT), pairs/s (RM), seconds per iteration and
rollout tokens/s (PPO, GRPO), first window left out. The runs are short: a check that every stage works
on a GPU and what it holds, not a tuned benchmark.

Without a CUDA GPU it stops at once with a message saying so (exit 2).

    python bench/gpu_check.py                        # the 1b model, full and LoRA, every stage
    python bench/gpu_check.py --size 300m --variants lora --stages ppo
    python bench/gpu_check.py --stages grpo         # GRPO alone, bf16, full and LoRA
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import REPO
from memory import STAGES, VARIANTS, run_matrix, write_results


def require_cuda() -> str:
    """The GPU's name, or exit 2 with why there is none."""
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
        sys.stderr.write(f"gpu-check: no CUDA GPU is visible here ({build}, torch.cuda.is_available() is False). "
                         "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.\n")
        sys.exit(2)
    return torch.cuda.get_device_name(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", help="a key of rlhf_jobs.tools.tiny_model.LLAMA_SHAPES")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--variants", default="full,lora", help=f"from {', '.join(VARIANTS)} (1 GPU: full, lora)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--output", type=Path, help="also write the table into this file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    gpu = require_cuda()
    stages, variants = args.stages.split(","), args.variants.split(",")
    several = [v for v in variants if VARIANTS[v][0] > 1]
    if several:
        parser.error(f"{', '.join(several)} need more than one GPU; this check uses one")
    print(f"gpu-check on {gpu}: {args.size} model, stages {', '.join(stages)}, {', '.join(variants)}", flush=True)
    started = time.perf_counter()
    rows = run_matrix(args.size, stages, variants, "cuda", trl=False, limit_gib=float("inf"),
                      work=args.workdir.resolve())
    print()
    for row in rows:
        if "error" in row:
            print(f"{row['stage']:<4} {row['variant']:<5} FAILED: {row['error']}")
            continue
        extra = f", rollout {row['rollout_tokens_per_second']:.0f} tokens/s" if row["stage"] in ("ppo", "grpo") else ""
        print(f"{row['stage']:<4} {row['variant']:<5} peak GPU memory {row['logged_gib']:6.2f} GiB  "
              f"{row['rate']:.4g} {row['unit']}{extra}")
    if args.output:
        command = ("python bench/gpu_check.py " + " ".join(sys.argv[1:])).strip()
        write_results(args.output, rows, args.size, "cuda", command, time.perf_counter() - started)
    sys.exit(1 if any("error" in row for row in rows) else 0)


if __name__ == "__main__":
    main()
