"""Loading tokenizers and models: hub names and local directories take the same path.

Trainable weights are loaded in fp32 whatever dtype the checkpoint was stored in (AdamW on bf16
weights rounds most small updates away); frozen models may be loaded in the compute dtype.
A directory holding a LoRA adapter (`adapter_config.json`) loads as its base model with the
adapter merged in, so a stage can start from another stage's adapter-only export. An `s3://` model is
downloaded once per node first (`storage.local_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_jobs import storage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded (no such directory, hub unreachable, gated...)."""


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """A tokenizer with a pad token (EOS when the model has none), padding on `padding_side`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(storage.local_model(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # unreachable hub, missing or incomplete directory
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load the tokenizer of {name!r}: {first_line}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] when the tokenizer adds one to a text by itself (Llama), else [] (GPT-2, Qwen).

    Every stage tokenises with `add_special_tokens=False` and prepends this, so SFT, the reward
    model and PPO see exactly the same tokens, and no EOS is ever appended by the tokenizer.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def adapter_base(name: str) -> str | None:
    """The base model of a LoRA adapter directory, or None when `name` is a plain model."""
    path = Path(storage.local_model(name)) / ADAPTER_CONFIG
    return json.loads(path.read_text())["base_model_name_or_path"] if path.is_file() else None


def stored_dtype(name: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (its config's `dtype`), fp32 when unknown."""
    config = AutoConfig.from_pretrained(storage.local_model(adapter_base(name) or name),
                                        trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _from_pretrained(auto_class: Any, name: str, dtype: torch.dtype, **kwargs: Any) -> PreTrainedModel:
    name = storage.local_model(name)
    base = adapter_base(name)
    if base is None:
        return auto_class.from_pretrained(name, dtype=dtype, **kwargs)
    from peft import PeftModel

    model = auto_class.from_pretrained(storage.local_model(base), dtype=dtype, **kwargs)
    return PeftModel.from_pretrained(model, name).merge_and_unload()


def _no_dropout(model: PreTrainedModel) -> PreTrainedModel:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_causal_lm(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False,
                   dropout: bool = True, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = _from_pretrained(AutoModelForCausalLM, name, dtype, trust_remote_code=trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model if dropout else _no_dropout(model)


def load_reward_model(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False,
                      dropout: bool = True, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A one-output sequence classifier; the pad token id makes it read the last real token."""
    model = _from_pretrained(AutoModelForSequenceClassification, name, dtype, num_labels=1,
                             trust_remote_code=trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model if dropout else _no_dropout(model)


def unwrap(model: torch.nn.Module) -> Any:
    """The model inside a DDP wrapper, if any (FSDP2 shards modules in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
