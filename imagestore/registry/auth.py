"""Authentication against one registry: challenges, Basic, and the Bearer token flow.

The registry says how to authenticate in ``WWW-Authenticate`` (on ``GET /v2/`` or on any 401):
``Basic realm=...`` sends the stored credentials with every request; ``Bearer realm=...,
service=...`` asks the token server at ``realm`` for a token per set of scopes
(``repository:NAME:pull,push``), anonymously or with the credentials as HTTP Basic (with an
``identitytoken``, the OAuth2 ``POST`` form with ``grant_type=refresh_token``).  Tokens are
cached per (realm, service, scopes) until ``expires_in`` runs out.

``Authorizer`` holds that state for one registry host; ``client.Registry`` asks it for the
header of each request and reports every 401, which updates the challenge, drops the cached
token and, when the challenge names a scope the request lacked (``insufficient_scope``), adds
that scope for the retry.

Caveats:
* Credentials are looked up once per Authorizer (a helper program may be slow).
* The token request itself goes through the caller's ``send`` (retries, no registry auth).
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from . import credentials
from .credentials import Credentials
from .errors import AuthError, RegistryError
from .runtime import TRIO, Runtime

log = logging.getLogger(__name__)

CLIENT_ID = "strata"
DEFAULT_EXPIRY = 60
SendFn = Callable[[httpx.Request], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def scopes(self) -> list[str]:
        return [s for s in self.params.get("scope", "").split(" ") if s]


def _token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in ' \t,="':
        i += 1
    return text[start:i], i


def _skip(text: str, i: int, chars: str = " \t") -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _quoted(text: str, i: int) -> tuple[str, int]:
    out = []
    i += 1  # opening quote
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out), i + 1


def parse_challenges(values: Sequence[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235; several challenges per value)."""
    out: list[Challenge] = []
    for text in values:
        i = _skip(text, 0, " \t,")
        while i < len(text):
            scheme, i = _token(text, i)
            if not scheme:
                break
            params: dict[str, str] = {}
            i = _skip(text, i)
            while i < len(text):
                save = i
                key, j = _token(text, i)
                j = _skip(text, j)
                if not key or j >= len(text) or text[j] != "=":
                    i = save
                    break  # the next challenge's scheme
                j = _skip(text, j + 1)
                if j < len(text) and text[j] == '"':
                    value, j = _quoted(text, j)
                else:
                    value, j = _token(text, j)
                params[key.lower()] = value
                i = _skip(text, j, " \t,")
            out.append(Challenge(scheme.lower(), params))
            i = _skip(text, i, " \t,")
    return out


def merge_scopes(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """The union of two scope lists; actions of the same resource are merged
    (``repository:x:pull`` + ``repository:x:push`` = ``repository:x:pull,push``)."""
    actions: dict[str, list[str]] = {}
    for scope in [*a, *b]:
        resource, _, acts = scope.rpartition(":")
        if not resource:
            resource, acts = scope, ""
        have = actions.setdefault(resource, [])
        for act in acts.split(","):
            if act and act not in have:
                have.append(act)
    return tuple(f"{r}:{','.join(sorted(acts))}" for r, acts in sorted(actions.items()))


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


_Key = tuple[str, str, tuple[str, ...]]


class Authorizer:
    """Authentication state for one registry host."""

    def __init__(self, host: str, send: SendFn,
                 creds: Credentials | None | Callable[[], Credentials | None] = None,
                 runtime: Runtime = TRIO) -> None:
        self.host = host
        self._send = send
        self._runtime = runtime
        self.challenge: Challenge | None = None
        self._creds_source = creds
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._tokens: dict[_Key, tuple[str, float]] = {}
        self._locks: dict[_Key, contextlib.AbstractAsyncContextManager[None]] = {}
        self.token_requests = 0

    def set_challenges(self, challenges: Sequence[Challenge]) -> bool:
        """Adopt the first usable challenge (Bearer before Basic); False when none is."""
        for scheme in ("bearer", "basic"):
            for c in challenges:
                if c.scheme == scheme and (scheme == "basic" or c.params.get("realm")):
                    self.challenge = c
                    return True
        return False

    async def credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            src = self._creds_source
            if callable(src):
                self._creds = await self._runtime.to_thread(src)
            elif src is None:
                host = self.host
                self._creds = await self._runtime.to_thread(lambda: credentials.lookup(host))
            else:
                self._creds = src
            self._creds_loaded = True
        return self._creds

    async def header(self, scopes: Sequence[str]) -> str | None:
        """The ``Authorization`` value for a request needing ``scopes`` (None: anonymous)."""
        c = self.challenge
        if c is None:
            return None
        if c.scheme == "basic":
            creds = await self.credentials()
            return basic_header(creds) if creds and creds.username else None
        token = await self.token(scopes)
        return f"Bearer {token}" if token else None

    async def unauthorized(self, challenges: Sequence[Challenge], scopes: Sequence[str],
                           sent: str | None) -> tuple[str, ...] | None:
        """A request with ``scopes`` got 401 (having sent ``sent``): the scopes to retry with,
        or None when a retry cannot help."""
        if not self.set_challenges(challenges):
            return None
        c = self.challenge
        assert c is not None
        if c.scheme == "basic":
            creds = await self.credentials()
            if sent is None and creds is not None and creds.username:
                return tuple(scopes)
            return None
        wanted = merge_scopes(scopes, c.scopes)
        for key in (self._key(scopes), self._key(wanted)):
            cached = self._tokens.get(key)
            if cached is not None and (sent is None or sent == f"Bearer {cached[0]}"):
                del self._tokens[key]  # the token that failed (a newer one may be cached)
        return wanted

    def _key(self, scopes: Sequence[str]) -> _Key:
        c = self.challenge
        assert c is not None
        return c.params.get("realm", ""), c.params.get("service", ""), merge_scopes(scopes, ())

    async def token(self, scopes: Sequence[str]) -> str:
        key = self._key(scopes)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = self._runtime.lock()
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached[1] > self._runtime.now():
                return cached[0]
            token, expires_in = await self._fetch_token(*key)
            self._tokens[key] = (token, self._runtime.now() + max(1.0, expires_in - 5))
            return token

    async def _fetch_token(self, realm: str, service: str,
                           scopes: tuple[str, ...]) -> tuple[str, float]:
        creds = await self.credentials()
        self.token_requests += 1
        if creds is not None and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": CLIENT_ID, "scope": " ".join(scopes)}
            if service:
                form["service"] = service
            resp = await self._send(httpx.Request("POST", realm, data=form))
            if resp.status_code not in (404, 405):
                return self._token_of(resp, realm, creds)
        params: list[tuple[str, str | int | float | bool | None]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        headers = {}
        if creds is not None and creds.username:
            params.append(("account", creds.username))
            headers["Authorization"] = basic_header(creds)
        log.debug("token request to %s for %s", realm, " ".join(scopes) or "no scope")
        resp = await self._send(httpx.Request("GET", realm, params=params,
                                              headers=headers))
        return self._token_of(resp, realm, creds)

    def _token_of(self, resp: httpx.Response, realm: str,
                  creds: Credentials | None) -> tuple[str, float]:
        if resp.status_code in (401, 403):
            if creds is not None:
                raise AuthError(f"login to {self.host} failed: unauthorized: incorrect username "
                                "or password", resp.status_code, "UNAUTHORIZED")
            raise AuthError(f"{self.host}: unauthorized: authentication required "
                            f"(try strata login {self.host})", resp.status_code, "UNAUTHORIZED")
        if resp.status_code != 200:
            raise RegistryError(f"token server {realm} answered {resp.status_code}",
                                resp.status_code)
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
            expires = doc.get("expires_in") or DEFAULT_EXPIRY
        except (ValueError, AttributeError, RecursionError):
            raise RegistryError(f"token server {realm} answered something that is not JSON") \
                from None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm} answered without a token")
        if not isinstance(expires, int | float) or expires <= 0:
            expires = DEFAULT_EXPIRY
        return token, float(expires)
