"""What a pipeline run did: a summary table and a PNG of the training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
    if stage == "sft":
        return f"eval loss {_first_last(_series(metrics, 'eval_loss', 'eval'))}"
    if stage == "rm":
        return (f"accuracy {_first_last(_series(metrics, 'eval_accuracy', 'eval'), '{:.2f}')}, "
                f"margin {_first_last(_series(metrics, 'eval_margin', 'eval'), '{:.2f}')}")
    if stage == "ppo":
        score = _series(metrics, "eval_score_mean", "eval") or _series(metrics, "score_mean", "train")
        kl = _series(metrics, "kl", "train")
        return f"reward {_first_last(score)}, KL {kl[-1][1]:.3f}" if kl else f"reward {_first_last(score)}"
    return ""


def summary_table(record: dict[str, Any], output_dirs: dict[str, str]) -> str:
    rows = [("stage", "status", "wall time", "key metrics")]
    for stage, entry in record.get("stages", {}).items():
        seconds = entry.get("seconds")
        rows.append((
            stage, entry.get("status", "-"), f"{seconds:.0f} s" if seconds is not None else "-",
            key_metrics(stage, read_metrics(output_dirs[stage])),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


PANELS = (
    ("SFT loss", "sft", (("loss", "train", "train loss"), ("eval_loss", "eval", "eval loss"))),
    ("Reward model", "rm", (("eval_accuracy", "eval", "eval accuracy"), ("loss", "train", "train loss"))),
    ("PPO reward", "ppo", (("score_mean", "train", "rollout score"), ("eval_score_mean", "eval", "held-out score"))),
    ("PPO KL to reference", "ppo", (("kl", "train", "KL"),)),
)


def plot_curves(output_dirs: dict[str, str], path: str | Path) -> Path:
    """One panel per curve family; stages that have not run leave their panel empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for axis, (title, stage, curves) in zip(axes, PANELS, strict=True):
        metrics = read_metrics(output_dirs.get(stage, "")) if stage in output_dirs else []
        for name, split, label in curves:
            series = _series(metrics, name, split)
            if series:
                steps, values = zip(*series, strict=True)
                axis.plot(steps, values, marker="o" if split == "eval" else None, markersize=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("iteration" if stage == "ppo" else "optimizer step")
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
