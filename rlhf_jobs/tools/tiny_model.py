"""Models built locally for offline runs, tests and benchmarks (no hub needed).

A tiny GPT-2, and random-init Llama-architecture models of any size, each with a BPE tokenizer
trained on the sample data. The Llama tokenizer adds a BOS token as Llama's does. Saved with
`save_pretrained`, so they load through exactly the code path a hub name takes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_jobs.core.paths import SAMPLE_DATA
from rlhf_jobs.core.prompts import INPUT_KEY, INSTRUCTION_KEY, INTRO, RESPONSE_KEY

if TYPE_CHECKING:  # tokenizers and transformers load only when a model is built
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# The repo's sample data: beside the package in a checkout or editable install, else under the working directory.
SAMPLE_DIRS = (SAMPLE_DATA, Path("examples") / "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sample_files() -> list[Path]:
    for directory in SAMPLE_DIRS:
        files = sorted(directory.glob("*.jsonl"))
        if files:
            return files
    from rlhf_jobs.core.errors import ConfigError

    raise ConfigError(f"no sample data in {' or '.join(map(str, SAMPLE_DIRS))}; pass --data FILE ...")


def _texts(files: list[Path]) -> Iterator[str]:
    from rlhf_jobs.core.data import read_numbered

    yield f"{INTRO}\n\n{INSTRUCTION_KEY}\n\n{INPUT_KEY}\n\n{RESPONSE_KEY}\n<|user|>\n<|assistant|>\n"
    for path in files:
        for _, record in read_numbered(str(path)):
            if isinstance(record, dict):
                yield from (v for v in record.values() if isinstance(v, str))


def check_new_directory(output: str | Path, key: str = "--output") -> Path:
    """`output` must be a new or empty directory: a side command never overwrites a model (a finished stage's,
    whose marker would then certify random weights) nor anything else; a file there is an error too."""
    from rlhf_jobs.core.errors import ConfigError
    from rlhf_jobs.store.checkpoints import describe
    from rlhf_jobs.store.markers import MARKER, read_marker

    path = Path(output)
    if path.is_file():
        raise ConfigError(f"{key}: {path} is a file; expected a new directory")
    if path.is_dir() and any(path.iterdir()):
        marker = read_marker(path) if (path / MARKER).is_file() else None
        entries = sorted(entry.name for entry in path.iterdir())
        held = describe(marker) if marker else "a model" if "config.json" in entries else \
            f"{len(entries)} file(s): {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}"
        raise ConfigError(f"{key}: {path} is not empty (it holds {held}); refusing to overwrite it: choose a new "
                          "directory")
    return path


def _check_data(data: list[Path] | None) -> list[Path]:
    from rlhf_jobs.core.errors import ConfigError

    files = data or sample_files()
    for path in files:
        if not Path(path).is_file():
            raise ConfigError(f"--data: {path}: file not found")
    return files


def _save_new(output: str | Path, model: Any, tokenizer: Any) -> Path:
    """Write model and tokenizer into a temp directory beside `output`, then rename it into place."""
    output = check_new_directory(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output.is_dir():
        output.rmdir()  # empty (checked above)
    staging.rename(output)
    return output


def train_tokenizer(files: list[Path], vocab_size: int, llama: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE. GPT-2 style: EOS only. Llama style: BOS and EOS, and BOS added to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [LLAMA_BOS, LLAMA_EOS] if llama else [EOS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(files), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if llama:
        bos = processors.TemplateProcessing(single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
                                            special_tokens=[(LLAMA_BOS, tokenizer.token_to_id(LLAMA_BOS))])
        tokenizer.post_processor = processors.Sequence([byte_level, bos])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS,
                                       unk_token=LLAMA_EOS)
    else:
        tokenizer.post_processor = byte_level
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
    """Write a tiny GPT-2 (about 0.8M parameters) and its tokenizer to `output`, a new or empty directory."""
    check_new_directory(output)
    files = _check_data(data)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(files, vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save_new(output, GPT2LMHeadModel(config), tokenizer)


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    layers: int
    intermediate_size: int
    heads: int
    kv_heads: int
    vocab_size: int = 32000


# Named sizes (parameter counts with a 32k vocabulary and untied embeddings).
LLAMA_SHAPES = {
    "tiny": LlamaShape(64, 2, 176, 4, 2, vocab_size=2048),  # ~0.3M: tests
    "300m": LlamaShape(1024, 20, 2816, 16, 8),  # ~0.30B: benchmarks
    "500m": LlamaShape(1280, 22, 3584, 20, 4),  # ~0.47B
    "750m": LlamaShape(1536, 26, 4096, 24, 8),  # ~0.75B
    "1b": LlamaShape(2048, 20, 5632, 32, 8),  # ~1.03B
}


def build_llama(output: str | Path, shape: LlamaShape | str = "tiny", dtype: str = "bfloat16",
                data: list[Path] | None = None, max_positions: int = 2048, seed: int = 0) -> Path:
    """Write a random-init Llama-architecture model and a Llama-style tokenizer to `output`.

    Stored in `dtype` (bf16 by default, as real Llama/Qwen checkpoints are). The tokenizer is
    trained on the sample data; its vocabulary can be smaller than the model's (the extra
    embedding rows are never read, but the LM head computes them, as in a real model).
    """
    check_new_directory(output)
    files = _check_data(data)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(files, min(shape.vocab_size, 2048), llama=True)
    config = LlamaConfig(
        vocab_size=max(shape.vocab_size, len(tokenizer)), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    return _save_new(output, model, tokenizer)


def parameter_count(shape: LlamaShape) -> int:
    h, i, layers, v = shape.hidden_size, shape.intermediate_size, shape.layers, shape.vocab_size
    kv = h * shape.kv_heads // shape.heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + 2 * v * h + h
