"""The on-disk layer index: ``LayerIndex`` (what the indexer builds, in columns) and
``IndexFile`` (reading one lazily).

The file is a small header — format version, the root's entry, where each directory's block
lies, totals — followed by one marshal block per directory with its children's columns.  A
reader parses the header at mount and a directory's block the first time that directory is
looked into, so opening a layer costs the same for 60k or 600k files.

Caveats:
* The format is private and versioned (``INDEX_VERSION``); a reader refuses other versions
  with ``LayerError`` (the store then rebuilds the index from the tar).
"""

from __future__ import annotations

import marshal
import os
import stat
from array import array
from dataclasses import dataclass
from typing import Any

from .tarheaders import LayerError

INDEX_VERSION = 2
_ROW = ("mode", "uid", "gid", "size", "mtime", "rdev", "nlink", "offset", "obj", "flags")
_MAGIC = b"STRATA-LAYER-INDEX\n"


@dataclass
class LayerIndex:
    """The entry index of one layer tar, in columns (``array('q')``), as the indexer builds it.

    On disk (``dump``) it is split by directory: a small header (format version, the root's
    entry, where each directory's block lies) and one marshal block per directory holding its
    children's columns.  ``TarLayer`` reads the header at mount and a directory's block the
    first time that directory is looked into, so mounting costs the same for 60k or 600k files.
    """

    paths: list[str]
    cols: dict[str, array[int]]
    targets: dict[int, str]
    xattrs: dict[int, dict[str, bytes]]
    sparse: dict[int, list[tuple[int, int]]]
    children: dict[int, list[int]]

    def _row(self, i: int) -> tuple[Any, ...]:
        return (*(self.cols[k][i] for k in _ROW), self.targets.get(i, ""),
                self.xattrs.get(i, {}), self.sparse.get(i))

    def dump(self, path: str, sync: bool = True) -> None:
        """Write the index to ``path`` (the caller makes it atomic), synced to disk unless
        ``sync`` is false (the caller then does it)."""
        table: dict[str, tuple[int, int]] = {}
        blocks: list[bytes] = []
        pos = 0
        allcols = [(k, self.cols[k]) for k in _ROW]
        targets, xattrs, sparse = self.targets, self.xattrs, self.sparse
        for d, kids in self.children.items():
            names = [self.paths[c].rpartition("/")[2] for c in kids]
            cols = {k: array("q", [col[c] for c in kids]).tobytes() for k, col in allcols}
            extra = ({j: targets[c] for j, c in enumerate(kids) if c in targets},
                     {j: xattrs[c] for j, c in enumerate(kids) if c in xattrs} if xattrs else {},
                     {j: sparse[c] for j, c in enumerate(kids) if c in sparse} if sparse else {})
            blob = marshal.dumps((names, cols, *extra), 4)
            table[self.paths[d]] = (pos, len(blob))
            blocks.append(blob)
            pos += len(blob)
        header = marshal.dumps((INDEX_VERSION, self._row(0), table,
                                (len(self.paths), self.content_size(), len(self.xattrs))), 4)
        with open(path, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for blob in blocks:
                f.write(blob)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str) -> LayerIndex:
        """Read a whole index back (``strata check`` compares it with a fresh build)."""
        layer = IndexFile(path)
        try:
            paths = [""]
            rows = [layer.root]
            children: dict[int, list[int]] = {}
            todo = [("", 0)]
            while todo:
                d, di = todo.pop()
                block = layer.block(d)
                if block is None:
                    continue
                kids = []
                for j, name in enumerate(block.names):
                    child = f"{d}/{name}" if d else name
                    kids.append(len(paths))
                    paths.append(child)
                    rows.append(block.row(j))
                    if child in layer.table:
                        todo.append((child, len(paths) - 1))
                children[di] = kids
        finally:
            layer.close()
        cols = {k: array("q", (r[n] for r in rows)) for n, k in enumerate(_ROW)}
        targets = {i: r[10] for i, r in enumerate(rows) if r[10]}
        xattrs = {i: r[11] for i, r in enumerate(rows) if r[11]}
        sparse = {i: r[12] for i, r in enumerate(rows) if r[12] is not None}
        return cls(paths, cols, targets, xattrs, sparse, children)

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self) -> dict[str, tuple[Any, ...]]:
        """path -> every field, hardlink groups named by their least path (order-free)."""
        first: dict[int, str] = {}
        for i, p in enumerate(self.paths):
            obj = self.cols["obj"][i]
            first[obj] = min(first.get(obj, p), p)
        out = {}
        for i, p in enumerate(self.paths):
            row = list(self._row(i))
            row[_ROW.index("obj")] = first[self.cols["obj"][i]]
            out[p] = tuple(row)
        return out

    def same_as(self, other: LayerIndex) -> bool:
        kids = {self.paths[d]: [self.paths[c] for c in cs] for d, cs in self.children.items()}
        okids = {other.paths[d]: [other.paths[c] for c in cs]
                 for d, cs in other.children.items()}
        return self.rows() == other.rows() and kids == okids

    def content_size(self) -> int:
        """Bytes of regular-file data, each hardlink group counted once."""
        mode, size, obj = self.cols["mode"], self.cols["size"], self.cols["obj"]
        return sum(
            size[i] for i in range(len(self.paths)) if stat.S_ISREG(mode[i]) and obj[i] == i
        )


class Block:
    """One directory's children, decoded on first use."""

    __slots__ = ("names", "pos", "cols", "targets", "xattrs", "sparse", "_row_cols")

    def __init__(self, raw: bytes) -> None:
        names, cols, self.targets, self.xattrs, self.sparse = marshal.loads(raw)
        self.names: list[str] = names
        self.pos = dict(zip(names, range(len(names)), strict=True))
        self.cols: dict[str, array[int]] = {}
        for k, v in cols.items():
            a = array("q")
            a.frombytes(v)
            self.cols[k] = a
        self._row_cols = [self.cols[k] for k in _ROW]

    def row(self, j: int) -> tuple[Any, ...]:
        return (*[c[j] for c in self._row_cols], self.targets.get(j, ""),
                self.xattrs.get(j, {}), self.sparse.get(j))


class IndexFile:
    """The header of an index file, and its blocks read on demand."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(self.fd, len(_MAGIC) + 8, 0)
            if not head.startswith(_MAGIC) or len(head) < len(_MAGIC) + 8:
                raise LayerError(f"corrupt layer index {path}: an unknown format")
            n = int.from_bytes(head[len(_MAGIC):], "little")
            try:
                payload = marshal.loads(os.pread(self.fd, n, len(head)))
            except (ValueError, EOFError, TypeError) as exc:
                raise LayerError(f"corrupt layer index {path}: {exc}") from None
            if not isinstance(payload, tuple) or len(payload) != 4 or \
                    payload[0] != INDEX_VERSION:
                raise LayerError(f"corrupt layer index {path}: an unknown format")
            _, self.root, self.table, self.stats = payload
            self.base = len(head) + n
            self.path = path
            self._blocks: dict[str, Block | None] = {}
        except BaseException:
            os.close(self.fd)
            raise

    def block(self, directory: str) -> Block | None:
        try:
            return self._blocks[directory]
        except KeyError:
            pass
        loc = self.table.get(directory)
        block = None
        if loc is not None:
            try:
                block = Block(os.pread(self.fd, loc[1], self.base + loc[0]))
            except (ValueError, EOFError, TypeError) as exc:
                raise LayerError(f"corrupt layer index {self.path}: {exc}") from None
        self._blocks[directory] = block
        return block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def xattr_count(path: str) -> int | None:
    """How many entries of the index at ``path`` have extended attributes, as its header
    says (None for an index written before the header counted them)."""
    index = IndexFile(path)
    try:
        return int(index.stats[2]) if len(index.stats) > 2 else None
    finally:
        index.close()
