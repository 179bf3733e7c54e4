"""`rlhf-jobs generate`: answers of one or several checkpoints to the same prompts, side by side,
each scored by the reward model, as a table and a JSONL file.

Prompts are built, truncated, sampled and scored by PPO's own functions (`ppo.tokenize_prompts`,
`ppo.generate_responses`, `ppo.score_responses`), so what you see is what PPO trained on.
Settings (prompt format, prompt length, temperature, length, seed) come from the PPO checkpoint's
recorded config when there is one, else the PPO defaults; flags override them. Responses are sampled
exactly as PPO samples them: from softmax(logits / temperature), whatever the checkpoint's own
`generation_config.json` says.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_jobs.core.config import PPOTraining, PromptDataset
from rlhf_jobs.core.data import PPO_SCHEMA, load_splits, read_records
from rlhf_jobs.core.errors import CheckpointError, DataError
from rlhf_jobs.core.stages import REGISTRY
from rlhf_jobs.store.markers import read_marker

BATCH = 16


@dataclass(frozen=True)
class Settings:
    prompt_format: str
    max_prompt_length: int
    training: PPOTraining  # sampling settings (temperature, max_new_tokens) and the seed


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


def settings_from(checkpoints: Sequence[str], overrides: dict[str, Any] | None = None) -> Settings:
    """The first PPO checkpoint's prompt and sampling settings (else defaults), with `overrides` applied."""
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
        training=PPOTraining.model_validate({**sampling, "training_iteration": 1}),
    )


def default_reward_model(checkpoints: Sequence[str]) -> str | None:
    """The reward model a PPO checkpoint was trained against (its rm_pretrain), if any."""
    for directory in checkpoints:
        marker = read_marker(directory) if Path(directory).is_dir() else None
        if marker and _samples_policy(marker):
            return (marker.get("config") or {}).get("General", {}).get(REGISTRY[marker["stage"]].reward_key)
    return None


def labels_for(models: Sequence[str]) -> list[str]:
    """Short column names: the directory names, or the paths where those repeat."""
    names = [Path(m).name or m for m in models]
    return names if len(set(names)) == len(names) else list(models)


def generate(models: Sequence[str], records: list[dict[str, Any]], settings: Settings,
             reward_model: str | None = None) -> list[Sample]:
    """Every model's answer to every record's prompt (same seed per model), scored by `reward_model`.

    Each policy goes through PPO's own rollout functions, wrapped in a `ppo.PPOModels` holding just it,
    its tokenizer and the reward model.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from rlhf_jobs.algorithms import ppo
    from rlhf_jobs.engine.batching import pad
    from rlhf_jobs.engine.models import load_causal_lm, load_reward_model, load_tokenizer

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model says nothing here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = [Sample(record, answers={}) for record in records]
    rm, rm_tokenizer = None, None
    if reward_model:
        rm_tokenizer = load_tokenizer(reward_model, padding_side="right")
        rm_tokenizer.truncation_side = "left"
        rm = ppo.frozen(load_reward_model(reward_model, rm_tokenizer, dropout=False)).to(device)
    training = settings.training
    for label, path in zip(labels_for(models), models, strict=True):
        tokenizer = load_tokenizer(path, padding_side="left")
        policy = load_causal_lm(path, tokenizer, dropout=False).to(device)
        held = ppo.PPOModels(policy=policy, critic=None, reference=None, reward_model=rm,  # type: ignore[arg-type]
                             tokenizer=tokenizer, rm_tokenizer=rm_tokenizer)
        prompts = ppo.tokenize_prompts(records, tokenizer, settings.prompt_format, settings.max_prompt_length)
        torch.manual_seed(training.seed)
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start : start + BATCH]
            responses = ppo.generate_responses(held, batch, training, device)
            scores: list[float | None] = [None] * len(batch)
            if rm is not None:
                response, mask = pad(responses, tokenizer.pad_token_id, device=device)
                scores = ppo.score_responses(held, batch, response, mask, training, device).tolist()
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


def table(samples: list[Sample], width: int = 100) -> str:
    """Per prompt, one row per model: score and answer; then each model's mean score."""
    if not samples:
        return "(no prompts)"
    labels = list(samples[0].answers or {})
    name_width = max(len(label) for label in labels)
    lines = []
    for number, sample in enumerate(samples, start=1):
        lines.append(f"prompt {number}: {_one_line(_question(sample.record), width)}")
        for label in labels:
            answer = (sample.answers or {})[label]
            score = f"{answer['score']:7.3f}" if answer["score"] is not None else "      -"
            lines.append(f"  {label.ljust(name_width)}  {score}  {_one_line(answer['text'], width) or '(empty)'}")
    means = []
    for label in labels:
        scores = [s.answers[label]["score"] for s in samples if s.answers and s.answers[label]["score"] is not None]
        if scores:
            means.append(f"{label} {sum(scores) / len(scores):.3f}")
    if means:
        lines.append(f"mean reward-model score over {len(samples)} prompt(s): {', '.join(means)}")
    else:
        lines.append("(no reward model given: no scores; pass --rm DIR)")
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
            overrides: dict[str, Any] | None = None) -> tuple[list[Sample], Settings]:
    """Read the prompts (a file, or a checkpoint's held-out split), then `generate`."""
    if not models:
        raise CheckpointError("give at least one model directory (--model DIR)")
    for model in models:
        if not Path(model).is_dir():
            raise CheckpointError(f"--model {model}: no such model directory")
    if (prompts_file is None) == (held_out is None):
        raise DataError("give the prompts as --prompts FILE or --held-out CHECKPOINT_DIR (one of them)")
    records = read_prompts(prompts_file) if prompts_file else held_out_records(str(held_out))
    records = records[:limit] if limit else records
    settings = settings_from([*([held_out] if held_out else []), *models], overrides)
    rm = reward_model or default_reward_model([*([held_out] if held_out else []), *models])
    if rm and not Path(rm).is_dir():
        raise CheckpointError(f"--rm {rm}: no such reward model directory")
    return generate(models, records, settings, rm), settings
