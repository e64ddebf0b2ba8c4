"""Registry client (distribution API v2): pull, push, login.

Modules: ``config`` (mirrors, insecure registries), ``credentials`` (docker config.json,
containers auth.json, credential helpers), ``auth`` (challenges, Basic, Bearer tokens),
``client`` (HTTP: retries, redirects, errors), ``pulling``, ``pushing``, ``sources`` (where blobs
came from, for cross-repository mounts).  Progress is reported as ``imagestore.ProgressEvent``
values.  The store's policy stays in ``Store``; this package speaks the protocol.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from .. import lazy_attribute
from . import credentials
from .client import Registry, RetryPolicy, Transport, open_transport
from .config import RegistriesConfig, load_config
from .credentials import Credentials
from .errors import AuthError, NotFound, RegistryError

if TYPE_CHECKING:
    from .pulling import pull
    from .pullsteps import PullResult
    from .pushing import PushResult, push

_LAZY = {"pull": "pulling", "PullResult": "pullsteps", "push": "pushing", "PushResult": "pushing"}


def __getattr__(name: str) -> Any:
    """``pull`` and ``push`` (and their results) on first use: a lazy layer's range reads need
    the client alone (``rangefetch``), not the whole pull and push (PEP 562)."""
    return lazy_attribute(__name__, _LAZY, globals(), name)

__all__ = ["AuthError", "Credentials", "NotFound", "PullResult",
           "PushResult", "RegistriesConfig", "Registry", "RegistryError", "RetryPolicy",
           "Transport", "api_host", "check_login", "load_config", "login", "logout",
           "open_transport", "pull", "push"]


def api_host(host: str) -> str:
    """The API host of a registry named as ``strata login`` takes it (Docker Hub's is
    ``registry-1.docker.io``)."""
    return "registry-1.docker.io" if host == "docker.io" else host


async def check_login(host: str, creds: Credentials,
                      transport: Transport | None = None) -> None:
    """Check ``creds`` against the registry ``host`` (raises ``AuthError`` when refused)."""
    async with (open_transport() if transport is None
                     else contextlib.nullcontext(transport)) as t:
        reg = Registry(t, t.config.endpoint(api_host(host)), creds)
        await reg.ping()
        challenge = reg.auth.challenge
        if challenge is None:
            return  # the registry asks for no authentication
        if challenge.scheme == "bearer":
            await reg.auth.token(())
            return
        resp = await reg.request("GET", "/v2/")
        if resp.status_code != 200:
            err = await reg.fail(resp, f"login to {host}")
            if resp.status_code == 401:
                raise AuthError(f"login to {host} failed: unauthorized: incorrect username or "
                                "password", 401, err.code)
            raise err



def login(server: str, username: str, password: str) -> None:
    """``strata login``: check the credentials against the registry ``server`` (raises
    ``AuthError`` when refused) and store them as docker does (``credentials``)."""
    import trio

    host = credentials.normalize_host(server)
    creds = Credentials(username, password)
    trio.run(check_login, host, creds)
    credentials.store_login(host, creds)


def logout(server: str) -> tuple[str, bool]:
    """``strata logout``: forget the credentials of ``server``; returns the key they were
    stored under and whether there were any."""
    host = credentials.normalize_host(server)
    return credentials.server_key(host), credentials.erase_login(host)
