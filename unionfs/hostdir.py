"""HostDir: a directory tree on the host reached through one open descriptor of its root.

Every call takes a union path (relative POSIX, ``""`` for the root) and goes through the
``*at()`` system calls relative to the root's descriptor, so the host path of the root never
counts against PATH_MAX: a path of 4095 bytes inside the mount works as on kernel overlayfs,
however deep the layer directory itself lives (architecture.md, decision 11).  A path too long for
one call (``WALK_FROM`` bytes and more) is reached by opening its parent directories one
component at a time (``O_PATH | O_NOFOLLOW``, never through a symlink), so trees deeper than
PATH_MAX work too.
Extended attributes go through ``/proc/self/fd/N/NAME`` (Linux has no ``*xattrat`` before
6.13), which is short for the same reason.

Caveats:
* Below the root no symlink is followed in the last component; intermediate components are
  followed by the kernel within one call.  Callers only name paths whose parents they have
  seen as directories of this tree (the union resolves top-down), and a tree does not change
  behind the mount's back (overlayfs's rule for its layers), so none is a symlink.
* Thread-safe: the root descriptor is never closed while the layer is open, and a walk's
  descriptors belong to the call that opened them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# A relative path this long or longer is reached by walking to its parent first: the string
# handed to one call (``/proc/self/fd/NNN/`` included) must stay below PATH_MAX (4096).
WALK_FROM = 4000
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint)
_renameat2.restype = ctypes.c_int


def errno_error(*filename: str) -> OSError:
    """The OSError of the libc call that just failed."""
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e), *filename)


def renameat2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int = 0) -> None:
    """rename(2) between two directory descriptors with flags (RENAME_NOREPLACE,
    RENAME_EXCHANGE, RENAME_WHITEOUT)."""
    if flags == 0:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    if _renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags) != 0:
        raise errno_error(src)


class HostDir:
    """The directory ``root`` (which must exist), held open for ``*at()`` calls."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.fd = os.open(self.root, _DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reaching a path ----------------------------------------------------------------------

    def call(self, path: str, fn: Callable[[int, str], T]) -> T:
        """``fn(dir_fd, name)`` for ``path``: the root's descriptor and the path itself, or
        for a path too long for one call, its parent's descriptor (opened for this call)
        and its last component.  The root is ``"."``."""
        if len(path) < WALK_FROM:
            return fn(self.fd, path or ".")
        parent, _, name = path.rpartition("/")
        fd = self._walk(parent)
        try:
            return fn(fd, name)
        finally:
            os.close(fd)

    def _walk(self, path: str) -> int:
        """An O_PATH descriptor of the directory ``path``, opened one component at a time
        without following a symlink (only paths past WALK_FROM bytes come here)."""
        fd = os.dup(self.fd)
        try:
            for step in path.split("/"):
                nfd = os.open(step, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def proc(self, path: str, fn: Callable[[str], T]) -> T:
        """``fn(proc_path)`` where ``proc_path`` names ``path`` through /proc/self/fd (for the
        calls that have no ``*at()`` form: the xattr family)."""
        return self.call(path, lambda fd, name: fn(f"/proc/self/fd/{fd}/{name}"))

    # -- the calls ----------------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        return self.call(path, lambda fd, n: os.stat(n, dir_fd=fd, follow_symlinks=False))

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        """open(2) of ``path`` (add O_NOFOLLOW to refuse a symlink)."""
        return self.call(path, lambda fd, n: os.open(n, flags | os.O_CLOEXEC, mode, dir_fd=fd))

    def opendir(self, path: str) -> int:
        """A descriptor to list the directory ``path`` (``os.scandir`` takes it)."""
        return self.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    def inside(self, directory: str, fn: Callable[[int], T]) -> T:
        """``fn(dir_fd)`` with a descriptor of the directory ``directory`` (for the calls that
        take a directory and a name of their own)."""
        fd = self.call(directory, lambda dfd, n: os.open(n, _DIR_FLAGS, dir_fd=dfd))
        try:
            return fn(fd)
        finally:
            os.close(fd)

    def readlink(self, path: str) -> str:
        return self.call(path, lambda fd, n: os.readlink(n, dir_fd=fd))

    def listxattr(self, path: str) -> list[str]:
        return self.proc(path, lambda p: os.listxattr(p, follow_symlinks=False))

    def getxattr(self, path: str, name: str) -> bytes:
        return self.proc(path, lambda p: os.getxattr(p, name, follow_symlinks=False))

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self.proc(path, lambda p: os.setxattr(p, name, value, flags, follow_symlinks=False))

    def removexattr(self, path: str, name: str) -> None:
        self.proc(path, lambda p: os.removexattr(p, name, follow_symlinks=False))

    def mkdir(self, path: str, mode: int) -> None:
        self.call(path, lambda fd, n: os.mkdir(n, mode, dir_fd=fd))

    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        self.call(path, lambda fd, n: os.mknod(n, mode, rdev, dir_fd=fd))

    def symlink(self, target: str, path: str) -> None:
        self.call(path, lambda fd, n: os.symlink(target, n, dir_fd=fd))

    def unlink(self, path: str) -> None:
        self.call(path, lambda fd, n: os.unlink(n, dir_fd=fd))

    def rmdir(self, path: str) -> None:
        self.call(path, lambda fd, n: os.rmdir(n, dir_fd=fd))

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.call(path, lambda fd, n: os.chown(n, uid, gid, dir_fd=fd, follow_symlinks=False))

    def chmod(self, path: str, mode: int) -> None:
        """chmod of a non-symlink (Linux cannot chmod a symlink)."""
        self.call(path, lambda fd, n: os.chmod(n, mode, dir_fd=fd))

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        self.call(path, lambda fd, n: os.utime(n, ns=ns, dir_fd=fd, follow_symlinks=False))

    def truncate(self, path: str, size: int) -> None:
        fd = self.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except FileNotFoundError:
            return False
        return True


def between(src: HostDir, src_path: str, dst: HostDir, dst_path: str,
            fn: Callable[[int, str, int, str], T]) -> T:
    """``fn(src_fd, src_name, dst_fd, dst_name)`` for two paths (of one tree or two): for
    rename and link."""
    return src.call(src_path, lambda sfd, sn: dst.call(dst_path, lambda dfd, dn: fn(sfd, sn,
                                                                                     dfd, dn)))


def rename(src: HostDir, src_path: str, dst: HostDir, dst_path: str, flags: int = 0) -> None:
    between(src, src_path, dst, dst_path,
            lambda sfd, sn, dfd, dn: renameat2(sfd, sn, dfd, dn, flags))


def link(src: HostDir, src_path: str, dst: HostDir, dst_path: str) -> None:
    between(src, src_path, dst, dst_path,
            lambda sfd, sn, dfd, dn: os.link(sn, dn, src_dir_fd=sfd, dst_dir_fd=dfd,
                                             follow_symlinks=False))
