"""What a mount can be of, besides an image or a container: plain directories
(``Directories``) and a build stage's stored layers (``Layers``); how long it may take to
answer (``READY_TIMEOUT``).  A module of its own, which imports nothing, so that the public
API (``Store``, ``imagestore.Directories``) does not load the mount planning to name them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

READY_TIMEOUT = 60.0  # seconds a mount may take to answer


@dataclass(frozen=True)
class Directories:
    """A union of plain directories in overlayfs format (``strata mount --lower``): ``lower``
    top first; with ``upper`` and ``work`` a writable one, as ``mount -t overlay``."""

    lower: tuple[str, ...]
    upper: str | None = None
    work: str | None = None


@dataclass(frozen=True)
class Layers:
    """Stored layers (their descriptions, top first) under a writable ``upper``: the mount of a
    build's stage.  ``cleanup``: a directory the daemon removes once the mount has ended (the
    stage's uppers), even when whoever started it was killed."""

    layers: tuple[dict[str, Any], ...]
    upper: str
    work: str
    cleanup: str | None = None
