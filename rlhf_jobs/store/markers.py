"""The two files that say what a directory holds, and the primitives that read them.

- `rlhf_stage.json` (`MARKER`) in a final model's directory: the stage that wrote it, its config and final
  metrics, and the run (`output_dir` + identity hash) that wrote it. Later stages require it.
- `rlhf_run.json` (`IDENTITY_FILE`) in a run's `output_dir`: the run's identity (`identity.py`), so that a
  changed config never resumes old state.

`checkpoints.py` writes the first and `identity.py` the second; both read through here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rlhf_jobs.store import storage

MARKER = "rlhf_stage.json"
IDENTITY_FILE = "rlhf_run.json"


def read_marker(directory: storage.Where) -> dict[str, Any] | None:
    text = storage.location(directory).join(MARKER).read_text()
    return json.loads(text) if text is not None else None


def run_location(output_dir: storage.Where) -> str:
    """How a run's output_dir is recorded and compared: absolute locally, the URI as is in object storage."""
    return storage.location(output_dir).recorded


def marker_output_dir(marker: dict[str, Any]) -> str | None:
    """The `output_dir` of the run that wrote a final model (older markers: from its config)."""
    run = marker.get("run") or {}
    if run.get("output_dir"):
        return str(run["output_dir"])
    output_dir = (marker.get("config") or {}).get("General", {}).get("output_dir")
    return run_location(output_dir) if output_dir else None


def read_identity(output_dir: storage.Where) -> dict[str, Any] | None:
    """The identity recorded in `output_dir` (a local path or an object-storage URI), or None."""
    text = storage.location(output_dir).join(IDENTITY_FILE).read_text()
    return json.loads(text)["identity"] if text is not None else None


def digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def recorded_hash(output_dir: storage.Where) -> str | None:
    identity = read_identity(output_dir)
    return digest(identity) if identity is not None else None
