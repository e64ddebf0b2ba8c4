"""UnionView: top-down lookup and merged, sorted readdir over a stack of layers.

The view is a list of layers, index 0 on top (the upper, when there is one).  A merged object is
a ``Node``: its union path, the entry giving its attributes and, for a directory, the stack of
directory entries that merge into it (top-down, ending at an opaque one or the bottom layer).
Lookups are relative to a parent ``Node``, as overlayfs does: a layer's child is only seen when
the layer's parent directory is part of the parent's stack.

Rules (kernel overlayfs): a whiteout ends the search; a non-directory is visible only if nothing
above it was found; a non-directory below a directory is hidden; an opaque directory hides every
lower layer.  A directory's attributes come from the topmost layer that has a real (not IMPLICIT)
entry for it, so a missing parent in a layer tar never overrides the lower directory.

Caveats:
* Nodes are immutable snapshots: after a mutation the caller looks the path up again.
* ``nlink`` of a merged directory is 1, as overlayfs reports; the caller applies ``dir_nlink``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .layers import WHITEOUT, Entry, LowerLayer, join

Stack = tuple[tuple[int, Entry], ...]


@dataclass(frozen=True, slots=True)
class Node:
    """A merged object: ``entry`` from layer ``layer``; ``stack`` lists what merges into it."""

    path: str
    entry: Entry
    layer: int
    stack: Stack

    @property
    def is_dir(self) -> bool:
        return self.entry.is_dir

    @property
    def merged(self) -> bool:
        return len(self.stack) > 1

    @property
    def nlink(self) -> int:
        return 1 if self.is_dir and self.merged else self.entry.nlink

    @property
    def key(self) -> tuple[int, int]:
        """The identity of the object: names of one hardlink group share it."""
        return (self.layer, self.entry.obj)


def merge(path: str, candidates: Iterable[tuple[int, Entry]]) -> Node | None:
    """Combine the entries found for ``path`` top-down into the visible ``Node`` (or None)."""
    found: list[tuple[int, Entry]] = []
    rest = iter(candidates)
    for li, e in rest:
        if e.is_whiteout:
            break
        if not e.is_dir:
            if not found:
                return Node(path, e, li, ((li, e),))
            break
        found.append((li, e))
        if e.opaque:
            break
    if not found:
        return None
    attr_li, attr = found[0]
    for li, e in found:
        if not e.implicit:
            attr_li, attr = li, e
            break
    else:
        if found[-1][1].opaque:
            # an opaque marker below a missing parent hides the lower children, not the lower
            # directory itself: its attributes still come from the first real one below
            for li, e in rest:
                if e.is_whiteout or not e.is_dir:
                    break
                if not e.implicit:
                    attr_li, attr = li, e
                    break
    return Node(path, attr, attr_li, tuple(found))


class UnionView:
    """Read-only resolution over ``layers`` (index 0 is the top)."""

    def __init__(self, layers: Sequence[LowerLayer]) -> None:
        if not layers:
            raise ValueError("a union needs at least one layer")
        self.layers = list(layers)

    def root(self) -> Node:
        node = merge("", ((i, e) for i, layer in enumerate(self.layers)
                          if (e := layer.entry("")) is not None))
        if node is None or not node.is_dir:
            raise ValueError("the top layer's root is not a directory")
        return node

    def lookup(self, parent: Node, name: str) -> Node | None:
        path = join(parent.path, name)
        return merge(path, self.candidates(parent.stack, path))

    def candidates(self, stack: Stack, path: str) -> Iterator[tuple[int, Entry]]:
        for li, _ in stack:
            e = self.layers[li].entry(path)
            if e is not None:
                yield li, e

    def resolve(self, path: str) -> Node | None:
        """The node at ``path`` walking from the root (no symlinks followed)."""
        node: Node | None = self.root()
        if not path:
            return node
        for name in path.split("/"):
            if node is None or not node.is_dir:
                return None
            node = self.lookup(node, name)
        return node

    def listdir(self, node: Node) -> list[tuple[str, Node]]:
        """Visible children of the directory ``node``, sorted by name."""
        if len(node.stack) == 1:  # one layer: nothing to merge, whiteouts aside
            li = node.stack[0][0]
            prefix = node.path + "/" if node.path else ""
            return sorted((name, Node(prefix + name, e, li, ((li, e),)))
                          for name, e in self.layers[li].children(node.path)
                          if not e.flags & WHITEOUT)
        per_name: dict[str, list[tuple[int, Entry]]] = {}
        for li, _ in node.stack:
            for name, e in self.layers[li].children(node.path):
                per_name.setdefault(name, []).append((li, e))
        out = []
        for name in sorted(per_name):
            child = merge(join(node.path, name), per_name[name])
            if child is not None:
                out.append((name, child))
        return out

    def walk(self, node: Node | None = None) -> Iterator[Node]:
        """Every visible node below ``node`` (default the root), depth first, sorted by path
        component, the directory before its children."""
        start = node or self.root()
        todo = [start]
        while todo:
            n = todo.pop()
            yield n
            if n.is_dir:
                todo.extend(child for _, child in reversed(self.listdir(n)))

    def read(self, node: Node, offset: int, size: int) -> bytes:
        return self.layers[node.layer].read(node.entry, offset, size)

    def xattrs(self, node: Node) -> dict[str, bytes]:
        return self.layers[node.layer].xattrs(node.entry)
