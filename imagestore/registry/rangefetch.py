"""Byte ranges of registry blobs, for callers in any thread: ``Fetcher``.

A lazily pulled layer reads in whatever thread asks it (a FUSE worker thread, the layer's
completion, a command's main thread).  ``Fetcher`` fetches in that very thread, through the
registry client without an event loop (``Transport(blocking=True)``: one HTTP/1.1 connection
per thread and registry, kept alive), so every ranged read goes through the client's rules:
the registries configuration (mirrors first, insecure registries), credentials and token
auth, redirects without credentials to another origin, 5xx/429 and transport-error retries.
``fetch`` blocks the calling thread until the bytes are there or ``timeout`` seconds have
passed (``runtime.deadline``, retries and their waits included), and raises ``OSError(EIO)``
when they cannot be had: the read that wanted them fails, the next read tries again.

Caveats:
* One ``Fetcher`` per process (``shared()``); the registries' scheme and tokens, found by
  the first fetch (or ``prepare``), serve every thread.
* A registry that ignores ``Range`` (200 instead of 206) is read from the start and the
  response cut after the range: correct, but costly.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import httpx

from .client import Registry, Transport
from .errors import RegistryError
from .pullsteps import Source, get_range
from .runtime import deadline, run_sync

log = logging.getLogger(__name__)
# httpx logs every request at INFO: in a mount daemon's log (INFO) that is a line a range read
logging.getLogger("httpx").setLevel(logging.WARNING)

DEFAULT_TIMEOUT = 30.0


def default_timeout() -> float:
    """Seconds a ranged read may take (``STRATA_LAZY_TIMEOUT``, default 30)."""
    try:
        return float(os.environ.get("STRATA_LAZY_TIMEOUT", "") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT


class Fetcher:
    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout if timeout is not None else default_timeout()
        self._t = Transport(timeout=httpx.Timeout(self.timeout, pool=None), blocking=True)
        self._lock = threading.Lock()
        self._regs: dict[str, Registry] = {}
        self.requests = 0  # ranged requests sent (tests and measurements read it)
        self.received = 0  # body bytes received

    def close(self) -> None:
        """Close its connections (a fetcher that fetches again opens new ones)."""
        run_sync(self._t.aclose())

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn(*args)`` — a coroutine of the registry client — in this thread, to its end
        or for at most ``timeout`` seconds (default: the fetcher's), then OSError(EIO)."""
        limit = self.timeout if timeout is None else timeout
        try:
            with deadline(limit):
                return run_sync(fn(*args))
        except TimeoutError:
            raise OSError(errno.EIO, f"timed out after {limit:.0f}s") from None

    def fetch(self, source: Source | dict[str, str], digest: str, start: int, end: int
              ) -> bytes:
        """Bytes ``start:end`` of blob ``digest`` from ``source`` (a ``Source`` or its JSON
        form); OSError(EIO) when they cannot be had."""
        if isinstance(source, dict):
            source = Source.from_json(source)
        try:
            data: bytes = self.call(self._fetch, source, digest, start, end)
        except RegistryError as exc:
            raise OSError(errno.EIO, str(exc)) from None
        return data

    def prepare(self, source: Source | dict[str, str], token: bool = True) -> None:
        """Do now what the first fetch from ``source`` would do first: find the registry's
        scheme and challenge and (``token``) get its token, which may run a credential helper
        (the mount daemon calls this while it mounts, so a first read costs one request), for
        at most 10 seconds (or this thread's ``runtime.deadline``).  Failures are left for the
        fetch to meet."""
        if isinstance(source, dict):
            source = Source.from_json(source)
        with contextlib.suppress(OSError, RegistryError, httpx.HTTPError):
            self.call(self._prepare, source, token, timeout=min(self.timeout, 10.0))

    async def _prepare(self, source: Source, token: bool) -> None:
        ep = self._t.config.pull_endpoints(source.domain, source.api_host)[0]
        reg = self._registry(ep)
        await reg.ping()
        if token:
            await reg.auth.header((f"repository:{source.path}:pull",))

    def _registry(self, endpoint: Any) -> Registry:
        with self._lock:
            reg = self._regs.get(endpoint.host)
            if reg is None:
                reg = self._regs[endpoint.host] = Registry(self._t, endpoint)
            return reg

    async def _fetch(self, source: Source, digest: str, start: int, end: int) -> bytes:
        endpoints = self._t.config.pull_endpoints(source.domain, source.api_host)
        last: Exception | None = None
        for ep in endpoints:
            reg = self._registry(ep)
            try:
                data = await get_range(reg, source.path, digest, start, end)
                with self._lock:
                    self.requests += 1
                    self.received += len(data)
                return data
            except (RegistryError, httpx.TransportError) as exc:
                last = exc
                log.info("range %d-%d of %s from %s: %s", start, end, digest, ep.host, exc)
        raise RegistryError(f"blob {digest} bytes {start}-{end}: {last}")


def preload() -> None:
    """Import now what the first request would import (the blocking transport) and build a
    client without certificate checks (what a plain-HTTP registry uses): no socket is opened.
    The preloaded mount daemon calls it while its command plans, so that the first read waits
    for the network alone."""
    Transport(blocking=True).client(False)


_shared: Fetcher | None = None
_shared_lock = threading.Lock()


def shared() -> Fetcher:
    """This process's fetcher."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Fetcher()
        return _shared
