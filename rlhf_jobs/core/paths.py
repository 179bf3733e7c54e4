"""Files beside the package in a source checkout (and in the image, which installs from one)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPO_CHART = REPO / "helm"  # the Helm chart the submitter installs and `make schema` writes into
SAMPLE_DATA = REPO / "examples" / "data"
