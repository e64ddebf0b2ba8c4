"""An httpx transport whose requests block the calling thread: ``BlockingHTTP``.

httpx's own transports (httpcore) wait for the network through the event loop; this one does
its I/O with ``http.client``, in the thread that awaits it, and never suspends, so the
registry client's coroutines run over it without an event loop (``runtime.run_sync``, with
``Transport(blocking=True)``).  HTTP/1.1 with keep-alive: one connection per thread and
origin, reused once a response has been read to its end (dropped otherwise); a kept-alive
connection the server has closed meanwhile is opened again once.  TLS: the system's CAs
(``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` honoured), or no checks at all for a client that does
not verify.  Failures are httpx's transport errors (``ConnectError``, ``ReadError``,
``ConnectTimeout``, ``ReadTimeout``), each caused by the socket's or TLS's own error, so the
client retries and describes them as it does httpcore's.

Caveats:
* No proxies: ``usable()`` is False when the environment names one, and callers take the
  event-loop path then.
* Timeouts are per socket operation (connect, then each read or write), as httpcore's are,
  and within this thread's ``runtime.deadline``: past it, TimeoutError.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from collections.abc import AsyncIterator

import httpx

from .runtime import remaining

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def usable() -> bool:
    """False when the environment names a proxy (which httpx would use and this does not)."""
    return not any(os.environ.get(v) or os.environ.get(v.upper()) for v in PROXY_VARIABLES)


class BlockingHTTP(httpx.AsyncBaseTransport):
    def __init__(self, verify: bool, timeout: httpx.Timeout) -> None:
        self.verify = verify
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._opened: list[http.client.HTTPConnection] = []

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                ctx = ssl.create_default_context()
                if not self.verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                self._tls = ctx
            return self._tls

    def _connection(self, url: httpx.URL) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str, int | None], http.client.HTTPConnection] = \
            self._local.__dict__.setdefault("conns", {})
        key = (url.scheme, url.host, url.port)
        conn = conns.get(key)
        if conn is None:
            if url.scheme == "https":
                conn = http.client.HTTPSConnection(url.host, url.port,
                                                   timeout=self.timeout.connect,
                                                   context=self._context())
            elif url.scheme == "http":
                conn = http.client.HTTPConnection(url.host, url.port,
                                                  timeout=self.timeout.connect)
            else:
                raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
            conns[key] = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        target = request.url.raw_path.decode("ascii")
        conn = self._connection(request.url)
        for again in (True, False):
            reused = conn.sock is not None
            try:
                if not reused:
                    conn.timeout = _bounded(self.timeout.connect)
                    conn.connect()
                assert conn.sock is not None
                conn.sock.settimeout(_bounded(self.timeout.read))
                conn.putrequest(request.method, target, skip_host=True,
                                skip_accept_encoding=True)
                for name, value in request.headers.raw:
                    conn.putheader(name.decode("latin-1"), value.decode("latin-1"))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as exc:
                conn.close()
                if reused and again:
                    continue  # the server closed the kept-alive connection: a fresh one
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            except TimeoutError as exc:
                timeout = httpx.ReadTimeout if conn.sock is not None else httpx.ConnectTimeout
                conn.close()
                _check_deadline()
                raise timeout(str(exc) or "timed out") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                error = httpx.ReadError if reused else httpx.ConnectError
                raise error(str(exc) or type(exc).__name__) from exc
        return httpx.Response(resp.status, headers=resp.getheaders(),
                              stream=_Body(resp, conn), request=request)

    async def aclose(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()


class _Body(httpx.AsyncByteStream):
    """A response's body, read as it is iterated; the connection is kept for the next
    request once the body was read to its end, closed otherwise."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection
                 ) -> None:
        self._resp = resp
        self._conn = conn

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                _check_deadline()
                # read(), not read1(): it closes the response at its end, which lets the
                # connection serve the next request
                chunk = self._resp.read(1 << 16) if not self._resp.isclosed() else b""
            except TimeoutError as exc:
                self._conn.close()
                _check_deadline()
                raise httpx.ReadTimeout(str(exc) or "timed out") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        if not self._resp.isclosed():
            self._conn.close()  # not read to its end: the connection cannot be reused
        self._resp.close()


def _bounded(seconds: float | None) -> float | None:
    """A socket timeout of ``seconds``, shortened to this thread's deadline (``runtime``)."""
    left = remaining()
    if left is None:
        return seconds
    _check_deadline()
    return left if seconds is None else min(seconds, left)


def _check_deadline() -> None:
    """TimeoutError (not httpx's: the client does not retry it) once the deadline passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise TimeoutError("the deadline passed")
