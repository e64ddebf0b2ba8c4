"""Real registry processes and the small servers the registry tests put around them.

* ``RegistryProcess``: ``docker-registry serve CONFIG`` (CNCF distribution) on a free
  127.0.0.1 port with filesystem storage in a temp dir: open, htpasswd Basic auth, or Bearer
  token auth trusting ``RsaKey``'s certificate.
* ``TokenServer``: a token server for the Bearer variant.  It signs RS256 JWTs carrying the
  signing certificate in ``x5c`` (what distribution verifies against ``rootcertbundle``);
  anonymous users may pull ``public/*``, known users may pull everything, ``pushers`` push.
* ``FaultProxy``: an HTTP proxy in front of a registry that records every request and
  applies fault rules (cut a response after N bytes, corrupt it, answer a status, redirect a
  blob to a "CDN" on 127.0.0.2 that serves blobs from the registry's storage, serve a
  schema 1 manifest).

Everything runs in threads on loopback; nothing here is a mock of the registry.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALT_HOST = "127.0.0.2"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class RsaKey:
    """An RSA key and self-signed certificate made by ``openssl``; signs RS256 in Python."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key_path = directory / "token.key"
        self.cert_path = directory / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=strata-test-token", "-keyout", str(self.key_path),
                        "-out", str(self.cert_path)], check=True, capture_output=True)
        text = subprocess.run(["openssl", "rsa", "-in", str(self.key_path), "-text", "-noout"],
                              check=True, capture_output=True, text=True).stdout
        self.n = self._number(text, "modulus")
        self.d = self._number(text, "privateExponent")
        self.cert_der = subprocess.run(["openssl", "x509", "-in", str(self.cert_path), "-outform",
                                        "DER"], check=True, capture_output=True).stdout

    @staticmethod
    def _number(text: str, name: str) -> int:
        m = re.search(name + r":\s*\n((?:\s+[0-9a-f:]+\n)+)", text)
        assert m, f"no {name} in openssl output"
        return int(re.sub(r"[\s:]", "", m.group(1)), 16)

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256."""
        digest_info = bytes.fromhex("3031300d060960864801650304020105000420")
        t = digest_info + hashlib.sha256(message).digest()
        k = (self.n.bit_length() + 7) // 8
        em = b"\x00\x01" + b"\xff" * (k - 3 - len(t)) + b"\x00" + t
        return pow(int.from_bytes(em, "big"), self.d, self.n).to_bytes(k, "big")

    def jwt(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = b64url(json.dumps(header).encode()) + "." + \
            b64url(json.dumps(claims).encode())
        return signing_input + "." + b64url(self.sign(signing_input.encode()))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as Go's net/http (the registry) has it: without it a small body written
    # after its headers waits for the client's delayed ACK, 40 ms a response
    disable_nagle_algorithm = True
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def handle(self) -> None:
        try:
            first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first in (b"", b"\x16"):  # closed, or a TLS ClientHello (https probe): hang up
            return
        super().handle()

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _serve(server: http.server.HTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    return t


# -- the token server ------------------------------------------------------------------------


@dataclass
class TokenRequest:
    method: str
    user: str | None
    scopes: list[str]
    granted: list[dict[str, Any]]


class TokenServer:
    SERVICE = "strata-test-registry"
    ISSUER = "strata-test-issuer"

    def __init__(self, key: RsaKey, users: dict[str, str], pushers: tuple[str, ...] = ("alice",)
                 ) -> None:
        self.key = key
        self.users = users
        self.pushers = pushers
        self.requests: list[TokenRequest] = []
        self.stale = 0  # the next N tokens are already expired (beyond the registry's leeway)
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        outer = self

        class Handler(_Handler):
            def do_GET(self) -> None:
                outer._get(self)

            def do_POST(self) -> None:
                outer._post(self)

        self.httpd = _Server(("127.0.0.1", self.port), Handler)
        self.thread = _serve(self.httpd)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def grant(self, user: str | None, scope: str) -> dict[str, Any] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        wanted = [a for a in actions.split(",") if a]
        if user is not None:
            allowed = [a for a in wanted if a == "pull" or user in self.pushers]
        else:
            allowed = [a for a in wanted if a == "pull" and name.startswith("public/")]
        return {"type": "repository", "name": name, "actions": allowed}

    def issue(self, user: str | None, scopes: list[str], method: str) -> dict[str, Any]:
        access = [g for g in (self.grant(user, s) for s in scopes) if g]
        self.requests.append(TokenRequest(method, user, scopes, access))
        now = int(time.time())
        exp = now + 300
        if self.stale > 0:
            self.stale -= 1
            exp = now - 120
        token = self.key.jwt({"iss": self.ISSUER, "sub": user or "", "aud": self.SERVICE,
                              "exp": exp, "nbf": now - 10, "iat": now - 10,
                              "jti": os.urandom(8).hex(), "access": access})
        return {"token": token, "access_token": token, "expires_in": 300,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}

    def _user(self, h: _Handler) -> tuple[bool, str | None]:
        auth = h.headers.get("Authorization")
        if not auth:
            return True, None
        if not auth.startswith("Basic "):
            return False, None
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return self.users.get(user) == password, user

    def _get(self, h: _Handler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        ok, user = self._user(h)
        if url.path != "/token" or query.get("service") != [self.SERVICE]:
            h.reply(404)
            return
        if not ok:
            h.reply(401, b'{"details":"incorrect username or password"}',
                    {"Content-Type": "application/json"})
            return
        doc = self.issue(user, query.get("scope", []), "GET")
        h.reply(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _post(self, h: _Handler) -> None:
        form = urllib.parse.parse_qs(h.body().decode())
        grant = form.get("grant_type", [""])[0]
        user = None
        if grant == "refresh_token":
            token = form.get("refresh_token", [""])[0]
            user = token.removeprefix("refresh-") if token.startswith("refresh-") else None
        elif grant == "password":
            name = form.get("username", [""])[0]
            user = name if self.users.get(name) == form.get("password", [""])[0] else None
        if user is None or user not in self.users:
            h.reply(401, b'{"error":"invalid_grant"}', {"Content-Type": "application/json"})
            return
        doc = self.issue(user, form.get("scope", [""])[0].split(), "POST")
        doc["refresh_token"] = f"refresh-{user}"
        h.reply(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})


# -- the registry ----------------------------------------------------------------------------


class RegistryProcess:
    """``docker-registry serve`` on a free port; ``auth`` is None, ``("htpasswd", file)`` or
    ``("token", TokenServer)``."""

    def __init__(self, directory: Path, auth: tuple[str, Any] | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        lines = [
            "version: 0.1",
            "log:", "  level: error", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {self.storage}",
            "  delete:", "    enabled: true",
            "http:", f"  addr: {self.host}", "  secret: strata-test-secret",
        ]
        if auth is not None and auth[0] == "htpasswd":
            lines += ["auth:", "  htpasswd:", "    realm: strata-test",
                      f"    path: {auth[1]}"]
        elif auth is not None and auth[0] == "token":
            ts: TokenServer = auth[1]
            lines += ["auth:", "  token:", f"    realm: {ts.realm}",
                      f"    service: {ts.SERVICE}", f"    issuer: {ts.ISSUER}",
                      f"    rootcertbundle: {ts.key.cert_path}"]
        if tls is not None:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        self.scheme = "https" if tls else "http"
        self.config = self.dir / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = open(self.dir / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.logs()}")
            try:
                ctx = ssl._create_unverified_context()  # only asks "are you up?"
                urllib.request.urlopen(f"{self.scheme}://{self.host}/v2/", timeout=2,
                                       context=ctx).close()
                return
            except urllib.error.HTTPError:
                return  # 401: up, and asking for credentials
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer on {self.host}: {self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return (self.dir / "registry.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def blob_path(self, digest: str) -> Path:
        hexd = digest.partition(":")[2]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def tls_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and localhost): (certificate, key)."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    lines = []
    for user, password in users.items():
        out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                             capture_output=True, text=True).stdout
        lines.append(out.strip())
    path.write_text("\n".join(lines) + "\n")
    return path


def skopeo_copy(src: str, dest: str, *extra: str, creds: str | None = None) -> None:
    cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false", "--src-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds, "--src-creds", creds] if not dest.startswith("oci:") \
            else ["--src-creds", creds]
    proc = subprocess.run([*cmd, *extra, src, dest], capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"skopeo copy {src} {dest} failed: {proc.stderr.decode()}")


# -- the fault proxy ---------------------------------------------------------------------------


@dataclass
class Rule:
    method: str
    path: re.Pattern[str]
    action: str  # cut, corrupt, status, redirect, schema1, content_type, cut_request, hang
    times: int = 1
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Seen:
    listener: str  # "proxy" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    status: int = 0
    sent: int = 0  # body bytes sent back
    action: str = ""


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length"}

def _headers(h: _Handler) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in h.headers.items():
        out[k.lower()] = f"{out[k.lower()]}, {v}" if k.lower() in out else v
    return out


SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "x", "tag": "1", "architecture": "amd64",
                      "fsLayers": [], "history": []}).encode()


class FaultProxy:
    """A recording HTTP proxy in front of ``registry`` with fault rules, plus a blob "CDN" on
    127.0.0.2 that redirects can point to."""

    def __init__(self, registry: RegistryProcess) -> None:
        self.registry = registry
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.cdn_port = free_port(ALT_HOST)
        self.cdn_host = f"{ALT_HOST}:{self.cdn_port}"
        outer = self

        class Proxy(_Handler):
            def do_GET(self) -> None:
                outer._proxy(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        class Cdn(_Handler):
            def do_GET(self) -> None:
                outer._cdn(self)

        self.httpd = _Server(("127.0.0.1", self.port), Proxy)
        self.cdn = _Server((ALT_HOST, self.cdn_port), Cdn)
        _serve(self.httpd)
        _serve(self.cdn)

    def close(self) -> None:
        for s in (self.httpd, self.cdn):
            s.shutdown()
            s.server_close()

    def add(self, method: str, path: str, action: str, times: int = 1, **params: Any) -> Rule:
        rule = Rule(method, re.compile(path), action, times, params)
        with self.lock:
            self.rules.append(rule)
        return rule

    def _match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.times and rule.method == method and rule.path.search(path):
                    rule.times -= 1
                    return rule
        return None

    def requests(self, method: str | None = None, path: str = "", listener: str = "proxy"
                 ) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.listener == listener
                    and (method is None or s.method == method) and re.search(path, s.path)]

    def _record(self, seen: Seen) -> Seen:
        with self.lock:
            self.seen.append(seen)
        return seen

    def _proxy(self, h: _Handler) -> None:
        body = h.body()
        seen = self._record(Seen("proxy", h.command, h.path, _headers(h)))
        rule = self._match(h.command, h.path)
        seen.action = rule.action if rule else ""
        if rule is not None and rule.action == "status":
            status = int(rule.params.get("status", 500))
            headers = {"Content-Type": "application/json", **rule.params.get("headers", {})}
            seen.status = status
            h.reply(status, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}', headers)
            return
        if rule is not None and rule.action == "hang":
            rule.params["event"].wait(rule.params.get("timeout", 30))
            seen.status = 503
            h.reply(503, b"", {"Retry-After": "0"})
            return
        if rule is not None and rule.action == "redirect":
            digest = h.path.rsplit("/", 1)[1].split("?")[0]
            seen.status = 307
            h.reply(307, b"", {"Location": f"http://{self.cdn_host}/blobs/{digest}?sig=x"})
            return
        if rule is not None and rule.action == "cut_request":
            # forward the request, then lose the answer (the registry did the work)
            self._forward(h, body)
            seen.status = -1
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, data, length = self._forward(h, body)
        if rule is not None and rule.action == "corrupt":
            data = bytes(b ^ 0xFF if i % 97 == 0 else b for i, b in enumerate(data))
        if rule is not None and rule.action == "schema1":
            data = SCHEMA1
            headers = [(k, v) for k, v in headers if k.lower() not in
                       ("content-type", "docker-content-digest")]
            headers.append(("Content-Type",
                            "application/vnd.docker.distribution.manifest.v1+prettyjws"))
        if rule is not None and rule.action == "content_type":
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", rule.params["value"]))
        seen.status = status
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", length if h.command == "HEAD" else str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if rule is not None and rule.action == "cut":
            n = int(rule.params["after"])
            h.wfile.write(data[:n])
            h.wfile.flush()
            seen.sent = min(n, len(data))
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)
        seen.sent = len(data)

    def _forward(self, h: _Handler, body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.registry.port, timeout=60)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():  # repeated headers (Accept) stay repeated
                if k.lower() not in _HOP:
                    conn.putheader(k, v)
            if body or h.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            return resp.status, out, data, resp.getheader("Content-Length") or "0"
        finally:
            conn.close()

    def _cdn(self, h: _Handler) -> None:
        seen = self._record(Seen("cdn", h.command, h.path, _headers(h)))
        digest = urllib.parse.urlsplit(h.path).path.rsplit("/", 1)[1]
        path = self.registry.blob_path(digest)
        if "Authorization" in h.headers:
            seen.status = 400  # as S3 does when it gets credentials it did not ask for
            h.reply(400, b"<Error>unexpected Authorization</Error>")
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            seen.status = 404
            h.reply(404)
            return
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        if m and int(m.group(1)) < len(data):
            start = int(m.group(1))
            seen.status, seen.sent = 206, len(data) - start
            h.reply(206, data[start:], {
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
            return
        seen.status, seen.sent = 200, len(data)
        h.reply(200, data, {"Content-Type": "application/octet-stream"})


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)
