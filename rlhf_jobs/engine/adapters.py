"""LoRA adapters with peft: wrap a model, check a config against a model before training, export.

The same `Training.lora` block serves every stage: SFT adapts a causal LM, the reward model a
sequence classifier (its score head trains in full), and PPO adapts the policy (its reference
is the same model with the adapter disabled) and the critic (a LoRA on the reward model's
backbone, whose frozen base is also the reward model).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Literal

import torch

from rlhf_jobs.core.config import LoRA
from rlhf_jobs.core.errors import ConfigError

Task = Literal["CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"]


class AdapterError(ConfigError):
    """A LoRA config that does not fit the model."""


LORA_EXTRA = "pip install 'rlhf-jobs[lora]'"


def require_peft(what: str) -> None:
    """Driver pre-flight of what needs peft (LoRA, loading an adapter export): one line naming the extra."""
    try:
        installed = importlib.util.find_spec("peft") is not None
    except ValueError:  # in sys.modules as None: cannot be imported
        installed = False
    if not installed:
        raise AdapterError(f"{what} needs the peft package, which is not installed ({LORA_EXTRA})")


def lora_config(lora: LoRA, task: Task, exclude: tuple[str, ...] = ()) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type=task, bias="none", exclude_modules=list(exclude) or None,
    )


def add_lora(model: torch.nn.Module, lora: LoRA, task: Task, key: str = "Training.lora",
             exclude: tuple[str, ...] = ()) -> Any:
    """`model` with LoRA adapters (only they, and a classifier's head, are trainable); `exclude`: module
    names never adapted."""
    from peft import get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    hint = f"(its linear layers: {', '.join(linear) or 'none'}; target_modules may name these, or all-linear)"
    if isinstance(lora.target_modules, list):  # peft adapts the names it finds and ignores the others
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [name for name in lora.target_modules if name not in present]
        if missing:
            raise AdapterError(f"{key}.target_modules: {type(model).__name__} has no module named "
                               f"{', '.join(map(repr, missing))} {hint}")
    try:
        adapted = get_peft_model(model, lora_config(lora, task, exclude))
    except (ValueError, TypeError, NotImplementedError) as err:
        raise AdapterError(
            f"{key}: cannot add LoRA to {type(model).__name__}: {str(err).splitlines()[0]} {hint}"
        ) from None
    for parameter in adapted.parameters():  # fp32 masters: adapters and a classifier's head, over a bf16 base
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return adapted


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model; never imports peft (a base install has none, and then nothing is adapted)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def disabled_adapter(model: torch.nn.Module) -> Any:
    """A context in which a peft model computes its base model's function (a no-op for plain models)."""
    import contextlib

    return model.disable_adapter() if is_adapted(model) else contextlib.nullcontext()
