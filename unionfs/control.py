"""Controlling a mount from outside the process that serves it: checks, unmount, freeze.

These are the client halves of ``mount``: whether a path is a mount point (and of what type),
a clean (or lazy) unmount — umount2(2) as root, ``fusermount3`` otherwise; FUSE or the kernel
engine's overlayfs alike — and ``frozen`` (the client of the daemon's control socket that
holds every change while a commit reads the upper).  They need neither pyfuse3 nor trio, so the
image store may use them (``imagestore`` uses the ``unionfs`` core only, and starts the daemon
``unionfs.mount`` only as a process; docs/architecture.md).

Caveats:
* ``is_mounted`` reads ``/proc/self/mountinfo``: it tells what is true in this mount
  namespace.  A mount another namespace still holds after an unmount here (an ``unshare -m``
  made while it was mounted) is found by ``holders``, which reads every process's
  ``mountinfo``.
* ``frozen`` holds changes only for as long as its socket is open: a client that dies thaws
  the mount, so a commit can never leave it frozen.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from . import overlay
from .errors import MountError


def check_mountpoint(path: str) -> str:
    full = os.path.abspath(path)
    if not os.path.isdir(full):
        raise MountError(f"mountpoint {path} is not a directory")
    if is_mounted(full):
        raise MountError(f"{path} is already a mount point")
    return full


def _mounts(mountinfo: str) -> Iterator[tuple[str, str]]:
    """(device ``major:minor``, mountpoint) of every mount a ``mountinfo`` file lists."""
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                yield fields[2], _unescape(fields[4])


def is_mounted(path: str, dev: str | None = None) -> bool:
    """Is ``path`` a mount point in this mount namespace (of device ``dev`` when given: the
    ``major:minor`` of one particular mount)?"""
    full = os.path.realpath(path)
    return any(mp == full and (dev is None or d == dev)
               for d, mp in _mounts("/proc/self/mountinfo"))


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def holders(dev: str) -> list[int]:
    """Processes of *other* mount namespaces that still hold a mount of device ``dev`` (one
    pid per namespace): after an unmount here, what keeps a FUSE file system — and its
    daemon — alive.  Processes we may not inspect are skipped."""
    own = _namespace("self")
    seen = {own}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ns = _namespace(name)
        if ns is None or ns in seen:
            continue
        seen.add(ns)
        try:
            if any(d == dev for d, _ in _mounts(f"/proc/{name}/mountinfo")):
                found.append(int(name))
        except OSError:
            continue
    return found


def _namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def fstype(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file system type of the top mount at ``path`` in this mount namespace (``fuse``,
    ``overlay``, ...), or None when nothing is mounted there."""
    full = os.path.realpath(path)
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == full and " - " in line:
                found = line.split(" - ", 1)[1].split()[0]
    return found


def unmount(mountpoint: str, lazy: bool = False, dead: bool = False) -> None:
    """Unmount a strata mount, FUSE or kernel overlayfs; ``lazy`` (or a dead daemon: a FUSE
    mount answering ENOTCONN, or ``dead`` when the caller knows) detaches it even when busy.
    Root calls umount2(2) itself (no fusermount3 process); other users go through
    fusermount3.  Raises ``MountError`` (busy, not mounted, not permitted)."""
    full = os.path.abspath(mountpoint)
    kind = fstype(full)
    if kind is None:
        raise MountError(f"{mountpoint} is not mounted")
    if kind != "overlay":
        try:
            os.statvfs(full)  # statfs always reaches the daemon; stat may be answered from cache
        except OSError as exc:
            dead = dead or exc.errno == errno.ENOTCONN
    detach = lazy or dead
    if os.geteuid() == 0 or kind == "overlay":
        try:
            overlay.umount(full, detach)
            return
        except OSError as exc:
            if kind == "overlay" or exc.errno != errno.EPERM:  # EPERM: a user's FUSE mount
                raise MountError(f"unmount {mountpoint}: {exc.strerror}") from None
    import shutil  # users' unmounts only: root's need no helper, nor these imports
    import subprocess

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        cmd = [tool, "-u"] + (["-z"] if detach else []) + [full]
    else:
        cmd = ["umount"] + (["-l"] if detach else []) + [full]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise MountError(f"unmount {mountpoint}: {msg}")


@contextlib.contextmanager
def frozen(mountpoint: str, control: str, timeout: float = 60.0,
           sync: bool = True) -> Iterator[None]:
    """Hold every change to a mounted union while the block runs (``docker commit --pause``):
    flush the kernel's dirty pages to the daemon (``sync``: the mount is in this namespace),
    then ask it to freeze."""
    import socket

    if sync:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _libc_syncfs(fd)
        finally:
            os.close(fd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with short_address(control) as short:
                s.connect(short)
            s.sendall(b"freeze\n")
            answer = s.recv(64)
        except OSError as exc:
            raise MountError(f"cannot pause the mount at {mountpoint}: {exc}") from None
        if answer.strip() != b"frozen":
            raise MountError(f"the mount at {mountpoint} did not pause")
        yield


def _libc_syncfs(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextlib.contextmanager
def short_address(path: str) -> Iterator[str]:
    """A Unix socket address for ``path`` that fits the 108-byte limit, however deep the store
    is: the socket's directory through ``/proc/self/fd``."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)
