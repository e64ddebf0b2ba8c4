"""UpperLayer: the writable container layer, a plain directory in overlayfs format.

It reads like a ``DirLayer`` (whiteouts in any of their forms, opaque directories) and it is the
only writer in the union.  Every new object that must appear complete is built in the work
directory (``work/work``, the name kernel overlayfs uses and empties at mount) — a temp file is
written, given its owner, mode, xattrs and times, fsynced — and renamed into the upper only
when complete, so a crash never leaves a half-copied file in the upper.  The upper stays
readable by kernel overlayfs and fuse-overlayfs, and the other way round.  Whiteouts and opaque
markers are made by ``whiteout`` (the only module that knows their encodings).

Every host call goes through the ``*at()`` calls on the descriptors of the upper and work
directories (``hostdir``), so paths of any length inside the mount work.

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
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from . import hostdir
from . import whiteout as wh
from .hostdir import HostDir, errno_error
from .layers import DirLayer, Entry, LowerLayer, restat, split

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

# off_t is 64 bits wide in fallocate64 whatever the platform (libcs without it have a 64-bit one)
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (Python has only ``posix_fallocate``)."""
    if _fallocate(fd, mode, offset, length) != 0:
        raise errno_error()


def set_open_attrs(fd: int, *, size: int | None = None, mode: int | None = None,
                   atime_ns: int | None = None, mtime_ns: int | None = None) -> None:
    """truncate/chmod/utimens through an open descriptor (a file no name reaches any more);
    None leaves that attribute."""
    if size is not None:
        os.ftruncate(fd, size)
    if mode is not None:
        os.fchmod(fd, mode)
    if atime_ns is not None or mtime_ns is not None:
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                         st.st_mtime_ns if mtime_ns is None else mtime_ns))


def fd_xattrs(fd: int) -> dict[str, bytes]:
    """The extended attributes of an open file, overlay-private ones excluded."""
    out: dict[str, bytes] = {}
    for name in os.listxattr(fd):
        if not wh.is_private_xattr(name):
            with contextlib.suppress(OSError):
                out[name] = os.getxattr(fd, name)
    return out


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
        os.makedirs(upper, exist_ok=True)
        super().__init__(upper)
        work_dir = os.path.join(os.path.abspath(work), "work")
        if os.path.isdir(work_dir):
            remove_tree(work_dir)  # leftovers of a crash: never part of the upper
        os.makedirs(work_dir, exist_ok=True)
        self.work = HostDir(work_dir)
        self._work_closer = weakref.finalize(self, self.work.close)
        self.is_root = os.geteuid() == 0
        self._tmp = itertools.count()

    def close(self) -> None:
        super().close()
        self._work_closer()

    def hardlinks(self, entry: Entry) -> list[str]:
        return [str(entry.ref)]  # upper hardlinks are real links: nothing to copy up

    def open_path(self, path: str, flags: int) -> int:
        """A descriptor of the upper file at ``path`` (never through a symlink)."""
        return self.dir.open(path, flags | os.O_NOFOLLOW)

    # -- writing ---------------------------------------------------------------------------------

    def _temp(self) -> str:
        return f"#{os.getpid()}-{next(self._tmp)}"

    def _apply(self, where: HostDir, path: str, attrs: Attrs, kind: int,
               fd: int | None = None) -> None:
        """Owner, then mode (chown clears setuid), then xattrs, then times, on ``path`` of
        ``where`` (``fd``: the object's open descriptor, when there is one)."""
        is_link = stat.S_ISLNK(kind)
        if self.is_root:
            if fd is not None:
                os.fchown(fd, attrs.uid, attrs.gid)
            else:
                where.chown(path, attrs.uid, attrs.gid)
        elif (attrs.uid, attrs.gid) != (os.geteuid(), os.getegid()) and not is_link:
            value = f"{attrs.uid}:{attrs.gid}:0{attrs.mode & 0o7777:o}".encode()
            with contextlib.suppress(OSError):
                where.setxattr(path, wh.OVERRIDE_STAT_XATTR, value)
        if fd is not None:
            os.fchmod(fd, attrs.mode & 0o7777)
        elif not is_link:
            where.chmod(path, attrs.mode & 0o7777)
        for name, value in (attrs.xattrs or {}).items():
            if wh.is_private_xattr(name):
                continue
            try:
                where.setxattr(path, name, value)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        if attrs.mtime_ns is not None:
            atime = attrs.atime_ns if attrs.atime_ns is not None else attrs.mtime_ns
            where.utime(path, (atime, attrs.mtime_ns))

    def _is_dir(self, where: HostDir, path: str) -> bool:
        try:
            return stat.S_ISDIR(where.lstat(path).st_mode)
        except FileNotFoundError:
            return False

    def _install(self, tmp: str, path: str, over: bool = False) -> None:
        """Move a finished object from the work dir to ``path``; ``over``: a whiteout of the
        name may be there and is replaced (exchanged away for a directory, as the kernel
        does, since rename cannot put a directory over a device node)."""
        try:
            if over and self.dir.exists(path):
                if self._is_dir(self.work, tmp):
                    hostdir.rename(self.work, tmp, self.dir, path, RENAME_EXCHANGE)
                    self._forget_aufs(path)
                    self._remove_work(tmp)
                else:
                    hostdir.rename(self.work, tmp, self.dir, path)
            else:
                hostdir.rename(self.work, tmp, self.dir, path, RENAME_NOREPLACE)
        except BaseException:
            self._remove_work(tmp)
            raise
        if over:
            self._drop_aufs_whiteout(path)

    def _remove_work(self, name: str) -> None:
        """Remove a file or tree of the work dir."""
        remove_tree(name, self.work.fd)

    def make_dir(self, path: str, attrs: Attrs, opaque: bool = False, over: bool = False) -> None:
        """A new directory at ``path`` (``over``: replacing a whiteout there).  A plain new
        directory is made in place, as the kernel does; one that must be opaque or replace a
        whiteout is built in the work dir so it appears complete."""
        self._forget_aufs(path)
        if not over and not opaque and not attrs.xattrs:
            self.dir.mkdir(path, 0o700)
            try:
                self._apply(self.dir, path, attrs, stat.S_IFDIR)
            except BaseException:
                self.remove(path)
                raise
            return
        tmp = self._temp()
        self.work.mkdir(tmp, 0o700)
        try:
            if opaque:
                wh.make_opaque(self.work.fd, tmp)
            self._apply(self.work, tmp, attrs, stat.S_IFDIR)
        except BaseException:
            self._remove_work(tmp)
            raise
        self._install(tmp, path, over)

    def create_file(self, path: str, attrs: Attrs) -> tuple[int, Entry]:
        """A new empty regular file at ``path`` (where nothing is, not even a whiteout), made
        in place as the kernel does and left open for reading and writing: its descriptor
        and its entry.  (The request that creates a file goes on to write it.)"""
        fd = self.dir.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        perm = attrs.mode & 0o7777
        try:
            st = os.fstat(fd)
            if not self.is_root:
                self._apply(self.dir, path, attrs, stat.S_IFREG, fd)
            else:
                if (st.st_uid, st.st_gid) != (attrs.uid, attrs.gid):
                    os.fchown(fd, attrs.uid, attrs.gid)
                if stat.S_IMODE(st.st_mode) != perm:
                    os.fchmod(fd, perm)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            self.dir.unlink(path)
            raise
        return fd, Entry(stat.S_IFREG | perm, attrs.uid, attrs.gid, st.st_size, st.st_mtime_ns,
                         0, st.st_nlink, "", 0, path, self._obj(st), st.st_atime_ns,
                         st.st_ctime_ns, st.st_blocks)

    def make_file(self, path: str, attrs: Attrs, src: tuple[LowerLayer, Entry] | None = None,
                  over: bool = False, size: int | None = None) -> None:
        """A regular file at ``path``: empty, or a copy of ``src``'s data (copy-up).  ``size``
        truncates the copy (copy-up for a truncate skips data it would drop).  A new empty
        file is created in place; a copy is built in the work dir, fsynced, then renamed, so a
        crash never leaves half of it in the upper."""
        if src is None and not over:
            fd = self.dir.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            try:
                self._apply(self.dir, path, attrs, stat.S_IFREG, fd)
            except BaseException:
                os.close(fd)
                self.dir.unlink(path)
                raise
            os.close(fd)
            return
        tmp = self._temp()
        fd = self.work.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            if src is not None and size != 0:
                src[0].copy_data(src[1], fd)
            if size is not None:
                os.ftruncate(fd, size)
            self._apply(self.work, tmp, attrs, stat.S_IFREG, fd)
            if src is not None:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._remove_work(tmp)
            raise
        os.close(fd)
        self._install(tmp, path, over)

    def make_special(self, path: str, attrs: Attrs, kind: int, rdev: int = 0, target: str = "",
                     over: bool = False) -> None:
        """A symlink, FIFO, socket or device node at ``path``."""
        tmp = self._temp()
        if stat.S_ISLNK(kind):
            self.work.symlink(target, tmp)
        else:
            self.work.mknod(tmp, kind | 0o600, rdev)
        try:
            self._apply(self.work, tmp, attrs, kind)
        except BaseException:
            self._remove_work(tmp)
            raise
        self._install(tmp, path, over)

    def link(self, existing: str, path: str, over: bool = False) -> None:
        if over:
            tmp = self._temp()
            hostdir.link(self.dir, existing, self.work, tmp)
            self._install(tmp, path, over=True)
        else:
            hostdir.link(self.dir, existing, self.dir, path)

    def _forget_aufs(self, path: str) -> None:
        """The ``.wh.NAME`` files at or below ``path`` may have changed."""
        prefix = path + "/"
        for key in [k for k in self._aufs if k == path or k.startswith(prefix) or not path]:
            del self._aufs[key]

    def _drop_aufs_whiteout(self, path: str) -> None:
        parent, name = split(path)
        if name not in self.aufs_whiteouts(parent):
            return
        self.dir.inside(parent, lambda fd: wh.drop_whiteout_file(fd, name))
        self._forget_aufs(parent)

    def whiteout(self, path: str) -> None:
        """Hide ``path`` of the lower layers; whatever the upper had there goes (atomically: the
        whiteout is built in the work dir and renamed over it)."""
        tmp = self._temp()
        try:
            wh.make_whiteout_device(self.work.fd, tmp)
        except PermissionError:
            self.remove(path)
            parent, name = split(path)
            self.dir.inside(parent, lambda fd: wh.make_whiteout(fd, name))
            self._forget_aufs(parent)
            return
        if self._is_dir(self.dir, path):
            hostdir.rename(self.work, tmp, self.dir, path, RENAME_EXCHANGE)
            self._forget_aufs(path)
            self._remove_work(tmp)
        else:
            hostdir.rename(self.work, tmp, self.dir, path)

    def remove(self, path: str) -> None:
        """Remove whatever the upper has at ``path`` (a directory recursively, with its
        whiteouts and markers), and an AUFS-style whiteout of it; idempotent."""
        if self._is_dir(self.dir, path):
            tmp = self._temp()
            hostdir.rename(self.dir, path, self.work, tmp)
            self._forget_aufs(path)
            self._remove_work(tmp)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.dir.unlink(path)
        self._drop_aufs_whiteout(path)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        hostdir.rename(self.dir, src, self.dir, dst, flags)
        for moved in (dst, src) if flags & RENAME_EXCHANGE else (dst,):
            if self._is_dir(self.dir, moved):
                self._forget_aufs(src)  # a directory moved: what its tree held moved too
                self._forget_aufs(dst)
                break
        if not flags & RENAME_EXCHANGE:
            self._drop_aufs_whiteout(dst)

    def set_opaque(self, path: str) -> None:
        self.dir.call(path, wh.make_opaque)

    def set_attrs(self, path: str, cur: Entry, *, mode: int | None = None,
                  uid: int | None = None, gid: int | None = None, size: int | None = None,
                  times: tuple[int | None, int | None] | None = None) -> Entry:
        """chmod/chown/truncate/utimens on the upper object at ``path`` whose entry is ``cur``
        (``times``: atime, mtime in ns; None keeps that one).  Returns its entry now."""
        kind = stat.S_IFMT(cur.mode)
        is_link = stat.S_ISLNK(kind)
        new_uid = cur.uid if uid is None else uid
        new_gid = cur.gid if gid is None else gid
        perm = stat.S_IMODE(cur.mode) if mode is None else mode & 0o7777
        foreign = (new_uid, new_gid) != (os.geteuid(), os.getegid())
        if uid is not None or gid is not None:
            if self.is_root:
                self.dir.chown(path, new_uid, new_gid)  # clears setuid/setgid as for the union
            else:
                self._apply(self.dir, path, Attrs(perm, new_uid, new_gid), kind)
        if mode is not None and not is_link:
            self.dir.chmod(path, perm)
            if not self.is_root and foreign:
                self._apply(self.dir, path, Attrs(perm, new_uid, new_gid), kind)
        if size is not None:
            self.dir.truncate(path, size)
        if times is not None:
            atime, mtime = times
            if atime is None or mtime is None:
                st = self.dir.lstat(path)
                atime = st.st_atime_ns if atime is None else atime
                mtime = st.st_mtime_ns if mtime is None else mtime
            self.dir.utime(path, (atime, mtime))
        st = self.dir.lstat(path)
        if self.is_root:
            return restat(cur._replace(uid=st.st_uid, gid=st.st_gid), st, mode=True)
        shown = kind | perm if foreign or mode is not None else st.st_mode
        return restat(cur._replace(uid=new_uid, gid=new_gid, mode=shown), st, mode=False)

    def times(self, path: str) -> tuple[int, int]:
        """(atime, mtime) of ``path`` in ns."""
        st = self.dir.lstat(path)
        return st.st_atime_ns, st.st_mtime_ns

    def set_times(self, path: str, times: tuple[int, int]) -> None:
        self.dir.utime(path, times)

    def getxattr(self, path: str, name: str) -> bytes:
        return self.dir.getxattr(path, name)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.dir.setxattr(path, name, value)

    def removexattr(self, path: str, name: str) -> None:
        self.dir.removexattr(path, name)


def remove_tree(path: str, dir_fd: int | None = None) -> None:
    """Remove a file or a directory tree (``path`` relative to ``dir_fd`` when given), making
    read-only directories writable on the way."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path, dir_fd=dir_fd)
        return
    if dir_fd is not None:
        # shutil.rmtree(dir_fd=) removes below an open directory without building long paths
        for _ in range(2):
            try:
                shutil.rmtree(path, dir_fd=dir_fd)
                return
            except PermissionError:
                _make_writable(path, dir_fd)
        shutil.rmtree(path, dir_fd=dir_fd)
        return

    def onerror(func: object, p: str, exc: object) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, onerror=onerror)
        else:
            os.unlink(p)

    shutil.rmtree(path, onerror=onerror)


def _make_writable(path: str, dir_fd: int) -> None:
    """chmod u+rwx every directory of the tree ``path`` (relative to ``dir_fd``) that is not."""
    os.chmod(path, 0o700, dir_fd=dir_fd)
    for _dirpath, dirs, _files, dfd in os.fwalk(path, dir_fd=dir_fd):
        for d in dirs:
            os.chmod(d, 0o700, dir_fd=dfd)
