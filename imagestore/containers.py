"""Containers and mount records.

A container is an image plus a writable layer: ``containers/<id>/upper`` and ``work`` (an
overlayfs upper and work dir) and a record in ``state.json`` (image ID, name, created).  The
container keeps its image: ``rmi`` refuses, ``prune`` skips it.

A mount is recorded in ``mounts/<key>.json`` by the process serving it (pid, mountpoint, what is
mounted, log file) and removed when it ends; records of dead processes are dropped when read.
A mounted container holds ``containers/<id>/mount.lock`` exclusively for as long as it is
mounted, so it cannot be mounted twice, removed, or committed without the daemon's help.

Caveats:
* The upper's root directory takes the image root's mode, owner and mtime at create time, so
  the merged root looks like the image's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from unionfs.control import frozen
from unionfs.errors import MountError
from unionfs.layers import DirLayer, LowerLayer
from unionfs.resolve import UnionView
from unionfs.upper import remove_tree

from . import timefmt
from .errors import Ambiguous, Conflict, ContainerNotFound, InvalidReference, MountFailed
from .fsutil import atomic_write
from .store import Image, Store

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_LEFT = ("amazing", "bold", "brave", "calm", "clever", "eager", "gifted", "happy", "jolly",
         "keen", "lucid", "nifty", "quirky", "serene", "sharp", "tender", "vibrant", "zen")
_RIGHT = ("babbage", "curie", "darwin", "euler", "fermi", "galois", "hopper", "knuth",
          "lamport", "lovelace", "noether", "pike", "ritchie", "shannon", "thompson", "turing")


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    image: str  # image ID
    image_name: str  # as given to create
    created: str
    root: str  # containers/<id>

    @property
    def upper(self) -> str:
        return os.path.join(self.root, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.root, "work")

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    pid: int
    kind: str  # image, container or dirs
    target: str  # image ID, container ID, or the lower dirs
    name: str
    log: str
    started: str
    read_only: bool
    control: str = ""  # the daemon's control socket (freeze for commit)


class Containers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.mounts_dir = os.path.join(store.root, "mounts")
        os.makedirs(self.mounts_dir, exist_ok=True)

    def _from(self, cid: str, rec: dict[str, Any]) -> Container:
        return Container(cid, rec["name"], rec["image"], rec.get("imageName", ""),
                         rec.get("created", ""), os.path.join(self.store.containers_dir, cid))

    def of_record(self, cid: str, rec: dict[str, Any]) -> Container:
        """The container a ``state.json`` record describes."""
        return self._from(cid, rec)

    def all(self) -> list[Container]:
        st = self.store.state.read()
        return sorted((self._from(c, r) for c, r in st.containers.items()),
                      key=lambda c: c.created, reverse=True)

    def get(self, name: str) -> Container:
        """By name, full ID or unique ID prefix."""
        st = self.store.state.read()
        for cid, rec in st.containers.items():
            if rec["name"] == name or cid == name:
                return self._from(cid, rec)
        if re.fullmatch(r"[0-9a-f]{1,64}", name):
            hits = [c for c in st.containers if c.startswith(name)]
            if len(hits) > 1:
                raise Ambiguous(f"container ID prefix {name} is ambiguous")
            if hits:
                return self._from(hits[0], st.containers[hits[0]])
        raise ContainerNotFound(f"No such container: {name}")

    def find(self, name: str) -> Container | None:
        try:
            return self.get(name)
        except ContainerNotFound:
            return None

    def create(self, image_name: str, name: str | None = None) -> Container:
        image = self.store.resolve(image_name)
        if name is not None and not _NAME.match(name):
            raise InvalidReference(f"Invalid container name ({name}), only "
                                   "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        cid = secrets.token_hex(32)
        root = os.path.join(self.store.containers_dir, cid)
        with self.store.state.transaction() as st:
            if image.id not in st.images:
                raise Conflict(f"image {image.short_id} was removed meanwhile")
            names = {r["name"] for r in st.containers.values()}
            if name is None:
                name = _random_name(names)
            elif name in names:
                raise Conflict(f'Conflict. The container name "/{name}" is already in use')
            os.makedirs(os.path.join(root, "upper"))
            os.makedirs(os.path.join(root, "work"))
            self._copy_root_attrs(image, os.path.join(root, "upper"))
            st.containers[cid] = {"name": name, "image": image.id, "imageName": image_name,
                                  "created": timefmt.now()}
        return self.get(cid)

    def _copy_root_attrs(self, image: Image, upper: str) -> None:
        with self.store.layers_of(image) as layers:
            root = UnionView(layers).root().entry
        if os.geteuid() == 0:
            os.chown(upper, root.uid, root.gid)
        os.chmod(upper, root.mode & 0o7777)
        os.utime(upper, ns=(root.mtime_ns, root.mtime_ns))

    def remove(self, container: Container) -> None:
        if self.mounted_at(container) is not None:
            raise Conflict(f"container {container.name} is mounted at "
                           f"{self.mounted_at(container)}; unmount it first (or use -f)")
        with self.store.state.transaction() as st:
            st.containers.pop(container.id, None)
        remove_tree(container.root)

    def open_layers(self, container: Container) -> list[LowerLayer]:
        layers = self.store.open_layers(self.store.image(container.image))  # type: ignore[arg-type]
        # strata run's init layer (imagestore/run.py): stubs of mount targets, above the image
        init = os.path.join(container.root, "init")
        if os.path.isdir(init):
            layers.insert(0, DirLayer(init))
        return layers

    # -- mount lock and records ----------------------------------------------------------------

    @contextlib.contextmanager
    def mount_lock(self, container: Container) -> Iterator[None]:
        """Held by the process serving a container mount."""
        path = os.path.join(container.root, "mount.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                where = self.mounted_at(container) or "another process"
                raise Conflict(f"container {container.name} is already mounted at {where}"
                               ) from None
            yield
        finally:
            os.close(fd)

    def mounted_at(self, container: Container) -> str | None:
        for rec in self.mounts():
            if rec.kind == "container" and rec.target == container.id:
                return rec.mountpoint
        path = os.path.join(container.root, "mount.lock")
        if not os.path.exists(path):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "an unknown mountpoint"
        finally:
            os.close(fd)
        return None

    @contextlib.contextmanager
    def paused(self, container: Container, pause: bool = True) -> Iterator[None]:
        """Hold every write through the container's mount while the block runs, if it is
        mounted writable (``docker commit --pause``); a no-op otherwise or when ``pause`` is
        false.  Raises ``MountFailed`` when the mount does not pause."""
        rec = self.mount_of(container) if pause else None
        with contextlib.ExitStack() as stack:
            if rec is not None and rec.control:
                try:
                    stack.enter_context(frozen(rec.mountpoint, rec.control))
                except MountError as exc:
                    raise MountFailed(str(exc)) from None
            yield

    def _record_path(self, mountpoint: str) -> str:
        key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:20]
        return os.path.join(self.mounts_dir, key + ".json")

    def log_path(self, mountpoint: str) -> str:
        return self._record_path(mountpoint)[: -len(".json")] + ".log"

    def control_path(self, mountpoint: str) -> str:
        return self._record_path(mountpoint)[: -len(".json")] + ".sock"

    def mount_of(self, container: Container) -> MountRecord | None:
        for rec in self.mounts():
            if rec.kind == "container" and rec.target == container.id:
                return rec
        return None

    def record(self, rec: MountRecord) -> None:
        # under the writers' lock: garbage collection and check empty tmp/ only while they
        # hold it, so the temp file of the record cannot vanish before its rename
        with self.store.state.locked():
            atomic_write(self._record_path(rec.mountpoint),
                         json.dumps(rec.__dict__, indent=1).encode(),
                         tmp_dir=self.store.blobs.tmp_dir)

    def unrecord(self, mountpoint: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(mountpoint))

    def mounts(self) -> list[MountRecord]:
        out = []
        for name in sorted(os.listdir(self.mounts_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.mounts_dir, name)
            try:
                with open(path) as f:
                    rec = MountRecord(**json.load(f))
            except (OSError, ValueError, TypeError):
                continue
            if not process_alive(rec.pid):
                continue
            out.append(rec)
        return out

    def record_for(self, mountpoint: str) -> MountRecord | None:
        full = os.path.abspath(mountpoint)
        for rec in self.mounts():
            if rec.mountpoint == full:
                return rec
        return None


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _random_name(taken: set[str]) -> str:
    for _ in range(100):
        name = f"{random.choice(_LEFT)}_{random.choice(_RIGHT)}"
        if name not in taken:
            return name
    return f"{random.choice(_LEFT)}_{secrets.token_hex(4)}"
