"""The README's sample commands run as written: configs/local/*.yaml start from runs/tiny-model, which
the README's first command builds (each training command shortened here with --set)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SHORTER = {"sft": ["--set", "Training.max_train_steps=2"], "rm": ["--set", "Training.max_train_steps=2"],
           "ppo": ["--set", "Training.training_iteration=1"], "generate": ["--num", "2"]}


def sample_commands() -> list[list[str]]:
    """The `rlhf-jobs` lines of the README's code block right after the Samples bullet."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"- Samples:.*?```bash\n(.*?)```", text, re.S)
    assert block, "README: no command block after '- Samples:'"
    return [shlex.split(line.split("#")[0]) for line in block.group(1).splitlines() if line.startswith("rlhf-jobs")]


def test_the_sample_configs_start_from_what_the_readme_builds() -> None:
    import yaml

    commands = sample_commands()
    assert commands[0][:2] == ["rlhf-jobs", "tiny-model"]
    built = commands[0][commands[0].index("--output") + 1]
    trained = [c[c.index("--config_path") + 1] for c in commands if c[1] == "train"]
    assert trained == ["configs/local/sft.yaml", "configs/local/rm.yaml", "configs/local/ppo.yaml"]
    sft, _, ppo = (yaml.safe_load((REPO / path).read_text())["General"] for path in trained)
    assert sft["base_model"] == built and ppo["model_name"] == built and ppo["rm_name"] == built


@pytest.mark.slow
def test_the_readme_sample_commands_run(tmp_path: Path) -> None:
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in sample_commands():
        name = command[1] if command[1] != "train" else command[2]
        argv = [sys.executable, "-m", "rlhf_jobs.cli", *command[1:], *SHORTER.get(name, [])]
        process = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert process.returncode == 0, f"{shlex.join(command)}\n{process.stdout[-2000:]}\n{process.stderr[-3000:]}"
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((tmp_path / "runs" / "local" / stage / "rlhf_stage.json").read_text())["stage"] == stage
    assert len((tmp_path / "runs" / "local" / "samples.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "examples", "runs"]  # nothing in the root
