"""UpperLayer: the writable container layer, a plain directory in overlayfs format.

It reads like a ``DirLayer`` (whiteouts in any of their forms, opaque directories) and it is the
only writer in the union.  Every new object is built in the work directory (``work/work``, the
name kernel overlayfs uses and empties at mount) — a temp file is written, given its owner,
mode, xattrs and times, fsynced — and renamed into the upper only when complete, so a crash
never leaves a half-copied file in the upper.  The upper stays readable by kernel overlayfs and
fuse-overlayfs, and the other way round.

Ownership: as root, objects are chowned to their owner.  Without root, an owner strata cannot
set is recorded in ``user.containers.override_stat`` (``uid:gid:mode``, as containers/storage
and fuse-overlayfs write it) and read back from there.

Caveats:
* Paths are union paths; the caller (``union``) has checked that every parent is a directory
  in the upper, so no symlink is ever followed on the host side (O_NOFOLLOW where it matters).
* Not thread-safe on its own: ``union`` serialises writers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from . import whiteout as wh
from .layers import DirLayer, Entry, LowerLayer, split

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(src: str, dst: str, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT)."""
    if flags == 0:
        os.rename(src, dst)
        return
    res = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                          ctypes.c_uint(flags))
    if res != 0:
        raise _errno_error(src)


# off_t is 64 bits wide in fallocate64 whatever the platform (libcs without it have a 64-bit one)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (Python has only ``posix_fallocate``)."""
    if _fallocate(fd, mode, offset, length) != 0:
        raise _errno_error()


def _errno_error(*filename: str) -> OSError:
    """The OSError of the libc call that just failed."""
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e), *filename)


@dataclass(frozen=True)
class Attrs:
    """What a new upper object gets: owner, permission bits, times, xattrs."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int | None = None
    atime_ns: int | None = None
    xattrs: Mapping[str, bytes] | None = None


class UpperLayer(DirLayer):
    """The writable layer (index 0 of the union)."""

    def __init__(self, upper: str, work: str) -> None:
        super().__init__(upper)
        self.work = os.path.join(os.path.abspath(work), "work")
        self.is_root = os.geteuid() == 0
        self._tmp = itertools.count()
        os.makedirs(self.root, exist_ok=True)
        if os.path.isdir(self.work):
            shutil.rmtree(self.work)  # leftovers of a crash: never part of the upper
        os.makedirs(self.work, exist_ok=True)
        self.dev = os.lstat(self.root).st_dev

    def hardlinks(self, entry: Entry) -> list[str]:
        return [str(entry.ref)]  # upper hardlinks are real links: nothing to copy up

    # -- writing ---------------------------------------------------------------------------------

    def _temp(self) -> str:
        return os.path.join(self.work, f"#{os.getpid()}-{next(self._tmp)}")

    def _apply(self, full: str, attrs: Attrs, kind: int, fd: int | None = None) -> None:
        """Owner, then mode (chown clears setuid), then xattrs, then times."""
        is_link = stat.S_ISLNK(kind)
        if self.is_root:
            if fd is not None:
                os.fchown(fd, attrs.uid, attrs.gid)
            else:
                os.lchown(full, attrs.uid, attrs.gid)
        elif (attrs.uid, attrs.gid) != (os.geteuid(), os.getegid()) and not is_link:
            value = f"{attrs.uid}:{attrs.gid}:0{attrs.mode & 0o7777:o}".encode()
            with contextlib.suppress(OSError):
                os.setxattr(full, wh.OVERRIDE_STAT_XATTR, value, follow_symlinks=False)
        if not is_link and fd is None:
            os.chmod(full, attrs.mode & 0o7777)
        elif fd is not None:
            os.fchmod(fd, attrs.mode & 0o7777)
        for name, value in (attrs.xattrs or {}).items():
            if wh.is_private_xattr(name):
                continue
            try:
                os.setxattr(full, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        if attrs.mtime_ns is not None:
            atime = attrs.atime_ns if attrs.atime_ns is not None else attrs.mtime_ns
            os.utime(full, ns=(atime, attrs.mtime_ns), follow_symlinks=False)

    def _install(self, tmp: str, path: str, over: bool = False) -> None:
        """Move a finished object from the work dir to ``path``; ``over``: a whiteout of the
        name may be there and is replaced (exchanged away for a directory, as the kernel
        does, since rename cannot put a directory over a device node)."""
        full = self.abs(path)
        try:
            if over and os.path.lexists(full):
                if os.path.isdir(tmp) and not os.path.islink(tmp):
                    renameat2(tmp, full, RENAME_EXCHANGE)
                    self._forget_aufs(path)
                    remove_tree(tmp)
                else:
                    os.rename(tmp, full)
            else:
                renameat2(tmp, full, RENAME_NOREPLACE)
        except BaseException:
            remove_tree(tmp)
            raise
        if over:
            self._drop_aufs_whiteout(path)

    def make_dir(self, path: str, attrs: Attrs, opaque: bool = False, over: bool = False) -> None:
        """A new directory at ``path`` (``over``: replacing a whiteout there).  A plain new
        directory is made in place, as the kernel does; one that must be opaque or replace a
        whiteout is built in the work dir so it appears complete."""
        self._forget_aufs(path)
        if not over and not opaque and not attrs.xattrs:
            full = self.abs(path)
            os.mkdir(full, 0o700)
            try:
                self._apply(full, attrs, stat.S_IFDIR)
            except BaseException:
                remove_tree(full)
                raise
            return
        tmp = self._temp()
        os.mkdir(tmp, 0o700)
        try:
            if opaque:
                wh.make_opaque(tmp)
            self._apply(tmp, attrs, stat.S_IFDIR)
        except BaseException:
            remove_tree(tmp)
            raise
        self._install(tmp, path, over)

    def make_file(self, path: str, attrs: Attrs, src: tuple[LowerLayer, Entry] | None = None,
                  over: bool = False, size: int | None = None) -> None:
        """A regular file at ``path``: empty, or a copy of ``src``'s data (copy-up).  ``size``
        truncates the copy (copy-up for a truncate skips data it would drop).  A new empty
        file is created in place; a copy is built in the work dir, fsynced, then renamed, so a
        crash never leaves half of it in the upper."""
        if src is None and not over:
            full = self.abs(path)
            fd = os.open(full, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                self._apply(full, attrs, stat.S_IFREG, fd)
            except BaseException:
                os.close(fd)
                os.unlink(full)
                raise
            os.close(fd)
            return
        tmp = self._temp()
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            if src is not None and size != 0:
                src[0].copy_data(src[1], fd)
            if size is not None:
                os.ftruncate(fd, size)
            self._apply(tmp, attrs, stat.S_IFREG, fd)
            if src is not None:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            remove_tree(tmp)
            raise
        os.close(fd)
        self._install(tmp, path, over)

    def make_special(self, path: str, attrs: Attrs, kind: int, rdev: int = 0, target: str = "",
                     over: bool = False) -> None:
        """A symlink, FIFO, socket or device node at ``path``."""
        tmp = self._temp()
        if stat.S_ISLNK(kind):
            os.symlink(target, tmp)
        else:
            os.mknod(tmp, kind | 0o600, rdev)
        try:
            self._apply(tmp, attrs, kind)
        except BaseException:
            remove_tree(tmp)
            raise
        self._install(tmp, path, over)

    def link(self, existing: str, path: str, over: bool = False) -> None:
        if over:
            tmp = self._temp()
            os.link(self.abs(existing), tmp)
            self._install(tmp, path, over=True)
        else:
            os.link(self.abs(existing), self.abs(path))

    def _forget_aufs(self, path: str) -> None:
        """The ``.wh.NAME`` files at or below ``path`` may have changed."""
        prefix = path + "/"
        for key in [k for k in self._aufs if k == path or k.startswith(prefix) or not path]:
            del self._aufs[key]

    def _drop_aufs_whiteout(self, path: str) -> None:
        parent, name = split(path)
        if name not in self.aufs_whiteouts(parent):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.abs(parent), wh.WH_PREFIX + name))
        self._forget_aufs(parent)

    def whiteout(self, path: str) -> None:
        """Hide ``path`` of the lower layers; whatever the upper had there goes (atomically: the
        whiteout is built in the work dir and renamed over it)."""
        tmp = self._temp()
        try:
            os.mknod(tmp, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        except PermissionError:
            self.remove(path)
            parent, name = split(path)
            fd = os.open(self.abs(parent), os.O_RDONLY | os.O_DIRECTORY)
            try:
                wh.make_whiteout(fd, name)
            finally:
                os.close(fd)
            self._forget_aufs(parent)
            return
        full = self.abs(path)
        if os.path.isdir(full) and not os.path.islink(full):
            renameat2(tmp, full, RENAME_EXCHANGE)
            self._forget_aufs(path)
            remove_tree(tmp)
        else:
            os.rename(tmp, full)

    def remove(self, path: str) -> None:
        """Remove whatever the upper has at ``path`` (a directory recursively, with its
        whiteouts and markers), and an AUFS-style whiteout of it; idempotent."""
        full = self.abs(path)
        if os.path.isdir(full) and not os.path.islink(full):
            tmp = self._temp()
            os.rename(full, tmp)
            self._forget_aufs(path)
            remove_tree(tmp)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
        self._drop_aufs_whiteout(path)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        renameat2(self.abs(src), self.abs(dst), flags)
        for moved in (dst, src) if flags & RENAME_EXCHANGE else (dst,):
            full = self.abs(moved)
            if os.path.isdir(full) and not os.path.islink(full):
                self._forget_aufs(src)  # a directory moved: what its tree held moved too
                self._forget_aufs(dst)
                break
        if not flags & RENAME_EXCHANGE:
            self._drop_aufs_whiteout(dst)

    def set_opaque(self, path: str) -> None:
        wh.make_opaque(self.abs(path))

    def set_attrs(self, path: str, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, size: int | None = None,
                  times: tuple[int | None, int | None] | None = None) -> None:
        """chmod/chown/truncate/utimens on an upper object (``times``: atime, mtime in ns;
        None keeps that one)."""
        full = self.abs(path)
        st = os.lstat(full)
        is_link = stat.S_ISLNK(st.st_mode)
        if uid is not None or gid is not None:
            cur = self.entry(path)
            assert cur is not None
            new_uid = cur.uid if uid is None else uid
            new_gid = cur.gid if gid is None else gid
            perm = stat.S_IMODE(cur.mode)
            if self.is_root:
                os.lchown(full, new_uid, new_gid)  # clears setuid/setgid as for the union
            else:
                self._apply(full, Attrs(perm if mode is None else mode, new_uid, new_gid),
                            stat.S_IFMT(st.st_mode))
        if mode is not None and not is_link:
            os.chmod(full, mode & 0o7777)
            if not self.is_root:
                cur = self.entry(path)
                assert cur is not None
                if (cur.uid, cur.gid) != (os.geteuid(), os.getegid()):
                    self._apply(full, Attrs(mode, cur.uid, cur.gid), stat.S_IFMT(st.st_mode))
        if size is not None:
            os.truncate(full, size)
        if times is not None:
            st = os.lstat(full)
            atime = st.st_atime_ns if times[0] is None else times[0]
            mtime = st.st_mtime_ns if times[1] is None else times[1]
            os.utime(full, ns=(atime, mtime), follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self.abs(path), name, value, follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self.abs(path), name, follow_symlinks=False)


def remove_tree(path: str) -> None:
    """Remove a file or a directory tree, making read-only directories writable on the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return

    def onerror(func: object, p: str, exc: object) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, onerror=onerror)
        else:
            os.unlink(p)

    shutil.rmtree(path, onerror=onerror)
