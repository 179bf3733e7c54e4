"""Reward-function files on Kubernetes: what a stage config names on this machine reaches the pods.

A config names reward functions as `General.reward_functions: ["path/to/file.py:name", "package.module:name"]`.
On Kubernetes the chart mounts its value `rewardFunctions` (file name -> Python source) read-only at
`REWARDS_DIR` in the head and worker pods. The kuberay backend reads the local `.py` files a stage's config
names, passes them as that stage's `rewardFunctions` and rewrites the config's paths to the mounted directory,
so one config works locally and on the cluster. A mounted file is named `<stem>_<first 8 hex of its sha256>.py`:
a changed file is a changed config (the stage runs again; it does not resume from a run of the old function).
Module references pass through unchanged (they must be importable in the image); so do paths already under
`REWARDS_DIR` (a Helm user's own `rewardFunctions`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_jobs.core.errors import ConfigError

KEY = "reward_functions"  # General.<KEY>
REWARDS_DIR = "/etc/rlhf-jobs/rewards"  # where the chart mounts rewardFunctions (helm/templates/_helpers.tpl)
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.py$")  # a file the chart accepts: an importable module's name
HASHED = re.compile(r"_[0-9a-f]{8}$")


@dataclass
class StageRewards:
    files: dict[str, str] = field(default_factory=dict)  # mounted file name -> source
    references: list[str] = field(default_factory=list)  # General.reward_functions as the pods must read it


def is_file_reference(reference: str) -> bool:
    """`path/to/file.py:name` (a file) rather than `package.module:name`."""
    return reference.rpartition(":")[0].endswith(".py")


def mounted_name(path: Path, source: str) -> str:
    """`my_rewards.py` -> `my_rewards_1a2b3c4d.py` (kept when it already ends in its own digest)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    stem = stem if stem[:1].isalpha() or stem[:1] == "_" else f"_{stem}"
    return f"{stem}.py" if stem.endswith(f"_{digest}") else f"{stem}_{digest}.py"


def resolve(stage: str, config: dict[str, Any], base: Path | None = None) -> StageRewards | None:
    """The files a stage's config names and its references rewritten to REWARDS_DIR; None when it names none
    (nothing to mount, nothing rewritten). Raises ConfigError, before anything is created, for a file that is
    not there."""
    references = (config.get("General") or {}).get(KEY)
    if not references or not isinstance(references, list):
        return None
    out = StageRewards()
    for reference in references:
        if not isinstance(reference, str) or not is_file_reference(reference) or reference.startswith(
                REWARDS_DIR + "/"):
            out.references.append(reference)
            continue
        target, _, function = reference.rpartition(":")
        path = (base or Path.cwd()) / target
        if not path.is_file():
            raise ConfigError(f"configs.{stage}.General.{KEY}: {target}: file not found (relative paths start at "
                              f"{base or Path.cwd()}; the file is read here and mounted in the pods at {REWARDS_DIR})")
        source = path.read_text()
        name = mounted_name(path, source)
        out.files[name] = source
        out.references.append(f"{REWARDS_DIR}/{name}:{function}")
    return out if out.files else None
