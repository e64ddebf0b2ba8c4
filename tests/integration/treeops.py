"""Operations applied to a mounted tree (strata or kernel overlayfs), and tree snapshots, for the
differential tests.  Every operation returns 0 or the errno it failed with."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Snapshot = dict[str, tuple[Any, ...]]


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.name}{self.args!r}"


def _err(fn: Any, *args: Any, **kw: Any) -> int:
    try:
        fn(*args, **kw)
    except OSError as exc:
        return exc.errno or -1
    return 0


def _create(p: str, data: bytes) -> None:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# O_NONBLOCK: a FIFO made by an earlier step has no reader; opening it to write would wait
# forever (with the flag both mounts answer ENXIO); regular files ignore it
def _write(p: str, offset: int, data: bytes) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _append(p: str, data: bytes) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _trunc_open(p: str, data: bytes) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def apply(root: Path, op: Op, emulate_exdev: bool = False) -> int:
    """Apply ``op`` under ``root``.  ``emulate_exdev``: a directory rename refused with EXDEV
    (kernel overlayfs without redirect_dir) is done as ``mv`` does it: copy, then delete."""
    def p(rel: str) -> str:
        return os.path.join(root, rel)

    a = op.args
    if op.name == "create":
        return _err(_create, p(a[0]), a[1])
    if op.name == "write":
        return _err(_write, p(a[0]), a[1], a[2])
    if op.name == "append":
        return _err(_append, p(a[0]), a[1])
    if op.name == "overwrite":
        return _err(_trunc_open, p(a[0]), a[1])
    if op.name == "truncate":
        return _err(os.truncate, p(a[0]), a[1])
    if op.name == "mkdir":
        return _err(os.mkdir, p(a[0]), 0o755)
    if op.name == "unlink":
        return _err(os.unlink, p(a[0]))
    if op.name == "rmdir":
        return _err(os.rmdir, p(a[0]))
    if op.name == "rename":
        rc = _err(os.rename, p(a[0]), p(a[1]))
        if rc == errno.EXDEV and emulate_exdev:
            return _mv(p(a[0]), p(a[1]))
        return rc
    if op.name == "link":
        return _err(os.link, p(a[0]), p(a[1]), follow_symlinks=False)
    if op.name == "symlink":
        return _err(os.symlink, a[0], p(a[1]))
    if op.name == "chmod":
        return _err(os.chmod, p(a[0]), a[1])
    if op.name == "chown":
        return _err(os.lchown, p(a[0]), a[1], a[2])
    if op.name == "utime":
        return _err(os.utime, p(a[0]), ns=(a[1], a[2]), follow_symlinks=False)
    if op.name == "setxattr":
        return _err(os.setxattr, p(a[0]), a[1], a[2], follow_symlinks=False)
    if op.name == "removexattr":
        return _err(os.removexattr, p(a[0]), a[1], follow_symlinks=False)
    if op.name == "mkfifo":
        return _err(os.mkfifo, p(a[0]), 0o644)
    raise ValueError(op.name)


def _mv(src: str, dst: str) -> int:
    """What mv(1) does after EXDEV: copy with everything preserved, then remove the source."""
    if os.path.isdir(dst) and not os.path.islink(dst):
        rc = _err(os.rmdir, dst)
        if rc:
            return rc
    proc = subprocess.run(["cp", "-a", "--", src, dst], capture_output=True)
    if proc.returncode != 0:
        return errno.EIO
    shutil.rmtree(src)
    return 0


def snapshot(root: Path, with_nlink: bool = True) -> Snapshot:
    """path -> (type, mode, uid, gid, size, sha256, link target, user xattrs, nlink of a
    non-directory)."""
    out: Snapshot = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            size, digest, target = 0, "", ""
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                names = sorted(n for n in os.listxattr(full, follow_symlinks=False)
                               if n.startswith("user."))
                xattrs = tuple((n, os.getxattr(full, n, follow_symlinks=False)) for n in names)
            # a directory's link count depends on how a rename was done (redirect or copy):
            # test_differential_steps compares it against redirect_dir=on
            nlink = st.st_nlink if with_nlink and not stat.S_ISDIR(st.st_mode) else 0
            out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, digest, target,
                        xattrs, nlink)
    return out


def diff(a: Snapshot, b: Snapshot) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"+ {k} {b[k]}")
        elif k not in b:
            out.append(f"- {k} {a[k]}")
        elif a[k] != b[k]:
            out.append(f"~ {k}: {a[k]} != {b[k]}")
    return out
