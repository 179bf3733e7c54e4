"""The package's layers (../shared/LAYOUT.md): what never imports what, read from the source with `ast`.

Every `import` counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_jobs"
HEAVY = ("torch", "ray", "transformers", "kubernetes", "peft")  # core reads records with `datasets`, lazily
DRIVER = ("rlhf_jobs.engine.launcher", "rlhf_jobs.engine.ray_backend", "rlhf_jobs.engine.logs",
          "rlhf_jobs.engine.preemption")
SHARED_ALGORITHM_CODE = ("rlhf_jobs.algorithms.supervised", "rlhf_jobs.algorithms.rl")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> Iterator[str]:
    """Every module `path` imports: our modules by full name, others by their top-level name."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from rlhf_jobs.engine import export` imports the module engine.export
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in known else node.module


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports(path, known)) for name, path in found.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def top(module: str) -> str:
    return module.split(".")[0]


def is_algorithm(module: str) -> bool:
    return layer(module) == "algorithms" and not module.startswith(SHARED_ALGORITHM_CODE) \
        and module != "rlhf_jobs.algorithms"


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every broken rule, as 'importer -> imported: rule'."""
    found = []
    for importer, imported in sorted(edges.items()):
        for target in sorted(imported):
            ours = target.startswith("rlhf_jobs.")
            source_layer, target_layer = layer(importer), layer(target) if ours else None
            rule = None
            if source_layer == "core" and ours and target_layer != "core":
                rule = "core imports nothing else from rlhf_jobs"
            elif source_layer == "core" and top(target) in HEAVY:
                rule = "core imports no torch, ray, transformers, kubernetes or peft"
            elif source_layer == "store" and ours and target_layer not in ("core", "store"):
                rule = "store imports only core"
            elif source_layer == "engine" and target_layer in ("algorithms", "train", "pipeline", "tools", ""):
                rule = "engine never imports algorithms, train, pipeline, tools or the CLI"
            elif source_layer == "engine" and importer not in DRIVER and target in DRIVER:
                rule = "engine's worker modules never import its driver modules"
            elif source_layer == "algorithms" and target_layer in ("train", "pipeline", "tools", ""):
                rule = "algorithms never import train, pipeline, tools or the CLI"
            elif is_algorithm(importer) and is_algorithm(target) and importer != target:
                rule = "an algorithm never imports another (shared code: supervised.py, rl/)"
            elif source_layer == "pipeline" and target_layer in ("engine", "algorithms"):
                rule = "pipeline reaches training only through rlhf_jobs.train"
            elif source_layer == "tools" and target_layer == "pipeline":
                rule = "tools never import pipeline"
            if rule:
                found.append(f"{importer} -> {target}: {rule}")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module among ours (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_the_layers_are_folders() -> None:
    layers = {layer(name) for name in modules() if name.count(".") >= 1}
    assert {"core", "store", "engine", "algorithms", "train", "pipeline", "tools"} <= layers


def test_no_module_breaks_a_dependency_rule() -> None:
    assert violations(graph()) == []


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


@pytest.mark.parametrize(("importer", "target", "rule"), [
    ("rlhf_jobs.core.config", "rlhf_jobs.store.hub", "core imports nothing else"),
    ("rlhf_jobs.core.data", "torch", "core imports no torch"),
    ("rlhf_jobs.store.storage", "rlhf_jobs.engine.models", "store imports only core"),
    ("rlhf_jobs.engine.worker", "rlhf_jobs.algorithms.ppo", "engine never imports algorithms"),
    ("rlhf_jobs.engine.control", "rlhf_jobs.engine.launcher", "worker modules never import its driver"),
    ("rlhf_jobs.algorithms.ppo", "rlhf_jobs.algorithms.sft", "an algorithm never imports another"),
    ("rlhf_jobs.algorithms.ppo", "rlhf_jobs.train", "algorithms never import train"),
    ("rlhf_jobs.pipeline.backends.local", "rlhf_jobs.engine.launcher", "pipeline reaches training only"),
    ("rlhf_jobs.tools.chart_schema", "rlhf_jobs.pipeline.backends.helm", "tools never import pipeline"),
])
def test_the_checker_catches_a_broken_rule(importer: str, target: str, rule: str) -> None:
    """The rules test is not vacuous: one edge that breaks a rule, added to the real graph, is reported."""
    edges = graph()
    edges[importer] = edges.get(importer, set()) | {target}
    assert any(rule in problem and problem.startswith(f"{importer} -> {target}") for problem in violations(edges))


def test_the_checker_catches_a_circle() -> None:
    edges = graph()
    edges["rlhf_jobs.store.markers"] = edges["rlhf_jobs.store.markers"] | {"rlhf_jobs.store.checkpoints"}
    assert ["rlhf_jobs.store.checkpoints", "rlhf_jobs.store.markers"] in cycles(edges)


@pytest.mark.parametrize(("argv", "exit_code"), [
    (["--help"], 0),
    (["check-config", "sft", "--config_path", "missing.yaml"], 2),
    (["check-config", "ppo", "--config_path", "configs/local/ppo.yaml", "--no-check-paths"], 0),
    (["convert", "sft", "--input", "examples/data/sample_finetune_data.jsonl", "--output", "{tmp}/out.jsonl"], 0),
    (["status", "--workdir", "{tmp}/nothing-here"], 1),
    (["pipeline", "--backend", "kuberay", "--run", "exp1", "--dry-run", "--stages", "sft"], 0),
])
def test_commands_that_do_not_train_import_neither_torch_nor_ray(argv: list[str], exit_code: int,
                                                                  tmp_path: Path) -> None:
    """They ran to their end (the exit code says so) without loading torch, Ray or transformers."""
    if "kuberay" in argv and shutil.which("helm") is None:
        pytest.skip("helm is not on PATH (../shared/tools/install-helm-kubectl installs it)")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    script = (
        "import sys\nfrom rlhf_jobs.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'ray', 'transformers'))\n"
        "print('EXIT', code, 'HEAVY', ' '.join(heavy[:5]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.stdout.splitlines()[-1].split() == ["EXIT", str(exit_code), "HEAVY"], result.stdout + result.stderr
