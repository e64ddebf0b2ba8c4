"""Mount lifecycle: init, serve under one nursery, signals, readiness, clean unmount.

``serve`` mounts a ``Union`` at a mountpoint and serves it until the file system is unmounted
(``fusermount3 -u``, ``umount``) or the process gets SIGTERM/SIGINT/SIGHUP, which unmount
cleanly.  ``on_ready`` is called once the mount answers a request (a ``stat`` of the mountpoint
from a worker thread), so a parent process can return only when the mount is usable.

``unmount`` is the other side: a clean unmount, and the lazy unmount that clears a mount whose
daemon died (ENOTCONN).

Caveats:
* Mount options: ``default_permissions`` always (the kernel checks modes against the image's
  owners), ``nosuid``/``nodev`` unless asked for, ``ro`` for image mounts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import MountError

if TYPE_CHECKING:  # pyfuse3 and trio load only in the process that serves (start-up time)
    import trio

    from .fuse_ops import Operations
    from .mutate import Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountOptions:
    allow_other: bool = False
    read_only: bool = False
    suid: bool = False
    dev: bool = False
    debug: bool = False
    fsname: str = "strata"
    timeout: float = 86400.0

    def fuse_options(self) -> set[str]:
        opts = {f"fsname={self.fsname}", "subtype=strata", "default_permissions"}
        opts.add("suid" if self.suid else "nosuid")
        opts.add("dev" if self.dev else "nodev")
        if self.allow_other:
            opts.add("allow_other")
        if self.read_only:
            opts.add("ro")
        if self.debug:
            opts.add("debug")
        return opts


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


def serve(union: Union, mountpoint: str, options: MountOptions,
          on_ready: Callable[[], None] | None = None, control: str | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns the number of handler errors.
    ``control``: a Unix socket path where ``freeze`` requests are answered (see ``frozen``)."""
    import pyfuse3
    import trio

    from .fuse_ops import Operations

    ops = Operations(union, timeout=options.timeout)
    try:
        pyfuse3.init(ops, mountpoint, options.fuse_options())
    except RuntimeError as exc:
        raise MountError(f"cannot mount {mountpoint}: {exc}") from None
    try:
        trio.run(_run, ops, mountpoint, on_ready, control)
    finally:
        ops.close_all()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        if control is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
    return ops.errors


async def _control(ops: Operations, path: str) -> None:
    """One request: ``freeze``.  Changes are held from the ``frozen`` answer until the client
    closes the connection (or dies), so a commit can never leave the mount frozen."""
    import trio

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with _short(path) as short:
        await sock.bind(short)
    os.chmod(path, 0o600)
    sock.listen(4)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if (await stream.receive_some(64)).strip() != b"freeze":
                return
            await ops.freeze()
            try:
                await stream.send_all(b"frozen\n")
                while await stream.receive_some(64):
                    pass
            except trio.BrokenResourceError:
                pass
            finally:
                ops.thaw()

    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


async def _run(ops: Operations, mountpoint: str, on_ready: Callable[[], None] | None,
               control: str | None) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        if control is not None:
            nursery.start_soon(_control, ops, control)

        async def main() -> None:
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(main)
        nursery.start_soon(signals)
        await trio.to_thread.run_sync(os.stat, mountpoint)
        log.info("mounted %s", mountpoint)
        if on_ready is not None:
            on_ready()


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
            with _short(control) as short:
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
def _short(path: str) -> Iterator[str]:
    """A Unix socket address for ``path`` that fits the 108-byte limit, however deep the store
    is: the socket's directory through ``/proc/self/fd``."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)
