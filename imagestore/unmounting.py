"""Taking mounts down: ``strata umount``, ``rm -f`` and ``check --repair`` of a dead mount.

Both engines go the same way: unmount here (umount2(2) as root, ``fusermount3`` otherwise;
``unionfs.control.unmount``), then wait for the daemon, which ends once its FUSE session does —
at the unmount for the FUSE engine, when the overlay has gone everywhere for the kernel
engine, whose FUSE mount is held by the overlay alone (``unionfs.overlay``).  A mount another
mount namespace still holds is served on there until asked again (``stop``).  A daemon that
died leaves a mount answering ``ENOTCONN`` (for the kernel engine: everything of the image
under the overlay) and a record whose pid is gone: it is detached and the record dropped; a
container's FUSE lower left mounted by a daemon killed while it started is detached too.

This module imports only the records (``mounts``) and ``unionfs.control``: ``strata umount``
loads it without the rest of the store (its start-up is most of its time).

Caveats:
* Waiting for a daemon uses its pidfd; without one (Linux before 5.3) it polls ``/proc``
  every 10 ms.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Sequence

from unionfs.control import holders, is_mounted
from unionfs.control import unmount as _unmount
from unionfs.errors import MountError

from .errors import MountFailed
from .mounts import MountRecord, Mounts, process_alive

EXIT_TIMEOUT = 10.0
SETTLE = 0.5  # a daemon whose mount nobody else holds ends well within this after an unmount


def unmount(root: str, mountpoint: str, lazy: bool = False) -> None:
    """``strata umount``: unmount here and wait for the daemon (a dead daemon's mount,
    ``ENOTCONN``, is detached and its record dropped).  A mount another mount namespace
    still holds stays served there; asked again for such a mount (no longer here), the daemon
    is stopped.  Raises ``MountFailed`` (busy, not mounted)."""
    mounts = Mounts(root)
    full = os.path.abspath(mountpoint)
    rec = mounts.record_for(full)
    if is_mounted(full):
        dead = None
        if rec is None:  # no live daemon: the record of a dead one tells the engine
            dead = mounts.recorded(full)
        try:
            _unmount(full, lazy=lazy, dead=dead is not None)
        except MountError as exc:
            raise MountFailed(str(exc)) from None
        if rec is None:
            mounts.unrecord(full)
            if dead is not None and dead.kind == "container":
                mounts.clear_lower(os.path.join(root, "containers", dead.target))
        else:
            _settle(mounts, rec, stop=False)
        return
    if rec is not None and rec.elsewhere:
        _terminate(rec)
        return
    raise MountFailed(f"{mountpoint} is not mounted")


def release(root: str, rec: MountRecord) -> None:
    """End the mount of ``rec`` everywhere (``rm -f``): unmount here, and stop its daemon if
    another mount namespace holds it, so the container's lock is free afterwards.  Raises
    ``MountFailed`` when the mount is busy."""
    if not rec.elsewhere and is_mounted(rec.mountpoint, rec.dev or None):
        try:
            _unmount(rec.mountpoint)
        except MountError as exc:
            if is_mounted(rec.mountpoint):
                raise MountFailed(str(exc)) from None
    _settle(Mounts(root), rec, stop=True)


def _settle(mounts: Mounts, rec: MountRecord, stop: bool) -> None:
    """After an unmount here: wait for the daemon to end, unless another mount namespace
    holds the mount (then it serves on, or with ``stop`` is stopped).  Other namespaces are
    looked for only when the daemon does not end at once (reading every process's
    ``mountinfo`` costs more than the usual wait)."""
    wait_gone(rec.pid, SETTLE)
    if not process_alive(rec.pid):
        return
    if rec.dev and holders(rec.dev):
        if stop:
            _terminate(rec)
        return
    wait_gone(rec.pid, EXIT_TIMEOUT)


def _terminate(rec: MountRecord) -> None:
    """Stop the daemon of ``rec`` (its mount lives only in another mount namespace, which
    then sees ENOTCONN) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    wait_gone(rec.pid, EXIT_TIMEOUT)
    if process_alive(rec.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
        wait_gone(rec.pid, EXIT_TIMEOUT)


def wait_gone(pid: int, timeout: float = EXIT_TIMEOUT) -> None:
    """Wait (up to ``timeout`` s) until the daemon ``pid`` has exited (not our child, or not
    reaped by us: ``process_alive``): woken by its pidfd (Linux 5.3) the moment it exits, else
    polling ``/proc`` every 10 ms."""
    deadline = time.monotonic() + timeout
    try:
        fd: int | None = os.pidfd_open(pid)
    except OSError:
        fd = None
    try:
        while process_alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if fd is not None and not _exited(fd, min(left, 0.1)):
                continue
            time.sleep(min(0.01, left))  # no pidfd, or it said so before /proc does
    finally:
        if fd is not None:
            os.close(fd)


def _exited(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


__all__: Sequence[str] = ["release", "unmount", "wait_gone"]
