"""Progress events of pull and push: the CLI turns them into docker-like lines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One progress line: ``id`` is a short digest (or a tag for a header line); ``current``
    and ``total`` are bytes for ``Downloading``/``Pushing``."""

    id: str
    status: str
    current: int | None = None
    total: int | None = None


EventFn = Callable[[Event], None]


def short(digest: str) -> str:
    """The 12 hex characters docker shows for a digest."""
    return digest.partition(":")[2][:12]


def ignore(event: Event) -> None:
    """An ``EventFn`` that drops everything."""
