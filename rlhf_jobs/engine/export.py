"""The final model of a stage: gathered when sharded, LoRA merged (or kept as an adapter), in the save dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf_jobs.core.config import TrainingBase
from rlhf_jobs.engine.adapters import is_adapted
from rlhf_jobs.engine.models import DTYPES, unwrap
from rlhf_jobs.engine.sharding import full_state_dict, is_sharded
from rlhf_jobs.engine.worker import Worker


def save_dtype(training: TrainingBase, stored: torch.dtype) -> torch.dtype:
    """`Training.save_dtype`, where `auto` is the dtype the base checkpoint was stored in."""
    return stored if training.save_dtype == "auto" else DTYPES[training.save_dtype]


def skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """An empty (meta-device) model of the same structure as `module`, peft wrapper included."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    hf_model = module.get_base_model() if is_adapted(module) else module
    auto_class = AutoModelForCausalLM if hasattr(hf_model, "generate") and hf_model.can_generate() \
        else AutoModelForSequenceClassification
    with torch.device("meta"):
        skeleton = auto_class.from_config(hf_model.config)
    if is_adapted(module):
        from peft import get_peft_model

        skeleton = get_peft_model(skeleton, module.peft_config["default"])
    return skeleton


def gathered_model(model: torch.nn.Module, worker: Worker,
                   make_skeleton: Callable[[], torch.nn.Module] | None = None) -> Any:
    """The trained module in full on rank 0 (None elsewhere). Every rank must call it: a sharded model
    is gathered into an empty copy of itself (`make_skeleton`, by default built from its transformers
    config), so rank 0 never holds two full copies at once."""
    module = unwrap(model)
    if not is_sharded(module):
        return module if worker.is_main else None
    state = full_state_dict(module)
    if not worker.is_main:
        return None
    empty = make_skeleton() if make_skeleton else skeleton(module)
    empty.load_state_dict(state, assign=True)
    for part in empty.modules():
        if hasattr(part, "tie_weights") and hasattr(part, "config"):
            part.tie_weights()
    return empty


def exportable(module: Any, training: TrainingBase, dtype: torch.dtype) -> Any:
    """What `save_pretrained` writes: a plain merged model, or (export: adapter) the peft adapter alone."""
    if is_adapted(module) and not (training.lora and training.lora.export == "adapter"):
        module = merged_in_fp32(module, dtype)
    return module.to(dtype)


def merged_in_fp32(module: Any, dtype: torch.dtype) -> Any:
    """The peft model with its adapters merged into the base weights in fp32, each weight then rounded once to
    `dtype`.

    peft merges in the base weights' dtype: a bf16 base (LoRA under mixed precision) keeps most of a small
    adapter's change below bf16's resolution, and an fp32 export would then save the rounded weights. One layer
    at a time is upcast, merged and cast to `dtype`, so no full fp32 copy is held unless `dtype` is fp32.
    """
    from peft.tuners.lora import LoraLayer

    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            weight = layer.get_base_layer().weight
            weight.data = weight.data.float()
            layer.merge()
            weight.data = weight.data.to(dtype)
    return module.unload()
