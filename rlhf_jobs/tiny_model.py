"""A tiny GPT-2 and a tokenizer trained on the sample data, for offline runs and tests.

Saved with `save_pretrained`, so it loads through exactly the code path a hub name takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf_jobs.prompts import INPUT_KEY, INSTRUCTION_KEY, INTRO, RESPONSE_KEY

EOS = "<|endoftext|>"
# The repo's sample data: beside the package in a checkout or editable install, else under the working directory.
SAMPLE_DIRS = (Path(__file__).resolve().parents[1] / "examples" / "data", Path("examples") / "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sample_files() -> list[Path]:
    for directory in SAMPLE_DIRS:
        files = sorted(directory.glob("*.jsonl"))
        if files:
            return files
    raise FileNotFoundError(f"no sample data in {' or '.join(map(str, SAMPLE_DIRS))}; pass --data FILE ...")


def _texts(files: list[Path]) -> Iterator[str]:
    yield f"{INTRO}\n\n{INSTRUCTION_KEY}\n\n{INPUT_KEY}\n\n{RESPONSE_KEY}\n<|user|>\n<|assistant|>\n"
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield from (v for v in json.loads(line).values() if isinstance(v, str))


def train_tokenizer(files: list[Path], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(files), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    output: str | Path,
    data: list[Path] | None = None,
    vocab_size: int = 2048,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny GPT-2 (about 0.8M parameters) and its tokenizer to `output`."""
    import torch

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(data or sample_files(), vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    output = Path(output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output
