"""Containers: an image plus a writable layer.

A container is ``containers/<id>/upper`` and ``work`` (an overlayfs upper and work dir) and a
record in ``state.json`` (image ID, name, created).  The container keeps its image: ``rmi``
refuses, ``prune`` skips it.  Whether and where it is mounted is ``mounts.py``'s business (its
mount lock and the mount records); ``remove`` asks it.

Caveats:
* The upper's root directory takes the image root's mode, owner and mtime at create time, so
  the merged root looks like the image's.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unionfs.layers import LowerLayer
from unionfs.resolve import UnionView
from unionfs.upper import remove_tree

from . import timefmt
from .digest import Digest
from .errors import Ambiguous, Conflict, ContainerNotFound, InvalidReference
from .mounts import MountRecord, Mounts

if TYPE_CHECKING:
    from .api import Store
    from .images import Image

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_LEFT = ("amazing", "bold", "brave", "calm", "clever", "eager", "gifted", "happy", "jolly",
         "keen", "lucid", "nifty", "quirky", "serene", "sharp", "tender", "vibrant", "zen")
_RIGHT = ("babbage", "curie", "darwin", "euler", "fermi", "galois", "hopper", "knuth",
          "lamport", "lovelace", "noether", "pike", "ritchie", "shannon", "thompson", "turing")


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    image: Digest  # image ID
    image_name: str  # as given to create
    created: str
    root: str  # containers/<id>
    mount: MountRecord | None = field(default=None, compare=False)  # when it was read

    @property
    def upper(self) -> str:
        return os.path.join(self.root, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.root, "work")

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
        return Container(cid, rec["name"], Digest(rec["image"]), rec.get("imageName", ""),
                         rec.get("created", ""), os.path.join(self.dir, cid),
                         mount)

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
            root = UnionView(layers).root().entry
        if os.geteuid() == 0:
            os.chown(upper, root.uid, root.gid)
        os.chmod(upper, root.mode & 0o7777)
        os.utime(upper, ns=(root.mtime_ns, root.mtime_ns))

    def describe(self, container: Container, upper: bool = True) -> list[dict[str, str]]:
        """The container's layers as descriptions, top first: with ``upper`` its writable
        layer (read as a plain directory), then its image's.  The one recipe of a container's
        rootfs outside a writable mount: export, commit, diff and read-only mounts use it."""
        image = self.store.image(container.image)
        top = [{"kind": "dir", "path": container.upper}] if upper else []
        return top + self.store.layers.stack(image.diff_ids)

    def layers(self, container: Container,
               upper: bool = True) -> contextlib.AbstractContextManager[list[LowerLayer]]:
        """``describe``'s layers, opened for the block."""
        return self.store.layers.opened(self.describe(container, upper))

    def remove(self, container: Container) -> None:
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
