"""A run's identity, recorded in its `output_dir`, so that a changed config never resumes old state.

The identity is the stage config minus the keys that may change between attempts of one run
(`RESUMABLE_KEYS`: worker count, logging and checkpoint cadence...), plus the markers of the
models the run starts from (a re-trained SFT model is a change for the RM and PPO built on it).
A re-run with the same identity resumes; a different one is refused with the changed keys
listed, or, with `--on-config-change restart`, the old `output_dir` is moved aside (never deleted).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_jobs.core.config import StageConfig
from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.stages import get
from rlhf_jobs.store import storage
from rlhf_jobs.store.checkpoints import move_aside
from rlhf_jobs.store.markers import IDENTITY_FILE, digest, marker_output_dir, read_identity, read_marker, run_location

ON_CONFIG_CHANGE = ("refuse", "restart")
RESUMABLE_KEYS = (
    "Training.num_training_workers",
    "Training.resources_per_worker",
    "Training.logging_steps",
    "Training.save_steps",
    "Training.eval_steps",
    "Training.max_failures",
    "Training.report_to",
    "Dataset.preprocessing_num_workers",
    # Memory knobs that do not change what is computed, which the out-of-memory message advises changing
    # before a resume (launcher.out_of_memory). Beyond PLAN.md's list.
    "Training.gradient_checkpointing",
    "Training.rollout_batch_size",
    "Training.logprob_chunk_size",
    # DPO: the reference's log-probs, live or computed once, are those of the same starting model either way
    # (a resume that turns it on computes them then), so it may change to get out of memory.
    "Training.precompute_reference",
)


def compute(config: StageConfig) -> dict[str, Any]:
    """The identity of `config`: {"stage", "config" (minus RESUMABLE_KEYS), "inputs" (their markers)}."""
    data = config.to_dict()
    for key in RESUMABLE_KEYS:
        section, _, name = key.partition(".")
        data.get(section, {}).pop(name, None)
    inputs = {}
    for key in get(config.stage).model_keys:
        location = getattr(config.General, key, None)
        if location:  # a hub id has no marker either
            marker = read_marker(location)
            if marker is not None:
                inputs[f"General.{key}"] = {"stage": marker.get("stage"), "written_at": marker.get("written_at")}
    return {"stage": config.stage, "config": data, "inputs": inputs}


def record(config: StageConfig) -> Path:
    """Create `output_dir` and record the run's identity there (call right before training starts).

    The preflight (`check`) already settled a differing identity; one found here means the directory
    changed in between, and is refused as well.
    """
    output_dir = storage.location(config.General.output_dir)
    identity = compute(config)
    existing = read_identity(output_dir)
    if existing is not None and existing != identity:
        raise ConfigError(changed_message(config, existing, identity))
    payload = json.dumps({"identity": identity, "hash": digest(identity), "recorded_at": time.time()}, indent=2)
    if existing is None:
        output_dir.join(IDENTITY_FILE).write_text(payload + "\n")  # creates a local output_dir
    output_dir.local.mkdir(parents=True, exist_ok=True)
    return output_dir.local


# ---- comparing ---------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _shown(value: Any) -> str:
    if isinstance(value, float) and value > 1e9:  # a written_at timestamp
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _flat_view(identity: dict[str, Any]) -> dict[str, Any]:
    """Config keys, and input-model markers as 'General.model_pretrain (the model there).written_at'."""
    view = _flatten(identity["config"])
    for key, marker in identity.get("inputs", {}).items():
        view.update({f"{key} (the model there).{field}": value for field, value in marker.items()})
    return view


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'Training.epochs: 6 -> 2' lines for every key whose value differs."""
    before, after = _flat_view(old), _flat_view(new)
    unset = "<unset>"
    return [
        f"{key}: {_shown(before.get(key, unset))} -> {_shown(after.get(key, unset))}"
        for key in sorted(set(before) | set(after))
        if before.get(key, unset) != after.get(key, unset)
    ]


def changed_message(config: StageConfig, old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    output_dir = config.General.output_dir
    if old is None:
        what = f"holds files but no {IDENTITY_FILE}, so the config they were trained with is unknown;\n"
    else:
        lines = changed_keys(old, new) or ["(stage)"]
        what = "holds the training state of a different config:\n  " + "\n  ".join(lines) + "\n"
    return (
        f"General.output_dir: {output_dir} {what}"
        f"resuming would mix that state with this config. Restore the old values to resume, choose another "
        f"output_dir, or start over with --on-config-change restart (moves {output_dir} aside, deletes nothing)"
    )


# ---- the preflight decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    action: str  # "fresh", "resume" or "restart"
    moved: tuple[tuple[str, str], ...] = ()  # (from, to) of what a restart moved aside


def _has_training_state(output_dir: str) -> bool:
    return bool(storage.location(output_dir).names())


def check(config: StageConfig, on_config_change: str = "refuse", fresh: bool = False) -> Decision:
    """Compare the recorded identity with this config's; refuse or move aside on a change.

    Runs on the driver before anything is written. A restart also moves aside this run's old final
    model in `checkpoint_dir` (trained with the old config), so nothing is ever deleted. `fresh`:
    restart even with the same config (a forced re-run, e.g. the pipeline's --from-stage).
    """
    if on_config_change not in ON_CONFIG_CHANGE:
        raise ConfigError(f"--on-config-change {on_config_change!r}: expected one of {', '.join(ON_CONFIG_CHANGE)}")
    output_dir = config.General.output_dir
    new = compute(config)
    old = read_identity(output_dir)
    if old is None and not _has_training_state(output_dir):
        return Decision("fresh", restart_moves(config) if fresh else ())
    if old == new and not fresh:
        return Decision("resume")
    if on_config_change == "refuse" and not fresh:
        raise ConfigError(changed_message(config, old, new))
    return Decision("restart", restart_moves(config))


def restart_moves(config: StageConfig) -> tuple[tuple[str, str], ...]:
    """Move aside `output_dir` and this run's final model in `checkpoint_dir`; (from, to) pairs."""
    moved = []
    output_dir, checkpoint_dir = config.General.output_dir, config.General.checkpoint_dir
    marker = read_marker(checkpoint_dir)
    ours = marker is not None and marker.get("stage") == config.stage and (
        marker_output_dir(marker) == run_location(output_dir)
    )
    for path in (output_dir, checkpoint_dir if ours else None):
        if path is not None and storage.location(path).exists():
            moved.append((str(path), move_aside(path)))
    return tuple(moved)
