"""The README's demo figures, from a run (`make readme-figures`; a measurement, not a test).

Runs the demo (`rlhf-jobs pipeline --backend local --tiny-model`, what `make demo` runs) in a fresh work directory,
then rewrites the README's demo block — the summary table and the reward model's scores of the SFT and the PPO
policy's answers to the held-out prompts, as the pipeline printed them —, the end-to-end time quoted above it, and
docs/demo-curves.png, from that one run. Paths are shown as `make demo` writes them (runs/demo).
`tests/test_readme_figures.py` checks the README block with `parse`, and the slow pipeline test checks that
`demo_block` reads what the pipeline prints.

    python bench/readme_figures.py                      # run the demo, rewrite README.md
    python bench/readme_figures.py --output run.log     # rewrite it from a saved demo output (no timing update)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- demo figures: written by `make readme-figures` from a demo run; do not edit by hand -->"
END = "<!-- end of demo figures -->"
SHOWN_WORKDIR = "runs/demo"
CURVES = REPO / "docs" / "demo-curves.png"  # the README shows it
SUMMARY_HEADER = re.compile(r"^stage\s+status\s+wall time\s+key metrics$")
SCORES_INTRO = "the SFT model's and the PPO policy's answers to the"
END_TO_END = re.compile(r"\*\*\d+ s end to end\*\*")


def demo_block(output: str, workdir: str | Path) -> str:
    """The README block from the pipeline's printed output: the summary table through the 'final models' line,
    then the score table through its mean row."""
    lines = output.replace(str(Path(workdir).resolve()), SHOWN_WORKDIR).replace(str(workdir), SHOWN_WORKDIR)
    lines = lines.splitlines()
    start = next((i for i, line in enumerate(lines) if SUMMARY_HEADER.match(line)), None)
    if start is None:
        raise ValueError("no summary table (a 'stage  status  wall time  key metrics' line) in the output")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("final models:"))
    scores = next((i for i in range(end, len(lines)) if lines[i].startswith(SCORES_INTRO)), None)
    if scores is None:
        raise ValueError(f"no score table ('{SCORES_INTRO} ...') after the summary")
    mean = next(i for i in range(scores, len(lines)) if re.match(r"^\s+mean over \d+ prompt\(s\)", lines[i]))
    return "\n".join([*lines[start : end + 1], "", *lines[scores : mean + 1]])


def parse(block: str) -> dict:
    """{'stages': {stage: {'status', 'seconds', 'metrics'}}, 'prompts': n, 'means': {model: score}} of a block."""
    lines = block.splitlines()
    if not SUMMARY_HEADER.match(lines[0]) or not set(lines[1]) <= {"-", " "}:
        raise ValueError(f"the block does not start with the summary table: {lines[:2]}")
    stages = {}
    for line in lines[2:]:
        match = re.match(r"^(\w+)\s+(\w+)\s+(\d+) s\s+(.+)$", line)
        if not match:
            break
        stages[match[1]] = {"status": match[2], "seconds": int(match[3]), "metrics": match[4]}
    header = next(line for line in lines if line.strip().startswith("prompt") and not line.startswith(SCORES_INTRO))
    models = header.split()[1:]
    mean = next(line for line in lines if re.match(r"^\s+mean over \d+ prompt\(s\)", line))
    prompts = int(re.search(r"mean over (\d+) prompt", mean)[1])
    means = dict(zip(models, map(float, mean.split()[-len(models):]), strict=True))
    rows = [line for line in lines if re.match(r"^\s*\d+\s{2}", line)]
    if len(rows) != prompts:
        raise ValueError(f"the score table has {len(rows)} rows for {prompts} prompts")
    return {"stages": stages, "prompts": prompts, "means": means}


def rewrite(readme: str, block: str, seconds: float | None = None) -> str:
    """`readme` with the block between the markers replaced (and the end-to-end time, when measured)."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    readme = f"{readme[:start]}\n```text\n{block}\n```\n{readme[end:]}"
    return END_TO_END.sub(f"**{seconds:.0f} s end to end**", readme) if seconds is not None else readme


def readme_block(readme: str) -> str:
    """The block between the markers, without its code fence."""
    inner = readme[readme.index(BEGIN) + len(BEGIN) : readme.index(END)].strip()
    return inner.removeprefix("```text").removesuffix("```").strip("\n")


def run_demo(workdir: Path) -> tuple[str, float]:
    command = [sys.executable, "-m", "rlhf_jobs.cli", "pipeline", "--backend", "local", "--workdir", str(workdir),
               "--tiny-model"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"the demo failed (exit code {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--output", type=Path, help="a saved demo output to read instead of running the demo")
    parser.add_argument("--workdir", default=SHOWN_WORKDIR, help="the work directory of that saved output")
    args = parser.parse_args()
    if args.output:
        output, seconds, workdir = args.output.read_text(), None, args.workdir
    else:
        (REPO / "runs").mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="readme-demo-", dir=REPO / "runs"))
        output, seconds = run_demo(workdir)
    block = demo_block(output, workdir)
    parse(block)
    args.readme.write_text(rewrite(args.readme.read_text(), block, seconds))
    print(block)
    print(f"{args.readme}: demo block rewritten" + (f", {seconds:.0f} s end to end" if seconds else ""))
    if (Path(workdir) / "curves.png").is_file():
        shutil.copyfile(Path(workdir) / "curves.png", CURVES)
        print(f"{CURVES}: the same run's training curves")


if __name__ == "__main__":
    main()
