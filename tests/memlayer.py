"""MemLayer: a LowerLayer from a dict spec, for unit tests of the union logic.

``{"a/b": b"data", "a/.wh.c": WH, "d/": DIR, "d/.wh..wh..opq": OPQ, "l": Link("target")}``
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from unionfs.layers import IMPLICIT, OPAQUE, WHITEOUT, WHITEOUT_ENTRY, Entry, join, split

WH = object()
OPQ = object()
DIR = object()


@dataclass(frozen=True)
class Link:
    target: str


class MemLayer:
    def __init__(self, spec: dict[str, object]) -> None:
        self.entries: dict[str, Entry] = {"": Entry(mode=stat.S_IFDIR | 0o755, flags=IMPLICIT)}
        self.data: dict[str, bytes] = {}
        opaque: set[str] = set()
        for n, (raw, value) in enumerate(sorted(spec.items())):
            path = raw.rstrip("/")
            parent, name = split(path)
            self._ensure(parent)
            if name == ".wh..wh..opq" or value is OPQ:
                opaque.add(parent if name == ".wh..wh..opq" else path)
                continue
            if name.startswith(".wh.") or value is WH:
                target = join(parent, name[4:]) if name.startswith(".wh.") else path
                self.entries[target] = WHITEOUT_ENTRY
                continue
            if value is DIR or raw.endswith("/"):
                e = Entry(mode=stat.S_IFDIR | 0o755, ref=path, obj=n + 1)
            elif isinstance(value, Link):
                e = Entry(mode=stat.S_IFLNK | 0o777, target=value.target, ref=path, obj=n + 1,
                          size=len(value.target))
            else:
                assert isinstance(value, bytes)
                e = Entry(mode=stat.S_IFREG | 0o644, size=len(value), ref=path, obj=n + 1)
                self.data[path] = value
            self.entries[path] = e
        for path in opaque:
            e = self.entries[path]
            self.entries[path] = e._replace(flags=e.flags | OPAQUE)

    def _ensure(self, path: str) -> None:
        if path in self.entries:
            return
        self._ensure(split(path)[0])
        self.entries[path] = Entry(mode=stat.S_IFDIR | 0o755, flags=IMPLICIT, ref=path)

    def entry(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def children(self, path: str) -> Iterator[tuple[str, Entry]]:
        for p in sorted(self.entries):
            if p and split(p)[0] == path:
                yield split(p)[1], self.entries[p]

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        return self.data[str(entry.ref)][offset : offset + size]

    def copy_data(self, entry: Entry, dst_fd: int) -> None:
        os.write(dst_fd, self.data[str(entry.ref)])

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        return {}

    def hardlinks(self, entry: Entry) -> list[str]:
        return [str(entry.ref)]

    def close(self) -> None:
        pass


__all__ = ["DIR", "OPQ", "WH", "Link", "MemLayer", "WHITEOUT"]


def from_description(desc: Mapping[str, Any]) -> MemLayer:
    """A layer opener (``unionfs.layerkinds``): ``{"files": {path: text}}``."""
    return MemLayer({path: text.encode() for path, text in desc["files"].items()})
