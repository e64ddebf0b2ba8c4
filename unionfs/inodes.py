"""Inode table: stable numbers for the life of a mount.

An inode is a union *object*, known by its names (``paths``) and by its identity ``key``: a
directory's path, or for a non-directory the object it is in its layer, ``(layer, obj)`` (the
upper's obj is the host inode number), so every name of one hardlink group finds one inode.
Names are authoritative: the adapter reports every namespace change (``moved``, ``unlinked``),
and a name that now resolves to a new identity (a copy-up) re-keys its inode without changing
its number.

Lookup counts rise in lookup/create/mkdir/mknod/symlink/link/readdirplus and fall in
``forget``; an inode leaves the table when the kernel has forgotten it and no handle is open,
so an unlinked file stays readable and writable through open handles until the last release.

Caveats:
* Numbers are never reused within a mount (a counter): a stale kernel reference can never reach
  a different object.
* ``moved`` is linear in the number of known inodes; directory renames are rare.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .resolve import Node

ROOT_INO = 1
Key = tuple[Any, ...]


def key_of(node: Node) -> Key:
    return ("d", node.path) if node.is_dir else (node.layer, node.entry.obj)


@dataclass
class Inode:
    ino: int
    key: Key
    paths: list[str]
    is_dir: bool
    lookups: int = 0
    opens: int = 0
    node: Node | None = None  # the last resolved node (attributes of a nameless open file)
    attr: Any = None  # the EntryAttributes made for ``attr_of`` (fuse_ops' cache)
    attr_of: Node | None = None

    @property
    def path(self) -> str | None:
        return self.paths[0] if self.paths else None


class InodeTable:
    def __init__(self, root: Node) -> None:
        self._next = itertools.count(ROOT_INO + 1)
        self._by_ino: dict[int, Inode] = {}
        self._by_key: dict[Key, Inode] = {}
        self._by_path: dict[str, Inode] = {}
        root_inode = Inode(ROOT_INO, key_of(root), [""], True, lookups=1, node=root)
        self._by_ino[ROOT_INO] = root_inode
        self._by_key[root_inode.key] = root_inode
        self._by_path[""] = root_inode

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def at(self, path: str) -> Inode | None:
        return self._by_path.get(path)

    def __len__(self) -> int:
        return len(self._by_ino)

    def __iter__(self) -> Iterator[Inode]:
        return iter(list(self._by_ino.values()))

    def _set_key(self, inode: Inode, key: Key) -> None:
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        inode.key = key
        self._by_key.setdefault(key, inode)

    def ref(self, node: Node, count: int = 1) -> Inode:
        """The inode of ``node`` (created when new); its lookup count rises by ``count``."""
        inode = self._by_path.get(node.path)
        if inode is not None and inode.node is node:  # the common case: nothing changed
            inode.lookups += count
            return inode
        key = key_of(node)
        if inode is None:
            inode = self._by_key.get(key)
            if inode is None:
                inode = Inode(next(self._next), key, [], node.is_dir)
                self._by_ino[inode.ino] = inode
                self._by_key[key] = inode
            inode.paths.append(node.path)
            self._by_path[node.path] = inode
        if inode.key != key:
            self._set_key(inode, key)  # copied up since we last looked
        inode.lookups += count
        inode.node = node
        return inode

    def refresh(self, inode: Inode, node: Node) -> None:
        """``node`` is what ``inode``'s name resolves to now."""
        key = key_of(node)
        if inode.key != key:
            self._set_key(inode, key)
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
        del self._by_ino[inode.ino]
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        for p in inode.paths:
            if self._by_path.get(p) is inode:
                del self._by_path[p]

    def opened(self, inode: Inode) -> None:
        inode.opens += 1

    def released(self, inode: Inode) -> None:
        inode.opens = max(0, inode.opens - 1)
        if inode.ino in self._by_ino:
            self._drop_if_unused(inode)

    def unlinked(self, path: str) -> None:
        """``path`` no longer names what it named."""
        inode = self._by_path.pop(path, None)
        if inode is None:
            return
        inode.paths.remove(path)
        if not inode.paths:
            # nameless (open handles may keep it): its key must not catch a new object that
            # reuses the path or the host inode number
            self._set_key(inode, ("gone", inode.ino))
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
            if inode.is_dir:
                self._set_key(inode, ("d", np))

    def exchanged(self, a: str, b: str) -> None:
        tmp = "\0exchange"
        self.moved(a, tmp)
        self.moved(b, a)
        self.moved(tmp, b)
