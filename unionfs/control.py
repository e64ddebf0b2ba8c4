"""Controlling a mount from outside the process that serves it: checks, unmount, freeze.

These are the client halves of ``mount``: whether a path is a mount point, a clean (or lazy)
unmount through ``fusermount3``, and ``frozen`` (the client of the daemon's control socket that
holds every change while a commit reads the upper).  They need neither pyfuse3 nor trio, so the
image store may use them (DESIGN.md: ``imagestore`` uses the ``unionfs`` core only);
``unionfs.mount`` re-exports them.

Caveats:
* ``is_mounted`` reads ``/proc/self/mountinfo``: a mount made in another mount namespace is
  invisible.
* ``frozen`` holds changes only for as long as its socket is open: a client that dies thaws
  the mount, so a commit can never leave it frozen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator

from .errors import MountError


def check_mountpoint(path: str) -> str:
    full = os.path.abspath(path)
    if not os.path.isdir(full):
        raise MountError(f"mountpoint {path} is not a directory")
    if is_mounted(full):
        raise MountError(f"{path} is already a mount point")
    return full


def is_mounted(path: str) -> bool:
    full = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if _unescape(line.split()[4]) == full:
                return True
    return False


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a strata mount; ``lazy`` (or a dead daemon) detaches it even when busy."""
    full = os.path.abspath(mountpoint)
    dead = False
    try:
        os.statvfs(full)  # statfs always reaches the daemon; stat may be answered from cache
    except OSError as exc:
        dead = exc.errno == errno.ENOTCONN
    if not is_mounted(full):
        raise MountError(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        cmd = [tool, "-u"] + (["-z"] if lazy or dead else []) + [full]
    else:
        cmd = ["umount"] + (["-l"] if lazy or dead else []) + [full]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise MountError(f"unmount {mountpoint}: {msg}")


@contextlib.contextmanager
def frozen(mountpoint: str, control: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold every change to a mounted union while the block runs (``docker commit --pause``):
    flush the kernel's dirty pages to the daemon, then ask it to freeze."""
    import socket

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
