"""The registry client without an event loop (``Transport(blocking=True)``, ``run_sync``), as
``pull --lazy`` uses it: against the real registries, the same rules as under trio — Bearer
tokens (anonymous, with credentials, refreshed on 401), Basic auth, TLS verification, 5xx
retries, redirects to another host without credentials, ranges, an HTTP proxy; and its HTTP
transport (``BlockingHTTP``) against a local server: keep-alive, a connection the server
closed, a body left unread or cut short, a read timeout."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagestore import oci, reference
from imagestore.api import Store
from imagestore.lazylayer import LazyLayer
from imagestore.registry import AuthError, Registry, RegistryError, RetryPolicy
from imagestore.registry.blocking import BlockingHTTP, usable
from imagestore.registry.client import Transport
from imagestore.registry.config import Endpoint
from imagestore.registry.pullsteps import choose, fetch_blob_bytes, get_range, pull_scope, resolve
from imagestore.registry.rangefetch import Fetcher
from imagestore.registry.runtime import run_sync
from tests import lazy_helpers as lh
from tests import registry_helpers as rh
from tests.conftest import REGISTRY_USERS

pytestmark = [pytest.mark.registry]

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)


def _auth(user: str) -> str:
    return base64.b64encode(f"{user}:{REGISTRY_USERS[user]}".encode()).decode()


def _login(env: dict[str, Path], host: str, user: str = "alice") -> None:
    (env["DOCKER_CONFIG"] / "config.json").write_text(
        json.dumps({"auths": {host: {"auth": _auth(user)}}}))


def _image(name: str, retry: RetryPolicy | None = None
           ) -> tuple[oci.Manifest, bytes, bytes]:
    """The manifest, the config and the first 100 bytes of the first layer of ``name``,
    fetched without an event loop."""
    t = Transport(retry=retry, blocking=True)
    try:
        ref = reference.parse(name)
        scopes = (pull_scope(ref.path),)
        reg, top, _ = run_sync(resolve(t, ref, scopes))
        manifest = run_sync(choose(reg, ref, top, None, scopes))
        config = run_sync(fetch_blob_bytes(reg, ref.path, manifest.config, scopes))
        head = run_sync(get_range(reg, ref.path, manifest.layers[0].digest, 0, 100))
        return manifest, config, head
    finally:
        run_sync(t.aclose())


def test_bearer_tokens_anonymous_with_credentials_and_refreshed(
        token_registry: rh.RegistryProcess, token_server: rh.TokenServer,
        registry_env: dict[str, Path]) -> None:
    host = token_registry.host
    before = len(token_server.requests)
    manifest, config, head = _image(f"{host}/public/img:1")
    assert oci.ImageConfig.parse(config, manifest.config.digest).diff_ids
    assert head[:2] == b"\x1f\x8b"  # the layer's gzip, from a Range request
    assert [(r.method, r.user, r.scopes) for r in token_server.requests[before:]] == \
        [("GET", None, ["repository:public/img:pull"])]  # one token for every request
    with pytest.raises(AuthError, match="authentication required"):
        _image(f"{host}/private/img:1")
    _login(registry_env, host)
    token_server.stale = 1  # the first token has expired already: a 401, then a new one
    before = len(token_server.requests)
    _image(f"{host}/private/img:1")
    assert [(r.user, r.scopes) for r in token_server.requests[before:]] == \
        [("alice", ["repository:private/img:pull"])] * 2


def test_basic_auth(basic_registry: rh.RegistryProcess, registry_env: dict[str, Path]) -> None:
    name = f"{basic_registry.host}/private/img:1"
    with pytest.raises(AuthError, match=f"try strata login {basic_registry.host}"):
        _image(name)
    _login(registry_env, basic_registry.host, "bob")
    assert _image(name)[2][:2] == b"\x1f\x8b"


def test_tls_is_verified_against_the_system_cas(
        tls_registry: tuple[rh.RegistryProcess, Path], registry_env: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg, cert = tls_registry
    assert _image(f"{reg.host}/private/img:1")[2][:2] == b"\x1f\x8b"  # loopback: unverified
    strict = Endpoint(reg.host, ("https",), verify=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(registry_env["DOCKER_CONFIG"] / "none.pem"))
    t = Transport(retry=RetryPolicy(attempts=0), blocking=True)
    try:
        with pytest.raises(RegistryError,
                           match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
            run_sync(Registry(t, strict).ping())
    finally:
        run_sync(t.aclose())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    t = Transport(blocking=True)
    try:
        r = Registry(t, strict)
        run_sync(r.ping())
        assert r.base == f"https://{reg.host}"
    finally:
        run_sync(t.aclose())


def test_retries_and_redirects_without_credentials(
        auth_registry: rh.RegistryProcess, registry_env: dict[str, Path]) -> None:
    proxy = rh.FaultProxy(auth_registry)
    try:
        _login(registry_env, proxy.host)
        proxy.add("GET", "/manifests/1", "status", times=2, status=500)
        proxy.add("GET", r"/blobs/sha256:", "redirect", times=99)
        _, config, head = _image(f"{proxy.host}/private/img:1", FAST)
        assert [r.status for r in proxy.requests("GET", "/manifests/1")] == [500, 500, 200]
        cdn = proxy.requests("GET", listener="cdn")
        assert len(cdn) == 2 and all(r.status in (200, 206) for r in cdn)  # config, range
        assert not any("authorization" in r.headers for r in cdn)
        assert all("authorization" in r.headers for r in proxy.requests("GET", "/blobs/"))
        assert config.startswith(b"{") and head[:2] == b"\x1f\x8b"
    finally:
        proxy.close()


# -- through an HTTP proxy --------------------------------------------------------------------


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class _ForwardProxy:
    """A forward HTTP proxy: ``CONNECT`` tunnels, absolute-URI requests relayed (one a
    connection); it records (method, target, Proxy-Authorization) of each."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                method, target, _ = self.rfile.readline().decode().split(" ", 2)
                headers = []
                while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    headers.append(line.decode())
                auth = [h.split(":", 1)[1].strip() for h in headers
                        if h.lower().startswith("proxy-authorization:")]
                outer.seen.append((method, target, auth[0] if auth else None))
                if method == "CONNECT":
                    host, port = target.rsplit(":", 1)
                    with socket.create_connection((host, int(port))) as up:
                        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        self.wfile.flush()
                        back = threading.Thread(target=_copy, args=(up, self.connection))
                        back.start()
                        _copy(self.connection, up)
                        back.join()
                    return
                u = urllib.parse.urlsplit(target)
                keep = [h for h in headers if not h.lower().startswith(("proxy-", "connection"))]
                path = u.path + (f"?{u.query}" if u.query else "")
                with socket.create_connection((u.hostname, u.port or 80)) as up:
                    up.sendall(f"{method} {path} HTTP/1.1\r\n{''.join(keep)}"
                               "Connection: close\r\n\r\n".encode())
                    _copy(up, self.connection)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://user:p%40ss@127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_ForwardProxy]:
    p = _ForwardProxy()
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", p.url)
    monkeypatch.setenv("https_proxy", p.url)
    yield p
    p.close()


def test_a_lazy_pull_and_its_reads_go_through_the_environments_proxy(
        registry: rh.RegistryProcess, forward_proxy: _ForwardProxy,
        tls_registry: tuple[rh.RegistryProcess, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    refs = lh.push_images(registry.host, tmp_path, [lh.generated_layers(files=30)[0]],
                          "proxied", None)
    store = Store(str(tmp_path / "s"))
    img = store.pull(refs["estargz-strata"], lazy=True).image  # without an event loop
    auth = "Basic " + base64.b64encode(b"user:p@ss").decode()
    seen = [(m, t) for m, t, a in forward_proxy.seen if a == auth]
    assert ("GET", f"http://{registry.host}/v2/") in seen  # plain HTTP: by absolute URI
    assert any(t.startswith(f"http://{registry.host}/v2/lazy/proxied-esgz-strata/blobs/")
               for _, t in seen)
    digest = store.lazy_layers(img)[0]
    before = len(forward_proxy.seen)
    layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
    try:
        entry = layer.entry("etc/os-release")
        assert entry is not None and layer.read(entry, 0, 100).startswith(b"PRETTY_NAME")
    finally:
        layer.close()
    assert any("/blobs/" in t for _, t, _ in forward_proxy.seen[before:])  # the range too
    tls, _ = tls_registry  # HTTPS: a CONNECT tunnel, credentials said to the proxy alone
    _image(f"{tls.host}/private/img:1")
    assert (f"{tls.host}", auth) in [(t, a) for m, t, a in forward_proxy.seen
                                     if m == "CONNECT"]
    before = len(forward_proxy.seen)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    _image(f"{tls.host}/private/img:1")
    assert len(forward_proxy.seen) == before  # NO_PROXY names it: straight there
    monkeypatch.setenv("https_proxy", "socks5://127.0.0.1:1")
    assert not usable()


# -- the transport against a local HTTP server ------------------------------------------------


class _Server:
    """A local HTTP/1.1 server counting the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def do_GET(self) -> None:
                if self.path == "/slow":
                    time.sleep(1.0)
                if self.path == "/short":  # a body cut short: 10 of the 100 bytes promised
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    self.close_connection = True
                    return
                body = (self.path * 20000).encode()
                self.send_response(200)
                if self.path == "/chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 7000):
                        part = body[i:i + 7000]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if self.path == "/close":
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that left before the body was sent (the tests do)

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _get(client: httpx.AsyncClient, url: str, read: int | None = None) -> bytes:
    """GET ``url``: its whole body, or only the first ``read`` bytes (then closed)."""
    async def go() -> bytes:
        resp = await client.send(client.build_request("GET", url), stream=True)
        try:
            got = b""
            async for chunk in resp.aiter_raw():
                got += chunk
                if read is not None and len(got) >= read:
                    break
            return got
        finally:
            await resp.aclose()
    return run_sync(go())


@pytest.fixture
def clients() -> Iterator[list[httpx.AsyncClient]]:
    made: list[httpx.AsyncClient] = []
    yield made
    for c in made:
        run_sync(c.aclose())


def _client(clients: list[httpx.AsyncClient], timeout: float = 5.0) -> httpx.AsyncClient:
    clients.append(httpx.AsyncClient(transport=BlockingHTTP(False, httpx.Timeout(timeout))))
    return clients[-1]


def test_connections_are_kept_alive_and_reopened_when_the_server_closed_them(
        server: _Server, clients: list[httpx.AsyncClient]) -> None:
    c = _client(clients)
    assert _get(c, server.url + "/a") == b"/a" * 20000
    assert _get(c, server.url + "/chunked") == b"/chunked" * 20000
    assert server.connections == 1  # both on one connection
    assert _get(c, server.url + "/close") == b"/close" * 20000
    assert _get(c, server.url + "/b") == b"/b" * 20000  # the server closed it: a new one
    assert server.connections == 2
    for conn in c._transport._opened:  # type: ignore[attr-defined]
        if conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)  # broken under the client (as by a reset)
    assert _get(c, server.url + "/c") == b"/c" * 20000  # a broken pipe: opened again
    assert server.connections == 3


def test_a_body_left_unread_closes_its_connection(server: _Server,
                                                   clients: list[httpx.AsyncClient]) -> None:
    c = _client(clients)
    assert len(_get(c, server.url + "/abc", read=10)) >= 10
    assert _get(c, server.url + "/d") == b"/d" * 20000  # not the rest of /abc
    assert server.connections == 2


def test_timeouts_refusals_and_short_bodies_are_httpx_transport_errors(
        server: _Server, clients: list[httpx.AsyncClient]) -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="90 bytes before the end"):
        _get(_client(clients), server.url + "/short")  # retried by the client, as httpcore's
    with pytest.raises(httpx.ReadTimeout):
        _get(_client(clients, timeout=0.2), server.url + "/slow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    with pytest.raises(httpx.ConnectError):
        _get(_client(clients), f"http://127.0.0.1:{port}/")
