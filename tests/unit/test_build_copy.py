"""COPY's rules on plain directories (no mount): sources found in a build context (globs,
.dockerignore, symlinks kept inside, paths that leave it), the destination rules, owners and
modes, hardlinks, archives, and the checksum the cache keys on."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from imagestore.build.copy import (
    CopyError,
    CopyOptions,
    DestRoot,
    copy_sources,
    extract_archive,
    is_archive,
    lookup_owner,
)
from imagestore.build.ignore import Matcher
from imagestore.build.sources import CopySourceError, HostTree, checksum, find_sources
from tests.buildah import write_context


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    c = write_context(tmp_path / "ctx", {
        "a.txt": "a\n", "b.txt": "b\n", "c.md": "c\n", "dir/sub/f": "f\n", "dir/top": "t\n",
        "dir/link": ("symlink", "top"), "escape": ("symlink", "/../../etc/hostname"),
        "dirlink": ("symlink", "dir"), "exec.sh": ("mode", b"#!/bin/sh\n", 0o755)})
    os.link(c / "dir" / "top", c / "dir" / "hard")
    return c


@pytest.fixture
def root(tmp_path: Path) -> DestRoot:
    r = tmp_path / "rootfs"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    (r / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    (r / "existing").mkdir()
    os.symlink("existing", r / "lnk")
    os.symlink("/etc/../../../..", r / "up")
    return DestRoot(str(r))


def names(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_sources(ctx: Path) -> None:
    tree = HostTree(str(ctx), Matcher(["*.md"]))
    assert [s.path for s in find_sources(tree, "*.txt", True)] == ["a.txt", "b.txt"]
    assert [s.path for s in find_sources(tree, "/a.txt", True)] == ["a.txt"]
    assert [s.path for s in find_sources(tree, "dirlink", True)] == ["dir"]
    # a symlink cannot lead out of the context: /../../etc/hostname stays inside
    with pytest.raises(CopySourceError, match="stat escape"):
        find_sources(tree, "escape", True)
    with pytest.raises(CopySourceError, match="outside the build context: ../x"):
        find_sources(tree, "../x", True)
    with pytest.raises(CopySourceError, match="outside the build context"):
        find_sources(tree, "dir/../../x", True)
    with pytest.raises(CopySourceError, match="excluded by .dockerignore: stat c.md"):
        find_sources(tree, "c.md", True)
    with pytest.raises(CopySourceError, match="matches nothing"):
        find_sources(tree, "*.md", True)


def test_destination_rules(ctx: Path, root: DestRoot) -> None:
    tree = HostTree(str(ctx))
    r = Path(root.root)

    def copy(src: str, dest: str, **kw: object) -> None:
        copy_sources(tree, find_sources(tree, src, True), root, dest,
                     CopyOptions(**kw))  # type: ignore[arg-type]

    copy("a.txt", "/new/name")
    copy("a.txt", "/into/")
    copy("a.txt", "/existing")  # an existing directory receives it
    copy("a.txt", "/lnk/via-link")  # the symlink in the path is followed inside the root
    copy("a.txt", "/up/escaped")  # .. never leaves the root
    copy("dir", "/contents")
    copy("*.txt", "/several/")
    assert (r / "new" / "name").read_text() == "a\n"
    assert (r / "into" / "a.txt").exists() and (r / "existing" / "a.txt").exists()
    assert (r / "existing" / "via-link").exists() and (r / "escaped").exists()
    assert names(r / "contents") == ["hard", "link", "sub", "sub/f", "top"]
    assert os.readlink(r / "contents" / "link") == "top"
    assert os.stat(r / "contents" / "hard").st_ino == os.stat(r / "contents" / "top").st_ino
    assert names(r / "several") == ["a.txt", "b.txt"]
    st = os.stat(r / "new")
    assert (st.st_mode & 0o7777, st.st_uid) == (0o755, 0)
    with pytest.raises(CopyError, match="must be a directory and end with a /"):
        copy("*.txt", "/not-a-dir")
    with pytest.raises(CopyError, match="not a directory"):
        copy("dir", "/new/name")


def test_owners_and_modes(ctx: Path, root: DestRoot) -> None:
    tree = HostTree(str(ctx))
    r = Path(root.root)
    assert lookup_owner(root, "app") == (1000, 1000)
    assert lookup_owner(root, "app:staff") == (1000, 50)
    assert lookup_owner(root, "7:8") == (7, 8)
    with pytest.raises(CopyError, match="no such user: nobody"):
        lookup_owner(root, "nobody")
    with pytest.raises(CopyError, match="no such group: wheel"):
        lookup_owner(root, "app:wheel")
    copy_sources(tree, find_sources(tree, "dir", True), root, "/owned/deep/",
                 CopyOptions(owner=(1000, 50), chmod=0o640))
    for p in [r / "owned", r / "owned" / "deep", r / "owned" / "deep" / "sub"]:
        assert (os.stat(p).st_uid, os.stat(p).st_gid) == (1000, 50)
    assert os.stat(r / "owned" / "deep" / "top").st_mode & 0o7777 == 0o640
    copy_sources(tree, find_sources(tree, "exec.sh", True), root, "/kept", CopyOptions())
    assert os.stat(r / "kept").st_mode & 0o7777 == 0o755
    assert os.stat(r / "kept").st_mtime == os.stat(ctx / "exec.sh").st_mtime


def test_archives(tmp_path: Path, root: DestRoot) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("pkg/one", b"1"), ("../evil", b"x")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.uid = len(data), 1000
            tf.addfile(ti, io.BytesIO(data))
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tf:
        ti = tarfile.TarInfo("pkg/one")
        ti.size, ti.uid, ti.mode = 1, 1000, 0o600
        tf.addfile(ti, io.BytesIO(b"1"))
    ctx = write_context(tmp_path / "arch", {"good.tgz": gzip.compress(good.getvalue()),
                                            "evil.tar": buf.getvalue(),
                                            "text.gz": gzip.compress(b"not a tar")})
    tree = HostTree(str(ctx))
    assert is_archive(tree, "good.tgz") and is_archive(tree, "evil.tar")
    assert not is_archive(tree, "text.gz")
    with open(ctx / "good.tgz", "rb") as f:
        extract_archive(f, root, "x", "good.tgz")
    st = os.stat(Path(root.root) / "x" / "pkg" / "one")
    assert (st.st_uid, st.st_mode & 0o7777) == (1000, 0o600)
    with open(ctx / "evil.tar", "rb") as f, pytest.raises(CopyError, match="leaves"):
        extract_archive(f, root, "y", "evil.tar")


def test_checksum_sees_content_and_modes_not_mtimes(ctx: Path) -> None:
    tree = HostTree(str(ctx))
    srcs = find_sources(tree, "dir", True)
    first = checksum(tree, srcs)
    os.utime(ctx / "dir" / "top", (1, 1))
    assert checksum(tree, srcs) == first
    os.chmod(ctx / "dir" / "top", 0o600)
    assert checksum(tree, srcs) != first
    os.chmod(ctx / "dir" / "top", 0o644)
    (ctx / "dir" / "top").write_text("other\n")
    assert checksum(tree, srcs) != first
