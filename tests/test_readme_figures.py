"""The README's demo figures come from a run: `make readme-figures` (bench/readme_figures.py) writes the block
from the demo's printed output. Here: the block in the README is what that script writes, in the shape the
pipeline prints (the slow pipeline test checks that the script reads the pipeline's real output)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from conftest import REPO

from rlhf_jobs.core import stages


def readme_figures():
    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "bench" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_shape(parsed: dict) -> None:
    """Every stage succeeded and shows the registry's figures; the score table has a column per policy."""
    assert list(parsed["stages"]) == list(stages.DEFAULT_PIPELINE)
    for name, entry in parsed["stages"].items():
        assert entry["status"] == "succeeded"
        assert all(f"{figure.label} " in entry["metrics"] for figure in stages.get(name).summary), entry
    assert list(parsed["means"]) == ["sft", "ppo"] and parsed["prompts"] > 0


def test_the_readme_demo_block_is_what_the_script_writes() -> None:
    module = readme_figures()
    readme = (REPO / "README.md").read_text()
    block = module.readme_block(readme)
    check_shape(module.parse(block))
    assert module.rewrite(readme, block) == readme  # the markers, the fence and nothing else
    seconds = int(re.search(r"\*\*(\d+) s end to end\*\*", readme)[1])
    assert module.rewrite(readme, block, seconds) == readme


def test_the_script_reads_the_block_from_the_pipeline_output(tmp_path: Path) -> None:
    """What `rlhf-jobs pipeline` prints around the block (progress before, answers after) is left out, and the
    work directory is shown as runs/demo."""
    module = readme_figures()
    block = module.readme_block((REPO / "README.md").read_text())
    workdir = tmp_path / "readme-demo-x"
    printed = block.replace("runs/demo", str(workdir))
    output = ("[sft] epoch 1/6 step 5/42 loss 7.1\n== ppo: run\n\n" + printed
              + "\n\nprompt 1: How do I sharpen a kitchen knife?\n  sft  a\n  ppo  b\nsample answers: x\n")
    assert module.demo_block(output, workdir) == block
