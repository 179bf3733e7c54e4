"""A base install (no extras) runs every path that does not ask for one; a path that does fails in the driver,
before anything is written, naming the extra.

The extras' packages (peft, mlflow, wandb) are installed in the dev venv, so each test runs `rlhf-jobs` in a
subprocess whose import system cannot find them, as on a base install. `.ci/base-install-smoke` checks the same
with a real venv without extras.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, local_config, write_config

EXTRAS = ("peft", "mlflow", "wandb")

# Every finder on sys.meta_path is wrapped so that it does not find the extras: `import peft` raises
# ModuleNotFoundError, `importlib.util.find_spec("peft")` is None and importlib.metadata finds no peft (nor
# mlflow-skinny), as where they are not installed.
WITHOUT_EXTRAS = f"""
import sys

EXTRAS = {EXTRAS!r}


class WithoutExtras:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in EXTRAS:
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec else None

    def find_distributions(self, *args, **kwargs):
        find_distributions = getattr(self.finder, "find_distributions", None)
        for distribution in find_distributions(*args, **kwargs) if find_distributions else ():
            if distribution.name.lower().partition("-")[0] not in EXTRAS:
                yield distribution

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [WithoutExtras(finder) for finder in sys.meta_path]
from rlhf_jobs.cli import main

code = main(sys.argv[1:])
imported = sorted(name for name in sys.modules if name.partition(".")[0] in EXTRAS)
assert not imported, f"imported {{imported}}"
sys.exit(code)
"""


def run_without_extras(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_sft_rm_ppo_and_samples_run_without_the_extras(tiny_model: Path, tmp_path: Path) -> None:
    """SFT, RM and PPO one step each (the local pipeline, in-process), the final models and the samples after PPO."""
    process = run_without_extras(
        "pipeline", "--backend", "local", "--in-process", "--workdir", str(tmp_path / "run"),
        "--config-dir", str(REPO / "configs" / "local"), "--base-model", str(tiny_model),
        "--set", "Training.num_training_workers=1", "--set", "sft.Training.max_train_steps=1",
        "--set", "rm.Training.max_train_steps=1", "--set", "ppo.Training.training_iteration=1",
        cwd=REPO,
    )
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((tmp_path / "run" / stage / "rlhf_stage.json").read_text())["stage"] == stage
    assert (tmp_path / "run" / "ppo-samples.jsonl").is_file()


def test_lora_without_peft_fails_before_training_naming_the_extra(tiny_model: Path, tmp_path: Path) -> None:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"] |= {"num_training_workers": 1, "lora": {"r": 4}}
    process = run_without_extras("train", "sft", "--config_path", str(write_config(tmp_path / "sft.yaml", config)),
                                 "--in-process", cwd=tmp_path)
    assert process.returncode == 2, process.stderr[-3000:]
    assert process.stderr.strip().splitlines() == [
        "error: Training.lora needs the peft package, which is not installed (pip install 'rlhf-jobs[lora]')"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()


def test_an_adapter_input_without_peft_fails_before_training_naming_the_extra(tiny_model: Path,
                                                                             tmp_path: Path) -> None:
    """A model exported as a LoRA adapter (`export: adapter`) loads with peft: the driver says so first."""
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    config = local_config("sft", base_model=adapter, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"]["num_training_workers"] = 1
    process = run_without_extras("train", "sft", "--config_path", str(write_config(tmp_path / "sft.yaml", config)),
                                 "--in-process", cwd=tmp_path)
    assert process.returncode == 2, process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1] == (
        f"error: General.base_model ({adapter}) is a LoRA adapter: loading it needs the peft package, which is not "
        "installed (pip install 'rlhf-jobs[lora]')")
    assert not (tmp_path / "out").exists()


def test_report_to_mlflow_without_it_fails_naming_the_extra(tiny_model: Path, tmp_path: Path) -> None:
    config = local_config("sft", base_model=tiny_model, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "model")
    config["Training"] |= {"num_training_workers": 1, "report_to": ["tensorboard", "mlflow"]}
    process = run_without_extras("train", "sft", "--config_path", str(write_config(tmp_path / "sft.yaml", config)),
                                 "--in-process", cwd=tmp_path)
    assert process.returncode == 2, process.stderr[-3000:]
    assert "pip install 'rlhf-jobs[mlflow]'" in process.stderr.strip().splitlines()[-1]
