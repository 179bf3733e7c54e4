"""`rlhf-jobs generate`: answers of one or several checkpoints to the same prompts, side by side,
each scored by the reward model, as a table and a JSONL file.

Prompts are built, truncated, sampled and scored by the RL stages' own pieces (`algorithms/rl/rollout.py`,
`algorithms/rl/rewards.py`), so what you see is what PPO trained on.
Settings (prompt format, prompt length, temperature, length, seed) come from the PPO checkpoint's
recorded config when there is one, else the PPO defaults; flags override them. Responses are sampled
exactly as PPO samples them: from softmax(logits / temperature), whatever the checkpoint's own
`generation_config.json` says.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_jobs.core.config import PPOTraining, PromptDataset
from rlhf_jobs.core.data import PPO_SCHEMA, load_splits, read_records
from rlhf_jobs.core.errors import CheckpointError, ConfigError, DataError
from rlhf_jobs.core.stages import REGISTRY
from rlhf_jobs.store.markers import read_marker

BATCH = 16


@dataclass(frozen=True)
class Settings:
    prompt_format: str
    max_prompt_length: int
    training: PPOTraining  # sampling settings (temperature, max_new_tokens) and the seed
    greedy: bool = False  # the most likely token at every step instead of sampling


@dataclass
class Sample:
    record: dict[str, Any]
    prompt_text: str = ""
    answers: dict[str, dict[str, Any]] | None = None


def _marker(directory: str) -> dict[str, Any]:
    marker = read_marker(directory) if Path(directory).is_dir() else None
    if marker is None:
        raise CheckpointError(f"{directory}: not a finished stage checkpoint (no rlhf_stage.json)")
    return marker


def held_out_records(checkpoint: str) -> list[dict[str, Any]]:
    """The held-out split of the stage that wrote `checkpoint`, read as that stage read it."""
    marker = _marker(checkpoint)
    config, stage = marker.get("config") or {}, marker.get("stage")
    dataset, seed = config.get("Dataset", {}), config.get("Training", {}).get("seed", 42)
    if stage not in REGISTRY or "train_file" not in dataset:
        raise CheckpointError(f"{checkpoint}: its rlhf_stage.json records no Dataset to take a held-out split from")
    _, held_out = load_splits(dataset["train_file"], dataset.get("validation_file"),
                              dataset.get("validation_split_percentage", 0), REGISTRY[stage].records, seed)
    if held_out is None or len(held_out) == 0:
        raise DataError(f"{checkpoint}: its stage held out no records (validation_split_percentage 0)")
    return list(held_out)


def read_prompts(path: str) -> list[dict[str, Any]]:
    """A file of {"prompt" | "instruction", "context"?} records (JSONL or a JSON array)."""
    return read_records(path, PPO_SCHEMA)


def _samples_policy(marker: dict[str, Any]) -> bool:
    """A model of an RL stage (PPO): its recorded config says how it sampled and which reward model scored it."""
    stage = REGISTRY.get(str(marker.get("stage")))
    return stage is not None and stage.reward_key is not None


def check_options(num: int | None, max_new_tokens: int | None, temperature: float | None,
                  output: str | None) -> None:
    """The command's numbers and output path, each refused in one line (before any model loads)."""
    if num is not None and num < 0:
        raise ConfigError(f"--num: expected 0 (every prompt) or a positive number of prompts, got {num}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected a positive number of tokens, got {max_new_tokens}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"--temperature: expected a positive number, got {temperature:g}; for the most likely "
                          "answer use --greedy")
    if output is not None and Path(output).is_dir():
        raise ConfigError(f"--output: {output} is a directory; expected a file to write the JSON lines to")


def settings_from(checkpoints: Sequence[str], overrides: dict[str, Any] | None = None,
                  greedy: bool = False) -> Settings:
    """The first PPO checkpoint's prompt and sampling settings (else defaults), with `overrides` applied;
    `greedy`: the most likely token at every step (no sampling)."""
    dataset: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for directory in checkpoints:
        marker = read_marker(directory) if Path(directory).is_dir() else None
        config = (marker or {}).get("config") or {}
        if marker and _samples_policy(marker):
            dataset, training = config.get("Dataset", {}), config.get("Training", {})
            break
        dataset = dataset or config.get("Dataset", {})
    # Sampled as PPO samples, from the full softmax(logits / temperature) (a checkpoint written before top_k/top_p
    # were refused may record them: they are not applied).
    sampling = {k: v for k, v in training.items() if k in ("temperature", "max_new_tokens", "seed")}
    sampling.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Settings(
        prompt_format=dataset.get("prompt_format", "instruction"),
        max_prompt_length=dataset.get("max_prompt_length", PromptDataset.model_fields["max_prompt_length"].default),
        training=PPOTraining.model_validate({**sampling, "training_iteration": 1}), greedy=greedy,
    )


def _policy_markers(checkpoints: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The stage markers of those `checkpoints` that are sampling policies (PPO, GRPO), in order."""
    for directory in checkpoints:
        marker = read_marker(directory) if Path(directory).is_dir() else None
        if marker and _samples_policy(marker):
            yield marker


def default_reward_model(checkpoints: Sequence[str]) -> str | None:
    """The reward model a PPO checkpoint was trained against (its rm_pretrain), if any."""
    for marker in _policy_markers(checkpoints):
        return (marker.get("config") or {}).get("General", {}).get(REGISTRY[marker["stage"]].reward_key)
    return None


def default_reward_functions(checkpoints: Sequence[str]) -> tuple[list[str], list[float]] | None:
    """The reward functions (and their weights) a GRPO checkpoint was trained with, if any: what scores its answers
    when it had no reward model."""
    for marker in _policy_markers(checkpoints):
        general = (marker.get("config") or {}).get("General", {})
        if general.get("reward_functions"):
            references = list(general["reward_functions"])
            return references, list(general.get("reward_weights") or [1.0] * len(references))
    return None


def labels_for(models: Sequence[str]) -> list[str]:
    """Short column names: the directory names, or the paths where those repeat."""
    names = [Path(m).name or m for m in models]
    return names if len(set(names)) == len(names) else list(models)


def generate(models: Sequence[str], records: list[dict[str, Any]], settings: Settings,
             reward_model: str | None = None,
             reward_functions: tuple[list[str], list[float]] | None = None) -> list[Sample]:
    """Every model's answer to every record's prompt (same seed per model), scored by `reward_model`, else by
    `reward_functions` (references and weights: their weighted total, as GRPO sums them).

    The RL stages' own pieces: prompts built and truncated as they build them (`rollout.tokenize_prompts`),
    sampled by the same engine and settings (`rollout.HFRolloutEngine`, `rollout.Sampling`), scored as they
    score (`rewards.RewardModelScore`, `rewards.RewardFunction`).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from rlhf_jobs.algorithms.rl.rewards import Responses, RewardModelScore, load_reward_functions, weighted_total
    from rlhf_jobs.algorithms.rl.rollout import HFRolloutEngine, Sampling, frozen, tokenize_prompts
    from rlhf_jobs.engine.batching import pad
    from rlhf_jobs.engine.models import load_causal_lm, load_reward_model, load_tokenizer

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model says nothing here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = [Sample(record, answers={}) for record in records]
    training = settings.training
    reward = None
    if reward_model:
        rm_tokenizer = load_tokenizer(reward_model, padding_side="right")
        rm_tokenizer.truncation_side = "left"
        rm = frozen(load_reward_model(reward_model, rm_tokenizer, dropout=False)).to(device)
        reward = RewardModelScore(
            lambda input_ids, attention_mask: rm(input_ids=input_ids, attention_mask=attention_mask,
                                                 use_cache=False).logits.squeeze(-1),
            rm_tokenizer, getattr(rm.config, "max_position_embeddings", None) or 1024, training, device)
    elif reward_functions:
        functions, weights = load_reward_functions(reward_functions[0]), reward_functions[1]

        def reward(responses: Responses) -> torch.Tensor:
            return weighted_total([function(responses) for function in functions], weights)
    sampling = Sampling.of(training, greedy=settings.greedy)
    for label, path in zip(labels_for(models), models, strict=True):
        tokenizer = load_tokenizer(path, padding_side="left")
        engine = HFRolloutEngine(load_causal_lm(path, tokenizer, dropout=False).to(device), tokenizer, training,
                                 device)
        prompts = tokenize_prompts(records, tokenizer, settings.prompt_format, settings.max_prompt_length)
        torch.manual_seed(training.seed)
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start : start + BATCH]
            responses = engine.generate([prompt["input_ids"] for prompt in batch], sampling)
            scores: list[float | None] = [None] * len(batch)
            if reward is not None:
                response, mask = pad(responses, tokenizer.pad_token_id, device=device)
                scores = [None if value != value else value  # NaN: no function scored it
                          for value in reward(Responses(batch, response, mask, tokenizer)).tolist()]
            for offset, (prompt, ids, value) in enumerate(zip(batch, responses, scores, strict=True)):
                sample = samples[start + offset]
                sample.prompt_text = sample.prompt_text or prompt["text"]
                sample.answers[label] = {  # type: ignore[index]
                    # the answer; the reward model read join_response(prompt_text, text), as in its training pairs
                    "model": str(path), "text": tokenizer.decode(ids, skip_special_tokens=True),
                    "score": value, "tokens": len(ids), "eos": bool(ids) and ids[-1] == tokenizer.eos_token_id,
                }
    return samples


# ---- showing -----------------------------------------------------------------------------------------------


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _question(record: dict[str, Any]) -> str:
    question = record.get("instruction") or record.get("prompt") or ""
    return question + (f" [{record['context']}]" if record.get("context") else "")


def score_table(samples: list[Sample], width: int = 60) -> str:
    """The reward model's score of every model's answer, one column per model, one row per prompt, then the
    means: which model the reward model prefers, at a glance."""
    labels = list(samples[0].answers or {})
    widths = [max(len(label), 7) for label in labels]
    rows = [f"{'':>3}  {'prompt':<{width}}  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, widths,
                                                                                              strict=True))]
    for number, sample in enumerate(samples, start=1):
        scores = [(sample.answers or {})[label]["score"] for label in labels]
        rows.append(f"{number:>3}  {_one_line(_question(sample.record), width):<{width}}  "
                    + "  ".join(f"{score:>{w}.3f}" if score is not None else f"{'-':>{w}}"
                                for score, w in zip(scores, widths, strict=True)))
    means = [_mean([s.answers[label]["score"] for s in samples]) for label in labels]  # type: ignore[index]
    rows.append(f"{'':>3}  {f'mean over {len(samples)} prompt(s)':<{width}}  "
                + "  ".join(f"{mean:>{w}.3f}" for mean, w in zip(means, widths, strict=True)))
    return "\n".join(row.rstrip() for row in rows)


def _mean(scores: list[float | None]) -> float:
    """The mean of the scores given (a reward function's None: no opinion, left out)."""
    given = [score for score in scores if score is not None]
    return sum(given) / len(given) if given else float("nan")


def table(samples: list[Sample], width: int = 100, answers: int | None = None) -> str:
    """The reward-model scores (a column per model, when there is a reward model), then per prompt each
    model's answer (of the first `answers` prompts; None: all)."""
    if not samples:
        return "(no prompts)"
    labels = list(samples[0].answers or {})
    scored = any(a["score"] is not None for s in samples for a in (s.answers or {}).values())
    lines = [score_table(samples), ""] if scored else ["(no reward model given: no scores; pass --rm DIR)", ""]
    name_width = max(len(label) for label in labels)
    for number, sample in enumerate(samples[:answers], start=1):
        lines.append(f"prompt {number}: {_one_line(_question(sample.record), width)}")
        for label in labels:
            answer = (sample.answers or {})[label]
            lines.append(f"  {label.ljust(name_width)}  {_one_line(answer['text'], width) or '(empty)'}")
    return "\n".join(lines)


def write_jsonl(samples: list[Sample], path: str | Path) -> Path:
    """One line per prompt: the record's prompt, the text the models saw, and every model's answer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            line = {"prompt": _question(sample.record), "prompt_text": sample.prompt_text, "answers": sample.answers}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def compare(models: Sequence[str], *, prompts_file: str | None = None, held_out: str | None = None,
            reward_model: str | None = None, limit: int | None = 8,
            overrides: dict[str, Any] | None = None, greedy: bool = False) -> tuple[list[Sample], Settings]:
    """Read the prompts (a file, or a checkpoint's held-out split), then `generate` (`limit` 0 or None: all).
    Scored by `reward_model`, else a PPO/GRPO checkpoint's reward model, else a GRPO checkpoint's reward functions."""
    if not models:
        raise CheckpointError("give at least one model directory (--model DIR)")
    for model in models:
        if not Path(model).is_dir():
            raise CheckpointError(f"--model {model}: no such model directory")
    if (prompts_file is None) == (held_out is None):
        raise DataError("give the prompts as --prompts FILE or --held-out CHECKPOINT_DIR (one of them)")
    records = read_prompts(prompts_file) if prompts_file else held_out_records(str(held_out))
    records = records[:limit] if limit else records
    settings = settings_from([*([held_out] if held_out else []), *models], overrides, greedy)
    rm = reward_model or default_reward_model([*([held_out] if held_out else []), *models])
    if rm and not Path(rm).is_dir():
        raise CheckpointError(f"--rm {rm}: no such reward model directory")
    functions = None if rm else default_reward_functions([*([held_out] if held_out else []), *models])
    return generate(models, records, settings, rm, functions), settings
