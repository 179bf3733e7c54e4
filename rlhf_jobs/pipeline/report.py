"""What a pipeline run did: a summary table and a PNG of the training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_jobs.core import stages


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(metrics: list[dict[str, Any]], name: str, split: str) -> list[tuple[int, float]]:
    """(step, value) of one metric; a resumed run's later values for a step replace earlier ones."""
    points = {m["step"]: m[name] for m in metrics if m.get("split") == split and name in m}
    return sorted(points.items())


def _first_last(series: list[tuple[int, float]], fmt: str = "{:.3f}") -> str:
    if not series:
        return "-"
    first, last = fmt.format(series[0][1]), fmt.format(series[-1][1])
    return last if len(series) == 1 else f"{first} → {last}"


def key_metrics(stage: str, metrics: list[dict[str, Any]]) -> str:
    """The registry's summary figures of a stage: `label first → last` each."""
    parts = []
    for figure in stages.get(stage).summary:
        series = _series(metrics, figure.metric, figure.split)
        if not series and figure.fallback:
            series = _series(metrics, *figure.fallback)
        if figure.last_only:
            if series:
                parts.append(f"{figure.label} {figure.fmt.format(series[-1][1])}")
        else:
            parts.append(f"{figure.label} {_first_last(series, figure.fmt)}")
    return ", ".join(parts)


def finished_line(stage: str, output_dir: str, checkpoint_dir: str, seconds: float) -> str:
    """The last line of `rlhf-jobs train`: how long, the stage's key figures, where the final model is."""
    from rlhf_jobs.store.storage import location

    figures = key_metrics(stage, read_metrics(location(output_dir).local))
    return f"{stage} finished in {seconds:.0f} s: {figures}; final model: {checkpoint_dir}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _wall_time(entry: dict[str, Any]) -> str:
    seconds = entry.get("seconds")
    return f"{seconds:.0f} s" if seconds is not None else "-"


def summary_table(record: dict[str, Any], output_dirs: dict[str, str]) -> str:
    rows = [("stage", "status", "wall time", "key metrics")]
    for stage, entry in record.get("stages", {}).items():
        rows.append((stage, entry.get("status", "-"), _wall_time(entry),
                     key_metrics(stage, read_metrics(output_dirs[stage]))))
    return _table(rows)


def status_text(record: dict[str, Any], workdir: str | Path, output_dirs: dict[str, str]) -> str:
    """`rlhf-jobs status --workdir`: a local pipeline record, as the KubeRay status shows a cluster's."""
    import time

    rows = [("stage", "status", "wall time", "finished", "config", "final model", "key metrics")]
    errors = []
    for stage, entry in record.get("stages", {}).items():
        finished = entry.get("finished_at")
        rows.append((
            stage, entry.get("status", "-"), _wall_time(entry),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(finished)) if finished else "-",
            entry.get("config_hash", "-"), entry.get("checkpoint", "-"),
            key_metrics(stage, read_metrics(output_dirs[stage])),
        ))
        if entry.get("error") and entry.get("status") != "succeeded":
            errors.append(f"{stage}: {entry['error'].strip().splitlines()[-1]}")
    workdir = Path(workdir)
    extras = [f"training curves: {workdir / 'curves.png'}"] if (workdir / "curves.png").is_file() else []
    extras += [f"sample answers: {path}" for path in sorted(workdir.glob("*-samples.jsonl"))]
    header = f"pipeline in {workdir} ({record.get('backend', 'local')} backend):"
    return "\n".join([header, _table(rows), *errors, *extras])


def panels(ran: list[str] | tuple[str, ...]) -> list[tuple[str, str, tuple[stages.Curve, ...]]]:
    """(title, stage, curves) of every panel of the stages that ran, in registry order."""
    return [(title, stage.name, curves) for stage in stages.REGISTRY.values() if stage.name in ran
            for title, curves in stage.panels]


def plot_curves(output_dirs: dict[str, str], path: str | Path) -> Path:
    """One panel per curve family of the stages in `output_dirs`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels(tuple(output_dirs)) or panels(stages.NAMES[:1])
    figure, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for axis, (title, stage, curves) in zip(axes[0], shown, strict=True):
        metrics = read_metrics(output_dirs[stage]) if stage in output_dirs else []
        for curve in curves:
            series = _series(metrics, curve.metric, curve.split)
            if series:
                steps, values = zip(*series, strict=True)
                axis.plot(steps, values, marker="o" if curve.split == "eval" else None, markersize=3,
                          label=curve.label)
        axis.set_title(title)
        axis.set_xlabel(stages.get(stage).step_name)
        if axis.has_data():
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
