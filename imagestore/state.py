"""The store's refs and metadata: one JSON document, ``state.json``, under one lock.

Writers take an exclusive ``flock`` on ``lock``, read the current document, change it and
replace it atomically (temp + fsync + rename); readers just read the file and always see a
whole version.  A second lock, ``gc.lock``, is held shared by every command that adds content
(an ingest in progress has blobs no ref names yet) and exclusively by garbage collection.

Caveats:
* ``flock`` locks belong to the open file description: they are released when the process dies,
  so a crash never leaves the store locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreError
from .fsutil import atomic_write

STATE_VERSION = 1


@dataclass
class State:
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {"version": STATE_VERSION, "images": self.images, "tags": self.tags,
               "containers": self.containers}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> State:
        doc = json.loads(raw)
        if doc.get("version") != STATE_VERSION:
            raise StoreError(f"state.json has unsupported version {doc.get('version')!r}")
        return cls(doc.get("images", {}), doc.get("tags", {}), doc.get("containers", {}))


class StateFile:
    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "state.json")
        self.lock_path = os.path.join(root, "lock")
        self.gc_lock_path = os.path.join(root, "gc.lock")
        self.tmp_dir = os.path.join(root, "tmp")

    def read(self) -> State:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return State()
        try:
            return State.from_json(raw)
        except ValueError as exc:
            raise StoreError(f"{self.path} is corrupt: {exc}") from None

    def locked(self, wait: bool = True) -> contextlib.AbstractContextManager[bool]:
        """Hold the writers' lock: no transaction runs (nor writes its temp file) meanwhile.
        Yields False (holding nothing) when another process has it and ``wait`` is false."""
        return _flock(self.lock_path, fcntl.LOCK_EX, wait)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        """Exclusive access: yields the current state; writes it back if the block succeeds."""
        with self.locked():
            state = self.read()
            before = state.to_json()
            yield state
            after = state.to_json()
            if after != before:
                atomic_write(self.path, after, tmp_dir=self.tmp_dir)

    def ingesting(self) -> contextlib.AbstractContextManager[bool]:
        """Held while a command adds content no ref names yet: garbage collection waits."""
        return _flock(self.gc_lock_path, fcntl.LOCK_SH, True)

    def collecting(self, wait: bool) -> contextlib.AbstractContextManager[bool]:
        """Exclusive garbage-collection access; yields False (without waiting) when another
        command is adding content and ``wait`` is false."""
        return _flock(self.gc_lock_path, fcntl.LOCK_EX, wait)


@contextlib.contextmanager
def _flock(path: str, operation: int, wait: bool) -> Iterator[bool]:
    """``flock(path, operation)`` for the block; yields False, holding nothing, when another
    process holds it and ``wait`` is false."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, operation | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
