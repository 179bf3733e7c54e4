"""Object storage: `s3://bucket/prefix` (or any `pyarrow.fs` URI) for outputs and models.

A remote location is a URI string everywhere (never a `Path`: `Path("s3://b/x")` is `s3:/b/x`).
Training code reads and writes local files; this module moves them:

- `local_dir(uri)`: a local mirror of a remote directory (`$RLHF_JOBS_CACHE_DIR/mirror/...`), the same
  path on every node, where metrics and checkpoints are written before they are uploaded;
- `local_model(uri)`: a remote model downloaded once per node into the cache, for `from_pretrained`;
- `upload_tree` / `download_tree` / `upload_file`;
- `read_text` / `write_text` / `create_text` / `exists` / `delete` / `file_sizes`, for a local path or a URI alike;
- `check_location`: the pre-flight check (credentials, bucket) that names the config key.

S3 credentials and endpoint come from the standard AWS variables: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, and
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for S3-compatible servers (MinIO, moto). Web identity
(`AWS_WEB_IDENTITY_TOKEN_FILE`, IRSA), profiles and container credentials are used when present;
instance-profile credentials only when `AWS_EC2_METADATA_DISABLED=false` is set explicitly (otherwise a
machine without credentials would wait on the metadata service instead of failing at once).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlhf_jobs.core.errors import ConfigError
from rlhf_jobs.core.locations import SCHEMES  # the pre-flight check knows S3's credential sources; others would hang
from rlhf_jobs.core.stages import get

CACHE_ENV = "RLHF_JOBS_CACHE_DIR"


class StorageError(ConfigError):
    """A remote location that cannot be used: no credentials, no such bucket, no access."""


class DiskFull(StorageError):
    """No space left where a run writes; the message is one line naming the path and the space needed."""


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """An object-store URI (`s3://...`), as opposed to a local path, `file://` URI or hub name."""
    if location is None:
        return False
    scheme = urlparse(str(location)).scheme
    return "://" in str(location) and scheme not in ("", "file")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts if part)])


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


def ray_storage(output_dir: str) -> tuple[str, Any]:
    """`RunConfig(storage_path=..., storage_filesystem=...)` for `output_dir`, local or remote."""
    if not is_remote(output_dir):
        return str(Path(output_dir).resolve()), None
    remote_fs, path = filesystem(output_dir)
    return path, remote_fs


# ---- local mirrors and the model cache ---------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf-jobs").expanduser()


def local_dir(location: str) -> Path:
    """Where files of `location` live on this machine: the path itself, or the mirror of a remote URI."""
    if not is_remote(location):
        return Path(location)
    parsed = urlparse(location)
    return cache_root() / "mirror" / parsed.scheme / parsed.netloc / parsed.path.strip("/")


def _listing(uri: str) -> list[tuple[str, int]]:
    """(path relative to `uri`, size) of every file under `uri`, sorted."""
    from pyarrow import fs

    remote_fs, path = filesystem(uri)
    infos = remote_fs.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((info.path[len(path) + 1 :], info.size) for info in infos if info.type == fs.FileType.File)


def file_sizes(location: str | Path) -> dict[str, int]:
    """{path relative to `location`: size in bytes} of every file under a local directory or a remote prefix."""
    if is_remote(location):
        return dict(_listing(str(location)))
    root = Path(location)
    return {path.relative_to(root).as_posix(): path.stat().st_size
            for path in sorted(root.rglob("*")) if path.is_file()} if root.is_dir() else {}


def local_model(location: str) -> str:
    """A local directory holding the model at `location`: itself, or a per-node cached download.

    The cache key is the listing (names and sizes) and the marker's content, so a model replaced at
    the same URI is downloaded again. Concurrent downloads (several workers on a node) each fill a temp
    dir and rename it into place; the loser drops its copy.
    """
    if not is_remote(location):
        return location
    listing = _listing(location)
    if not listing:
        raise StorageError(f"{location}: no model there (no objects under this prefix)")
    marker = read_text(join(location, "rlhf_stage.json")) or ""
    digest = hashlib.sha256(json.dumps([listing, marker]).encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{local_dir(location).name}-{digest}"
    if not target.is_dir():
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        download_tree(location, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# ---- copies -------------------------------------------------------------------------------------


def upload_file(local: str | Path, uri: str) -> None:
    from pyarrow import fs

    remote_fs, path = filesystem(uri)
    fs.copy_files(str(Path(local).resolve()), path, source_filesystem=fs.LocalFileSystem(),
                  destination_filesystem=remote_fs)


def download_file(uri: str, local: str | Path) -> None:
    from pyarrow import fs

    remote_fs, path = filesystem(uri)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    fs.copy_files(path, str(Path(local).resolve()), source_filesystem=remote_fs,
                  destination_filesystem=fs.LocalFileSystem())


def upload_tree(local: str | Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Every file under `local` to `uri` (same relative paths), except those named in `skip`."""
    root = Path(local)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        if relative not in skip:
            upload_file(file, join(uri, relative))


def download_tree(uri: str, local: str | Path) -> None:
    """Every file under `uri` into `local` (created), same relative paths."""
    for relative, _ in _listing(uri):
        download_file(join(uri, relative), Path(local) / relative)
    Path(local).mkdir(parents=True, exist_ok=True)


def read_text(location: str | Path) -> str | None:
    """The text of one file or object, or None when there is none."""
    if not is_remote(location):
        try:
            return Path(location).read_text()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    from pyarrow import fs

    remote_fs, path = filesystem(str(location))
    try:
        with remote_fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:  # none there, or deleted since it was listed
        return None
    except OSError:
        if remote_fs.get_file_info(path).type != fs.FileType.File:
            return None
        raise


def write_text(location: str | Path, text: str) -> None:
    """Replace one file or object with `text` (a local file is written beside it, then renamed into place)."""
    if not is_remote(location):
        path = Path(location)
        temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with writing(path, path.name, cleanup=lambda: temporary.unlink(missing_ok=True)):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
            os.replace(temporary, path)
        return
    remote_fs, path = filesystem(str(location))
    with remote_fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def create_text(location: str | Path, text: str) -> bool:
    """Create one file or object holding `text` unless there is one already; whether this call created it.

    Locally `O_CREAT | O_EXCL`, which two processes cannot both win. Object storage through pyarrow has no
    create-if-absent: the object is written when absent and read back, so two writers within the same
    instant can both see their own text (`run_lock` notices at its next renewal)."""
    if not is_remote(location):
        path = Path(location)
        with writing(path, path.name):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(text)
            except BaseException:
                path.unlink(missing_ok=True)  # not a torn file that looks taken
                raise
        return True
    if exists(str(location)):
        return False
    write_text(location, text)
    return read_text(location) == text


def exists(location: str | Path) -> bool:
    """A file, or a directory (a prefix with objects under it)."""
    if not is_remote(location):
        return Path(location).exists()
    from pyarrow import fs

    remote_fs, path = filesystem(str(location))
    return remote_fs.get_file_info(path).type != fs.FileType.NotFound


def list_dir(uri: str) -> list[str]:
    """Names of the files and directories directly under `uri`."""
    from pyarrow import fs

    remote_fs, path = filesystem(uri)
    infos = remote_fs.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def delete(location: str | Path) -> None:
    """Remove a file, or everything under a directory or prefix; nothing there is fine."""
    if not is_remote(location):
        path = Path(location)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    from pyarrow import fs

    remote_fs, path = filesystem(str(location))
    kind = remote_fs.get_file_info(path).type
    if kind == fs.FileType.File:
        remote_fs.delete_file(path)
    elif kind == fs.FileType.Directory:
        remote_fs.delete_dir(path)


# ---- a full disk ----------------------------------------------------------------------------------------

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def _errors(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and the per-rank errors a `torch.distributed.checkpoint` failure holds."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():  # CheckpointException: rank -> (error, tb)
            pending.append(failure[0] if isinstance(failure, tuple) else failure)


def no_space(error: BaseException) -> bool:
    """Whether `error` says a disk is full (ENOSPC, EDQUOT, or their words in a wrapped message)."""
    return any(
        (isinstance(item, OSError) and item.errno in NO_SPACE) or any(word in str(item) for word in NO_SPACE_WORDS)
        for item in _errors(error) if isinstance(item, BaseException)
    )


def free_bytes(path: str | Path) -> int | None:
    """Free space (for this user) on the file system holding `path`, or its nearest existing parent."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"


def require_free(path: str | Path, needed: int, what: str, then: str = "") -> None:
    """`DiskFull` when less than `needed` bytes are free at the local `path` (before a writer that would fail badly)."""
    if is_remote(path):
        return
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskFull(f"no space left on device at {path} (at least {mib(needed)} needed for {what}; {mib(free)} "
                       f"free there){then}")


@contextlib.contextmanager
def writing(path: str | Path, what: str, needed: Callable[[], int | None] | None = None,
            cleanup: Callable[[], None] | None = None, then: str = "") -> Iterator[None]:
    """Writing `what` at the local `path`: a full disk becomes one `DiskFull` line naming the path, the space `what`
    needs (`needed()`, bytes) and the space free, and ending with `then` (what is intact, what to do).

    `cleanup` removes what the failed write left (a partial checkpoint, a staging directory), whatever the error.
    Some writers lose the errno (torch's zip writer raises "unexpected pos"), so an error is also taken for a full
    disk when, after the cleanup, less than `needed()` is free."""
    try:
        yield
    except BaseException as err:
        if is_remote(path) or isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        size = needed() if needed is not None else None
        if cleanup is not None:
            cleanup()
        free = free_bytes(path)
        if not (no_space(err) or (size is not None and free is not None and free < size)):
            raise
        needs = f", about {mib(size)}" if size else ""
        room = f"; {mib(free)} free there" if free is not None else ""
        raise DiskFull(f"no space left on device at {path} (writing {what}{needs}{room}){then}") from None


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


def check_config(config: Any) -> None:
    """Every remote location in `config.General` is usable, and every remote model is there (driver, pre-flight)."""
    general = config.General
    model_keys = get(config.stage).model_keys
    for name in ("output_dir", "checkpoint_dir", *model_keys):
        location = getattr(general, name, None)
        if not is_remote(location):
            continue
        key = f"General.{name}"
        check_location(location, key)
        if name in model_keys and not exists(location):
            raise StorageError(f"{key}: {location}: no model there (no objects under this prefix)")
