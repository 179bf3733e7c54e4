"""Sharded loading and generation under FSDP, per worker: memory and seconds, in a 2-process gloo group (no Ray).

- **loading**: the policy of a random-init Llama stored in bf16, fp32 masters, bf16 compute: every worker loading
  it whole, then sharding it (before), against `sharding.load_prepared` (rank 0 reads, the others receive shards).
- **generate**: `HFRolloutEngine.generate` on the sharded policy, the policy gathered once per call (what PPO
  does) against FSDP's own per-layer gathering (each decoder layer all-gathered before its forward and freed after
  it, at every generated token), in bf16 and fp32 compute.

Memory is the growth of each worker's resident memory during the phase, sampled every millisecond: `private`
leaves out mapped files (rank 0 maps the checkpoint while it reads it), `resident` is all of it.

    python bench/sharded_loading.py --size 300m --prompts 8 --tokens 16     # writes its section of RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from common import write_section

CPU = torch.device("cpu")


def _memory_mib() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"private": int(fields["RssAnon"].split()[0]) / 1024, "resident": int(fields["VmRSS"].split()[0]) / 1024}


@contextlib.contextmanager
def measured(into: dict[str, float]) -> Iterator[None]:
    """Fills `into` with the phase's seconds and the peak growth of private and resident memory (MiB)."""
    before = _memory_mib()
    peaks = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _memory_mib().items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        into["seconds"] = time.perf_counter() - start
        done.set()
        sampler.join()
        into.update({key: peaks[key] - before[key] for key in before})


def worker_run(rank: int, world_size: int, model_dir: str, prompts: int, tokens: int) -> dict[str, Any]:
    from rlhf_jobs.algorithms.rl.rollout import HFRolloutEngine, Sampling, tokenize_prompts
    from rlhf_jobs.core.config import PPOTraining
    from rlhf_jobs.engine import sharding
    from rlhf_jobs.engine.models import load_causal_lm, load_tokenizer
    from rlhf_jobs.engine.worker import Worker

    worker = Worker(rank, world_size, CPU)
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    build = functools.partial(load_causal_lm, model_dir, tokenizer, dropout=False, dtype=torch.float32)  # masters
    results: dict[str, Any] = {}
    training = PPOTraining(strategy="fsdp", mixed_precision="bf16", num_training_workers=world_size)
    for how, load in (("whole, then sharded", lambda: sharding.prepare(build(), training, worker)),
                      ("sharded", lambda: sharding.load_prepared(build, training, worker))):
        results[f"loading: {how}"] = {}
        with measured(results[f"loading: {how}"]):
            policy = load()
        del policy
    for precision in ("bf16", "no"):
        training = PPOTraining(strategy="fsdp", mixed_precision=precision, num_training_workers=world_size,
                               max_new_tokens=tokens)
        policy = sharding.load_prepared(build, training, worker)
        engine = HFRolloutEngine(policy, tokenizer, training, CPU)
        records = [{"prompt": f"Write a short story about a {thing}."} for thing in
                   ("cat", "dog", "bird", "fish", "tree", "river", "town", "star")]
        ids = [p["input_ids"] for p in tokenize_prompts(records, tokenizer, "instruction", 64)][:prompts]
        sampling = Sampling(1.0, tokens)
        engine.generate(ids[:1], Sampling(1.0, 2))  # warm-up
        for how, gather in (("gathered once", sharding.gathered), ("per layer", _no_gather)):
            original = sharding.gathered
            sharding.gathered = gather
            key = f"generate {precision}: {how}"
            results[key] = {}
            try:
                torch.manual_seed(0)
                with measured(results[key]):
                    engine.generate(ids, sampling)
            finally:
                sharding.gathered = original
        del policy, engine
    return results


@contextlib.contextmanager
def _no_gather(model: torch.nn.Module) -> Iterator[None]:
    yield


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # as the launcher sets for FSDP on CPU
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, buffer.getvalue()))
    finally:
        torch.distributed.destroy_process_group()


def run(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_entry, args=(rank, world_size, port, fn, args, queue))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=3600) for _ in processes)
    for process in processes:
        process.join()
    return [torch.load(io.BytesIO(results[rank]), weights_only=False) for rank in range(world_size)]


def main() -> None:
    from rlhf_jobs.tools.tiny_model import LLAMA_SHAPES, build_llama, parameter_count

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="300m", help="a key of tiny_model.LLAMA_SHAPES")
    parser.add_argument("--model", help="a model directory (default: build --size in a temp dir, stored in bf16)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per worker")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per prompt")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or str(build_llama(Path(scratch) / "model", args.size))
        fp32_gib = parameter_count(LLAMA_SHAPES[args.size]) * 4 / 2**30 if not args.model else None
        results = run(worker_run, 2, model_dir, args.prompts, args.tokens)
    lines = ["| phase | seconds | peak private growth per worker, rank 0 / 1 (GiB) | "
             "peak resident growth per worker, rank 0 / 1 (GiB) |", "| --- | ---: | ---: | ---: |"]
    for phase in results[0]:
        rows = [result[phase] for result in results]
        private, resident = (" / ".join(f"{row[key] / 1024:.2f}" for row in rows) for key in ("private", "resident"))
        lines.append(f"| {phase} | {max(row['seconds'] for row in rows):.2f} | {private} | {resident} |")
    command = ("python bench/sharded_loading.py " + " ".join(sys.argv[1:])).strip()
    text = f"""## Sharded loading and generation under FSDP (`bench/sharded_loading.py`)

Latest figures from `{command}` ({(time.perf_counter() - started) / 60:.0f} min), CPU, 2 workers × 1 thread in a
gloo group (no Ray), a random-init Llama of size `{args.model or args.size}` stored in bf16"""
    text += f" (a full fp32 copy: {fp32_gib:.2f} GiB)" if fp32_gib else ""
    text += f""", fp32 masters; generate: {args.prompts} prompts × {args.tokens} new tokens per
worker. Growth of each worker's memory during the phase, sampled every millisecond: private leaves out mapped files
(rank 0 maps the checkpoint while it reads it), resident is all of it.

""" + "\n".join(lines)
    print(text)
    write_section(args.output, f"sharded-loading-cpu-{args.size}", text)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
