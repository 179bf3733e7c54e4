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
    from rlhf_jobs.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


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


@pytest.fixture(scope="session")
def sft_checkpoint(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SFT stage trained on the sample data with configs/local/sft.yaml (2 workers)."""
    from rlhf_jobs.cli import train_stage

    work = tmp_path_factory.mktemp("sft")
    config = local_config("sft", base_model=tiny_model, output_dir=work / "output", checkpoint_dir=work / "model")
    # Written in the original .conf format on purpose: it must train unchanged.
    train_stage("sft", str(write_config(work / "sft.conf", config)))
    return work / "model"


@pytest.fixture(scope="session")
def rm_checkpoint(sft_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reward model trained from the SFT checkpoint with configs/local/rm.yaml (2 workers)."""
    from rlhf_jobs.cli import train_stage

    work = tmp_path_factory.mktemp("rm")
    config = local_config("rm", base_model=sft_checkpoint, output_dir=work / "output", checkpoint_dir=work / "model")
    train_stage("rm", str(write_config(work / "rm.yaml", config)))
    return work / "model"
