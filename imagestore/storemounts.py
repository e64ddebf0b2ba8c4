"""``Store``'s mount methods (``imagestore.api``): a mount for a ``with`` block (sync or trio),
one that outlives the process (``strata mount``), one served in this process (``strata mount
-f``), unmounting and the live mounts.  ``mounting`` plans and spawns, ``unmounting`` ends,
``mounts`` keeps the records; this class only turns arguments into a plan.  Those modules are
imported by the methods that use them: a ``Store`` that pulls or lists never loads them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, cast

from .containers import Container
from .errors import MountFailed
from .images import Image
from .mounts import MountRecord, Mounts
from .targets import READY_TIMEOUT, Directories

if TYPE_CHECKING:
    from .api import Store

ImageLike = str | Image
MountTarget = ImageLike | Container | Directories
PathLike = str | os.PathLike[str]

__all__ = ["ImageLike", "MountMethods", "MountTarget", "PathLike"]


class MountMethods:
    """Mixed into ``Store``."""

    root: str

    def _store(self) -> Store:
        return cast("Store", self)

    @contextlib.contextmanager
    def mount(self, target: MountTarget, mountpoint: PathLike | None = None, *,
              read_only: bool = False, allow_other: bool = False, suid: bool = False,
              dev: bool = False, engine: str | None = None,
              timeout: float = READY_TIMEOUT) -> Iterator[Path]:
        """Mount an image (always read-only), a container (writable unless ``read_only``) or
        ``Directories`` for the ``with`` block and yield the mountpoint: ``mountpoint``
        (created if missing) or a new temporary directory, removed afterwards.  A string
        names a container first, then an image, as ``strata mount``.  Mounts are
        ``nosuid,nodev`` unless ``suid`` or ``dev``; ``allow_other`` lets other users in.
        ``engine`` (a writable container's): ``"fuse"``, ``"kernel"`` (overlayfs over a
        FUSE mount of the image; root) or ``"auto"`` (kernel where overlayfs may be
        mounted, else FUSE); default ``$STRATA_ENGINE``, else ``"fuse"``.
        The daemon runs in a child process; the mount is taken down when the block ends,
        raises or is interrupted.  Raises ``FuseUnavailable``, ``MountFailed``,
        ``ImageNotFound``, ``ContainerNotFound``, ``Conflict`` (the container is mounted),
        ``Unsupported`` (the engine)."""
        from . import mounting

        p = mounting.plan(self._store(), target, mountpoint, read_only=read_only,
                          allow_other=allow_other, suid=suid, dev=dev, engine=engine)
        with mounting.mounted(p, timeout) as path:
            yield path

    @contextlib.asynccontextmanager
    async def open_mount(self, target: MountTarget, mountpoint: PathLike | None = None, *,
                         read_only: bool = False, allow_other: bool = False,
                         suid: bool = False, dev: bool = False, engine: str | None = None,
                         timeout: float = READY_TIMEOUT) -> AsyncIterator[Path]:
        """``mount`` for trio code: ``async with store.open_mount("busybox") as root:``.
        The event loop never blocks on the daemon; the teardown runs shielded from
        cancellation."""
        from . import mounting

        p = mounting.plan(self._store(), target, mountpoint, read_only=read_only,
                          allow_other=allow_other, suid=suid, dev=dev, engine=engine)
        async with mounting.open_mounted(p, timeout) as path:
            yield path

    def start_mount(self, target: MountTarget, mountpoint: PathLike, *,
                    read_only: bool = False, allow_other: bool = False, suid: bool = False,
                    dev: bool = False, debug: bool = False, engine: str | None = None,
                    timeout: float = READY_TIMEOUT) -> MountRecord:
        """Mount as ``mount`` does, but for good (``strata mount``): returns once the mount
        answers, and the daemon serves on after this process exits, logging to
        ``<root>/mounts/<key>.log`` (every request with ``debug``), until ``unmount``,
        ``umount`` (``fusermount3 -u`` for the FUSE engine) or SIGTERM.  The mountpoint must
        be an existing directory."""
        from . import mounting

        p = mounting.plan(self._store(), target, mountpoint, read_only=read_only,
                          allow_other=allow_other, suid=suid, dev=dev, debug=debug,
                          make_mountpoint=False, engine=engine)
        mounting.start(p, timeout)
        rec = Mounts(self.root).record_for(p.mountpoint)
        if rec is None:  # unmounted already, by someone else
            raise MountFailed(f"{p.mountpoint} was unmounted as soon as it was ready")
        return rec

    def serve_mount(self, target: MountTarget, mountpoint: PathLike, *,
                    read_only: bool = False, allow_other: bool = False, suid: bool = False,
                    dev: bool = False, debug: bool = False,
                    engine: str | None = None) -> NoReturn:
        """Serve a mount in this very process until it is unmounted or signalled
        (``strata mount -f``): the process becomes the mount daemon (``exec``), logging to
        its stderr.  Checks and errors are those of ``start_mount`` (``auto`` does not fall
        back to FUSE here once the kernel refuses the overlay: the process is the daemon)."""
        from . import mounting

        p = mounting.plan(self._store(), target, mountpoint, read_only=read_only,
                          allow_other=allow_other, suid=suid, dev=dev, debug=debug,
                          make_mountpoint=False, engine=engine)
        mounting.exec_foreground(p)

    def unmount(self, mountpoint: PathLike, *, lazy: bool = False) -> None:
        """``strata umount``: unmount here and wait for the daemon; ``lazy`` detaches a busy
        mount; a mount whose daemon died (``ENOTCONN``) is detached and forgotten.  A mount
        another mount namespace still holds is served on there (``mounts()`` shows it as
        ``elsewhere``); unmounting it again stops its daemon.  Raises ``MountFailed``."""
        from . import unmounting

        unmounting.unmount(self.root, os.fspath(mountpoint), lazy)

    def mounts(self) -> list[MountRecord]:
        """The live mounts of this store, whoever made them (``strata mounts``)."""
        return Mounts(self.root).records()

    def check_fuse(self) -> None:
        """Mount and unmount an empty directory: raises ``FuseUnavailable`` with the reason
        (no ``/dev/fuse``, no ``fusermount3``, the kernel refused the mount) when mounts
        cannot work here, ``MountFailed`` for another failure."""
        from . import mounting

        mounting.probe(self._store())
