"""HostDir: every host call relative to the root's descriptor, so a union path of 4095 bytes
works however deep the layer directory lives, and deeper trees through a walk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unionfs import hostdir
from unionfs.hostdir import WALK_FROM, HostDir


def deep_root(tmp_path: Path) -> Path:
    """A directory whose own absolute path is ~1000 bytes long."""
    root = tmp_path
    for _ in range(4):
        root = root / ("r" * 250)
    root.mkdir(parents=True)
    return root


def make_tree(h: HostDir, total: int) -> str:
    """Directories of 200-byte names down to a path of ``total`` bytes; returns the path of
    a file name that ends exactly there."""
    path = ""
    while total - len(path) > 256:
        path = f"{path}/{'c' * 200}" if path else "c" * 200
        h.mkdir(path, 0o755)
    last = "f" * (total - len(path) - 1)
    return f"{path}/{last}"


@pytest.mark.parametrize("total", [4095, 9000])
def test_every_call_works_at_and_past_path_max(tmp_path: Path, total: int) -> None:
    root = deep_root(tmp_path)
    h = HostDir(str(root))
    try:
        path = make_tree(h, total)
        assert len(path) == total
        assert len(str(root)) + 1 + len(path) > 4096  # joined, it would not fit
        fd = h.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, b"data")
        os.close(fd)
        assert h.lstat(path).st_size == 4
        h.chmod(path, 0o600)
        assert stat.S_IMODE(h.lstat(path).st_mode) == 0o600
        h.chown(path, 1000, 1000)
        h.utime(path, (1_000_000_000, 2_000_000_000))
        st = h.lstat(path)
        assert (st.st_uid, st.st_mtime_ns) == (1000, 2_000_000_000)
        h.setxattr(path, "user.k", b"v")
        assert h.getxattr(path, "user.k") == b"v" and "user.k" in h.listxattr(path)
        h.removexattr(path, "user.k")
        h.truncate(path, 1)
        assert h.lstat(path).st_size == 1
        other = path[:-1] + "g"
        hostdir.link(h, path, h, other)
        assert h.lstat(path).st_nlink == 2
        moved = path[:-1] + "m"
        hostdir.rename(h, other, h, moved, 1)  # RENAME_NOREPLACE
        h.unlink(moved)
        h.symlink("target", other)
        assert h.readlink(other) == "target"
        h.unlink(other)
        h.mknod(other, stat.S_IFIFO | 0o600)
        assert stat.S_ISFIFO(h.lstat(other).st_mode)
        h.unlink(other)
        d = path[:-1] + "d"
        h.mkdir(d, 0o755)
        fd = h.opendir(d)
        assert os.listdir(fd) == []
        os.close(fd)
        h.rmdir(d)
        assert h.exists(path) and not h.exists(d)
    finally:
        h.close()


def test_the_walk_never_follows_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    h = HostDir(str(root))
    try:
        path = make_tree(h, WALK_FROM + 300)
        parent = path.rpartition("/")[0]
        # replace a directory on the way by a symlink leading out of the tree
        victim = parent.rpartition("/")[0]
        os.rename(os.path.join(str(root), victim.split("/")[0]), str(tmp_path / "moved"))
        os.symlink(str(tmp_path / "moved"), os.path.join(str(root), victim.split("/")[0]))
        with pytest.raises(OSError):
            h.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    finally:
        h.close()
