"""Operations for the step-by-step differential tests: every one is applied to one mounted tree
(kernel overlayfs or strata) by an ``Actor``, which also keeps open descriptors between steps.

An operation is an ``Op`` (a name and its arguments).  ``Actor.apply`` returns an ``Outcome``:
the errno (0 for success) and what the call gave back (bytes read, a count written, an fstat
summary), so the two mounts can be compared on both.  Operations that fail are as important
as those that succeed: the state after an error is compared too.

Seams: ``OPEN_FLAGS`` and ``open_flag_sets`` enumerate ``open(2)`` flag combinations;
``renameat2`` reaches the flags Python's ``os.rename`` lacks (ctypes).

Caveats:
* A FIFO opened without ``O_RDWR`` would wait for a peer that never comes: the actor adds
  ``O_NONBLOCK`` when the name (followed unless ``O_NOFOLLOW``) is a FIFO on its own mount.
  That look-up is the same on both mounts when their states agree, which every step checks.
* ``rename_out``/``link_out`` aim at a directory beside the mount (``EXDEV``); should one
  succeed, the name has left the mount and the next comparison says so.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)

ACCESS = {"RDONLY": os.O_RDONLY, "WRONLY": os.O_WRONLY, "RDWR": os.O_RDWR}
OPEN_FLAGS = {"TRUNC": os.O_TRUNC, "CREAT": os.O_CREAT, "EXCL": os.O_EXCL,
              "APPEND": os.O_APPEND, "NOFOLLOW": os.O_NOFOLLOW, "DIRECTORY": os.O_DIRECTORY,
              "NONBLOCK": os.O_NONBLOCK}


def flag_names(flags: int) -> str:
    acc = next(k for k, v in ACCESS.items() if v == flags & os.O_ACCMODE)
    return "|".join([acc] + [k for k, v in OPEN_FLAGS.items() if flags & v])


def open_flag_sets(extra: tuple[str, ...] = ("TRUNC", "CREAT", "EXCL", "APPEND", "NOFOLLOW",
                                             "DIRECTORY")) -> Iterator[int]:
    """Every access mode with every subset of ``extra``."""
    for acc in ACCESS.values():
        for n in range(len(extra) + 1):
            for combo in itertools.combinations(extra, n):
                flags = acc
                for name in combo:
                    flags |= OPEN_FLAGS[name]
                yield flags


def renameat2(src: str | int, dst: str, flags: int, src_dir: int = _AT_FDCWD,
              dst_dir: int = _AT_FDCWD) -> None:
    """renameat2(2); ``src``/``dst`` relative to the directory descriptors if given."""
    res = _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst),
                          ctypes.c_uint(flags))
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        if self.name == "open":
            p, flags, mode, slot = self.args
            return f"open({p!r}, {flag_names(flags)}, {mode:o}) -> fd{slot}"
        return f"{self.name}{self.args!r}"


Outcome = tuple[int, Any]


def _call(fn: Any, *args: Any, **kw: Any) -> Outcome:
    try:
        return 0, fn(*args, **kw)
    except OSError as exc:
        return exc.errno or -1, None


def fstat_summary(fd: int) -> tuple[str, int, int]:
    st = os.fstat(fd)
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return stat.filemode(st.st_mode), size, st.st_nlink


class Actor:
    """Applies operations under ``root``; descriptors opened by ``open`` steps live in slots
    until a ``close`` step, a new ``open`` into the same slot, or ``close_all``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.outside = root.parent / f"{root.name}-outside"
        self.outside.mkdir(exist_ok=True)
        self.fds: dict[int, int] = {}

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _open(self, rel: str, flags: int, mode: int, slot: int) -> None:
        path = self.p(rel)
        if flags & os.O_ACCMODE != os.O_RDWR:
            try:
                st = os.stat(path, follow_symlinks=not flags & os.O_NOFOLLOW)
            except OSError:
                pass
            else:
                if stat.S_ISFIFO(st.st_mode):
                    flags |= os.O_NONBLOCK
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        old = self.fds.pop(slot, None)
        if old is not None:
            os.close(old)
        self.fds[slot] = fd

    def _fd(self, slot: int) -> int:
        fd = self.fds.get(slot)
        if fd is None:
            raise OSError(errno.EBADF, "slot is closed")
        return fd

    def _close(self, slot: int) -> None:
        os.close(self._fd(slot))
        del self.fds[slot]

    def apply(self, op: Op) -> Outcome:
        a, p = op.args, self.p
        fn = getattr(self, "_op_" + op.name, None)
        if fn is not None:
            return _call(fn, *a)
        if op.name == "open":
            return _call(self._open, *a)
        if op.name == "close":
            return _call(self._close, a[0])
        if op.name == "fdwrite":
            return _call(lambda: os.write(self._fd(a[0]), a[1]))
        if op.name == "fdpwrite":
            return _call(lambda: os.pwrite(self._fd(a[0]), a[2], a[1]))
        if op.name == "fdread":
            return _call(lambda: os.pread(self._fd(a[0]), 1 << 20, 0))
        if op.name == "fdtruncate":
            return _call(lambda: os.ftruncate(self._fd(a[0]), a[1]))
        if op.name == "fdstat":
            return _call(lambda: fstat_summary(self._fd(a[0])))
        if op.name == "truncate":
            return _call(os.truncate, p(a[0]), a[1])
        if op.name == "mkdir":
            return _call(os.mkdir, p(a[0]), a[1] if len(a) > 1 else 0o755)
        if op.name == "unlink":
            return _call(os.unlink, p(a[0]))
        if op.name == "rmdir":
            return _call(os.rmdir, p(a[0]))
        if op.name == "rename":
            return _call(renameat2, p(a[0]), p(a[1]), a[2] if len(a) > 2 else 0)
        if op.name == "link":
            return _call(os.link, p(a[0]), p(a[1]), follow_symlinks=False)
        if op.name == "symlink":
            return _call(os.symlink, a[0], p(a[1]))
        if op.name == "chmod":
            return _call(os.chmod, p(a[0]), a[1])
        if op.name == "chown":
            return _call(os.lchown, p(a[0]), a[1], a[2])
        if op.name == "utime":
            return _call(os.utime, p(a[0]), ns=(a[1], a[2]), follow_symlinks=False)
        if op.name == "setxattr":
            return _call(os.setxattr, p(a[0]), a[1], a[2], follow_symlinks=False)
        if op.name == "removexattr":
            return _call(os.removexattr, p(a[0]), a[1], follow_symlinks=False)
        if op.name == "mkfifo":
            return _call(os.mkfifo, p(a[0]), 0o644)
        if op.name == "rename_out":
            return _call(os.rename, p(a[0]), str(self.outside / "moved"))
        if op.name == "link_out":
            return _call(os.link, p(a[0]), str(self.outside / "linked"),
                         follow_symlinks=False)
        if op.name == "read":
            return _call(self._read, p(a[0]))
        raise ValueError(op.name)

    # whole-file conveniences: open, act, close (what a shell's redirections do)

    def _op_create(self, rel: str, data: bytes) -> int:
        fd = os.open(self.p(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    def _rw(self, rel: str, flags: int, data: bytes, offset: int | None = None) -> int:
        fd = os.open(self.p(rel), flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return os.pwrite(fd, data, offset) if offset is not None else os.write(fd, data)
        finally:
            os.close(fd)

    def _op_write(self, rel: str, offset: int, data: bytes) -> int:
        return self._rw(rel, os.O_WRONLY, data, offset)

    def _op_append(self, rel: str, data: bytes) -> int:
        return self._rw(rel, os.O_WRONLY | os.O_APPEND, data)

    def _op_overwrite(self, rel: str, data: bytes) -> int:
        return self._rw(rel, os.O_WRONLY | os.O_TRUNC, data)

    def _read(self, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
