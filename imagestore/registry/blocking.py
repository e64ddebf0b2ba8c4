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

Proxies: the environment's (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, as
httpx reads them), when they are ``http://`` proxies: HTTPS through ``CONNECT``, plain HTTP by
absolute URI, credentials in the proxy's URL sent as ``Proxy-Authorization``.

Caveats:
* A proxy of another scheme (``socks5://``, ``https://``): ``usable()`` is False (the lazy
  pull takes the event-loop path) and a request fails with httpx's ``UnsupportedProtocol``.
* Timeouts are per socket operation (connect, then each read or write), as httpcore's are,
  and within this thread's ``runtime.deadline``: past it, TimeoutError.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import threading
import urllib.parse
import urllib.request
import weakref
from collections.abc import AsyncIterator

import httpx

from .runtime import remaining


def _environment_proxies() -> dict[str, str]:
    return urllib.request.getproxies_environment()


# NO_PROXY's rule (a host, a domain suffix, "*"), as urllib applies it: typeshed lacks it
_bypass = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009


def usable() -> bool:
    """False when the environment names a proxy this transport cannot use (not http://)."""
    return all(_proxy_url(raw).scheme == "http"
               for kind, raw in _environment_proxies().items() if kind != "no")


def _proxy_url(raw: str) -> urllib.parse.SplitResult:
    return urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")


class _Conns(dict[tuple[str, str, int | None], http.client.HTTPConnection]):
    """One thread's connections, closed when the thread ends (its local storage goes)."""

    def __del__(self) -> None:
        for conn in self.values():
            conn.close()


class _Route:
    """How a connection reaches its origin: directly, or through a forward proxy (then a
    plain-HTTP request names the absolute URL, with the proxy's credentials)."""

    def __init__(self, proxy: urllib.parse.SplitResult | None) -> None:
        self.proxy = proxy
        self.auth: dict[str, str] = {}
        if proxy is not None and proxy.username is not None:
            user = urllib.parse.unquote(proxy.username)
            password = urllib.parse.unquote(proxy.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.auth = {"Proxy-Authorization": f"Basic {token}"}


class BlockingHTTP(httpx.AsyncBaseTransport):
    def __init__(self, verify: bool, timeout: httpx.Timeout) -> None:
        self.verify = verify
        self.timeout = timeout
        self._proxies = _environment_proxies()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._opened: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._routes: weakref.WeakKeyDictionary[http.client.HTTPConnection, _Route] = \
            weakref.WeakKeyDictionary()

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                ctx = ssl.create_default_context()
                if not self.verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                self._tls = ctx
            return self._tls

    def _proxy(self, url: httpx.URL) -> urllib.parse.SplitResult | None:
        raw = self._proxies.get(url.scheme) or self._proxies.get("all")
        if not raw or _bypass(url.host, self._proxies):
            return None
        proxy = _proxy_url(raw)
        if proxy.scheme != "http" or not proxy.hostname:
            raise httpx.UnsupportedProtocol(f"proxy {raw}: only http:// proxies are supported "
                                            "here")
        return proxy

    def _connection(self, url: httpx.URL) -> tuple[http.client.HTTPConnection, _Route]:
        conns: _Conns | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = _Conns()
        key = (url.scheme, url.host, url.port)
        conn = conns.get(key)
        if conn is None:
            if url.scheme not in ("http", "https"):
                raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
            route = _Route(self._proxy(url))
            host, port = url.host, url.port
            if route.proxy is not None:
                host, port = route.proxy.hostname or "", route.proxy.port or 80
            if url.scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout.connect,
                                                   context=self._context())
                if route.proxy is not None:
                    conn.set_tunnel(url.host, url.port or 443, headers=route.auth)
                    route.auth = {}  # said in the CONNECT, not to the origin
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout.connect)
            conns[key] = conn
            with self._lock:
                self._opened.add(conn)
                self._routes[conn] = route
        return conn, self._routes[conn]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        conn, route = self._connection(request.url)
        # through a forward proxy, plain HTTP names the whole URL (HTTPS tunnels instead)
        absolute = route.proxy is not None and request.url.scheme == "http"
        target = str(request.url) if absolute else request.url.raw_path.decode("ascii")
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
                for key, text in route.auth.items():
                    conn.putheader(key, text)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as exc:
                conn.close()
                if reused and again:
                    continue  # the server closed the kept-alive connection: a fresh one
                raise httpx.ReadError(_text(exc)) from exc
            except TimeoutError as exc:
                timeout = httpx.ReadTimeout if conn.sock is not None else httpx.ConnectTimeout
                conn.close()
                _check_deadline()
                raise timeout(str(exc) or "timed out") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                error = httpx.ReadError if reused else httpx.ConnectError
                raise error(_text(exc)) from exc
        return httpx.Response(resp.status, headers=resp.getheaders(),
                              stream=_Body(resp, conn), request=request)

    async def aclose(self) -> None:
        with self._lock:
            for conn in list(self._opened):
                conn.close()


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
                raise httpx.ReadError(_text(exc)) from exc
            if not chunk:
                if self._resp.length:  # closed before its Content-Length: as httpcore says
                    self._conn.close()
                    raise httpx.RemoteProtocolError("the server closed the connection "
                                                    f"{self._resp.length} bytes before the "
                                                    "end of the body")
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


def _text(exc: BaseException) -> str:
    """A socket error in words ("Connection refused", not "[Errno 111] Connection refused")."""
    strerror = getattr(exc, "strerror", None)
    return strerror if isinstance(strerror, str) and strerror else str(exc) or \
        type(exc).__name__
