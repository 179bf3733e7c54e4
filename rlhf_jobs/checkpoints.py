"""Final models on disk or in object storage: atomic writes and the `rlhf_stage.json` marker later stages check.

On a local disk a model is swapped into place by a rename. In object storage (`s3://...`), where there
is no rename, the marker is the commit: an old model's marker is deleted before its files are replaced,
the new files are uploaded, and the new marker is written last; readers require the marker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_jobs import storage

MARKER = "rlhf_stage.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, foreign, or from the wrong stage."""


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    if storage.is_remote(directory):
        text = storage.read_text(storage.join(str(directory), MARKER))
        return json.loads(text) if text is not None else None
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def require_stage(directory: str | Path, stage: str, key: str) -> dict[str, Any]:
    """The marker of `directory`, which must be a finished `stage` checkpoint."""
    from rlhf_jobs.stages import get

    directory = str(directory) if storage.is_remote(directory) else Path(directory)
    command, title = f"rlhf-jobs train {stage}", get(stage).title
    found = storage.exists(directory) if isinstance(directory, str) else directory.is_dir()
    if not found:
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
    if storage.is_remote(directory):
        if storage.exists(str(directory)) and read_marker(directory) is None:
            raise CheckpointError(
                f"{key}: {directory} is not empty and holds no {MARKER}; refusing to overwrite it "
                "(point checkpoint_dir elsewhere or empty it)"
            )
        return
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{key}: {directory} is a file, expected a directory")
    if directory.is_dir() and any(directory.iterdir()) and read_marker(directory) is None:
        raise CheckpointError(
            f"{key}: {directory} is not empty and holds no {MARKER}; refusing to overwrite it "
            "(point checkpoint_dir elsewhere or empty it)"
        )


def write_atomically(directory: str | Path, write: Callable[[Path], None], marker: dict[str, Any]) -> Path | str:
    """Fill a temp dir beside `directory` with `write`, add the marker, then swap it into place.

    A crash leaves either the old directory or the new one, never a half-written model.
    """
    if storage.is_remote(directory):
        return _write_remote(str(directory), write, marker)
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


def _write_remote(uri: str, write: Callable[[Path], None], marker: dict[str, Any]) -> str:
    """Write locally, then publish to `uri`: old marker deleted first, files, new marker last.

    A crash leaves no marker (readers refuse the directory and say which stage to run), never a
    marker beside half a model.
    """
    check_overwritable(uri)
    cache = storage.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="publish-") as temporary:
        staging = Path(temporary) / "model"
        write(staging)
        storage.delete(storage.join(uri, MARKER))
        storage.delete(uri)
        storage.upload_tree(staging, uri, skip=(MARKER,))
        text = json.dumps({**marker, "written_at": time.time()}, indent=2) + "\n"
        storage.write_text(storage.join(uri, MARKER), text)
    return uri
