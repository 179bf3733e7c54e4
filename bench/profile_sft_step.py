"""Where our SFT step loses to TRL's: the same batches through three versions of the loss.

- `ours`: `rlhf_jobs.sft.response_loss` as it is: logits at every position (prompt and padding
  included), then the cross-entropy on the response tokens;
- `use_cache=False`: the same, without building a KV cache in the training forward (TRL passes it);
- `LM head on label positions only`: the backbone's hidden states gathered at the positions that
  have a label, then the LM head and the cross-entropy there: the same loss, what TRL's default
  `loss_type="chunked_nll"` does.

Each step is forward, backward, clipping and AdamW on 1 thread; the variants alternate, medians
are printed in ms/step, then a torch.profiler table of `ours`.

    python bench/profile_sft_step.py                     # builds the tiny model in a temp dir
    python bench/profile_sft_step.py --model runs/bench/tiny-model --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import DATA, SFT_FILE, read_jsonl

from rlhf_jobs import sft
from rlhf_jobs.models import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir (default: build the tiny model in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            from rlhf_jobs.tiny_model import build_tiny_model

            model_dir = str(build_tiny_model(Path(scratch) / "tiny"))
        profile(model_dir, args.batch_size, args.batches, args.repeats)


def profile(model_dir: str, batch_size: int, n_batches: int, repeats: int) -> None:
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer)
    model.train()
    examples = [sft.tokenize_sft(r, tokenizer, "instruction", 256) for r in read_jsonl(DATA / SFT_FILE)]
    batches = [sft.pad_batch(examples[i : i + batch_size], tokenizer.pad_token_id)
               for i in range(0, batch_size * n_batches, batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def ours(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, tokens = sft.response_loss(model, batch)
        return loss_sum / tokens

    def no_cache(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        shifted = logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.size(-1)),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=sft.IGNORE_INDEX)

    def label_positions_only(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != sft.IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return torch.nn.functional.cross_entropy(logits, labels[keep])

    variants: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
        "ours": ours, "use_cache=False": no_cache, "LM head on label positions only": label_positions_only,
    }

    def step(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start

    for batch in batches[:3]:  # warm-up
        step(ours, batch)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        names = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(sum(step(variants[name], batch) for batch in batches) / len(batches))
    base = statistics.median(times["ours"])
    for name, values in times.items():
        value = statistics.median(values)
        print(f"{name:<45} {1000 * value:7.1f} ms/step  ({value / base:.2f} × ours)")

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches[:6]:
            step(ours, batch)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
