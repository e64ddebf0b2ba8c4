"""The daemon's side of the kernel engine (``unionfs.mount`` runs it): the overlay's part of a
mount spec, mounting the overlay over the daemon's own read-only FUSE mount and detaching that
mount, taking the overlay down, and a freeze that also holds opens of lower files.

The daemon serves the image's layers at a private mountpoint; once that mount answers it
mounts overlayfs (``unionfs.overlay``) over it, from a worker thread since the kernel looks the
lower up through this very daemon, then detaches its own mount: overlayfs keeps a private clone
of it, so the FUSE session lasts exactly as long as the overlay does, in every mount namespace.
``_State`` tracks how far that got, so each way out (a failure before ready, a signal, the
session's own end) undoes what was done.

Caveats:
* A freeze holds opens of lower files (so no copy-up starts) but no write: those go to the
  upper's file system without passing through the daemon.
* ``work/work`` is emptied only after a session that ended by itself (the overlay gone
  everywhere): after a signal a busy overlay may still be alive, and still using it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import overlay as kernel
from .errors import MountError

if TYPE_CHECKING:
    from .fuse_ops import Operations
    from .union import Union

log = logging.getLogger("unionfs.mount")


@dataclass(frozen=True)
class OverlaySpec:
    """The kernel engine's overlay: where it appears, the container's upper and work."""

    mountpoint: str
    upper: str
    work: str
    userxattr: bool = False
    suid: bool = False
    dev: bool = False

    @classmethod
    def parse(cls, doc: Any) -> OverlaySpec | None:
        if doc is None:
            return None
        if not isinstance(doc, dict) or not all(
                isinstance(doc.get(k), str) for k in ("mountpoint", "upper", "work")):
            raise MountError("a mount spec's 'overlay' needs 'mountpoint', 'upper' and 'work'")
        return cls(doc["mountpoint"], doc["upper"], doc["work"], bool(doc.get("userxattr")),
                   bool(doc.get("suid")), bool(doc.get("dev")))


@dataclass
class State:
    """The kernel engine's progress: the overlay mounted, the lower detached from the tree,
    the session ended by this daemon (signal, lifeline) rather than by the overlay's end."""

    overlay: OverlaySpec | None
    mounting: bool = False
    overlaid: bool = False
    detached: bool = False
    ending: bool = False


def operations(union: Union, timeout: float, lower: bool) -> Operations:
    """The FUSE handlers; for the kernel engine's lower, ones whose freeze also holds opens."""
    import trio

    from .fuse_ops import Operations, handler

    if not lower:
        return Operations(union, timeout=timeout)

    class LowerOperations(Operations):
        """A freeze holds every open of a lower file too: the kernel opens a lower file to
        copy it up, so no copy-up starts while a commit reads the upper.

        Where no layer has an extended attribute (``xattr_free``), ``getxattr`` answers
        ENOSYS, which the kernel takes as "this file system has none" and asks no more:
        overlayfs otherwise looks up ``trusted.overlay.metacopy`` (and more) of every lower
        file it meets, a request each (60k for a ``find`` of 60k files).  Its callers then
        get EOPNOTSUPP for a name where they would have got ENODATA; ``listxattr`` still
        answers (an empty list)."""

        held: trio.Event | None = None
        no_xattrs = union.upper is None and all(
            getattr(layer, "xattr_free", lambda: None)() is True for layer in union.view.layers)

        @handler
        async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
            if self.no_xattrs:
                raise OSError(errno.ENOSYS, "no extended attributes")
            return await super().getxattr(inode, name, ctx)

        async def freeze(self) -> None:
            await super().freeze()
            self.held = trio.Event()

        def thaw(self) -> None:
            held, self.held = self.held, None
            if held is not None:
                held.set()
            super().thaw()

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            while self.held is not None:
                await self.held.wait()
            return await super().open(inode, flags, ctx)

    return LowerOperations(union, timeout=timeout)


def mount_overlay(lower: str, state: State) -> int:
    """Mount the overlay over the FUSE mount at ``lower``, then detach that mount (the
    overlay holds its own clone) and remove its directory; the overlay's device number.
    Runs in a worker thread: the kernel looks the lower up through the mount."""
    ov = state.overlay
    assert ov is not None
    try:
        kernel.mount(ov.mountpoint, lower, ov.upper, ov.work, userxattr=ov.userxattr,
                     suid=ov.suid, dev=ov.dev)
    except OSError as exc:
        raise MountError(f"{kernel.REFUSED}{exc.strerror} (dmesg tells why)") from None
    state.overlaid = True
    dev = os.stat(ov.mountpoint).st_dev
    kernel.umount(lower, detach=True)
    state.detached = True
    with contextlib.suppress(OSError):
        os.rmdir(lower)
    return dev


def end_overlay(state: State) -> None:
    """Detach the overlay (a busy one lives on until its last user leaves, without the lower
    once this daemon is gone).  Runs in a worker thread: the unmount may reach the lower."""
    assert state.overlay is not None
    try:
        kernel.umount(state.overlay.mountpoint, detach=True)
    except OSError as exc:
        log.debug("overlay already gone: %s", exc)


def empty_work(work: str) -> None:
    """Empty ``work/work`` as the FUSE engine's next mount would (the kernel leaves its
    whiteout template there), so ``strata check`` finds no leftovers."""
    from .upper import remove_tree

    path = os.path.join(work, "work")
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            remove_tree(os.path.join(path, name))
