"""Shared fixtures: a tiny model built from the sample data, and trained stage checkpoints.

Training fixtures run the real trainers on an in-process Ray (started once per session).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "examples" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhf_jobs.tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama-architecture model (~0.35M parameters) stored in bf16, with a tokenizer that adds BOS."""
    from rlhf_jobs.tools.tiny_model import build_llama

    return build_llama(tmp_path_factory.mktemp("llama") / "model", "tiny")


def write_config(path: Path, config: dict) -> Path:
    """YAML, or for a `.conf` path the original workflow's Python-literal style."""
    path.write_text(to_conf(config) if path.suffix == ".conf" else yaml.safe_dump(config, sort_keys=False))
    return path


def to_conf(value: object, indent: int = 0) -> str:
    """A dict as the original `.conf` files wrote it: `None`, trailing commas, a comment line."""
    pad = "    " * (indent + 1)
    if isinstance(value, dict):
        body = "".join(f"{pad}{key!r}: {to_conf(item, indent + 1)},\n" for key, item in value.items())
        text = "{\n" + body + "    " * indent + "}"
        return ("# I am python, not json\n" + text + "\n") if indent == 0 else text
    return repr(value)


def local_config(name: str, **replacements: str) -> dict:
    """configs/local/<name>.yaml with General paths replaced (e.g. base_model=..., output_dir=...)."""
    config = yaml.safe_load((REPO / "configs" / "local" / f"{name}.yaml").read_text())
    for key, value in replacements.items():
        section = "Dataset" if key in ("train_file", "validation_file") else "General"
        config[section][key] = str(value)
    for key in ("train_file", "validation_file"):
        location = config["Dataset"].get(key)
        if location and not Path(location).is_absolute():
            config["Dataset"][key] = str(REPO / location)
    return config


def train_local_stage(stage: str, base_model: Path, factory: pytest.TempPathFactory, suffix: str = ".yaml") -> Path:
    """Train configs/local/<stage>.yaml from `base_model` into a temp dir; the final model's path."""
    from rlhf_jobs.cli import train_stage

    work = factory.mktemp(stage)
    config = local_config(stage, base_model=base_model, output_dir=work / "output", checkpoint_dir=work / "model")
    train_stage(stage, str(write_config(work / f"{stage}{suffix}", config)))
    return work / "model"


@pytest.fixture(scope="session")
def sft_checkpoint(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SFT stage trained on the sample data (2 workers), from a config in the original .conf
    format on purpose: such a file must train unchanged."""
    return train_local_stage("sft", tiny_model, tmp_path_factory, suffix=".conf")


@pytest.fixture(scope="session")
def rm_checkpoint(sft_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reward model trained from the SFT checkpoint with configs/local/rm.yaml (2 workers)."""
    return train_local_stage("rm", sft_checkpoint, tmp_path_factory)
