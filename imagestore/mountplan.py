"""Mount plans: what to mount (an image, a container, ``Directories``) becomes a *mount spec*,
the JSON the daemon reads (``unionfs.mount`` documents it), with the engine chosen and the
container's mount lock taken.  ``mounting`` runs plans (it is the only spawner of the daemon).

``plan`` checks FUSE, the target and the mountpoint, chooses the engine (``engine_for``: a
writable container may be mounted by strata's FUSE union or by kernel overlayfs over the
daemon's read-only FUSE mount of the image; everything else is a FUSE mount) and takes a
container's mount lock, which goes to the daemon with the spec.  For the kernel engine the
spec serves the image at ``containers/<id>/lower`` and carries an ``overlay`` section; with
``auto`` the plan keeps the FUSE engine's spec as a fallback should the kernel refuse the
overlay.

Caveats:
* ``engine_for`` judges by credentials (``unionfs.overlay.permitted``); only the mount tells
  whether the upper's file system can be an overlay upper (the fallback covers that).
* The store's own modules (containers, images) load when ``plan`` first runs, not with this
  module: ``strata mount`` starts its daemon before the store is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unionfs import overlay
from unionfs.control import is_mounted

from . import timefmt
from .errors import FuseUnavailable, ImageNotFound, MountFailed, StoreError, Unsupported
from .mounts import Mounts
from .targets import Directories, Layers

if TYPE_CHECKING:
    from .api import Store
    from .containers import Container
    from .digest import Digest
    from .images import Image

# in a line of the daemon's error or log that mentions fuse, words saying FUSE itself is
# refused here (lower case); a permission error of anything else is no reason to skip tests
_NO_FUSE = ("permission denied", "operation not permitted", "device not found",
            "no such device", "no such file")

ENGINES = ("fuse", "kernel", "auto")
# the engine a writable container gets when none is asked for (and $STRATA_ENGINE is unset),
# by what the mount is for: README "Engines" gives the measurements behind these
DEFAULT_ENGINES = {"mount": "fuse", "run": "auto", "build": "auto"}


if TYPE_CHECKING:
    Target = str | Image | Container | Directories | Layers


def fuse_missing() -> str | None:
    """Why FUSE mounts cannot work on this machine, without trying one: ``/dev/fuse`` missing,
    ``fusermount3`` not installed; None when both are there.  ``probe`` also tries a mount."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package fuse3)")
    return "; ".join(problems) or None


def engine_for(requested: str | None, writable_container: bool,
               purpose: str = "mount") -> tuple[str, bool]:
    """The engine a mount uses, and whether it may fall back to FUSE should the kernel refuse
    the overlay.  ``requested``: ``fuse``, ``kernel``, ``auto`` or None (``$STRATA_ENGINE``,
    else ``DEFAULT_ENGINES[purpose]``: ``mount``, ``run`` or ``build``).  Only a writable
    container has a choice: images, read-only mounts and directories are FUSE mounts (asking
    for ``kernel`` there is refused).  Raises ``Unsupported`` (an unknown engine, ``kernel``
    for what is not a writable container), ``MountFailed`` (``kernel`` where overlayfs may not
    be mounted, with the reason)."""
    name = requested or os.environ.get("STRATA_ENGINE") or DEFAULT_ENGINES[purpose]
    if name not in ENGINES:
        raise Unsupported(f"unknown mount engine {name!r} ({', '.join(ENGINES)})")
    if not writable_container:
        if requested == "kernel":
            raise Unsupported("the kernel engine mounts writable containers; images, "
                              "read-only mounts and directories are FUSE mounts")
        return "fuse", False
    if name == "fuse":
        return "fuse", False
    why = overlay.permitted()
    if why is None:
        return "kernel", name == "auto"
    if name == "kernel":
        raise MountFailed(f"cannot use the kernel engine: {why}")
    return "fuse", False


@dataclass
class Plan:
    """Everything decided before the daemon starts.  ``lock``: a container's mount lock,
    held until the daemon has its own copy of the descriptor (``close`` drops ours)."""

    spec: dict[str, Any]
    mountpoint: str
    created: bool  # the mountpoint is ours to remove
    log: str
    what: str  # for messages
    lock: int | None = None
    engine: str = "fuse"
    fallback: dict[str, Any] | None = None  # auto: the FUSE engine's spec, should overlayfs fail
    lower: str | None = None  # the kernel engine's private FUSE mountpoint

    def set_layers(self, layers: list[dict[str, Any]]) -> None:
        """Mount ``layers`` (descriptions, as ``store.layers.for_mount`` gives them) instead
        of the planned ones, whichever engine mounts them."""
        self.spec["layers"] = layers
        if self.fallback is not None:
            self.fallback["layers"] = layers

    def use_fallback(self) -> None:
        """Mount with the FUSE engine instead (``auto``, the kernel refused the overlay)."""
        assert self.fallback is not None
        self.spec, self.fallback, self.engine, self.lower = self.fallback, None, "fuse", None

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def spec_fd(self, **fds: Any) -> int:
        """The spec (plus the descriptors ``fds`` name) in a memfd, for ``/dev/fd/N``."""
        doc = {**self.spec, **fds, "hold_fds": [self.lock] if self.lock is not None else []}
        fd = os.memfd_create("strata-mount-spec")
        os.write(fd, json.dumps(doc).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def command(self, spec_fd: int) -> list[str]:
        """The daemon's argv for the spec in ``spec_fd`` (``mounting.daemon_command``)."""
        from .mounting import daemon_command

        return daemon_command(f"/dev/fd/{spec_fd}", self.mountpoint)

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def failure(self, message: str | None, status: int | None, log_from: int) -> StoreError:
        """The typed error for a daemon that did not become ready: ``FuseUnavailable`` when
        its error or log says FUSE itself is refused, else ``MountFailed``."""
        try:
            with open(self.log, "rb") as f:
                f.seek(log_from)
                tail = f.read(1 << 16).decode(errors="replace")
        except OSError:
            tail = ""
        if not message:
            lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
            message = lines[-1] if lines else f"the mount daemon exited with status {status}"
        for line in [message, *tail.splitlines()]:
            low = line.lower()
            if "fuse" in low and any(word in low for word in _NO_FUSE):
                return FuseUnavailable(f"FUSE is not usable here: {line.strip()}")
        return MountFailed(f"cannot mount {self.what} at {self.mountpoint}: {message} "
                           f"(daemon log: {self.log})")


def _hint_lazy_sources(store: Store, diff_ids: Sequence[Digest]) -> None:
    """Before the layers are described (the first description of a lazy layer builds its
    index): tell the preloaded daemon where the lazy ones are fetched from, so that it finds
    the registries' scheme meanwhile (``daemonfork.hint``)."""
    from . import daemonfork

    lazy = store.layers.lazy
    sources: list[dict[str, str]] = []
    for diff_id in diff_ids:
        digest = None if store.layers.has(diff_id) else lazy.for_diff_id(diff_id)
        if digest is not None and (source := lazy.info(digest).source) not in sources:
            sources.append(source)
    daemonfork.hint(sources)


def plan(store: Store, target: Target, mountpoint: str | os.PathLike[str] | None, *,
         read_only: bool = False, allow_other: bool = False, suid: bool = False,
         dev: bool = False, debug: bool = False, make_mountpoint: bool = True,
         engine: str | None = None, purpose: str = "mount") -> Plan:
    """Check FUSE, the target and the mountpoint (a new temp dir when None; one that is
    missing is made when ``make_mountpoint``), choose the engine (``engine_for``: the one
    asked for, else the default for ``purpose`` — ``mount``, ``run``, ``build``) and write
    the spec.  Raises ``FuseUnavailable``, ``ImageNotFound``, ``ContainerNotFound``,
    ``Conflict`` (the container is mounted), ``MountFailed`` (the mountpoint, the kernel
    engine refused), ``Unsupported`` (the engine)."""
    missing = fuse_missing()
    if missing:
        raise FuseUnavailable(missing)
    from .containers import Container, Containers  # the store's code: loaded only to plan
    from .images import Image

    mounts = Mounts(store.root)
    layers: list[dict[str, Any]] = []
    upper = work = None
    lock: int | None = None
    container = None
    cleanup = None
    if isinstance(target, Layers):
        layers = list(target.layers)
        upper, work, cleanup = target.upper, target.work, target.cleanup
        kind, ident, name, what = "build", cleanup or upper, "build", "a build stage"
    elif isinstance(target, Directories):
        if target.upper and not target.work and not read_only:
            raise MountFailed("a writable upper directory needs a work directory")
        for d in (*target.lower, target.upper, target.work):
            if d is not None and not os.path.isdir(d):
                raise MountFailed(f"directory {d} does not exist")
        dirs = [target.upper] if target.upper and read_only else []  # read-only: on top
        layers = [{"kind": "dir", "path": os.path.abspath(d)} for d in [*dirs, *target.lower]]
        if target.upper and not read_only:
            upper, work = os.path.abspath(target.upper), os.path.abspath(str(target.work))
        kind, ident, name = "dirs", ":".join(target.lower), ":".join(target.lower)
        what = f"directory {name}"
        read_only = read_only or upper is None
    else:
        cs = Containers(store)
        if isinstance(target, Container):
            container = cs.get(target.id)
        elif isinstance(target, str):
            container = cs.find(target)
        if container is not None:
            kind, ident, name = "container", container.id, container.name
            what = f"container {container.name}"
            _hint_lazy_sources(store, store.image(container.image).diff_ids)
            # read-only: the upper on top; either way with its init layer (strata run's stubs)
            layers = cs.describe(container, upper=read_only, init=True)
            if not read_only:
                upper, work = container.upper, container.work
        else:
            try:
                image = store.image(target.id) if isinstance(target, Image) else \
                    store.resolve(str(target))
            except ImageNotFound:
                if isinstance(target, Image):
                    raise
                raise ImageNotFound(f"No such image or container: {target}") from None
            kind, ident = "image", str(image.id)
            name = image.tags[0].familiar if image.tags else image.short_id
            what = f"image {target if isinstance(target, str) else image.short_id}"
            read_only = True
            _hint_lazy_sources(store, image.diff_ids)
            layers = store.layers.stack(image.diff_ids)
    chosen, may_fall_back = engine_for(engine, container is not None and not read_only, purpose)
    if container is not None:
        lock = mounts.lock(container.root, container.name)
    try:
        mp, created = _mountpoint(mountpoint, make_mountpoint)
        writable = upper is not None and not read_only
        control = mounts.control_path(mp) if writable else None
        log = mounts.log_path(mp)
        spec = {
            "mountpoint": mp,
            "options": {"allow_other": allow_other, "ro": read_only, "suid": suid, "dev": dev,
                        "debug": debug},
            "layers": store.layers.for_mount(layers), "upper": upper, "work": work,
            "control": control,
            "record": {"path": mounts.record_path(mp), "data": {
                "mountpoint": mp, "kind": kind, "target": ident, "name": name, "log": log,
                "started": timefmt.now(), "read_only": read_only, "control": control or "",
                "engine": "fuse"}},
        }
        if cleanup is not None:
            spec["cleanup"] = cleanup
        p = Plan(spec, mp, created, log, what, lock)
        if chosen == "kernel":
            assert container is not None and upper is not None and work is not None
            p.lower = mounts.lower_path(container.root)
            mounts.clear_lower(container.root)  # what a daemon killed as it started left
            os.mkdir(p.lower, 0o700)
            p.spec = _kernel_spec(spec, p.lower, upper, work)
            p.engine = "kernel"
            p.fallback = spec if may_fall_back else None
        return p
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise


def _kernel_spec(spec: dict[str, Any], lower: str, upper: str, work: str) -> dict[str, Any]:
    """The kernel engine's spec from the FUSE engine's: the layers served read-only at
    ``lower``, overlayfs with the container's upper and work at the mountpoint."""
    o = spec["options"]
    record = {**spec["record"], "data": {**spec["record"]["data"], "engine": "kernel"}}
    return {**spec, "mountpoint": lower, "upper": None, "work": None, "record": record,
            "options": {**o, "ro": True, "allow_other": False},
            "overlay": {"mountpoint": spec["mountpoint"], "upper": upper, "work": work,
                        "userxattr": not overlay.in_initial_userns(), "suid": o["suid"],
                        "dev": o["dev"]}}


def _mountpoint(mountpoint: str | os.PathLike[str] | None, make: bool) -> tuple[str, bool]:
    if mountpoint is None:
        return tempfile.mkdtemp(prefix="strata-mnt-"), True
    mp = os.path.abspath(os.fspath(mountpoint))
    if not os.path.isdir(mp):
        if not make or os.path.lexists(mp):
            raise MountFailed(f"mountpoint {mountpoint} is not a directory")
        try:
            os.makedirs(mp)
        except OSError as exc:
            raise MountFailed(f"cannot create the mountpoint {mp}: {exc.strerror}") from None
        return mp, True
    if is_mounted(mp):
        raise MountFailed(f"{mountpoint} is already a mount point")
    return mp, False


__all__ = ["DEFAULT_ENGINES", "ENGINES", "Directories", "Plan", "engine_for", "fuse_missing",
           "plan"]
