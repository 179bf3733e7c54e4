"""Object storage through `pyarrow.fs`, configured from the standard AWS variables, and its pre-flight check.

`storage.ObjectStore` is the `Location` built on this. S3 credentials and endpoint come from `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, and
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for S3-compatible servers (MinIO, moto). Web identity
(`AWS_WEB_IDENTITY_TOKEN_FILE`, IRSA), profiles and container credentials are used when present;
instance-profile credentials only when `AWS_EC2_METADATA_DISABLED=false` is set explicitly (otherwise a
machine without credentials would wait on the metadata service instead of failing at once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.locations import SCHEMES  # the pre-flight check knows S3's credential sources; others would hang


class StorageError(ConfigError):
    """A remote location that cannot be used: no credentials, no such bucket, no access."""


# ---- filesystems --------------------------------------------------------------------------------


def _env(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_options() -> dict[str, Any]:
    """`pyarrow.fs.S3FileSystem` keyword arguments from the standard AWS environment variables."""
    options: dict[str, Any] = {"connect_timeout": 10.0, "request_timeout": 60.0}
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc
        options["scheme"] = parsed.scheme
    if _env("AWS_ACCESS_KEY_ID"):
        options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if _env("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return options


def credentials_problem() -> str | None:
    """Why no S3 request could be signed, or None when some credential source is configured."""
    key_id, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key_id and not secret:
        return "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"
    if secret and not key_id:
        return "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"
    if key_id:
        return None
    aws_home = Path(os.environ.get("HOME", "~")).expanduser() / ".aws"
    sources = (
        _env("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
             "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        (aws_home / "credentials").is_file() or (aws_home / "config").is_file(),
        os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false",
    )
    if any(sources):
        return None
    return ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on Kubernetes from a Secret), "
            "or use web identity (AWS_WEB_IDENTITY_TOKEN_FILE) or a profile; for instance-profile credentials "
            "set AWS_EC2_METADATA_DISABLED=false")


_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a remote URI; S3 configured from the AWS variables."""
    from pyarrow import fs

    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise StorageError(f"{uri}: unsupported storage scheme {parsed.scheme!r} (expected s3://bucket/prefix)")
    path = (parsed.netloc + parsed.path).rstrip("/")
    options = s3_options()
    key = tuple(sorted(options.items()))
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = fs.S3FileSystem(**options)
    return _FILESYSTEMS[key], path


def listing(uri: str) -> list[tuple[str, int]]:
    """(path relative to `uri`, size) of every file under `uri`, sorted."""
    from pyarrow import fs

    remote_fs, path = filesystem(uri)
    infos = remote_fs.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((info.path[len(path) + 1 :], info.size) for info in infos if info.type == fs.FileType.File)


def copy_file(local: Path, uri: str, to_store: bool) -> None:
    """One file between the local disk and the object store, either way."""
    from pyarrow import fs

    remote_fs, path = filesystem(uri)
    local_fs, local_path = fs.LocalFileSystem(), str(Path(local).resolve())
    if to_store:
        fs.copy_files(local_path, path, source_filesystem=local_fs, destination_filesystem=remote_fs)
    else:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        fs.copy_files(path, local_path, source_filesystem=remote_fs, destination_filesystem=local_fs)


# ---- pre-flight ----------------------------------------------------------------------------------


def check_location(uri: str, key: str) -> None:
    """One clear `StorageError` naming `key` when `uri` cannot be used: scheme, credentials, bucket, access."""
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise StorageError(f"{key}: {uri}: unsupported storage scheme {parsed.scheme!r} (expected s3://bucket/prefix)")
    if not parsed.netloc:
        raise StorageError(f"{key}: {uri}: no bucket in the URI (expected s3://bucket/prefix)")
    if parsed.scheme == "s3" and (problem := credentials_problem()):
        raise StorageError(f"{key}: {uri}: {problem}")
    from pyarrow import fs

    try:
        remote_fs, _ = filesystem(uri)
        found = remote_fs.get_file_info(parsed.netloc).type != fs.FileType.NotFound
    except (OSError, ValueError) as err:
        raise StorageError(f"{key}: {uri}: {_explain(err, parsed.netloc)}") from None
    if not found:
        raise StorageError(f"{key}: {uri}: no such bucket {parsed.netloc!r}")


def _explain(err: Exception, bucket: str) -> str:
    text = " ".join(str(err).split())
    if "NO_SUCH_BUCKET" in text or "does not exist" in text:
        return f"no such bucket {bucket!r}"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        return f"access denied to bucket {bucket!r} with these credentials ({text[:160]})"
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"the credentials were rejected ({text[:160]})"
    return f"cannot reach the object store ({text[:200]})"
