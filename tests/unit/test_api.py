"""The public API (``imagestore.Store``) without FUSE: typed values, typed errors, progress
events, and the mount plumbing that runs before any daemon starts."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import imagestore
from imagestore import (
    ContainerNotFound,
    FuseUnavailable,
    Image,
    ImageNotFound,
    InvalidImage,
    InvalidReference,
    OutputError,
    ProgressEvent,
    Store,
    StoreError,
    Unsupported,
    mounting,
    mountplan,
    progress,
)
from imagestore.errors import Conflict, MountFailed
from tests.builders import d, file, oci_layout, sym, tar_bytes

ROOTFS = tar_bytes([d("etc"), file("etc/motd", b"welcome\n"), sym("etc/link", "motd"),
                    file("bin/tool", b"#!/bin/sh\n", mode=0o755)])


def open_store(root: Path) -> Store:
    return Store(str(root))


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return sorted(t.getnames())


def test_import_tag_remove_return_typed_values(store_root: Path, tmp_path: Path) -> None:
    s = open_store(store_root)
    (tmp_path / "rootfs.tar").write_bytes(ROOTFS)
    events: list[ProgressEvent] = []
    image = s.import_rootfs(tmp_path / "rootfs.tar", "demo:1", changes=["ENV A=1"],
                           progress=events.append)
    assert isinstance(image, Image)
    assert [t.familiar for t in image.tags] == ["demo:1"]
    assert image.config.container_config["Env"] == ["A=1"]
    # bytes events about the import, then one final event naming the new layer
    assert {e.operation for e in events} == {"import"}
    assert events[-1] == ProgressEvent("import", progress.short(image.diff_ids[0]), "Imported",
                                       len(ROOTFS), len(ROOTFS))
    assert all(e.total_bytes == len(ROOTFS) for e in events)

    ref = s.tag(image, "demo:2")
    assert ref.familiar == "demo:2"
    assert s.resolve("demo:2").id == image.id
    with pytest.raises(Conflict):
        s.remove(image)  # two tags: deleting by image needs force
    removed = s.remove("demo:1")
    assert removed.untagged == ("demo:1",) and removed.deleted == ()
    removed = s.remove(s.resolve("demo:2"), force=True)
    assert removed.deleted[0] == image.id
    assert s.images() == []


def test_import_from_a_file_object(store_root: Path) -> None:
    image = open_store(store_root).import_rootfs(io.BytesIO(ROOTFS))
    assert image.tags == () and len(image.diff_ids) == 1


def test_errors_are_store_errors(store_root: Path, tmp_path: Path) -> None:
    s = open_store(store_root)
    image = s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    cases: list[tuple[type[StoreError], object]] = [
        (ImageNotFound, lambda: s.resolve("nothing:here")),
        (InvalidReference, lambda: s.tag(image, "demo:bad tag")),
        (InvalidImage, lambda: s.import_rootfs(tmp_path / "missing.tar")),
        (InvalidImage, lambda: s.load(tmp_path / "missing.tar")),
        (OutputError, lambda: s.save("demo:1", tmp_path)),
        (OutputError, lambda: s.export("demo:1", tmp_path / "no" / "such" / "dir.tar")),
        (Unsupported, lambda: s.save("demo:1", tmp_path / "x.tar", format="zip")),
        (ContainerNotFound, lambda: s.container("nobody")),
        (ContainerNotFound, lambda: s.remove_container("nobody")),
        (InvalidReference, lambda: s.create_container(image, name="no/slash")),
        (ImageNotFound, lambda: s.create_container("nothing:here")),
    ]
    for kind, call in cases:
        with pytest.raises(kind):
            call()  # type: ignore[operator]
    c = s.create_container(image)
    with pytest.raises(Unsupported):
        s.commit(c, compression="lz4")
    with pytest.raises(Unsupported):
        s.commit(c, format="tar")
    with pytest.raises(Conflict):
        s.remove(image, force=False)  # a container uses it
    assert not any(p.name.startswith(".strata-") for p in tmp_path.iterdir())


def test_save_load_round_trip_with_progress(store_root: Path, tmp_path: Path) -> None:
    s = open_store(store_root)
    image = s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    for fmt in ("docker", "oci"):
        s.save([image], tmp_path / f"{fmt}.tar", format=fmt)
        other = open_store(tmp_path / f"store-{fmt}")
        events: list[ProgressEvent] = []
        loaded = other.load(tmp_path / f"{fmt}.tar", progress=events.append)
        assert [(x.image.id, [t.familiar for t in x.tags]) for x in loaded] == \
            [(image.id, ["demo:1"])]
        last = events[-1]
        assert (last.operation, last.status) == ("load", "Loaded")
        assert last.layer == progress.short(image.diff_ids[0])
        assert last.done_bytes == last.total_bytes and last.total_bytes is not None
        assert {e.status for e in events} <= {"Loading layer", "Loaded"}


def test_save_by_name_follows_docker_save(store_root: Path) -> None:
    s = open_store(store_root)
    a = s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    s.tag(a, "demo:2")
    out = io.BytesIO()
    s.save("demo", out)  # a bare repository: every tag of it
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as t:
        manifest = t.extractfile("manifest.json")
        assert manifest is not None
        assert b'"demo:1","demo:2"' in manifest.read()
    out = io.BytesIO()
    s.save(a.id, out)  # an ID: no names
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as t:
        manifest = t.extractfile("manifest.json")
        assert manifest is not None
        assert b'"RepoTags":null' in manifest.read()


def test_load_an_oci_layout_directory(store_root: Path, tmp_path: Path) -> None:
    oci_layout(str(tmp_path / "layout"), [ROOTFS], tag="v3")
    loaded = open_store(store_root).load(tmp_path / "layout")
    assert len(loaded) == 1 and loaded[0].image.diff_ids == [
        "sha256:" + __import__("hashlib").sha256(ROOTFS).hexdigest()]


def test_export_image_to_path_and_file_object(store_root: Path, tmp_path: Path) -> None:
    s = open_store(store_root)
    s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    s.export("demo:1", tmp_path / "rootfs.tar")
    out = io.BytesIO()
    s.export(s.resolve("demo:1"), out)
    assert names((tmp_path / "rootfs.tar").read_bytes()) == names(out.getvalue()) == \
        ["bin", "bin/tool", "etc", "etc/link", "etc/motd"]


def test_container_diff_commit_export_unmounted(store_root: Path) -> None:
    s = open_store(store_root)
    s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    c = s.create_container("demo:1", name="work")
    assert s.container("work") == c and s.containers() == [c]
    # unmounted, the writable layer is a plain overlayfs upper directory
    Path(c.upper, "etc").mkdir()
    Path(c.upper, "etc/new").write_text("new\n")
    assert s.diff("work") == [("C", "/etc"), ("A", "/etc/new")]
    events: list[ProgressEvent] = []
    image = s.commit(c, "demo:2", message="add new", timestamp=0, progress=events.append)
    assert [t.familiar for t in image.tags] == ["demo:2"]
    assert len(image.diff_ids) == 2
    assert events[-1].status == "Committed"
    assert events[-1].layer == progress.short(image.manifest.layers[-1].digest)
    assert events[-1].total_bytes == events[-1].done_bytes and events[-1].total_bytes
    # the same changes at the same timestamp give the same image
    assert s.commit(c, message="add new", timestamp=0).id == image.id
    out = io.BytesIO()
    s.export(c, out)
    assert "etc/new" in names(out.getvalue())
    s.remove_container(c)
    assert s.containers() == []
    assert not os.path.exists(c.root)


def test_byte_counter_throttles_and_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    got: list[ProgressEvent] = []
    counter = progress.ByteCounter(got.append, "load", "abc", "Loading layer", 1000, "Loaded")
    for _ in range(100):
        counter(1)
        now[0] += 0.01  # 100 chunks in one second: ten events at most
    counter.finish()
    assert 9 <= len(got) <= 11
    assert got[-1] == ProgressEvent("load", "abc", "Loaded", 100, 100)
    assert [e.done_bytes for e in got[:-1]] == sorted(e.done_bytes or 0 for e in got[:-1])


# -- mount plumbing before a daemon exists ----------------------------------------------------


def test_fuse_missing_names_each_reason(monkeypatch: pytest.MonkeyPatch,
                                        store_root: Path) -> None:
    real_exists = os.path.exists
    monkeypatch.setattr(mounting.os.path, "exists",
                        lambda p: False if p == "/dev/fuse" else real_exists(p))
    monkeypatch.setattr(mountplan.shutil, "which", lambda name: None)
    assert mounting.fuse_missing() == ("/dev/fuse is missing; fusermount3 is not installed "
                                       "(Debian package fuse3)")
    s = open_store(store_root)
    s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    with pytest.raises(FuseUnavailable, match="^/dev/fuse is missing;"), s.mount("demo:1"):
        pass


@pytest.mark.skipif(shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"),
                    reason="the checks below run before a mount only when FUSE is present")
def test_mount_checks_the_target_and_mountpoint_first(store_root: Path, tmp_path: Path) -> None:
    s = open_store(store_root)
    with pytest.raises(ImageNotFound, match="No such image or container: nothing"), \
            s.mount("nothing"):
        pass
    s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    (tmp_path / "file").write_text("")
    with pytest.raises(MountFailed, match="cannot create the mountpoint"), \
            s.mount("demo:1", tmp_path / "file" / "below"):
        pass


def test_daemon_failures_become_typed_errors(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    plan = mounting.Plan({}, str(tmp_path / "mnt"), False, str(log), "image x")
    log.write_text("old noise: permission denied\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("fusermount3: mount failed: Operation not permitted\n")
    err = plan.failure("cannot mount /mnt: fuse_session_mount failed", 1, start)
    assert isinstance(err, FuseUnavailable)
    assert str(err) == "FUSE is not usable here: fusermount3: mount failed: Operation not permitted"
    err = plan.failure("open /store/layers/x/layer.tar: Permission denied", 1, log.stat().st_size)
    assert type(err) is MountFailed  # not FUSE's refusal: no reason to skip
    err = plan.failure("No such image: x", 1, log.stat().st_size)
    assert type(err) is MountFailed
    assert str(err) == f"cannot mount image x at {tmp_path / 'mnt'}: No such image: x " \
                       f"(daemon log: {log})"
    with open(log, "a") as f:
        f.write("Traceback ...\nRuntimeError: boom\n")
    err = plan.failure("", 1, start + 51)
    assert type(err) is MountFailed and "RuntimeError: boom" in str(err)


def test_public_names_resolve() -> None:
    for name in imagestore.__all__:
        assert getattr(imagestore, name) is not None
    assert imagestore.Store is Store
    assert issubclass(imagestore.RegistryError, StoreError)
    with pytest.raises(AttributeError):
        imagestore.NoSuchThing  # noqa: B018


class _RemovingSink(io.BytesIO):
    """An output whose first write runs ``rmi`` of the image being written, through a second
    ``Store`` of the same root (its own lock descriptors, as another process would have), and
    records whether the layer was still stored right after it."""

    def __init__(self, root: Path, name: str, diff_id: str) -> None:
        super().__init__()
        self.root, self.name, self.diff_id = root, name, diff_id
        self.kept: bool | None = None

    def write(self, data: object) -> int:
        if self.kept is None:
            other = Store(str(self.root))
            other.remove(self.name)
            self.kept = other.layers.has(self.diff_id)  # type: ignore[arg-type]
        return super().write(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("operation", ["save", "export"])
def test_gh15_save_and_export_hold_off_garbage_collection(store_root: Path, tmp_path: Path,
                                                          operation: str) -> None:
    """An ``rmi`` while the API writes an archive untags at once but leaves the collection to
    the next prune: nothing being read is deleted under the reader (as the CLI promises)."""
    s = open_store(store_root)
    image = s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    sink = _RemovingSink(store_root, "demo:1", image.diff_ids[0])
    getattr(s, operation)("demo:1", sink)
    assert sink.kept is True, "the layer was collected while it was being read"
    assert s.images() == []
    if operation == "save":  # the archive is whole
        (tmp_path / "saved.tar").write_bytes(sink.getvalue())
        [loaded] = open_store(tmp_path / "other").load(tmp_path / "saved.tar")
        assert loaded.image.id == image.id
    else:
        assert names(sink.getvalue()) == ["bin", "bin/tool", "etc", "etc/link", "etc/motd"]
    assert s.prune().reclaimed > 0  # the next prune collects what the rmi left
