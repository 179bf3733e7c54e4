"""KV-cache benchmark: generation time per token must not grow with the length already generated.

With the cache (`use_cache=True`, what PPO's rollout uses) each new token attends to cached keys and
values, so the time per token stays flat; without it every step re-runs the whole sequence, so the
time per token grows with its length. Prints ms/token for successive chunks of generated tokens.

    python bench/bench_generation.py                       # builds the tiny model in a temp dir
    python bench/bench_generation.py --model runs/tiny-model --batch-size 8 --tokens 384 --chunk 64
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from rlhf_jobs.core.prompts import instruction_prompt
from rlhf_jobs.engine.models import load_tokenizer


class StepClock(StoppingCriteria):
    """Records the time at which each generation step finishes (never stops generation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)


def time_per_token(model: torch.nn.Module, inputs: dict[str, torch.Tensor], tokens: int, use_cache: bool,
                   pad_token_id: int) -> list[float]:
    """Seconds of each generation step (the first one includes the prompt's forward)."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **inputs, do_sample=True, max_new_tokens=tokens, min_new_tokens=tokens, use_cache=use_cache,
            pad_token_id=pad_token_id, stopping_criteria=StoppingCriteriaList([clock]),
        )
    stamps = [start, *clock.times]
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir (default: build the tiny model in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=384, help="tokens to generate")
    parser.add_argument("--chunk", type=int, default=64, help="report ms/token per chunk of this many tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            from rlhf_jobs.tools.tiny_model import build_tiny_model

            model_dir = str(build_tiny_model(Path(scratch) / "tiny"))
        tokenizer = load_tokenizer(model_dir, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        prompts = [instruction_prompt(f"Describe thing number {i}.") for i in range(args.batch_size)]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        limit = model.config.max_position_embeddings - inputs["input_ids"].size(1)
        tokens = min(args.tokens, limit)
        print(f"model {model_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"batch {args.batch_size}, prompt {inputs['input_ids'].size(1)} tokens, {tokens} new tokens, "
              f"{args.threads} thread(s)")
        time_per_token(model, inputs, 8, True, tokenizer.pad_token_id)  # warm up
        results = {}
        for use_cache in (True, False):
            torch.manual_seed(0)
            results[use_cache] = time_per_token(model, inputs, tokens, use_cache, tokenizer.pad_token_id)
        print(f"{'tokens':>12} {'use_cache=True':>16} {'use_cache=False':>16}   (ms/token, batch of sequences)")
        for start in range(0, tokens, args.chunk):
            end = min(start + args.chunk, tokens)
            # Step 0 also runs the prompt: leave it out so chunk 1 measures decoding alone.
            row = [1000 * sum(results[c][max(start, 1) : end]) / (end - max(start, 1)) for c in (True, False)]
            print(f"{start + 1:>5}-{end:<6} {row[0]:>16.2f} {row[1]:>16.2f}")
        for use_cache, steps in results.items():
            first, last = steps[1 : 1 + args.chunk], steps[-args.chunk :]
            growth = (sum(last) / len(last)) / (sum(first) / len(first))
            print(f"use_cache={use_cache}: last chunk / first chunk = {growth:.2f}x")


if __name__ == "__main__":
    main()
