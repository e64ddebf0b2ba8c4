"""Mount lifecycle: init, serve under one nursery, signals, readiness, clean unmount.

``serve`` mounts a ``Union`` at a mountpoint and serves it until the file system is unmounted
(``fusermount3 -u``, ``umount``) or the process gets SIGTERM/SIGINT/SIGHUP, which unmount
cleanly.  ``on_ready`` is called once the mount answers a request (a ``stat`` of the mountpoint
from a worker thread), so a parent process can return only when the mount is usable.

The other side (``check_mountpoint``, ``is_mounted``, ``unmount``, the ``frozen`` client of the
control socket) lives in ``control``, which needs no pyfuse3; it is re-exported here.

Caveats:
* Mount options: ``default_permissions`` always (the kernel checks modes against the image's
  owners), ``nosuid``/``nodev`` unless asked for, ``ro`` for image mounts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .control import check_mountpoint, frozen, is_mounted, short_address, unmount
from .errors import MountError

if TYPE_CHECKING:  # pyfuse3 and trio load only in the process that serves (start-up time)
    import trio

    from .fuse_ops import Operations
    from .union import Union

log = logging.getLogger(__name__)

__all__ = ["MountError", "MountOptions", "check_mountpoint", "frozen", "is_mounted", "serve",
           "unmount"]


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


def serve(union: Union, mountpoint: str, options: MountOptions,
          on_ready: Callable[[], None] | None = None, control: str | None = None,
          lifeline: int | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns the number of handler errors.
    ``control``: a Unix socket path where ``freeze`` requests are answered (see ``frozen``).
    ``lifeline``: the read end of a pipe whose write end only the parent process holds; when
    it closes (the parent exited, even by SIGKILL) the mount ends as on SIGTERM."""
    import pyfuse3
    import trio

    from .fuse_ops import Operations

    if options.allow_other and os.geteuid() != 0 and not user_allow_other():
        raise MountError("-o allow_other needs 'user_allow_other' in /etc/fuse.conf for users "
                         "other than root")
    ops = Operations(union, timeout=options.timeout)
    try:
        pyfuse3.init(ops, mountpoint, options.fuse_options())
    except RuntimeError as exc:
        raise MountError(f"cannot mount {mountpoint}: {exc}") from None
    try:
        trio.run(_run, ops, mountpoint, on_ready, control, lifeline)
    finally:
        ops.close_all()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        if control is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
    return ops.errors


def user_allow_other(conf: str = "/etc/fuse.conf") -> bool:
    """Whether fusermount3 lets users other than root mount with ``allow_other``."""
    try:
        with open(conf) as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


async def _control(ops: Operations, path: str) -> None:
    """One request: ``freeze``.  Changes are held from the ``frozen`` answer until the client
    closes the connection (or dies), so a commit can never leave the mount frozen."""
    import trio

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with short_address(path) as short:
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


async def _watch(fd: int) -> None:
    """Return when the write end of the pipe ``fd`` is closed everywhere."""
    import trio

    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 64):
            return


async def _run(ops: Operations, mountpoint: str, on_ready: Callable[[], None] | None,
               control: str | None, lifeline: int | None = None) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        if control is not None:
            nursery.start_soon(_control, ops, control)
        if lifeline is not None:

            async def orphaned() -> None:
                await _watch(lifeline)
                log.info("the parent process is gone: unmounting")
                pyfuse3.terminate()

            nursery.start_soon(orphaned)

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
        # abandoned if the mount ends first (a signal, the parent gone): the stat would wait
        # forever for an answer nobody is left to give, and the daemon with it
        # Nothing on this thread may touch the mount: a request another process sends the
        # moment the mount appears waits for this very thread (the stat that tells the
        # mount answers runs in a worker, and its result names the device for read-ahead)
        st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        _readahead(st.st_dev, READAHEAD_KB)
        log.info("mounted %s", mountpoint)
        if on_ready is not None:
            on_ready()


READAHEAD_KB = 1024


def _readahead(dev: int, kb: int) -> None:
    """Let the kernel read ahead ``kb`` KiB at a time (its default for FUSE is 128) on the
    mount of device ``dev``: sequential reads then come in 1 MiB requests, an eighth of the
    round trips.  Root only; best effort."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("read-ahead left at the default: %s", exc)
