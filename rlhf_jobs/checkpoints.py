"""Final models on disk: atomic writes and the `rlhf_stage.json` marker later stages check."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "rlhf_stage.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, foreign, or from the wrong stage."""


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def require_stage(directory: str | Path, stage: str, key: str) -> dict[str, Any]:
    """The marker of `directory`, which must be a finished `stage` checkpoint."""
    from rlhf_jobs.stages import get

    directory = Path(directory)
    command, title = f"rlhf-jobs train {stage}", get(stage).title
    if not directory.is_dir():
        raise CheckpointError(
            f"{key}: {directory} does not exist; run the {title} stage first ({command})"
        )
    marker = read_marker(directory)
    if marker is None:
        raise CheckpointError(
            f"{key}: {directory} has no {MARKER}, so it is not a finished {title} "
            f"checkpoint; run the {title} stage first ({command})"
        )
    if marker.get("stage") != stage:
        raise CheckpointError(
            f"{key}: {directory} holds a {marker.get('stage')!r} checkpoint, expected {stage!r}"
        )
    return marker


def check_overwritable(directory: str | Path, key: str = "General.checkpoint_dir") -> None:
    """Refuse to replace a non-empty directory we did not write (it may be the user's data)."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{key}: {directory} is a file, expected a directory")
    if directory.is_dir() and any(directory.iterdir()) and read_marker(directory) is None:
        raise CheckpointError(
            f"{key}: {directory} is not empty and holds no {MARKER}; refusing to overwrite it "
            "(point checkpoint_dir elsewhere or empty it)"
        )


def write_atomically(directory: str | Path, write: Callable[[Path], None], marker: dict[str, Any]) -> Path:
    """Fill a temp dir beside `directory` with `write`, add the marker, then swap it into place.

    A crash leaves either the old directory or the new one, never a half-written model.
    """
    directory = Path(directory).resolve()
    check_overwritable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = directory.with_name(f".{directory.name}.tmp-{token}")
    write(staging)
    (staging / MARKER).write_text(json.dumps({**marker, "written_at": time.time()}, indent=2) + "\n")
    previous = directory.with_name(f".{directory.name}.old-{token}")
    if directory.exists():
        directory.rename(previous)
    staging.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)
    return directory
