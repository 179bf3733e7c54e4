"""Final models on disk or in object storage: atomic writes and the `rlhf_stage.json` marker later stages check.

On a local disk a model is swapped into place by a rename. In object storage (`s3://...`), where there
is no rename, the marker is the commit: an old model's marker is deleted before its files are replaced,
the new files are uploaded, and the new marker is written last; readers require the marker.

The marker also says which run wrote the model: the run's `output_dir` and the identity hash
recorded there (see `markers.py`, `identity.py`). A final model is only ever replaced by the run that wrote it;
anything else in `checkpoint_dir` is refused, or (this run's old model, on a restart) moved aside.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_jobs.core.errors import CheckpointError
from rlhf_jobs.core.stages import REGISTRY, get
from rlhf_jobs.store import run_lock, storage
from rlhf_jobs.store.markers import MARKER, marker_output_dir, read_marker, recorded_hash, run_location

FINAL_MODEL_LATER = ("; the training state in General.output_dir is intact: free some space, then run the same "
                     "command again to write the final model from it")


def product(stage: str) -> str:
    """What a stage's final model is called ('SFT model'); a stage this version does not know, by its name."""
    return REGISTRY[stage].product if stage in REGISTRY else f"{stage!r} model"


def require_stage(directory: storage.Where, stage: str, key: str) -> dict[str, Any]:
    """The marker of `directory`, which must be a finished `stage` checkpoint."""
    directory = storage.location(directory)
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


def describe(marker: dict[str, Any]) -> str:
    """'the final SFT model of the run in /x/sft-output, written 2026-01-02 03:04'."""
    stage = product(str(marker.get("stage")))
    written = marker.get("written_at")
    when = f", written {time.strftime('%Y-%m-%d %H:%M', time.localtime(written))}" if written else ""
    output_dir = marker_output_dir(marker)
    run = f" of the run in {output_dir}" if output_dir else ""
    return f"the final {stage}{run}{when}"


def check_overwritable(
    directory: storage.Where,
    key: str = "General.checkpoint_dir",
    stage: str | None = None,
    output_dir: str | Path | None = None,
) -> None:
    """Refuse to replace what this run did not write: data without a marker, another stage's model,
    or a model of another run (another `output_dir`). `stage`/`output_dir` None skip those checks."""
    directory = storage.location(directory)
    if directory.is_file():
        raise CheckpointError(f"{key}: {directory} is a file, expected a directory")
    if not directory.names():
        return
    marker = read_marker(directory)
    if marker is None:
        raise CheckpointError(
            f"{key}: {directory} is not empty and holds no {MARKER}; refusing to overwrite it "
            "(point checkpoint_dir elsewhere or empty it)"
        )
    if stage is not None and marker.get("stage") != stage:
        raise CheckpointError(
            f"{key}: {directory} holds {describe(marker)}; refusing to replace it with the "
            f"{product(stage)} (point checkpoint_dir elsewhere)"
        )
    theirs = marker_output_dir(marker)
    if output_dir is not None and theirs is not None and theirs != run_location(output_dir):
        raise CheckpointError(
            f"{key}: {directory} holds {describe(marker)}, not of this run (General.output_dir "
            f"{run_location(output_dir)}); refusing to replace it (point checkpoint_dir elsewhere, "
            "or use that run's output_dir to resume it)"
        )


def move_aside(path: storage.Where, label: str = "replaced") -> str:
    """Move `path` to `<path>.<label>-<time>` beside it (never deleted); returns the new location.

    Locally a rename. In object storage, where there is no rename, every object is copied (server side)
    before the old prefix is deleted, and the local mirror of the prefix (`Location.local`) is moved too.
    An output_dir another live run holds (`run_lock`) is refused.
    """
    run_lock.refuse_if_in_use(path)
    return str(storage.location(path).move_aside(label))


def with_run(marker: dict[str, Any]) -> dict[str, Any]:
    """The marker plus `run`: the output_dir of the run writing it and the identity recorded there."""
    output_dir = (marker.get("config") or {}).get("General", {}).get("output_dir")
    if not output_dir:
        return marker
    return {**marker, "run": {"output_dir": run_location(output_dir), "identity": recorded_hash(output_dir)}}


def write_atomically(directory: storage.Where, write: Callable[[Path], None], marker: dict[str, Any]) -> str:
    """Fill a fresh directory with `write`, add the marker, then put it in place of `directory`
    (`Location.publish`: a rename on a local disk; in object storage the marker is the commit, deleted first and
    written last).

    A crash leaves either the old model or the new one, never a marker beside half a model. The marker
    gains `run` (output_dir, identity) when its `config` names an output_dir.
    """
    output_dir = (marker.get("config") or {}).get("General", {}).get("output_dir")
    check_overwritable(directory, stage=marker.get("stage"), output_dir=output_dir)
    marker = with_run(marker)
    target = storage.location(directory).resolved()

    def write_with_marker(staging: Path) -> None:
        write(staging)
        (staging / MARKER).write_text(json.dumps({**marker, "written_at": time.time()}, indent=2) + "\n")

    target.publish(write_with_marker, commit=MARKER, what="the final model", then=FINAL_MODEL_LATER)
    return str(target)
