"""Inode numbers derived from the entry, lookup counts, and the names the kernel knows.

An inode's number is a function of the object, not of the kernel's lookup history (architecture.md,
decision 6): ``number((layer, obj))`` puts the layer's index in the top ``LAYER_BITS`` bits and
the object's number within its layer below (a tar layer's hardlink group, a directory layer's
or the upper's host inode number).  The union gives every node its identity
(``Union.identity``): a copied-up object keeps the identity of what it was copied from (as
overlayfs keeps an origin), so its number does not change either.  The names of one hardlink
group share a number; a forgotten inode gets the same number at its next lookup; a listing's
``d_ino`` is the ``st_ino`` a stat gives.

An ``Inode`` record lives while the kernel holds a lookup reference or a handle is open: it
knows the names the kernel has used for it (``paths``; the adapter reports every namespace
change with ``moved``, ``unlinked``, ``exchanged``), so a request on a number finds its path.
Lookup counts rise in lookup/create/mkdir/mknod/symlink/link/readdirplus and fall in ``forget``;
an unlinked file stays readable and writable through open handles until its last release.

Number reuse: the host reuses the inode number of a deleted upper file for a later one.  When
an object is *created* with a number the kernel still holds for a dead one, the record's
``generation`` is raised: the kernel then knows the old inode is gone ("nodeid was reused") and
sends the old lookups back in a forget, which the record's count already includes.

Caveats:
* Host inode numbers of 2**54 and above, and numbers that would read as 0 or the root's 1, are
  given numbers from a reserved range for the life of the mount (stable within it).
* ``moved`` is linear in the number of known names; directory renames are rare.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .resolve import Node

ROOT_INO = 1
LAYER_BITS = 10  # up to 1023 layers (the store refuses images of more than 500)
OBJ_BITS = 64 - LAYER_BITS
_SPARE_LAYER = (1 << LAYER_BITS) - 1  # the reserved range

Identity = tuple[int, int]  # (layer index in the union, object number within that layer)


@dataclass
class Inode:
    ino: int
    paths: list[str]
    is_dir: bool
    lookups: int = 0
    opens: int = 0
    generation: int = 0
    node: Node | None = None  # the last resolved node (attributes of a nameless open file)
    attr: Any = None  # the EntryAttributes made for ``attr_of`` (fuse_ops' cache)
    attr_of: Node | None = None

    @property
    def path(self) -> str | None:
        return self.paths[0] if self.paths else None


class InodeTable:
    """The inodes the kernel holds.  ``identity(node)`` is the union's ``Union.identity``."""

    def __init__(self, root: Node, identity: Callable[[Node], Identity]) -> None:
        self._identity = identity
        self._spare: dict[Identity, int] = {}
        self._next_spare = itertools.count(1)
        self._by_ino: dict[int, Inode] = {}
        self._by_path: dict[str, Inode] = {}
        root_inode = Inode(ROOT_INO, [""], True, lookups=1, node=root)
        self._by_ino[ROOT_INO] = root_inode
        self._by_path[""] = root_inode

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def at(self, path: str) -> Inode | None:
        return self._by_path.get(path)

    def __len__(self) -> int:
        return len(self._by_ino)

    def __iter__(self) -> Iterator[Inode]:
        return iter(list(self._by_ino.values()))

    def number(self, node: Node) -> int:
        """The inode number of ``node``: the same for every name of one object, whatever the
        kernel forgot in between."""
        if not node.path:
            return ROOT_INO
        ident = self._identity(node)
        layer, obj = ident
        if 0 <= obj < (1 << OBJ_BITS) and layer < _SPARE_LAYER:
            ino = (layer << OBJ_BITS) | obj
            if ino > ROOT_INO:
                return ino
        got = self._spare.get(ident)
        if got is None:
            got = self._spare[ident] = (_SPARE_LAYER << OBJ_BITS) | next(self._next_spare)
        return got

    def ref(self, node: Node, count: int = 1, new: bool = False) -> Inode:
        """The inode of ``node`` (a record made when the kernel holds none); its lookup count
        rises by ``count``.  ``new``: the node is an object just created, so a record of its
        number that the kernel still holds belongs to a dead object (a new generation)."""
        inode = self._by_path.get(node.path)
        if inode is not None and inode.node is node and not new:  # nothing changed
            inode.lookups += count
            return inode
        ino = self.number(node)
        if inode is not None and inode.ino != ino:
            self._unname(inode, node.path)  # the name now names another object
            inode = None
        if inode is None or new:
            inode = self._by_ino.get(ino)
            if inode is None:
                inode = self._by_ino[ino] = Inode(ino, [], node.is_dir)
            elif new:
                for p in inode.paths:
                    if self._by_path.get(p) is inode:
                        del self._by_path[p]
                inode.paths.clear()
                inode.generation += 1
                inode.is_dir = node.is_dir
                inode.attr_of = None
            if node.path not in inode.paths:
                inode.paths.append(node.path)
            self._by_path[node.path] = inode
        inode.lookups += count
        inode.node = node
        return inode

    def refresh(self, inode: Inode, node: Node) -> None:
        """``node`` is what ``inode``'s name resolves to now."""
        inode.node = node

    def forget(self, ino: int, n: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None or ino == ROOT_INO:
            return
        inode.lookups = max(0, inode.lookups - n)
        self._drop_if_unused(inode)

    def _drop_if_unused(self, inode: Inode) -> None:
        if inode.lookups > 0 or inode.opens > 0 or inode.ino == ROOT_INO:
            return
        if self._by_ino.get(inode.ino) is inode:
            del self._by_ino[inode.ino]
        for p in inode.paths:
            if self._by_path.get(p) is inode:
                del self._by_path[p]

    def opened(self, inode: Inode) -> None:
        inode.opens += 1

    def released(self, inode: Inode) -> None:
        inode.opens = max(0, inode.opens - 1)
        self._drop_if_unused(inode)

    def _unname(self, inode: Inode, path: str) -> None:
        if path in inode.paths:
            inode.paths.remove(path)
        if self._by_path.get(path) is inode:
            del self._by_path[path]

    def unlinked(self, path: str) -> None:
        """``path`` no longer names what it named."""
        inode = self._by_path.pop(path, None)
        if inode is None:
            return
        inode.paths.remove(path)
        self._drop_if_unused(inode)

    def moved(self, old: str, new: str) -> None:
        """Everything at or below ``old`` now lives at ``new``."""
        prefix = old + "/"
        hits = [p for p in self._by_path if p == old or p.startswith(prefix)]
        moved = [(p, self._by_path.pop(p)) for p in hits]
        for p, inode in moved:
            np = new + p[len(old):]
            inode.paths[inode.paths.index(p)] = np
            self._by_path[np] = inode

    def exchanged(self, a: str, b: str) -> None:
        tmp = "\0exchange"
        self.moved(a, tmp)
        self.moved(b, a)
        self.moved(tmp, b)
