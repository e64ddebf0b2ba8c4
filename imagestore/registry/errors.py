"""Errors of the registry client.  All are ``StoreError``s: the CLI prints them as one line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from ..errors import StoreError


class RegistryError(StoreError):
    """The registry refused a request or could not be reached (after retries).

    ``status`` is the HTTP status (0 when no response arrived), ``code`` the first
    distribution error code of the body (``MANIFEST_UNKNOWN``, ``DENIED``...)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AuthError(RegistryError):
    """Authentication failed: no or wrong credentials, or the token server refused."""


class NotFound(RegistryError):
    """A manifest, blob, repository or upload the registry does not know (404)."""


def error_detail(body: bytes) -> tuple[str, str]:
    """(code, "message") from a distribution error body ``{"errors":[{code,message}]}``;
    ("", "") when the body is something else."""
    try:
        doc: Any = json.loads(body[:65536])
        first = doc["errors"][0]
        code, message = str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return "", ""
    return code, message


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Around a nursery: re-raise a ``KeyboardInterrupt`` or the first ``StoreError`` of an
    exception group on its own (the CLI prints it as one line); anything else (cancellation,
    bugs) stays grouped."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        for kind in (KeyboardInterrupt, StoreError):
            for exc in leaves:
                if isinstance(exc, kind):
                    raise exc from None
        raise
