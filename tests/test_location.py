"""`storage.Location`: the same assertions against a local directory and a real S3-compatible server (moto's), so
both implementations are shown to behave alike."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from servers import BUCKET, s3_server  # noqa: F401  (fixtures)

from rlhf_jobs.store import storage


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> storage.Location:
    """An empty directory: under tmp_path, or a fresh prefix in the S3 server's bucket (its mirror under tmp_path)."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    if request.param == "local":
        return storage.location(tmp_path / "root")
    for name, value in request.getfixturevalue("s3_server").items():
        monkeypatch.setenv(name, value)
    return storage.location(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/root")


def test_what_a_location_is_made_from(tmp_path: Path) -> None:
    assert isinstance(storage.location(tmp_path), storage.LocalPath)
    assert isinstance(storage.location("gpt2"), storage.LocalPath)  # a hub id: no files, model_dir as is
    assert storage.location("gpt2").model_dir() == "gpt2"
    assert isinstance(storage.location("s3://bucket/x"), storage.ObjectStore)
    assert storage.location("s3://bucket/x/").recorded == "s3://bucket/x"
    assert storage.location("runs/../out").recorded == str(Path("out").resolve())
    assert storage.location("s3://bucket/x").beside(".lock") == storage.location("s3://bucket/x.lock")
    where = storage.location("s3://bucket/x")
    assert storage.location(where) is where


def test_files_read_written_listed_and_deleted(root: storage.Location) -> None:
    file = root.join("sub", "a.txt")
    assert not root.exists() and root.names() == [] and root.sizes() == {} and file.read_text() is None
    file.write_text("one")
    root.join("b.txt").write_text("four")
    assert file.read_text() == "one" and file.is_file() and not file.is_dir()
    assert root.exists() and root.is_dir() and not root.is_file()
    assert root.names() == ["b.txt", "sub"] and root.join("sub").names() == ["a.txt"]
    assert root.sizes() == {"b.txt": 4, "sub/a.txt": 3}
    assert file.names() == [], "a file lists nothing"

    file.write_text("replaced")
    assert file.read_text() == "replaced"
    file.delete()
    assert not file.exists() and file.read_text() is None
    file.delete()  # nothing there is fine
    root.delete()
    assert not root.exists() and root.names() == []


def test_create_text_is_exclusive(root: storage.Location) -> None:
    lock = root.beside(".lock")
    assert lock.create_text("first")
    assert not lock.create_text("second")
    assert lock.read_text() == "first"
    lock.delete()
    assert lock.create_text("third") and lock.read_text() == "third"


def test_move_aside_keeps_everything_under_a_free_name(root: storage.Location) -> None:
    root.join("state", "x.bin").write_text("weights")
    moved = root.move_aside("broken")
    assert moved.name.startswith(f"{root.name}.broken-") and moved.name != root.name
    assert not root.exists() and moved.join("state", "x.bin").read_text() == "weights"

    root.join("y.txt").write_text("again")
    second = root.move_aside("broken")
    assert second != moved and moved.exists() and second.join("y.txt").read_text() == "again"


def test_upload_and_download_through_the_local_copy(root: storage.Location, tmp_path: Path) -> None:
    """`local` is where the files are on this machine; `upload`/`download` move them (nothing to do locally)."""
    source = tmp_path / "source"
    (source / "d").mkdir(parents=True)
    (source / "d" / "f.txt").write_text("shard")
    (source / "commit.json").write_text("{}")
    root.upload(source, skip=("commit.json",))
    assert root.sizes() == {"d/f.txt": 5}
    root.join("commit.json").upload(source / "commit.json")
    assert root.sizes() == {"commit.json": 2, "d/f.txt": 5}

    target = tmp_path / "copy"
    root.download(target)
    assert (target / "d" / "f.txt").read_text() == "shard" and (target / "commit.json").read_text() == "{}"
    root.join("d", "f.txt").download(tmp_path / "one.txt")
    assert (tmp_path / "one.txt").read_text() == "shard"

    root.download()  # into its local copy: the mirror, or (a local path) itself
    assert (root.local / "d" / "f.txt").read_text() == "shard"
    (root.local / "d" / "f.txt").write_text("newer")
    root.upload()
    assert root.join("d", "f.txt").read_text() == "newer"
    assert (root.local == root.resolved().local) and (root.mirrored == (root.local != Path(str(root))))


def test_publish_replaces_a_directory_whole_with_the_commit_file_last(root: storage.Location) -> None:
    def fill(count: int, tag: str):
        def write(directory: Path) -> None:
            directory.mkdir(parents=True)
            for index in range(count):
                (directory / f"part-{index}.bin").write_text(f"{tag}-{index}")
            (directory / "commit.json").write_text(tag)
        return write

    root.publish(fill(3, "old"), commit="commit.json", what="a test model")
    assert root.names() == ["commit.json", "part-0.bin", "part-1.bin", "part-2.bin"]
    root.publish(fill(1, "new"), commit="commit.json", what="a test model")
    assert root.names() == ["commit.json", "part-0.bin"], "the old files are gone"
    assert root.join("commit.json").read_text() == "new" and root.join("part-0.bin").read_text() == "new-0"

    def fails(directory: Path) -> None:
        fill(1, "broken")(directory)
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        root.publish(fails, commit="commit.json", what="a test model")
    assert root.join("commit.json").read_text() == "new", "a failed write leaves the old directory"


def test_checkpoint_step_directories_take_one_path_for_both(root: storage.Location, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`StepDirs` (the train state's checkpoints): written in the local copy, kept at the location, committed by
    `complete.json` last, cleaned in both, and the newest complete one fetched on another machine."""
    from rlhf_jobs.store.step_dirs import StepDirs

    steps = StepDirs(root.join("checkpoints"), "complete.json")
    for step in (2, 4, 6):
        path = steps.local / f"step-{step:08d}"
        path.mkdir(parents=True)
        (path / "shard.distcp").write_text(f"s{step}")
        steps.upload_shards(path)
        if step < 6:  # step 6 stays partial: killed before its commit
            (path / "complete.json").write_text("{}")
            steps.commit(path)
    root.join("checkpoints", "step-00000002.broken-x", "shard.distcp").write_text("kept")
    assert steps.sizes(steps.local / "step-00000004") == {"complete.json": 2, "shard.distcp": 2}
    assert [path.name for path in steps.complete_steps()] == ["step-00000002", "step-00000004"]

    steps.clean(keep=1)
    assert root.join("checkpoints").names() == ["step-00000002.broken-x", "step-00000004"]
    assert {path.name for path in steps.local.iterdir()} - {"step-00000002.broken-x"} == {"step-00000004"}

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "another-machine"))
    elsewhere = StepDirs(root.join("checkpoints"), "complete.json")
    elsewhere.download_latest()
    assert [path.name for path in elsewhere.complete_steps()] == ["step-00000004"]
    assert (elsewhere.local / "step-00000004" / "shard.distcp").read_text() == "s4"


def test_a_mirror_holding_one_nodes_shards_of_the_newest_checkpoint_downloads_the_rest(
        root: storage.Location, tmp_path: Path) -> None:
    """Multi-node, object storage: node 0's mirror has the newest checkpoint's commit file but only its own shards
    (the other node uploaded its). A retry on node 0 used to keep that copy, and `verify` then moved the good
    checkpoint aside as broken; the mirror is now refreshed unless it holds every file the commit lists."""
    from rlhf_jobs.store.step_dirs import StepDirs

    if not root.mirrored:
        pytest.skip("a local output_dir is its own copy: nothing is downloaded")
    steps = StepDirs(root.join("checkpoints"), "complete.json")
    path = steps.local / "step-00000002"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_text("rank0")
    steps.upload_shards(path)
    root.join("checkpoints", "step-00000002", "__1_0.distcp").write_text("rank1")  # the other node's upload
    (path / "complete.json").write_text(json.dumps({"files": {"__0_0.distcp": 5, "__1_0.distcp": 5}}))
    steps.commit(path)
    steps.download_latest()
    assert (path / "__1_0.distcp").read_text() == "rank1"
