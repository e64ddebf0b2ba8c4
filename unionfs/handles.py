"""What the FUSE adapter keeps between requests, without pyfuse3: the mutation lock, open file
and directory handles, and the readdir cookies of a listing.

Caveats:
* ``Listing`` holds pyfuse3's ``EntryAttributes`` for "." and ".." (typed ``Any`` here, where
  pyfuse3 is not imported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .inodes import Inode
from .resolve import Node


class MutationLock:
    """``trio.Lock`` without the scheduling points of an uncontended acquire: trio's yields
    twice, once while already holding the lock, so concurrent requests piled up behind every
    mutation (parking and waking cost more than the mutations in W8).  Held across awaits like
    trio's; only the free case skips the checkpoints.  ``settle`` runs before each release
    (what a mutation leaves to tell the kernel)."""

    def __init__(self, settle: Callable[[], None] = lambda: None) -> None:
        self._lock = trio.Lock()
        self._settle = settle

    def locked(self) -> bool:
        return self._lock.locked()

    async def acquire(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()

    def release(self) -> None:
        try:
            self._settle()
        finally:
            self._lock.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Handle:
    inode: Inode
    fd: int | None  # the file's data (upper or directory layer); None: the layer reads
    node: Node | None
    writable: bool
    lower: bool  # reads a lower layer's file: switched to the upper copy after a copy-up


# "." and ".." with their attributes; the children with their cookies (increasing) and nodes
Listing = tuple[list[tuple[bytes, Any]], list[int], list[tuple[str, Node]]]

_COOKIE_MASK = (1 << 62) - 1


def cookies(entries: list[tuple[str, Node]]) -> tuple[list[int], list[tuple[str, Node]]]:
    """Each child's readdir offset from its name alone (a hash, unique within the listing),
    with the children in that order.  The kernel keeps one cached listing per directory for
    every open of it and resumes a reader at an offset it got earlier, perhaps from a listing
    made before a change: an offset must name the same place in every listing, or a reader
    skips or repeats names a change did not touch.  (Positions would shift when an earlier
    name goes.)  1 and 2 are "." and ".."; a collision takes the next free number."""
    keyed = sorted((((hash(name) & _COOKIE_MASK) + 3, name, node) for name, node in entries),
                   key=lambda t: (t[0], t[1]))
    out: list[int] = []
    last = 2
    for c, _, _ in keyed:
        last = c if c > last else last + 1
        out.append(last)
    return out, [(name, node) for _, name, node in keyed]


@dataclass
class DirHandle:
    inode: Inode
    listing: Listing | None = None  # made by the first readdir, again by a rewind
