"""Byte ranges of registry blobs, for callers in any thread: ``Fetcher``.

A lazily pulled layer reads in whatever thread asks it (a FUSE worker thread, a command's main
thread).  ``Fetcher`` runs one trio loop in a daemon thread of its own, with one ``Transport``,
so every ranged read goes through the registry client's rules: the registries configuration
(mirrors first, insecure registries), credentials and token auth, redirects without
credentials to another origin, 5xx/429 and transport-error retries.  ``fetch`` blocks the
calling thread until the bytes are there or ``timeout`` seconds have passed, and raises
``OSError(EIO)`` when they cannot be had: the read that wanted them fails, the next read tries
again.  Requests reach the loop through ``TrioToken.run_sync_soon``, which any thread may call
(even another trio loop's thread: it then waits for the answer, never deadlocks).

Caveats:
* One ``Fetcher`` per process (``shared()``), started on first use; its thread is a daemon
  thread and its loop ends with the process.
* A registry that ignores ``Range`` (200 instead of 206) is read from the start and the
  response cut after the range: correct, but costly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import httpx
import trio

from .client import Registry, Transport
from .errors import RegistryError
from .pullsteps import Source, get_range

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
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._regs: dict[str, Registry] = {}
        self.requests = 0  # ranged requests sent (tests and measurements read it)
        self.received = 0  # body bytes received

    def start(self) -> None:
        """Start the fetcher's thread and loop (idempotent; ``call`` does it on first use)."""
        self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=trio.run, args=(self._main,),
                                                name="strata-fetcher", daemon=True)
                self._thread.start()
        self._started.wait()

    async def _main(self) -> None:
        transport = self._t = Transport(timeout=httpx.Timeout(self.timeout, pool=None))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                self._started.set()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await transport.aclose()

    def _transport(self) -> Transport:
        return self._t

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run the async ``fn(*args)`` on the fetcher's loop and wait for its result (at most
        ``timeout`` seconds, then OSError(EIO)); for any thread but the loop's own."""
        self._start()
        assert self._token is not None and self._nursery is not None
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        limit = self.timeout if timeout is None else timeout

        async def job() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                with trio.fail_after(limit):
                    result = await fn(*args)
            except trio.TooSlowError:
                fut.set_exception(OSError(errno.EIO, f"timed out after {limit:.0f}s"))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        nursery = self._nursery
        self._token.run_sync_soon(lambda: nursery.start_soon(job))
        try:
            return fut.result(limit + 5)
        except concurrent.futures.TimeoutError:
            fut.cancel()
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

    def prepare(self, source: Source | dict[str, str]) -> None:
        """Start the loop and do now what the first fetch from ``source`` would do first: find
        the registry's scheme and challenge and get its token (the mount daemon calls this
        while it mounts, so a first read costs one request).  Failures are left for the
        fetch to meet."""
        if isinstance(source, dict):
            source = Source.from_json(source)
        with contextlib.suppress(OSError, RegistryError, httpx.HTTPError):
            self.call(self._prepare, source, timeout=min(self.timeout, 10.0))

    async def _prepare(self, source: Source) -> None:
        ep = self._transport().config.pull_endpoints(source.domain, source.api_host)[0]
        reg = self._registry(ep)
        await reg.ping()
        await reg.auth.header((f"repository:{source.path}:pull",))

    def _registry(self, endpoint: Any) -> Registry:
        reg = self._regs.get(endpoint.host)
        if reg is None:
            reg = self._regs[endpoint.host] = Registry(self._transport(), endpoint)
        return reg

    async def _fetch(self, source: Source, digest: str, start: int, end: int) -> bytes:
        endpoints = self._transport().config.pull_endpoints(source.domain, source.api_host)
        last: Exception | None = None
        for ep in endpoints:
            reg = self._registry(ep)
            try:
                data = await get_range(reg, source.path, digest, start, end)
                self.requests += 1
                self.received += len(data)
                return data
            except (RegistryError, httpx.TransportError) as exc:
                last = exc
                log.info("range %d-%d of %s from %s: %s", start, end, digest, ep.host, exc)
        raise RegistryError(f"blob {digest} bytes {start}-{end}: {last}")

def preload() -> None:
    """Import now what the first request would import (httpcore, h11, its trio backend, the
    IDNA codec) and build a client without certificate checks (what a plain-HTTP registry
    uses): no socket is opened.  The preloaded mount daemon calls it while its command plans,
    so that the first read waits for the network alone."""
    import importlib

    Transport().client(False)
    for name in ("httpcore._backends.trio", "httpcore._async.http11", "h11", "encodings.idna"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


_shared: Fetcher | None = None
_shared_lock = threading.Lock()


def shared() -> Fetcher:
    """This process's fetcher."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Fetcher()
        return _shared
