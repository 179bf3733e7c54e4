"""Our SFT step, per step in one process: what padding-free packing and the label-only LM head save.

The same batches through three versions of the step:
- `padded, full LM head`: right-padded batches, logits at every position (prompt and padding
  included), then the cross-entropy on the labelled ones (our step before packing);
- `padded, LM head at labels`: the LM head only at the positions that predict a label
  (`logits_to_keep`), what TRL's default `loss_type="chunked_nll"` also does;
- `packed, LM head at labels`: what `rlhf_jobs.algorithms.sft` does by default (`Training.padding_free`).

Each step is forward, backward, clipping and AdamW; the variants alternate, medians are printed in
ms/step and label tokens/s, then a torch.profiler table of the default step.

    python bench/profile_sft_step.py                     # builds the tiny model in a temp dir
    python bench/profile_sft_step.py --model runs/bench/model-300m --batches 3 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, SFT_FILE, read_jsonl

from rlhf_jobs.algorithms import sft
from rlhf_jobs.engine import packing
from rlhf_jobs.engine.models import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir (default: build the tiny model in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            from rlhf_jobs.tools.tiny_model import build_tiny_model

            model_dir = str(build_tiny_model(Path(scratch) / "tiny"))
        profile(model_dir, args.batch_size, args.max_length, args.batches, args.repeats, not args.no_profile)


def profile(model_dir: str, batch_size: int, max_length: int, n_batches: int, repeats: int,
            table: bool) -> None:
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer)
    model.train()
    examples = [sft.tokenize_sft(r, tokenizer, "instruction", max_length) for r in read_jsonl(DATA / SFT_FILE)]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [examples[i] for i in order]  # batches of random examples, as the training loop draws them
    chunks = [examples[i : i + batch_size] for i in range(0, batch_size * n_batches, batch_size)]
    padded = [sft.pad_batch(chunk, tokenizer.pad_token_id) for chunk in chunks]
    plan = packing.RowPlan.for_model(model)
    packed = [sft.packed_batch(chunk, plan) for chunk in chunks]
    labels = sum(int((b["targets"] != sft.IGNORE_INDEX).sum()) for b in padded) / len(padded)
    tokens = {"padded": sum(b["input_ids"].numel() for b in padded) / len(padded),
              "packed": sum(b["input_ids"].numel() for b in packed) / len(packed)}
    print(f"per batch: {labels:.0f} label tokens; {tokens['padded']:.0f} tokens padded, "
          f"{tokens['packed']:.0f} packed")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def full_head(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                                 ignore_index=sft.IGNORE_INDEX, reduction="sum")

    def label_head(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sft.response_loss(model, batch)[0]

    variants = {
        "padded, full LM head": (full_head, padded),
        "padded, LM head at labels": (label_head, padded),
        "packed, LM head at labels": (label_head, packed),
    }

    def step(name: str, index: int) -> float:
        loss_fn, batches = variants[name]
        start = time.perf_counter()
        loss = loss_fn(batches[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start

    step("packed, LM head at labels", 0)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        names = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(sum(step(name, i) for i in range(len(chunks))) / len(chunks))
    base = statistics.median(times["padded, full LM head"])
    for name, values in times.items():
        value = statistics.median(values)
        print(f"{name:<30} {1000 * value:8.1f} ms/step {labels / value:8.0f} label tokens/s  "
              f"({base / value:.2f} × the full-head padded step)")
    if not table:
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for index in range(min(len(chunks), 6)):
            step("packed, LM head at labels", index)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
