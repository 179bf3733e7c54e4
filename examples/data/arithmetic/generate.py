"""Write the arithmetic task of `make demo-grpo`: single-digit sums as prompt records with their answers.

    python examples/data/arithmetic/generate.py            # rewrites the three files beside this script

Every sum a + b of two digits (100 facts) in five phrasings: 500 prompts {"prompt", "answer"}, shuffled with a fixed
seed, the first 100 held out (`heldout.jsonl`), the other 400 for GRPO (`train.jsonl`). `sft.jsonl` holds SFT
records {"instruction", "response"} for half of the training prompts, so the SFT model learns the format
(a number, then EOS) and some of the facts; GRPO, rewarded by `answer_match` on the `answer` column, learns the rest.
Deterministic: the same files on every run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PHRASINGS = (  # every digit after a space: one token per digit whatever the phrasing
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Compute {a} plus {b}.",
    "How much is {a} plus {b}?",
)
HELD_OUT = 100
SFT_SHARE = 2  # one training prompt in SFT_SHARE becomes an SFT record
SEED = 25


def records(digits: int = 10) -> list[dict[str, str]]:
    return [{"prompt": phrasing.format(a=a, b=b), "answer": str(a + b)}
            for a in range(digits) for b in range(digits) for phrasing in PHRASINGS]


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(directory: Path | None = None, digits: int = 10, held_out_count: int = HELD_OUT) -> None:
    """The task's files in `directory` (default: beside this script); fewer `digits` make the small version the
    tests train on."""
    directory = directory or Path(__file__).resolve().parent
    rows = records(digits)
    random.Random(SEED).shuffle(rows)
    held_out, train = rows[:held_out_count], rows[held_out_count:]
    write(directory / "heldout.jsonl", held_out)
    write(directory / "train.jsonl", train)
    write(directory / "sft.jsonl", [{"instruction": row["prompt"], "response": row["answer"]}
                                    for row in train[::SFT_SHARE]])


if __name__ == "__main__":
    main()
