"""Loading tokenizers and models: hub names and local directories take the same path.

Trainable weights are loaded in fp32 whatever dtype the checkpoint was stored in (AdamW on bf16
weights rounds most small updates away); frozen models may be loaded in the compute dtype.
A directory holding a LoRA adapter (`adapter_config.json`) loads as its base model with the
adapter merged in, so a stage can start from another stage's adapter-only export. An `s3://` model is
downloaded once per node first (`storage.local_model`).

Sharded loading (`sharding.load_prepared`) calls the same loaders in a `loading_mode`: "skeleton" builds the
model on the meta device from its config (no weights read), "stored" reads the weights in the checkpoint's own
dtype where widening them later is exact (a bf16 checkpoint for fp32 masters).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_jobs.core.errors import ModelError
from rlhf_jobs.store import storage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"
LoadingMode = Literal["full", "skeleton", "stored"]
_loading_mode: contextvars.ContextVar[LoadingMode] = contextvars.ContextVar("loading_mode", default="full")


@contextlib.contextmanager
def loading_mode(mode: LoadingMode) -> Iterator[None]:
    """How the loaders below build a model while the context lasts: "full" (the weights, in the dtype asked for),
    "skeleton" (on the meta device, nothing read: what every worker shards before the weights are broadcast) or
    "stored" (the weights in the checkpoint's dtype where that is narrower than fp32 asked for: widening a bf16
    or fp16 value to fp32 is exact, so what is broadcast into fp32 shards is what a full load holds, at half the
    memory)."""
    token = _loading_mode.set(mode)
    try:
        yield
    finally:
        _loading_mode.reset(token)


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """A tokenizer with a pad token (EOS when the model has none), padding on `padding_side`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(storage.local_model(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # unreachable hub, missing or incomplete directory
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ModelError(f"cannot load the tokenizer of {name!r}: {detail}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] when the tokenizer adds one to a text by itself (Llama), else [] (GPT-2, Qwen).

    Every stage tokenises with `add_special_tokens=False` and prepends this unless the text wrote its
    own BOS (`split_bos`), so SFT, the reward model and PPO see exactly the same tokens, one BOS at most,
    and no EOS is ever appended by the tokenizer.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def split_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[list[int], list[int]]:
    """(the BOS a model input starts with, the rest of `ids`), for ids tokenised with `add_special_tokens=False`.

    The BOS is the one the text wrote itself (a chat template that writes it, as Llama 3's does) or else the
    tokenizer's own (`bos_ids`): never both, as TRL tokenises templated text with add_special_tokens=False.
    """
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] == [bos]:
        return [bos], ids[1:]
    return bos_ids(tokenizer), ids


def with_bos_tail(tokenizer: PreTrainedTokenizerBase, ids: list[int], length: int) -> tuple[list[int], bool]:
    """(`ids` as a model input of at most `length` tokens: its BOS (`split_bos`), then the last tokens of the
    rest; whether any were cut)."""
    head, body = split_bos(tokenizer, ids)
    kept = min(max(length - len(head), 0), len(body))
    return head + body[len(body) - kept :], kept < len(body)


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


def _from_pretrained(auto_class: Any, name: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """The model (with `output_loading_info=True`: (model, loading info of `name` or the adapter's base)); one
    whose weights hold NaN or inf (a diverged run's) is refused. In `loading_mode("skeleton")` the model is built
    on the meta device from its config (loading info None)."""
    from rlhf_jobs.engine.divergence import non_finite_parameter

    mode = _loading_mode.get()
    if mode == "skeleton":
        return _skeleton(auto_class, name, dtype, **kwargs)
    if mode == "stored" and adapter_base(name) is None:
        dtype = _stored_if_exact(name, dtype, kwargs.get("trust_remote_code", False))
    loaded = _load(auto_class, name, dtype, **kwargs)
    model = loaded[0] if kwargs.get("output_loading_info") else loaded
    bad = non_finite_parameter(model)
    if bad is not None:
        raise ModelError(f"{name}: its weights are not finite ({bad} holds NaN or inf): the run that wrote it "
                         "diverged; train it again (e.g. with a lower learning_rate)")
    return loaded


def _stored_if_exact(name: str, dtype: torch.dtype, trust_remote_code: bool) -> torch.dtype:
    """The checkpoint's dtype where it is bf16 or fp16 and `dtype` fp32 (widening is exact), else `dtype`."""
    stored = stored_dtype(name, trust_remote_code)
    return stored if dtype == torch.float32 and stored in (torch.bfloat16, torch.float16) else dtype


def _skeleton(auto_class: Any, name: str, dtype: torch.dtype, output_loading_info: bool = False,
              trust_remote_code: bool = False, **config_overrides: Any) -> Any:
    """What `_load` returns, on the meta device and in eval mode (as `from_pretrained` leaves a model), with the
    checkpoint's generation config; an adapter export has the structure of its base model (it is merged)."""
    from transformers import GenerationConfig

    path = storage.local_model(adapter_base(name) or name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **config_overrides)
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    if model.can_generate():
        with contextlib.suppress(OSError, ValueError):  # no generation_config.json: the one from_config made
            model.generation_config = GenerationConfig.from_pretrained(path)
    return (model, None) if output_loading_info else model


def _load(auto_class: Any, name: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    name = storage.local_model(name)
    base = adapter_base(name)
    if base is None:
        return auto_class.from_pretrained(name, dtype=dtype, **kwargs)
    from rlhf_jobs.engine.adapters import require_peft

    require_peft(f"{name} is a LoRA adapter: loading it")
    from peft import PeftModel

    loaded = auto_class.from_pretrained(storage.local_model(base), dtype=dtype, **kwargs)
    model, info = loaded if kwargs.get("output_loading_info") else (loaded, None)
    merged = PeftModel.from_pretrained(model, name).merge_and_unload()
    return (merged, info) if kwargs.get("output_loading_info") else merged


def _is_dropout_rate(name: str, value: Any) -> bool:
    lowered = name.lower()
    named = "dropout" in lowered or lowered.endswith("pdrop") or lowered == "layerdrop"
    return named and isinstance(value, float) and value > 0


def _dropout_rates(model: torch.nn.Module) -> Iterator[tuple[str, Any, str]]:
    """(where, owner, attribute) of every dropout rate a forward may read: `nn.Dropout*` modules (peft's
    `lora_dropout` included), float rates kept on modules (Llama's `attention_dropout`) and config fields
    read at forward time (Falcon's `hidden_dropout`)."""
    from torch.nn.modules.dropout import _DropoutNd

    for name, module in model.named_modules():
        if isinstance(module, _DropoutNd):
            if module.p > 0:
                yield name or type(module).__name__, module, "p"
            continue
        for attribute, value in vars(module).items():
            if _is_dropout_rate(attribute, value):
                yield f"{name}.{attribute}" if name else attribute, module, attribute
    seen: set[int] = set()
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        configs = [(f"{name}.config" if name else "config", config)]
        while configs:
            where, config = configs.pop()
            if not hasattr(config, "to_dict") or id(config) in seen:
                continue
            seen.add(id(config))
            for attribute, value in vars(config).items():
                if _is_dropout_rate(attribute, value):
                    yield f"{where}.{attribute}", config, attribute
                elif hasattr(value, "to_dict"):  # a sub-config (text_config, ...)
                    configs.append((f"{where}.{attribute}", value))


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of `model` off, in train mode too: `nn.Dropout` modules (peft's `lora_dropout`
    included, so call it after the adapters are added), float rates on modules and in the config.

    RL needs it: the rollout's log-probs and values must be what the update's first forward computes
    (ratio exactly 1), which a dropout mask drawn per forward breaks. The config's rates are zeroed too,
    so a model saved afterwards records dropout 0.
    """
    for _, owner, attribute in list(_dropout_rates(model)):
        setattr(owner, attribute, 0.0)
    return model


def live_dropout(model: torch.nn.Module) -> list[str]:
    """Where `model` still has a dropout rate above 0 (empty after `disable_dropout`)."""
    return [where for where, _, _ in _dropout_rates(model)]


def _fused_activations(model: PreTrainedModel) -> PreTrainedModel:
    """GPT-2's tanh-approximated GELU (`gelu_new`, `gelu_fast`), written as six element-wise operations
    forward and more backward, as PyTorch's single fused `gelu(approximate="tanh")`: the same function
    (transformers' `gelu_pytorch_tanh`; outputs equal to rounding, ~1e-7), at half the time forward and backward
    on CPU (6.2 vs 3.1-4.1 ms on an 8×90×512 activation). The config is left as it is, so a saved model is unchanged."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
    return model


def load_causal_lm(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False,
                   dropout: bool = True, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = _fused_activations(_from_pretrained(AutoModelForCausalLM, name, dtype,
                                                trust_remote_code=trust_remote_code))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model if dropout else disable_dropout(model)


def load_reward_model(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False,
                      dropout: bool = True, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A one-output sequence classifier; the pad token id makes it read the last real token.

    Started from a causal LM, the score head is new: one line says so instead of transformers'
    LOAD REPORT table (other missing, unexpected or mismatched weights are still reported).
    """
    with _without_load_report():
        model, info = _from_pretrained(AutoModelForSequenceClassification, name, dtype, num_labels=1,
                                       trust_remote_code=trust_remote_code, output_loading_info=True)
    if adapter_base(storage.local_model(name)) is None:  # an adapter export brings its own head
        _report_loading(name, info or {})
    model = _fused_activations(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model if dropout else disable_dropout(model)


def _report_loading(name: str, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    head = [key for key in missing if key.split(".")[0] in ("score", "classifier")]
    if head and _is_main_process():
        # The real stdout: Ray Train V2 echoes print() a second time through its logger.
        stream = sys.__stdout__ or sys.stdout
        stream.write(f"reward model from {name}: the score head ({', '.join(head)}) is new, initialised randomly\n")
        stream.flush()
    problems = {"missing keys": [key for key in missing if key not in head],
                **{key.replace("_", " "): sorted(map(str, info.get(key) or []))
                   for key in ("unexpected_keys", "mismatched_keys")}}
    if any(problems.values()):
        logging.getLogger(__name__).warning(
            "loading %s as a reward model: %s", name,
            "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys),
        )


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Drop transformers' LOAD REPORT warning (and only it) while loading one model."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def _is_main_process() -> bool:
    """Rank 0 of the worker group, or a process outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def unwrap(model: torch.nn.Module) -> Any:
    """The model inside a DDP wrapper, if any (FSDP2 shards modules in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
