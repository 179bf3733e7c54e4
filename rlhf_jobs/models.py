"""Loading tokenizers and models: hub names and local directories take the same path."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded (no such directory, hub unreachable, gated...)."""


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """A tokenizer with a pad token (EOS when the model has none), padding on `padding_side`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # unreachable hub, missing or incomplete directory
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load the tokenizer of {name!r}: {first_line}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _no_dropout(model: PreTrainedModel) -> PreTrainedModel:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_causal_lm(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False,
                   dropout: bool = True) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model if dropout else _no_dropout(model)


def load_reward_model(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False,
                      dropout: bool = True) -> PreTrainedModel:
    """A one-output sequence classifier; the pad token id makes it read the last real token."""
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=1, trust_remote_code=trust_remote_code
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model if dropout else _no_dropout(model)


def unwrap(model: torch.nn.Module) -> Any:
    """The model inside a DDP wrapper, if any."""
    return model.module if hasattr(model, "module") else model
