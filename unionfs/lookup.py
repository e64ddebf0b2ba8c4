"""Lookup: the read side of a union — resolving union paths over a ``UnionView`` with caches,
the attributes upper objects have now, identities for inode numbers, link counts, data.

``Union`` (union.py) extends it with every mutation; this is what reading needs and what the
mutations keep in step (``_changed`` after every change).

Caches: a path's ``Node`` until a mutation changes it (``_changed``, with ``tree`` for a
subtree), and listings of directories the upper does not have (their layers never change).
Upper objects change behind the caches through open descriptors (data writes), so ``stat``
and ``fresh`` ask the host again for them.

Identities (``identity``): ``(layer id, object in that layer)``, where a copied-up object keeps
the identity it was copied from (``origins``); ``inodes`` numbers objects by it.

Caveats:
* Reads may run in worker threads beside the request loop (copy-ups, large reads); the caches
  are plain dicts whose single operations are atomic, and nothing here spans a wait.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from .errors import UnionError
from .layers import LowerLayer, restat, split
from .resolve import Node, UnionView
from .upper import UpperLayer


class Lookup:
    """The merged tree of ``lowers`` (top first) under an optional writable ``upper``, read."""

    def __init__(self, lowers: Sequence[LowerLayer], upper: UpperLayer | None = None) -> None:
        self.upper = upper
        self.view = UnionView(([upper] if upper is not None else []) + list(lowers))
        self._cache: dict[str, Node | None] = {}
        self._dirs: dict[str, tuple[Node, list[tuple[str, Node]]]] = {}
        # the paths either cache may hold below each directory, so that forgetting a tree
        # costs its size, not the caches' (may name paths already forgotten)
        self._kids: dict[str, set[str]] = {}
        # each layer's identity for inode numbers, by position in the view: 0 for the upper,
        # 1.. for the lowers, top down (stable if layers are ever added or rotated)
        self.ids = list(range(len(self.view.layers))) if upper is not None else list(
            range(1, len(self.view.layers) + 1))
        # (layer id, upper host inode) -> the identity of the lower object it was copied up
        # from, so a copied-up object keeps its inode number (overlayfs keeps an origin)
        self.origins: dict[tuple[int, int], tuple[int, int]] = {}
        # names whose attributes a copy-up changed behind the caller's back (the object's
        # ctime, the ctime of the directory it went into): ``take_touched`` hands them over
        self.touched: list[str] = []
        # (layer id, host inode) of directories with lower content renamed (their tree copied
        # up): overlayfs keeps such a directory merged through a redirect
        self.renamed: set[tuple[int, int]] = set()

    @property
    def writable(self) -> bool:
        return self.upper is not None

    # -- reading -----------------------------------------------------------------------------

    def resolve(self, path: str) -> Node:
        """The node at ``path``; raises ENOENT (or ENOTDIR for a non-directory parent)."""
        if path in self._cache:
            node = self._cache[path]
        elif not path:
            node = self._remember(path, self.view.root())
        else:
            parent, name = split(path)
            pnode = self.resolve(parent)
            if not pnode.is_dir:
                raise UnionError(errno.ENOTDIR, parent)
            node = self._remember(path, self.view.lookup(pnode, name))
        if node is None:
            raise UnionError(errno.ENOENT, path)
        return node

    def stat(self, path: str) -> Node:
        """``resolve`` with the attributes the object has now: data written through open
        descriptors changes an upper file's size and times behind the union's back, and a
        stale answer to the kernel's LOOKUP would make it drop what was written."""
        return self.fresh(self.resolve(path))

    def fresh(self, node: Node) -> Node:
        """``node`` as its upper object is now (lower objects never change)."""
        if self.upper is None or node.stack[0][0] != 0:
            return node
        try:
            st = self.upper.dir.lstat(node.path)
        except (FileNotFoundError, NotADirectoryError):
            return node
        e = node.entry
        if st.st_ino != e.obj:  # replaced (cannot happen but through this union): look again
            self._changed(node.path)
            return self.resolve(node.path)
        got = restat(e, st, mode=self.upper.is_root)
        if got is e:
            return node
        node = Node(node.path, got, 0, ((0, got), *node.stack[1:]))
        self._cache[node.path] = node
        return node

    def nlink(self, node: Node) -> int:
        """The link count ``stat`` shows: 1 for a directory that merges layers, as overlayfs
        shows every merged directory, and for a renamed one with lower content (overlayfs's
        stays merged through its redirect), else the object's own."""
        e = node.entry
        if stat.S_ISDIR(e.mode) and (len(node.stack) > 1 or (self.ids[node.layer], e.obj)
                                     in self.renamed):
            return 1
        return e.nlink

    def identity(self, node: Node) -> tuple[int, int]:
        """What ``node`` is: ``(layer id, object in that layer)``; a copied-up object is
        what it was copied from.  ``inodes`` numbers objects by it."""
        ident = (self.ids[node.layer], node.entry.obj)
        return self.origins.get(ident, ident)

    def find(self, path: str) -> Node | None:
        try:
            return self.resolve(path)
        except UnionError as exc:
            if exc.code in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def listdir(self, node: Node) -> list[tuple[str, Node]]:
        """Visible children, sorted.  Listings of directories the upper does not have are
        kept (their layers never change; a copy-up drops them): a second walk is dict hits."""
        cached = self._dirs.get(node.path)
        if cached is not None and cached[0] is node:
            return cached[1]
        children = self.view.listdir(node)
        for _, child in children:
            self._cache.setdefault(child.path, child)
        self._kids.setdefault(node.path, set()).update(child.path for _, child in children)
        if not self.in_upper(node):
            self._dirs[node.path] = (node, children)
        return children

    def read(self, node: Node, offset: int, size: int) -> bytes:
        return self.view.read(node, offset, size)

    def xattrs(self, node: Node) -> dict[str, bytes]:
        return self.view.xattrs(node)

    def layer_of(self, node: Node) -> LowerLayer:
        return self.view.layers[node.layer]

    def in_upper(self, node: Node) -> bool:
        return self.upper is not None and node.stack[0][0] == 0

    # -- helpers -------------------------------------------------------------------------------

    def _up(self) -> UpperLayer:
        if self.upper is None:
            raise UnionError(errno.EROFS)
        return self.upper

    def _remember(self, path: str, node: Node | None) -> Node | None:
        self._cache[path] = node
        if path:
            self._kids.setdefault(split(path)[0], set()).add(path)
        return node

    def _changed(self, path: str, tree: bool = False) -> None:
        """``path`` resolves differently now; with ``tree`` everything below it does too (a
        directory copied up, removed or moved).  The cache keeps everything else."""
        self._cache.pop(path, None)
        self._dirs.pop(path, None)
        parent = split(path)[0]
        self._dirs.pop(parent, None)
        if path not in self._kids:  # nothing cached below: the index can let it go
            self._kids.get(parent, set()).discard(path)
        if tree:
            below = [path]
            while below:
                for key in self._kids.pop(below.pop(), ()):
                    self._cache.pop(key, None)
                    self._dirs.pop(key, None)
                    below.append(key)

    def statfs(self) -> dict[str, int]:
        """``statvfs`` fields for the union: the upper's file system; for a union of layers
        that know their size (an image), a full read-only file system of that size (its
        bytes as blocks, its entries as inodes, none free); else the top layer's."""
        out = {"f_namemax": 255}
        usage = self.usage()
        if usage is not None:
            size, entries = usage
            return {**out, "f_bsize": 4096, "f_frsize": 4096, "f_blocks": (size + 4095) // 4096,
                    "f_files": entries, "f_bfree": 0, "f_bavail": 0, "f_ffree": 0,
                    "f_favail": 0}
        top = self.upper or self.view.layers[0]
        fd = getattr(getattr(top, "dir", None), "fd", None)
        st = os.statvfs(fd if fd is not None else "/")
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):
            out[name] = getattr(st, name)
        return out

    def usage(self) -> tuple[int, int] | None:
        """(bytes, entries) of a union without an upper whose layers all say (``usage``):
        what ``df`` shows for an image mount, as for a read-only file system of that size;
        None otherwise (the upper's file system answers then)."""
        if self.upper is not None:
            return None
        total = entries = 0
        for layer in self.view.layers:
            usage = getattr(layer, "usage", None)
            if usage is None:
                return None
            size, count = usage()
            total, entries = total + size, entries + count
        return total, entries

    # -- data ----------------------------------------------------------------------------------

    def blocking(self, node: Node) -> bool:
        """Whether reading ``node``'s data may wait (a layer whose bytes are still arriving:
        its ``blocking`` attribute)."""
        return bool(getattr(self.view.layers[node.layer], "blocking", False))

    def read_blocks(self, node: Node, offset: int, size: int) -> bool:
        """Whether this read of ``node`` may wait (``blocking``, unless the layer's
        ``read_would_block`` says these bytes are at hand)."""
        layer = self.view.layers[node.layer]
        if not getattr(layer, "blocking", False):
            return False
        would_block = getattr(layer, "read_would_block", None)
        return would_block is None or bool(would_block(node.entry, offset, size))

    def open_file(self, node: Node, writable: bool) -> int | None:
        """A descriptor of ``node``'s data for a handle: the upper file (read-write when
        ``writable``; write-only where the owner may not read it), a directory layer's file,
        or None where the layer serves reads itself (tar layers)."""
        if self.in_upper(node):
            up = self._up()
            if not writable:
                return up.open_path(node.path, os.O_RDONLY)
            try:
                return up.open_path(node.path, os.O_RDWR)
            except PermissionError:
                return up.open_path(node.path, os.O_WRONLY)
        opener = getattr(self.layer_of(node), "open_file", None)
        if opener is None or self.blocking(node):
            return None
        return int(opener(node.entry))

    def fstat(self, node: Node, fd: int) -> Node:
        """``node`` (an upper file no name reaches any more) with the attributes of its open
        descriptor ``fd``."""
        upper = self._up()
        got = restat(node.entry, os.fstat(fd), mode=upper.is_root)
        return node if got is node.entry else Node(node.path, got, node.layer, node.stack)
