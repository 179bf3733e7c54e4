"""Where a run's files live: a local path or an object-store prefix (`s3://bucket/prefix`), behind one interface.

`location(text)` turns a config's value into a `Location`: a `LocalPath`, or an `ObjectStore` for a `pyarrow.fs`
URI (never a `Path`: `Path("s3://b/x")` is `s3:/b/x`). Callers use its methods and never ask which it is:

- `exists` / `is_file` / `is_dir` / `names` / `sizes`, `read_text` / `write_text` (atomic on a local disk) /
  `create_text` (exclusive), `delete`, `move_aside` (a rename locally; copy, then delete, in object storage);
- `local`: where its files are on this machine: the path itself, or a local mirror
  (`$RLHF_JOBS_CACHE_DIR/mirror/...`, the same path on every node) where metrics and checkpoints are written
  before they are uploaded; `upload` / `download` between the two (nothing to do for a local path);
- `publish`: replace a directory with a newly written one, its commit file last;
- `model_dir`: a local directory holding the model there (an object store's downloaded once per node);
- `recorded`: how a run's output_dir is recorded; `check`: the pre-flight (credentials, bucket) naming the key.

Training code reads and writes local files; `disk.writing` turns a full local disk into one line (`DiskFull`).
How an object store is reached (the AWS variables) and checked: `object_store.py`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from rlhf_jobs.core.locations import SCHEMES as SCHEMES  # the object stores read (the chart's schema)
from rlhf_jobs.core.stages import get
from rlhf_jobs.store.disk import DiskFull as DiskFull  # where callers found it
from rlhf_jobs.store.disk import writing
from rlhf_jobs.store.object_store import StorageError, check_location, copy_file, filesystem, listing

CACHE_ENV = "RLHF_JOBS_CACHE_DIR"


def _object_store_uri(where: str | os.PathLike[str]) -> bool:
    """An object-store URI (`s3://...`), as opposed to a local path, `file://` URI or hub name."""
    scheme = urlparse(str(where)).scheme
    return "://" in str(where) and scheme not in ("", "file")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts if part)])


# ---- one interface for both ---------------------------------------------------------------------------


class Location(abc.ABC):
    """A file or directory where a run's files live, on a local disk or in object storage (`location(text)`).

    `mirrored` is the one difference a caller may have to know: an object store's files are written and read in a
    local mirror (`local`), which `upload` and `download` keep in step with it; a local path is its own copy, so
    for it those are nothing to do.
    """

    mirrored: ClassVar[bool]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash((type(self), str(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The last part of the path."""

    @abc.abstractmethod
    def join(self, *parts: str) -> Location: ...

    @abc.abstractmethod
    def beside(self, suffix: str) -> Location:
        """The location named like this one plus `suffix`, next to it (`out` -> `out.lock`)."""

    @abc.abstractmethod
    def resolved(self) -> Location:
        """The one spelling of this location: an absolute local path, a URI without a trailing `/`."""

    @property
    def recorded(self) -> str:
        """How a run's output_dir is recorded and compared (markers, locks)."""
        return str(self.resolved())

    @abc.abstractmethod
    def exists(self) -> bool:
        """A file, or a directory (in object storage: a prefix with objects under it)."""

    @abc.abstractmethod
    def is_file(self) -> bool: ...

    @abc.abstractmethod
    def is_dir(self) -> bool: ...

    @abc.abstractmethod
    def read_text(self) -> str | None:
        """The text of this file, or None when there is none."""

    @abc.abstractmethod
    def write_text(self, text: str) -> None:
        """Replace this file with `text` (on a local disk: written beside it, then renamed into place)."""

    @abc.abstractmethod
    def create_text(self, text: str) -> bool:
        """Create this file holding `text` unless there is one already; whether this call created it."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Names of the files and directories directly under this directory (none when it is not one)."""

    @abc.abstractmethod
    def sizes(self) -> dict[str, int]:
        """{path relative to this directory: size in bytes} of every file under it."""

    @abc.abstractmethod
    def delete(self) -> None:
        """Remove this file, or everything under this directory; nothing there is fine."""

    def move_aside(self, label: str = "replaced") -> Location:
        """Move this to `<name>.<label>-<time>` beside it (never deleted); the new location."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, number = self.beside(f".{label}-{stamp}"), 1
        while target.exists():
            target, number = self.beside(f".{label}-{stamp}-{number}"), number + 1
        self._move(target, label)
        return target

    @abc.abstractmethod
    def _move(self, target: Location, label: str) -> None: ...

    @property
    @abc.abstractmethod
    def local(self) -> Path:
        """Where the files of this location are on this machine: the path itself, or its local mirror."""

    @abc.abstractmethod
    def upload(self, source: Path | None = None, skip: tuple[str, ...] = ()) -> None:
        """Copy the local file or directory `source` (by default `local`) here, all but the relative paths in `skip`;
        nothing to do when `source` is this location itself."""

    @abc.abstractmethod
    def download(self, target: Path | None = None) -> None:
        """Copy this file or directory to the local `target` (by default `local`); nothing to do when `target` is
        this location itself."""

    @abc.abstractmethod
    def publish(self, write: Callable[[Path], None], commit: str, what: str, then: str = "") -> None:
        """Replace this directory with the one `write` creates and fills (locally, in a fresh place), so that no
        reader sees half of it: the file `commit` (which `write` writes too) comes last. A full disk while `write`
        runs is one `DiskFull` line naming `what`, ending with `then`."""

    @abc.abstractmethod
    def model_dir(self) -> str:
        """A local directory holding the model here (what `from_pretrained` takes)."""

    @abc.abstractmethod
    def ray_storage(self) -> tuple[str, Any]:
        """`RunConfig(storage_path=..., storage_filesystem=...)` for a run's output_dir here."""

    @abc.abstractmethod
    def check(self, key: str, model: bool = False) -> None:
        """Pre-flight: one `StorageError` naming the config `key` when this location (a `model`) cannot be used."""

    @abc.abstractmethod
    def how_to_delete(self) -> str:
        """What a person runs to remove this file by hand."""


Where = str | os.PathLike[str] | Location


def location(where: Where) -> Location:
    """The `Location` a config's value names: an `ObjectStore` for an object-store URI, else a `LocalPath`."""
    if isinstance(where, Location):
        return where
    return ObjectStore(str(where)) if _object_store_uri(where) else LocalPath(where)


def _same_path(one: Path, other: Path) -> bool:
    return one.resolve() == other.resolve()


class LocalPath(Location):
    """A path on this machine's file system (shared by the nodes, when there are several)."""

    mirrored = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.text, self.path = os.fspath(path), Path(path)  # `text`: a hub id stays as written

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def join(self, *parts: str) -> LocalPath:
        return LocalPath(self.path.joinpath(*(part.strip("/") for part in parts if part)))

    def beside(self, suffix: str) -> LocalPath:
        return LocalPath(self.path.with_name(self.path.name + suffix))

    def resolved(self) -> LocalPath:
        return LocalPath(self.path.expanduser().resolve())

    def exists(self) -> bool:
        return self.path.exists()

    def is_file(self) -> bool:
        return self.path.is_file()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def read_text(self) -> str | None:
        try:
            return self.path.read_text()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_text(self, text: str) -> None:
        path = self.path
        temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with writing(path, path.name, cleanup=lambda: temporary.unlink(missing_ok=True)):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
            os.replace(temporary, path)

    def create_text(self, text: str) -> bool:
        """`O_CREAT | O_EXCL`, which two processes cannot both win."""
        path = self.path
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

    def names(self) -> list[str]:
        try:
            return sorted(entry.name for entry in self.path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def sizes(self) -> dict[str, int]:
        root = self.path
        return {path.relative_to(root).as_posix(): path.stat().st_size
                for path in sorted(root.rglob("*")) if path.is_file()} if root.is_dir() else {}

    def delete(self) -> None:
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path)
        else:
            self.path.unlink(missing_ok=True)

    def _move(self, target: Location, label: str) -> None:
        self.path.rename(str(target))

    @property
    def local(self) -> Path:
        return self.path

    def upload(self, source: Path | None = None, skip: tuple[str, ...] = ()) -> None:
        if source is None or _same_path(Path(source), self.path):
            return
        source = Path(source)
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(source).as_posix()
            if relative in skip:
                continue
            target = self.path / relative if relative != "." else self.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)

    def download(self, target: Path | None = None) -> None:
        if target is not None:
            LocalPath(target).upload(self.path)

    def publish(self, write: Callable[[Path], None], commit: str, what: str, then: str = "") -> None:
        """Written beside this directory (the same file system), then swapped in by two renames: a crash leaves the
        old directory or the new one, `commit` included."""
        directory = self.path.resolve()
        token = uuid.uuid4().hex[:8]
        staging = directory.with_name(f".{directory.name}.tmp-{token}")
        with writing(directory, what, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True), then=then):
            directory.parent.mkdir(parents=True, exist_ok=True)
            write(staging)
        previous = directory.with_name(f".{directory.name}.old-{token}")
        if directory.exists():
            directory.rename(previous)
        staging.rename(directory)
        shutil.rmtree(previous, ignore_errors=True)

    def model_dir(self) -> str:
        return self.text

    def ray_storage(self) -> tuple[str, Any]:
        return str(self.path.resolve()), None

    def check(self, key: str, model: bool = False) -> None:
        """Nothing here: local directories are checked with the whole config in view (`train.preflight`)."""

    def how_to_delete(self) -> str:
        return f"rm {self}"


class ObjectStore(Location):
    """A URI in an object store (`s3://bucket/prefix`), through `pyarrow.fs`; a directory is a prefix.

    There is no rename and no create-if-absent: `move_aside` copies (server side) then deletes, `publish` deletes
    the old commit file first and writes the new one last, and `create_text` writes when absent and reads back.
    """

    mirrored = True

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __str__(self) -> str:
        return self.uri

    def _fs(self) -> tuple[Any, str]:
        return filesystem(self.uri)

    def _kind(self) -> Any:
        remote_fs, path = self._fs()
        return remote_fs.get_file_info(path).type

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> ObjectStore:
        return ObjectStore(join(self.uri, *parts))

    def beside(self, suffix: str) -> ObjectStore:
        return ObjectStore(self.uri.rstrip("/") + suffix)

    def resolved(self) -> ObjectStore:
        return ObjectStore(self.uri.rstrip("/"))

    def exists(self) -> bool:
        from pyarrow import fs

        return self._kind() != fs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs

        return self._kind() == fs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs

        return self._kind() == fs.FileType.Directory

    def read_text(self) -> str | None:
        from pyarrow import fs

        remote_fs, path = self._fs()
        try:
            with remote_fs.open_input_stream(path) as stream:
                return stream.read().decode()
        except FileNotFoundError:  # none there, or deleted since it was listed
            return None
        except OSError:
            if remote_fs.get_file_info(path).type != fs.FileType.File:
                return None
            raise

    def write_text(self, text: str) -> None:
        remote_fs, path = self._fs()
        with remote_fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    def create_text(self, text: str) -> bool:
        """Written when absent and read back: two writers within the same instant can both see their own text
        (`run_lock` notices at its next renewal)."""
        if self.exists():
            return False
        self.write_text(text)
        return self.read_text() == text

    def names(self) -> list[str]:
        from pyarrow import fs

        remote_fs, path = self._fs()
        infos = remote_fs.get_file_info(fs.FileSelector(path, allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def sizes(self) -> dict[str, int]:
        return dict(listing(self.uri))

    def delete(self) -> None:
        from pyarrow import fs

        remote_fs, path = self._fs()
        kind = remote_fs.get_file_info(path).type
        if kind == fs.FileType.File:
            remote_fs.delete_file(path)
        elif kind == fs.FileType.Directory:
            remote_fs.delete_dir(path)

    def _move(self, target: Location, label: str) -> None:
        """Every object copied (server side) before the old prefix is deleted; the local mirror is moved too."""
        from pyarrow import fs

        remote_fs, root = self._fs()
        _, target_root = filesystem(str(target))
        for info in remote_fs.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True)):
            if info.type == fs.FileType.File:
                remote_fs.copy_file(info.path, target_root + info.path[len(root):])
        self.delete()
        if self.local.exists():
            LocalPath(self.local).move_aside(label)

    @property
    def local(self) -> Path:
        parsed = urlparse(self.uri)
        return cache_root() / "mirror" / parsed.scheme / parsed.netloc / parsed.path.strip("/")

    def upload(self, source: Path | None = None, skip: tuple[str, ...] = ()) -> None:
        source = self.local if source is None else Path(source)
        if source.is_file():
            copy_file(source, self.uri, to_store=True)
            return
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = file.relative_to(source).as_posix()
            if relative not in skip:
                copy_file(file, join(self.uri, relative), to_store=True)

    def download(self, target: Path | None = None) -> None:
        target = self.local if target is None else Path(target)
        files = listing(self.uri)
        if not files and self.is_file():
            copy_file(target, self.uri, to_store=False)
            return
        for relative, _ in files:
            copy_file(target / relative, join(self.uri, relative), to_store=False)
        target.mkdir(parents=True, exist_ok=True)

    def publish(self, write: Callable[[Path], None], commit: str, what: str, then: str = "") -> None:
        """Written in the cache, then uploaded: the old commit file is deleted first, then the old files, and the new
        commit file is uploaded last. A crash leaves no commit file (readers refuse the directory), never one beside
        half of the files."""
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix="publish-") as temporary:
            staging = Path(temporary) / "model"
            with writing(staging, f"{what} for {self} (staged in {CACHE_ENV})", then=then):
                write(staging)
            self.join(commit).delete()
            self.delete()
            self.upload(staging, skip=(commit,))
            self.join(commit).upload(staging / commit)

    def model_dir(self) -> str:
        """A per-node cached download. The cache key is the listing (names and sizes) and the marker's content, so a
        model replaced at the same URI is downloaded again. Concurrent downloads (several workers on a node) each
        fill a temp dir and rename it into place; the loser drops its copy."""
        files = listing(self.uri)
        if not files:
            raise StorageError(f"{self}: no model there (no objects under this prefix)")
        marker = self.join("rlhf_stage.json").read_text() or ""
        digest = hashlib.sha256(json.dumps([files, marker]).encode()).hexdigest()[:16]
        target = cache_root() / "models" / f"{self.local.name}-{digest}"
        if not target.is_dir():
            staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            self.download(staging)
            try:
                staging.rename(target)
            except OSError:  # another process finished first
                shutil.rmtree(staging, ignore_errors=True)
        return str(target)

    def ray_storage(self) -> tuple[str, Any]:
        remote_fs, path = self._fs()
        return path, remote_fs

    def check(self, key: str, model: bool = False) -> None:
        check_location(self.uri, key)
        if model and not self.exists():
            raise StorageError(f"{key}: {self}: no model there (no objects under this prefix)")

    def how_to_delete(self) -> str:
        return f"delete the object {self}"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf-jobs").expanduser()


_listing = listing  # the name tests know


# ---- the same, for a location given as text (scripts, tests) ----------------------------------------


def read_text(where: Where) -> str | None:
    return location(where).read_text()


def write_text(where: Where, text: str) -> None:
    location(where).write_text(text)


def exists(where: Where) -> bool:
    return location(where).exists()


def list_dir(where: Where) -> list[str]:
    return location(where).names()


def local_model(name: str) -> str:
    """A local directory holding the model `name` (a local path or hub id as is; an object store's, downloaded)."""
    return location(name).model_dir()


def upload_file(local: str | Path, uri: str) -> None:
    location(uri).upload(Path(local))


def upload_tree(local: str | Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    location(uri).upload(Path(local), skip)


def download_file(uri: str, local: str | Path) -> None:
    location(uri).download(Path(local))


# ---- pre-flight ----------------------------------------------------------------------------------------------


def check_config(config: Any) -> None:
    """Every location in `config.General` is usable, and every model there is (driver, pre-flight; `Location.check`)."""
    general = config.General
    model_keys = get(config.stage).model_keys
    for name in ("output_dir", "checkpoint_dir", *model_keys):
        value = getattr(general, name, None)
        if value:
            location(value).check(f"General.{name}", model=name in model_keys)
