"""Containers: an image plus a writable layer.

A container is ``containers/<id>/upper`` and ``work`` (an overlayfs upper and work dir) and a
record in ``state.json`` (image ID, name, created).  The container keeps its image: ``rmi``
refuses, ``prune`` skips it.  Whether and where it is mounted is ``mounts.py``'s business (its
mount lock and the mount records); ``remove`` asks it.

``describe`` is the one recipe of a container's layers, top first: its upper, its *init layer*
``containers/<id>/init`` when ``strata run`` made one (empty stubs of the runtime's mount
targets the image lacks, docker's ``-init`` layer, written by ``run.py``), then its image's
layers.  A mount of the container (writable or read-only, so also ``strata run``'s) includes
the init layer; ``diff``, ``commit`` (``--squash`` too) and ``export`` never do, so a stub
never shows as a change.  ``RunState`` is the container's last run
(``containers/<id>/run/state.json``, written by ``run.py``), read with the container.

Caveats:
* The upper's root directory takes the image root's mode, owner and mtime at create time, so
  the merged root looks like the image's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unionfs.layers import LowerLayer
from unionfs.upper import remove_tree

from . import timefmt
from .digest import Digest
from .errors import Ambiguous, Conflict, ContainerNotFound, InvalidReference
from .mounts import MountRecord, Mounts, process_alive

if TYPE_CHECKING:
    from .api import Store
    from .images import Image

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_LEFT = ("amazing", "bold", "brave", "calm", "clever", "eager", "gifted", "happy", "jolly",
         "keen", "lucid", "nifty", "quirky", "serene", "sharp", "tender", "vibrant", "zen")
_RIGHT = ("babbage", "curie", "darwin", "euler", "fermi", "galois", "hopper", "knuth",
          "lamport", "lovelace", "noether", "pike", "ritchie", "shannon", "thompson", "turing")


@dataclass(frozen=True)
class RunState:
    """A container's last ``strata run``, as it was when read: ``status`` is ``"running"``
    (its ``strata run`` or its command still runs), ``"exited"`` (``exit_code``,
    ``finished``) or ``"unknown"`` (its ``strata run`` was killed and its command is gone);
    ``pid`` is the ``strata run`` process, ``init`` the container's pid 1, ``started`` and
    ``finished`` RFC 3339 times.  ``orphaned``: running, but its ``strata run`` is gone (it
    was killed with SIGKILL): nothing waits for the command (``strata check`` reports it,
    ``strata rm -f`` ends it)."""

    status: str
    pid: int
    init: int
    started: str
    finished: str = ""
    exit_code: int = 0
    orphaned: bool = False


def run_state_path(root: str) -> str:
    """``containers/<id>/run/state.json`` of the container directory ``root``."""
    return os.path.join(root, "run", "state.json")


def read_run_state(root: str) -> RunState | None:
    """The last run of the container at ``root``, None if it never ran (or the file is
    damaged).  The file holds ``pid``/``init`` with their start times (``pid_start``,
    ``init_start``: clock ticks since boot, ``/proc/PID/stat``), so a reused pid is not taken
    for the run's."""
    try:
        with open(run_state_path(root)) as f:
            doc = json.load(f)
        status, pid, init = str(doc["status"]), int(doc["pid"]), int(doc["init"])
        started, finished = str(doc["started"]), str(doc.get("finished", ""))
        exit_code = int(doc.get("exit_code", 0))
        pid_start, init_start = doc.get("pid_start"), doc.get("init_start")
    except (OSError, ValueError, TypeError, KeyError):
        return None
    orphaned = False
    if status == "running":
        runner = alive_since(pid, pid_start)
        command = init > 0 and alive_since(init, init_start)
        if not runner and not command:
            status = "unknown"
        orphaned = not runner and command
    return RunState(status, pid, init, started, finished, exit_code, orphaned)


def started_at(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, field 22 of ``/proc/PID/stat``), None if
    it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive_since(pid: int, start: object) -> bool:
    """``pid`` runs and is the process that started at ``start`` (any, when unknown)."""
    if pid <= 0 or not process_alive(pid):
        return False
    return start is None or started_at(pid) == start


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    image: Digest  # image ID
    image_name: str  # as given to create
    created: str
    root: str  # containers/<id>
    mount: MountRecord | None = field(default=None, compare=False)  # when it was read
    last_run: RunState | None = field(default=None, compare=False)  # when it was read

    @property
    def upper(self) -> str:
        return os.path.join(self.root, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.root, "work")

    @property
    def init(self) -> str:
        """The init layer (``strata run``'s stubs of mount targets), if it exists."""
        return os.path.join(self.root, "init")

    @property
    def short_id(self) -> str:
        return self.id[:12]


class Containers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = os.path.join(store.root, "containers")
        os.makedirs(self.dir, exist_ok=True)
        self.mounts = Mounts(store.root)

    def _from(self, cid: str, rec: dict[str, Any],
              mounts: dict[str, MountRecord] | None = None) -> Container:
        mount = self.mounts.of_container(cid) if mounts is None else mounts.get(cid)
        root = os.path.join(self.dir, cid)
        return Container(cid, rec["name"], Digest(rec["image"]), rec.get("imageName", ""),
                         rec.get("created", ""), root, mount, read_run_state(root))

    def of_record(self, cid: str, rec: dict[str, Any]) -> Container:
        """The container a ``state.json`` record describes."""
        return self._from(cid, rec)

    def all(self) -> list[Container]:
        st = self.store.state.read()
        mounts = {r.target: r for r in self.mounts.records() if r.kind == "container"}
        return sorted((self._from(c, r, mounts) for c, r in st.containers.items()),
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
        root = os.path.join(self.dir, cid)
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
        with self.store.layers.opened(self.store.layers.stack(image.diff_ids)) as layers:
            from unionfs.resolve import UnionView

            root = UnionView(layers).root().entry
        if os.geteuid() == 0:
            os.chown(upper, root.uid, root.gid)
        os.chmod(upper, root.mode & 0o7777)
        os.utime(upper, ns=(root.mtime_ns, root.mtime_ns))

    def describe(self, container: Container, upper: bool = True,
                 init: bool = False) -> list[dict[str, Any]]:
        """The container's layers as descriptions, top first: with ``upper`` its writable
        layer (read as a plain directory), with ``init`` its init layer if it has one, then
        its image's.  The one recipe of a container's rootfs: a mount takes it with ``init``
        (a writable one without ``upper``: the upper is its writable layer); export, commit
        and diff without ``init`` (its stubs are no change of the container's)."""
        image = self.store.image(container.image)
        top = [{"kind": "dir", "path": container.upper}] if upper else []
        if init and os.path.isdir(container.init):
            top.append({"kind": "dir", "path": container.init})
        return top + self.store.layers.stack(image.diff_ids)

    def layers(self, container: Container, upper: bool = True,
               init: bool = False) -> contextlib.AbstractContextManager[list[LowerLayer]]:
        """``describe``'s layers, opened for the block."""
        return self.store.layers.opened(self.describe(container, upper, init))

    def remove(self, container: Container) -> None:
        ran = read_run_state(container.root)
        if ran is not None and ran.status == "running":
            raise Conflict(f"container {container.name} is running; stop it first (or use -f)")
        where = self.mounts.where(container.id, container.root)
        if where:
            raise Conflict(f"container {container.name} is mounted {where}; unmount it first "
                           "(or use -f)")
        self.mounts.clear_lower(container.root)  # a kernel engine daemon killed as it started
        with self.store.state.transaction() as st:
            st.containers.pop(container.id, None)
        remove_tree(container.root)

def _random_name(taken: set[str]) -> str:
    for _ in range(100):
        name = f"{random.choice(_LEFT)}_{random.choice(_RIGHT)}"
        if name not in taken:
            return name
    return f"{random.choice(_LEFT)}_{secrets.token_hex(4)}"
