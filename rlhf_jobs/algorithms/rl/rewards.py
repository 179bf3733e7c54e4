"""Rewards: what scores a sampled response, behind one interface (`Reward`), for every RL stage.

A reward reads `Responses` (the prompts, the sampled ids, the policy's tokenizer) and returns one score per
response (NaN: no opinion). `RewardModelScore` is a learned reward model's score of the text it was trained
on; `RewardFunction` a Python function's (`General.reward_functions`, loaded by `load_reward_functions`);
`weighted_total` sums several.

A reward function has TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`; built-ins are
in `reward_functions.py`. Each is called once on the driver before any worker starts (`check_reward_functions`),
so a missing file or name, a wrong signature or a wrong answer is one line there; at run time one that raises or
answers wrongly stops the run with `RewardError` naming the function, the error and the first record it failed on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf_jobs.core.errors import ConfigError, DataError, RewardError
from rlhf_jobs.core.prompts import join_response
from rlhf_jobs.engine import optim
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import with_bos_tail


@dataclass
class Responses:
    """Sampled responses and the prompts they answer, as every reward reads them."""

    prompts: list[dict[str, Any]]  # `rollout.tokenize_prompts`' examples: input_ids, text (+ the record's columns)
    response: torch.Tensor  # right-padded response ids
    mask: torch.Tensor  # 1 on response tokens up to and including the first EOS
    tokenizer: Any  # the policy's

    def texts(self) -> list[str]:
        """Each response as text (special tokens, EOS included, dropped)."""
        return [self.tokenizer.decode(tokens[: int(length)].tolist(), skip_special_tokens=True)
                for tokens, length in zip(self.response, self.mask.sum(1), strict=True)]


class Reward(Protocol):
    """Scores sampled responses: one float per response, NaN where it has no opinion."""

    name: str  # metrics report it as reward/<name>

    def __call__(self, responses: Responses) -> torch.Tensor: ...


class RewardModelScore:
    """A learned reward model's score of each response, read as it read its training pairs (`reward_model_inputs`).

    `score(input_ids, attention_mask)` runs the model (a frozen sequence classifier, or with LoRA the critic's
    base with its adapter disabled); the reward model's own tokenizer pads and truncates (the tail kept)."""

    name = "model"

    def __init__(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rm_tokenizer: Any,
                 max_length: int, training: Any, device: torch.device) -> None:
        self.score, self.rm_tokenizer, self.max_length = score, rm_tokenizer, max_length
        self.training, self.device = training, device

    @torch.no_grad()
    def __call__(self, responses: Responses) -> torch.Tensor:
        sequences = reward_model_inputs(responses.tokenizer, self.rm_tokenizer, responses.prompts, responses.response,
                                        responses.mask, self.max_length)
        input_ids, attention_mask = pad(sequences, self.rm_tokenizer.pad_token_id, device=self.device)
        with optim.autocast(self.training, self.device):
            return self.score(input_ids, attention_mask).float()


def reward_model_inputs(tokenizer: Any, rm_tokenizer: Any, prompts: list[dict[str, Any]], response: torch.Tensor,
                        mask: torch.Tensor, max_length: int) -> list[list[int]]:
    """The reward model's token ids for each response: the text its training pairs were made of,
    `join_response(prompt text, response text)` (EOS dropped), in its own tokens with its BOS, the tail kept.

    The join matters: a SentencePiece tokenizer decodes a response's first token without its leading space,
    and "Assistant:" + "Hello" would be scored as "Assistant:Hello" where the RM learnt "Assistant: Hello".
    """
    texts = [
        join_response(prompt["text"], tokenizer.decode(tokens[: int(length)].tolist(), skip_special_tokens=True))
        for prompt, tokens, length in zip(prompts, response, mask.sum(1), strict=True)
    ]
    return [with_bos_tail(rm_tokenizer, ids, max_length)[0]
            for ids in rm_tokenizer(texts, add_special_tokens=False)["input_ids"]]



# ---- Python reward functions -------------------------------------------------------------------------------

KEY = "General.reward_functions"
RESERVED_COLUMNS = ("prompts", "completions")  # the arguments every function takes


class RewardFunction:
    """A Python reward function as a `Reward`: `fn(prompts=..., completions=..., **columns)`, each value checked.

    `prompts` are the texts the policy was prompted with (the prompt format applied: what it continued),
    `completions` the sampled responses as text (special tokens dropped), `columns` the records' other fields as
    lists aligned with them. A function without `**kwargs` gets only the columns it names."""

    def __init__(self, function: Callable[..., Any], reference: str, name: str | None = None) -> None:
        self.function, self.reference = function, reference
        self.name = name or getattr(function, "__name__", None) or reference.rpartition(":")[2]
        parameters = inspect.signature(function).parameters.values()
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.named = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                               inspect.Parameter.KEYWORD_ONLY)}

    def __call__(self, responses: Responses) -> torch.Tensor:
        prompts = [prompt["text"] for prompt in responses.prompts]
        columns = column_lists(responses.prompts)
        values = self.values(prompts, responses.texts(), columns)
        return torch.tensor([math.nan if value is None else float(value) for value in values], dtype=torch.float32,
                            device=responses.response.device)

    def values(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> list[float | None]:
        """The function's answer, checked: one finite number or None per completion (else `RewardError`)."""
        kwargs = columns if self.takes_all else {key: value for key, value in columns.items() if key in self.named}
        try:
            answer = self.function(prompts=prompts, completions=completions, **kwargs)
        except Exception as err:  # the user's code: any error, named with the record it failed on
            index = self._first_failing(prompts, completions, kwargs)
            raise RewardError(f"reward function {self.name} ({self.reference}) raised {type(err).__name__}: "
                              f"{_short(str(err))} on {_record(prompts, completions, columns, index)}") from None
        if hasattr(answer, "tolist"):  # a numpy array or a tensor
            answer = answer.tolist()
        if not isinstance(answer, list | tuple):
            raise RewardError(f"reward function {self.name} ({self.reference}) returned a {type(answer).__name__}; "
                              f"expected a list of {len(completions)} float or None (one per completion), on "
                              f"{_record(prompts, completions, columns, 0)}")
        if len(answer) != len(completions):
            raise RewardError(f"reward function {self.name} ({self.reference}) returned {len(answer)} value(s) for "
                              f"{len(completions)} completion(s); expected one float or None per completion (first "
                              f"of them: {_record(prompts, completions, columns, 0)})")
        for index, value in enumerate(answer):
            if value is None:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value):
                shown = repr(value) if isinstance(value, int | float) else \
                    f"a {type(value).__name__} ({_short(repr(value))})"
                raise RewardError(f"reward function {self.name} ({self.reference}) returned {shown}; expected a "
                                  "finite float, or None for no opinion, on "
                                  f"{_record(prompts, completions, columns, index)}")
        return list(answer)

    def _first_failing(self, prompts: list[str], completions: list[str], kwargs: dict[str, list[Any]]) -> int:
        """The first completion the function raises on alone (0 when none does)."""
        for index in range(len(completions)):
            try:
                self.function(prompts=prompts[index : index + 1], completions=completions[index : index + 1],
                              **{key: value[index : index + 1] for key, value in kwargs.items()})
            except Exception:
                return index
        return 0


def column_lists(prompts: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The prompts' record columns, each as a list aligned with them."""
    names = dict.fromkeys(key for prompt in prompts for key in prompt.get("columns", {}))
    return {name: [prompt.get("columns", {}).get(name) for prompt in prompts] for name in names}


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record(prompts: list[str], completions: list[str], columns: dict[str, list[Any]], index: int) -> str:
    shown = {"prompt": _short(prompts[index], 120), "completion": _short(completions[index], 80),
             **{key: values[index] for key, values in columns.items()}}
    return "record " + _short(repr(shown), 400)


def _load_module(target: str, where: str) -> Any:
    """The module of `path/to/file.py` or `package.module`; ConfigError naming `where` when it cannot be loaded."""
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}: {target}: file not found (relative paths start at {Path.cwd()})")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        module_name = f"rlhf_jobs_reward_{path.stem}_{digest}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before it runs, as an import does: a @dataclass in it looks itself up
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ConfigError(f"{where}: {target}: cannot import it: {type(err).__name__}: {_short(str(err))}") \
                from None
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and target.startswith(err.name):
            raise ConfigError(f"{where}: no module {err.name!r} (a module must be importable where the workers run; "
                              "a file is named path/to/file.py:function)") from None
        raise ConfigError(f"{where}: {target}: cannot import it: {type(err).__name__}: {_short(str(err))}") from None
    except Exception as err:
        raise ConfigError(f"{where}: {target}: cannot import it: {type(err).__name__}: {_short(str(err))}") from None


def load_reward_function(reference: str, where: str = KEY) -> RewardFunction:
    """`path/to/file.py:name` or `package.module:name` as a `RewardFunction` (ConfigError naming `where`)."""
    target, _, name = reference.rpartition(":")
    module = _load_module(target, where)
    function = getattr(module, name, None)
    if function is None:
        defined = sorted(key for key, value in vars(module).items()
                         if callable(value) and not key.startswith("_") and not isinstance(value, type))
        raise ConfigError(f"{where}: {target} has no {name!r}" + (f" (its functions: {', '.join(defined[:12])})"
                                                                   if defined else ""))
    if not callable(function) or isinstance(function, type):
        raise ConfigError(f"{where}: {reference}: {name} is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {reference}: cannot read its signature") from None
    reward = RewardFunction(function, reference)
    accepts = reward.takes_all or {"prompts", "completions"} <= reward.named
    if not accepts:
        raise ConfigError(f"{where}: {reference}: {reward.name}{inspect.signature(function)} does not take "
                          "prompts= and completions=; a reward function is fn(prompts, completions, **columns) -> "
                          "list[float | None]")
    return reward


def load_reward_functions(references: Sequence[str]) -> list[RewardFunction]:
    """Every configured reward function, named uniquely (`reward/<name>` in the metrics; a repeated name gets _2)."""
    functions = [load_reward_function(reference, f"{KEY}[{index}] ({reference})")
                 for index, reference in enumerate(references)]
    seen: dict[str, int] = {}
    for function in functions:
        seen[function.name] = seen.get(function.name, 0) + 1
        if seen[function.name] > 1:
            function.name = f"{function.name}_{seen[function.name]}"
    return functions


def check_reward_functions(functions: Sequence[RewardFunction], first: dict[str, Any], where: str) -> None:
    """Call each function once on the first prompt record with an empty completion: a wrong signature, a missing
    column or a wrong answer is a ConfigError here, on the driver, before any worker starts."""
    reserved = [name for name in RESERVED_COLUMNS if name in first.get("columns", {})]
    if reserved:
        raise DataError(f"{where}: the records have a field {reserved[0]!r}, the name of an argument every reward "
                        "function takes; rename it")
    for index, function in enumerate(functions):
        columns = column_lists([first])
        try:
            function.values([first["text"]], [""], columns)
        except RewardError as err:
            detail = str(err).split(f"({function.reference}) ", 1)[-1]
            missing = [name for name in function.named - {"prompts", "completions"} - set(columns)
                       if _required(function.function, name)]
            hint = f"; the records have no field {missing[0]!r} (their fields: " \
                   f"{', '.join(columns) or 'none besides the prompt'})" if missing else ""
            raise ConfigError(f"{KEY}[{index}] ({function.reference}): called on the first record of {where} with an "
                              f"empty completion, it {detail}{hint}") from None


def _required(function: Callable[..., Any], name: str) -> bool:
    parameter = inspect.signature(function).parameters.get(name)
    return parameter is not None and parameter.default is inspect.Parameter.empty


def weighted_total(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_k w_k r_k per completion, a source's NaN (no opinion) left out of the sum; NaN where no source scored
    (TRL's `nansum`, then unscorable rows back to NaN)."""
    stacked = torch.stack([value.float() for value in values], dim=1)
    total = (stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)).nansum(dim=1)
    return total.masked_fill(stacked.isnan().all(dim=1), math.nan)
