"""HTTP to a registry: endpoints, authentication, retries, redirects, error bodies.

``open_transport`` owns the ``httpx.AsyncClient``s of one command (one with the system CAs,
one without certificate checks for insecure registries); ``Registry`` is one registry
endpoint.  ``Registry.request`` is the one way requests go out:

* the scheme is found by ``ping`` (``GET /v2/``): HTTPS first, plain HTTP only where the
  configuration allows it (loopback, insecure registries);
* ``Authorization`` comes from the ``Authorizer`` for the request's scopes, and only ever goes
  to the registry's own origin: redirects (301/302/303/307/308, e.g. blobs served from a CDN)
  are followed here, by hand, and a hop to another origin carries no credentials;
* a 401 updates the challenge and retries with a fresh token (at most twice);
* 429 and 5xx responses and transport errors (resets, timeouts) are retried with exponential
  backoff, honouring ``Retry-After`` (seconds or an HTTP date), for requests that are safe to
  repeat (``retry=False`` for uploads, which recover by asking the registry instead); a
  refused connection is retried at most twice.

Caveats:
* A streamed response (``stream=True``) must be closed by the caller.
* Backoff is deterministic (no jitter): a command is one client, not a fleet.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from .. import __version__
from .auth import Authorizer, merge_scopes, parse_challenges
from .config import Endpoint, RegistriesConfig, load_config
from .credentials import Credentials
from .errors import AuthError, NotFound, RegistryError, error_detail
from .runtime import BLOCKING, TRIO

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
MAX_AUTH_RETRIES = 2


USER_AGENT = f"strata/{__version__}"
MAX_ERROR_BODY = 1 << 16


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` retries after the first try; delay ``base * 2**n`` capped at ``cap``, or the
    server's ``Retry-After`` when it is at most ``max_retry_after``."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, retry_after)
        return float(min(self.cap, self.base * (2 ** attempt)))


def retry_after(resp: httpx.Response) -> float | None:
    """Seconds the server asks us to wait (``Retry-After``: seconds or an HTTP date)."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


class Transport:
    """The HTTP clients of one command, shared by every registry it talks to."""

    def __init__(self, config: RegistriesConfig | None = None,
                 retry: RetryPolicy | None = None,
                 timeout: httpx.Timeout | None = None,
                 http: httpx.AsyncBaseTransport | None = None, *,
                 blocking: bool = False) -> None:
        self.config = config if config is not None else load_config()
        self.retry = retry or RetryPolicy()
        self.timeout = timeout or httpx.Timeout(30.0, read=60.0, pool=None)
        self._http = http  # tests only: an httpx transport instead of the network
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._lock = threading.Lock()  # blocking: the threads of a Fetcher share the clients
        # blocking: requests block the calling thread (``blocking.BlockingHTTP``), as does
        # every other await (``runtime.BLOCKING``): for ``runtime.run_sync``, without trio
        self.blocking = blocking
        self.runtime = BLOCKING if blocking else TRIO

    def client(self, verify: bool) -> httpx.AsyncClient:
        c = self._clients.get(verify)
        if c is not None:
            return c
        with self._lock:
            return self._clients.get(verify) or self._new_client(verify)

    def _new_client(self, verify: bool) -> httpx.AsyncClient:
        http = self._http
        if http is None and self.blocking:
            from .blocking import BlockingHTTP

            http = BlockingHTTP(verify, self.timeout)
        # a transport of our own makes its TLS context itself (httpx's is for its own)
        tls: ssl.SSLContext | bool = ssl.create_default_context() \
            if verify and http is None else False
        c = httpx.AsyncClient(verify=tls, timeout=self.timeout, follow_redirects=False,
                              trust_env=not self.blocking, headers={"User-Agent": USER_AGENT},
                              transport=http,
                              limits=httpx.Limits(max_connections=32,
                                                  max_keepalive_connections=16))
        self._clients[verify] = c
        return c

    def client_for(self, url: str) -> httpx.AsyncClient:
        parts = urlsplit(url)
        # plain HTTP has no certificate to check: its client loads no CA bundle (~20 ms)
        return self.client(parts.scheme == "https" and not self.config.is_insecure(parts.netloc))

    async def send(self, request: httpx.Request, *, stream: bool = False,
                   retry: bool = True, what: str = "", verify: bool | None = None
                   ) -> httpx.Response:
        """Send ``request`` to its URL, retrying 429/5xx and transport errors (when ``retry``);
        no authentication and no redirects.  ``verify`` chooses certificate checks (default:
        by the configuration's rule for the URL's host)."""
        client = self.client_for(str(request.url)) if verify is None else self.client(verify)
        attempt = 0
        while True:
            try:
                resp = await client.send(request, stream=stream)
            except httpx.TransportError as exc:
                # a refused connection is rarely transient: fewer retries than for resets
                limit = min(2, self.retry.attempts) if isinstance(exc, httpx.ConnectError) \
                    else self.retry.attempts
                if not retry or attempt >= limit or isinstance(exc, httpx.UnsupportedProtocol):
                    raise RegistryError(f"{what or request.method} {request.url}: "
                                        f"{_describe(exc)}") from None
                delay = self.retry.delay(attempt)
                log.info("retrying %s %s after %s (retry %d of %d) in %.1fs", request.method,
                         request.url, type(exc).__name__, attempt + 1, self.retry.attempts,
                         delay)
            else:
                log.debug("%s %s -> %d", request.method, request.url, resp.status_code)
                if not retry or resp.status_code not in RETRY_STATUS or \
                        attempt >= self.retry.attempts:
                    return resp
                wait = retry_after(resp)
                if wait is not None and wait > self.retry.max_retry_after:
                    return resp
                delay = self.retry.delay(attempt, wait)
                await resp.aclose()
                log.info("retrying %s %s after status %d (retry %d of %d) in %.1fs",
                         request.method, request.url, resp.status_code, attempt + 1,
                         self.retry.attempts, delay)
            attempt += 1
            await self.runtime.sleep(delay)
            if request.stream is not None and not isinstance(request.stream,
                                                             httpx.ByteStream):
                raise RegistryError(f"{request.method} {request.url}: cannot resend a stream")

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()


@contextlib.asynccontextmanager
async def open_transport(config: RegistriesConfig | None = None,
                         retry: RetryPolicy | None = None,
                         timeout: httpx.Timeout | None = None,
                         http: httpx.AsyncBaseTransport | None = None
                         ) -> AsyncIterator[Transport]:
    import trio

    t = Transport(config, retry, timeout, http)
    try:
        yield t
    finally:
        with trio.CancelScope(shield=True):
            await t.aclose()


def _describe(exc: BaseException) -> str:
    """A transport error in words, with the TLS reason when there is one, and the socket's
    own reason (``connection refused``: nothing listens there) when the transport's words
    hide it ("all attempts to connect ... failed")."""
    seen: BaseException | None = exc
    reasons: list[str] = []
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return f"TLS error: {seen.reason or seen}"
        inner = getattr(seen, "exceptions", None)  # trio's ExceptionGroup of every attempt
        for e in inner if isinstance(inner, tuple | list) else ():
            reason = os.strerror(e.errno).lower() if isinstance(e, OSError) and e.errno else ""
            if reason and reason not in reasons:
                reasons.append(reason)
        seen = seen.__cause__ or seen.__context__
    text = str(exc) or type(exc).__name__
    missing = [r for r in reasons if r not in text.lower()]
    return f"{text} ({', '.join(missing)})" if missing else text


async def read_limited(resp: httpx.Response, limit: int) -> bytes:
    """The body of a streamed response, refusing more than ``limit`` bytes."""
    length = resp.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        await resp.aclose()
        raise RegistryError(f"{resp.request.url}: response of {length} bytes is larger than "
                            f"the {limit} bytes allowed")
    chunks = []
    total = 0
    async with contextlib.aclosing(resp.aiter_bytes()) as it:  # type: ignore[type-var]
        async for chunk in it:
            total += len(chunk)
            if total > limit:
                await resp.aclose()
                raise RegistryError(f"{resp.request.url}: response is larger than the {limit} "
                                    "bytes allowed")
            chunks.append(chunk)
    return b"".join(chunks)


class Registry:
    """One registry endpoint (a registry, or a mirror of one)."""

    def __init__(self, transport: Transport, endpoint: Endpoint,
                 creds: Credentials | None = None) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.host = endpoint.host
        self.base: str | None = None
        self.auth = Authorizer(endpoint.host, self._send_token_request, creds,
                               transport.runtime)

    async def _send_token_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        for _ in range(MAX_REDIRECTS):
            resp = await self.transport.send(request, what="token request")
            await resp.aread()
            if resp.status_code not in REDIRECT_STATUS or "location" not in resp.headers:
                return resp
            url = urljoin(url, resp.headers["location"])
            request = httpx.Request("GET", url)
        raise RegistryError(f"token server {url}: too many redirects")

    async def ping(self) -> None:
        """Find the scheme (``GET /v2/``) and the authentication challenge."""
        if self.base is not None:
            return
        schemes = self.endpoint.schemes
        last: RegistryError | None = None
        for i, scheme in enumerate(schemes):
            base = f"{scheme}://{self.host}"
            req = httpx.Request("GET", base + "/v2/")
            fallback = i + 1 < len(schemes)
            try:
                resp = await self.transport.send(req, retry=not fallback,
                                                 what=f"ping {self.host}",
                                                 verify=self.endpoint.verify)
            except RegistryError as exc:
                last = exc
                log.debug("%s: %s", base, exc)
                continue
            await resp.aread()
            if resp.status_code == 401:
                self.auth.set_challenges(parse_challenges(resp.headers.get_list(
                    "www-authenticate")))
            elif resp.status_code != 200:
                if fallback:
                    continue
                raise RegistryError(f"{self.host} does not look like a registry (GET /v2/ "
                                    f"answered {resp.status_code})", resp.status_code)
            self.base = base
            return
        assert last is not None
        raise last

    def url(self, path: str) -> str:
        assert self.base is not None
        return self.base + path

    async def request(self, method: str, path: str, *, scopes: Sequence[str] = (),
                      headers: dict[str, str] | None = None, content: bytes | None = None,
                      stream: bool = False, retry: bool = True) -> httpx.Response:
        """``method`` on ``path`` (``/v2/...`` or an absolute URL the registry gave)."""
        await self.ping()
        url = path if "://" in path else self.url(path)
        home = origin(self.url("/"))
        scopes = tuple(scopes)
        auth_retries = 0
        hops = 0
        while True:
            hdrs = dict(headers or {})
            sent: str | None = None
            at_home = origin(url) == home
            if at_home:
                sent = await self.auth.header(scopes)
                if sent:
                    hdrs["Authorization"] = sent
            req = httpx.Request(method, url, headers=hdrs, content=content)
            resp = await self.transport.send(req, stream=stream, retry=retry,
                                             verify=self.endpoint.verify if at_home else None)
            status = resp.status_code
            if status in REDIRECT_STATUS and "location" in resp.headers:
                await resp.aclose()
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise RegistryError(f"{method} {path}: too many redirects")
                url = urljoin(url, resp.headers["location"])
                log.debug("redirected to %s", url)
                if status == 303:
                    method, content = "GET", None
                continue
            if status == 401 and origin(url) == home:
                await resp.aread()
                if auth_retries < MAX_AUTH_RETRIES:
                    challenges = parse_challenges(resp.headers.get_list("www-authenticate"))
                    again = await self.auth.unauthorized(challenges, scopes, sent)
                    # one retry with a fresh token, another only for a wider scope
                    if again is not None and (auth_retries == 0
                                              or again != merge_scopes(scopes, ())):
                        await resp.aclose()
                        scopes = again
                        auth_retries += 1
                        continue
            return resp

    async def fail(self, resp: httpx.Response, what: str) -> RegistryError:
        """The error for an unexpected response (reads and closes it)."""
        try:
            body = resp.content
        except httpx.ResponseNotRead:
            try:
                body = await read_limited(resp, MAX_ERROR_BODY)
            except (RegistryError, httpx.TransportError):
                body = b""
        finally:
            await resp.aclose()
        code, message = error_detail(body)
        status = resp.status_code
        detail = f"{code.lower().replace('_', ' ')}: {message}" if code else f"HTTP {status}"
        if code and message.lower() == code.lower().replace("_", " "):
            detail = message
        if status == 401 or code == "UNAUTHORIZED":
            hint = "" if await self.auth.credentials() else f" (try strata login {self.host})"
            return AuthError(f"{what}: unauthorized: authentication required{hint}", status,
                             code)
        if status == 403 or code == "DENIED":
            reason = message or "requested access to the resource is denied"
            return AuthError(f"{what}: denied: {reason}", status, code)
        if status == 404:
            return NotFound(f"{what}: {detail}", status, code)
        if status == 429:
            return RegistryError(f"{what}: too many requests (HTTP 429)", status, code)
        return RegistryError(f"{what}: {detail}", status, code)
