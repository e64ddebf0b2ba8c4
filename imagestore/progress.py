"""Progress events of the public API: one typed event for pull, push, load, import and commit.

A caller passes ``progress=fn`` and ``fn`` gets ``ProgressEvent`` values to draw its own
progress from (the CLI draws docker's lines from them, ``cli/progress.py``).  The registry
client emits them for pull and push in docker's words; ``ByteCounter`` makes them from the byte
callbacks of ``LayerStore.ingest`` (load, import) and of the layer writer of ``commit``.  This
module only translates and throttles; it never reads or writes content.

Caveats:
* Byte events are throttled (at most one every ``INTERVAL`` seconds per layer, plus the final
  one), so a callback may draw directly.  Status changes are never dropped.
* A callback runs in the thread doing the work (a worker thread for pull and push layers):
  it should be quick and must not call back into the store.
* An exception raised by the callback aborts the operation (as any error does; nothing
  partial becomes visible).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

INTERVAL = 0.1


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long operation.

    ``operation``: ``"pull"``, ``"push"``, ``"load"``, ``"import"`` or ``"commit"``.
    ``layer``: the 12-character short digest of the layer (or config blob) the event is about,
    as docker prints it; ``""`` for an event about the whole image.
    ``status``: what happens, in docker's words where docker has some (``"Pulling fs layer"``,
    ``"Downloading"``, ``"Pull complete"``, ``"Already exists"``, ``"Pushing"``,
    ``"Layer already exists"``, ``"Loading layer"``, ...).
    ``done_bytes``/``total_bytes``: bytes processed so far and in all, when the status moves
    bytes (``total_bytes`` is None when not known in advance, as for a commit's layer)."""

    operation: str
    layer: str
    status: str
    done_bytes: int | None = None
    total_bytes: int | None = None


ProgressFn = Callable[[ProgressEvent], None]
ByteFn = Callable[[int], None]  # called with the size of each chunk of bytes processed
ProgressFactory = Callable[[str, int | None], ByteFn | None]  # (diff_id, size) -> per layer


def short(digest: str) -> str:
    """The 12 hex characters docker shows for a digest."""
    return digest.partition(":")[2][:12]


def ignore(event: ProgressEvent) -> None:
    """A ``ProgressFn`` that drops everything."""


class ByteCounter:
    """A ``layerstore.Progress`` (called with each chunk's size) that emits throttled
    ``status`` events for one layer; ``finish`` emits the final one with ``done_status``."""

    def __init__(self, fn: ProgressFn, operation: str, layer: str, status: str,
                 total: int | None, done_status: str) -> None:
        self.fn, self.operation, self.layer = fn, operation, layer
        self.status, self.total, self.done_status = status, total, done_status
        self.done = 0
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= INTERVAL:
            self._last = now
            self.fn(ProgressEvent(self.operation, self.layer, self.status, self.done,
                                  self.total))

    def finish(self, layer: str | None = None) -> None:
        self.fn(ProgressEvent(self.operation, self.layer if layer is None else layer,
                              self.done_status, self.done, self.done))
