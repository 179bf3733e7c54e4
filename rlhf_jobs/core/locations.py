"""What a location in a config is: a local path, a Hugging Face Hub id, or a URL this key can use.

One rule for every key that takes a location: a value whose first path segment holds a `:` (`s3:`, `gs:`,
`file:`, `host:port`) is meant as a URL, and must be one this key reads. Anything else is a local path or a hub
id. So `s3:/bucket/x` (one slash) or `s3:bucket/x` is an error naming the key and the value, instead of a local
folder named `s3:`.

- `STORAGE` keys (`General.output_dir`, `checkpoint_dir` and the models a stage starts from) take
  `s3://bucket/prefix` (`SCHEMES`), the object stores `storage.py` reads and writes;
- `DATA` keys (`Dataset.train_file`, `validation_file`) take any URL fsspec opens (`https://`, `s3://`,
  `hf://`, `simplecache::https://`...).

`pattern(kind)` is the same rule as a regular expression without look-arounds, for the chart's values schema
(JSON Schema, RE2 in Helm); the Python check gives the precise message.
"""

from __future__ import annotations

import re
from typing import Literal

Kind = Literal["storage", "data"]
STORAGE: Kind = "storage"
DATA: Kind = "data"
SCHEMES = ("s3",)  # object stores for outputs and models (storage.py); its pre-flight knows S3's credentials

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*"
_URL = re.compile(rf"^({_SCHEME})://")
_CHAINED = re.compile(rf"^({_SCHEME})(://|::)")
_STORAGE_EXAMPLE = "s3://bucket/prefix"


def looks_like_url(location: str) -> bool:
    """Whether `location` is meant as a URL: its first path segment holds a `:`."""
    return ":" in location.split("/", 1)[0]


def _as_local(location: str) -> str:
    return f"for a local path whose first part holds a ':', write ./{location}"


def problem(location: str, kind: Kind) -> str | None:
    """Why `location` cannot be what a key of this `kind` takes; None when it can."""
    if not looks_like_url(location):
        return None
    if kind == DATA:
        return _data_problem(location)
    match = _URL.match(location)
    if match is None:
        scheme = location.split(":", 1)[0]
        return (f"not a URL: {scheme + ':'!r} is not followed by '//' (expected {_STORAGE_EXAMPLE}); "
                f"{_as_local(location)}")
    scheme = match.group(1).lower()
    if scheme == "file":
        return f"file: URLs are not taken here; write the local path itself ({location[len('file://'):] or '/'})"
    if scheme not in SCHEMES:
        return (f"unsupported storage scheme {scheme!r}: this key takes a local path, a hub id or "
                f"{_STORAGE_EXAMPLE}")
    if not location[match.end():].split("/", 1)[0]:
        return f"no bucket in the URL (expected {_STORAGE_EXAMPLE})"
    return None


def _data_problem(location: str) -> str | None:
    from fsspec.registry import known_implementations, registry

    if _CHAINED.match(location) is None:
        scheme = location.split(":", 1)[0]
        return (f"not a URL: {scheme + ':'!r} is not followed by '//' (expected e.g. https://host/data.jsonl or "
                f"s3://bucket/data.jsonl); {_as_local(location)}")
    for part in location.split("::"):
        match = _CHAINED.match(part) or _CHAINED.match(part + "::")
        scheme = match.group(1).lower() if match else ""
        if scheme not in known_implementations and scheme not in registry:
            return (f"unknown URL scheme {scheme!r}: data files are local paths or URLs fsspec opens "
                    "(https://, s3://, gs://, hf://, ...)")
    return None


def pattern(kind: Kind) -> str:
    """`problem`'s rule as a JSON Schema pattern: no `:` in the first path segment, or a URL of this kind."""
    local = r"[^:/]*(/.*)?"
    url = "|".join(rf"{scheme}://[^/]+.*" for scheme in SCHEMES) if kind == STORAGE else rf"{_SCHEME}(://|::).*"
    return rf"^({local}|{url})$"
