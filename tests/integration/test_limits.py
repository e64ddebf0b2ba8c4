"""Paths at the limits, strata against kernel overlayfs (issue 13 item 3).

Names of 255 bytes; paths of exactly 4095 bytes inside the mount (15 directories and a name of
255 bytes each), used whole from the mount's root descriptor; and a tree deeper than PATH_MAX,
reached one ``openat`` at a time and worked on from a directory descriptor at its bottom.  The
layers, the uppers and the mount points themselves live several hundred bytes deep, so a daemon
that joins a layer root and a path into one string goes past PATH_MAX where the kernel's
overlayfs does not.  Every operation (create, stat, read, write, truncate, chmod, chown, utime,
setxattr, link, symlink, readlink, rename, mknod, unlink, rmdir, readdir) runs on both mounts:
same outcome, then the same tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mounter, require_root
from tests.integration.observe import Reported, compare, observe, settle
from tests.integration.pair import mounted_pair
from tests.integration.unionops import renameat2

pytestmark = [pytest.mark.fuse, pytest.mark.root]

NAME_MAX = 255
PATH_MAX = 4096


def name(tag: str) -> str:
    """A 255-byte name starting with ``tag``."""
    return (tag + "-").ljust(NAME_MAX, "n")


CHAIN = [name(f"c{i:02d}") for i in range(15)]  # 15 * 256 bytes of directories
LONG_DIR = "/".join(CHAIN)
DEEP = [name(f"deep{i:02d}") for i in range(20)]  # 20 * 256 bytes: past PATH_MAX


def long_path(tag: str) -> str:
    p = f"{LONG_DIR}/{name(tag)}"
    assert len(p.encode()) == PATH_MAX - 1
    return p


def _makedirs_at(top: int, parts: list[str]) -> int:
    """mkdir -p of ``parts`` below the directory descriptor ``top``; returns the bottom's fd."""
    fd = os.dup(top)
    for part in parts:
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, 0o755, dir_fd=fd)
        sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


def _open_chain(top: int, parts: list[str]) -> int:
    """The descriptor of the directory ``parts`` below ``top``, opened one level at a time."""
    fd = os.dup(top)
    for part in parts:
        try:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        finally:
            os.close(fd)
        fd = sub
    return fd


def _listing(dirfd: int, rel: str) -> list[str]:
    fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirfd)
    try:
        return sorted(e.name[:8] for e in os.scandir(fd))
    finally:
        os.close(fd)


def _write_at(dirfd: int, n: str, data: bytes) -> None:
    fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dirfd)
    os.write(fd, data)
    os.close(fd)


def build_lower(base: Path) -> list[Path]:
    layer = base / "l1"
    layer.mkdir(parents=True)
    top = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _write_at(top, name("top"), b"a name of 255 bytes")
        fd = _makedirs_at(top, CHAIN)
        _write_at(fd, name("lower"), b"lower at 4095 bytes")
        _write_at(fd, name("lower2"), b"second lower")
        os.close(fd)
        fd = _makedirs_at(top, DEEP)
        _write_at(fd, "deepfile", b"below PATH_MAX")
        os.mkdir("deepdir", dir_fd=fd)
        os.close(fd)
    finally:
        os.close(top)
    return [layer]


def long_base(tmp_path: Path) -> Path:
    """A directory some 400 bytes deep in ``tmp_path``."""
    base = tmp_path / ("b" * 120) / ("c" * 120) / ("d" * 120)
    base.mkdir(parents=True)
    return base


def _fd(dirfd: int, n: str, flags: int, fn: Callable[[int], Any]) -> Any:
    fd = os.open(n, flags, 0o644, dir_fd=dirfd)
    try:
        return fn(fd)
    finally:
        os.close(fd)


def _st(dirfd: int, n: str) -> tuple[int, int, int]:
    st = os.stat(n, dir_fd=dirfd, follow_symlinks=False)
    return st.st_mode, st.st_size, st.st_nlink


def operations(p: str, q: str, low: str, d: str) -> list[tuple[str, Callable[[int], Any]]]:
    """Operations on names relative to a directory descriptor: ``p`` and ``q`` new names,
    ``low`` a lower file, ``d`` a new directory (each may be a path of several components)."""
    rd, wr = os.O_RDONLY, os.O_WRONLY
    return [
        ("create", lambda fd: _fd(fd, p, wr | os.O_CREAT | os.O_EXCL,
                                  lambda f: os.write(f, b"created"))),
        ("stat", lambda fd: _st(fd, p)),
        ("read", lambda fd: _fd(fd, p, rd, lambda f: os.read(f, 100))),
        ("append", lambda fd: _fd(fd, p, wr | os.O_APPEND, lambda f: os.write(f, b"+more"))),
        ("truncate", lambda fd: _fd(fd, p, wr, lambda f: os.ftruncate(f, 3))),
        ("chmod", lambda fd: os.chmod(p, 0o600, dir_fd=fd)),
        ("chown", lambda fd: os.chown(p, 1000, 1000, dir_fd=fd, follow_symlinks=False)),
        ("utime", lambda fd: os.utime(p, ns=(10**18, 10**18), dir_fd=fd)),
        ("setxattr", lambda fd: _fd(fd, p, rd, lambda f: os.setxattr(f, "user.k", b"v"))),
        ("getxattr", lambda fd: _fd(fd, p, rd, lambda f: os.getxattr(f, "user.k"))),
        ("link", lambda fd: os.link(p, q, src_dir_fd=fd, dst_dir_fd=fd)),
        ("rename-noreplace", lambda fd: renameat2(q, p, 1, fd, fd)),
        ("unlink-link", lambda fd: os.unlink(q, dir_fd=fd)),
        ("symlink", lambda fd: os.symlink("some/target", q, dir_fd=fd)),
        ("readlink", lambda fd: os.readlink(q, dir_fd=fd)),
        ("rename-over", lambda fd: os.rename(q, p, src_dir_fd=fd, dst_dir_fd=fd)),
        ("mkfifo", lambda fd: os.mkfifo(q, 0o600, dir_fd=fd)),
        ("unlink-fifo", lambda fd: os.unlink(q, dir_fd=fd)),
        ("mkdir", lambda fd: os.mkdir(d, 0o750, dir_fd=fd)),
        ("create-in-dir", lambda fd: _fd(fd, d + "/x", wr | os.O_CREAT,
                                         lambda f: os.write(f, b"x"))),
        ("rmdir-not-empty", lambda fd: os.rmdir(d, dir_fd=fd)),
        ("unlink-in-dir", lambda fd: os.unlink(d + "/x", dir_fd=fd)),
        ("rmdir", lambda fd: os.rmdir(d, dir_fd=fd)),
        ("stat-lower", lambda fd: _st(fd, low)),
        ("read-lower", lambda fd: _fd(fd, low, rd, lambda f: os.read(f, 100))),
        ("write-lower", lambda fd: _fd(fd, low, wr, lambda f: os.pwrite(f, b"W", 2))),
        ("chmod-lower", lambda fd: os.chmod(low, 0o640, dir_fd=fd)),
        ("rename-lower", lambda fd: os.rename(low, q, src_dir_fd=fd, dst_dir_fd=fd)),
        ("unlink-renamed", lambda fd: os.unlink(q, dir_fd=fd)),
        ("unlink", lambda fd: os.unlink(p, dir_fd=fd)),
    ]


def _run(fn: Callable[[int], Any], fd: int) -> tuple[int, Any]:
    try:
        return 0, fn(fd)
    except OSError as exc:
        return exc.errno or -1, None


def _compare_ops(kfd: int, sfd: int, kroot: int, sroot: int,
                 ops: list[tuple[str, Callable[[int], Any]]]) -> list[str]:
    """Each operation on both mounts, then both trees; a difference is reported once, at the
    first step that shows it."""
    kb, sb = observe(kroot), observe(sroot)
    reported = Reported()
    problems = [f"before any operation: {p}" for p in reported.new(compare(kb, kb, sb, sb))]
    for what, fn in ops:
        settle(kb, sb)
        rk, rs = _run(fn, kfd), _run(fn, sfd)
        if rk != rs:
            problems.append(f"{what}: kernel {_fmt(rk)}, strata {_fmt(rs)}")
        ka, sa = observe(kroot), observe(sroot)
        problems += [f"after {what}: {p}" for p in reported.new(compare(kb, ka, sb, sa))]
        kb, sb = ka, sa
    return problems


def _fmt(o: tuple[int, Any]) -> str:
    return errno.errorcode.get(o[0], str(o[0])) if o[0] else f"ok {o[1]!r}"[:80]


def _short(p: str) -> str:
    return p if len(p) < 60 else f"{p[:20]}...({len(p.encode())} bytes)"


def test_paths_of_4095_bytes(tmp_path: Path, mounter: Mounter) -> None:
    require_root()
    base = long_base(tmp_path)
    lowers = build_lower(base / "lowers")
    with mounted_pair(mounter, lowers, base=base) as pair:
        kroot = os.open(pair.k.root, os.O_RDONLY | os.O_DIRECTORY)
        sroot = os.open(pair.s.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert len(str(lowers[0]).encode()) + 1 + PATH_MAX - 1 > PATH_MAX
            ops = operations(long_path("new"), long_path("other"), long_path("lower"),
                             long_path("dir"))
            ops.insert(0, ("stat-255", lambda fd: _st(fd, name("top"))))
            ops.insert(1, ("chmod-255", lambda fd: os.chmod(name("top"), 0o600, dir_fd=fd)))
            ops.append(("readdir", lambda fd: _listing(fd, LONG_DIR)))
            problems = _compare_ops(kroot, sroot, kroot, sroot, ops)
        finally:
            os.close(kroot)
            os.close(sroot)
    assert not problems, "\n".join(_short_lines(problems))


def test_tree_deeper_than_path_max(tmp_path: Path, mounter: Mounter) -> None:
    require_root()
    base = long_base(tmp_path)
    lowers = build_lower(base / "lowers")
    problems: list[str] = []
    with mounted_pair(mounter, lowers, base=base) as pair:
        fds = []
        try:
            for root in (pair.k.root, pair.s.root):
                top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
                fds.append(top)
                try:
                    fds.append(_open_chain(top, DEEP))
                except OSError as exc:
                    problems.append(f"walking down {root.name}: {exc.strerror}")
            if not problems:
                kroot, kfd, sroot, sfd = fds
                ops = operations("new", "other", "deepfile", "dir")
                ops.append(("readdir", lambda fd: _listing(fd, ".")))
                ops.append(("mkdir-deeper", lambda fd: os.close(_makedirs_at(fd, DEEP[:4]))))
                problems += _compare_ops(kfd, sfd, kroot, sroot, ops)
        finally:
            for fd in fds:
                os.close(fd)
    assert not problems, "\n".join(_short_lines(problems))


def _short_lines(problems: list[str]) -> list[str]:
    out = []
    for p in problems[:40]:
        for n in CHAIN + DEEP + [name(t) for t in ("top", "lower", "lower2", "new", "other",
                                                     "dir")]:
            p = p.replace(n, n[:n.index("-")] + "-n{255}")
        out.append(p[:400])
    return out
