"""Authentication against real registries: htpasswd Basic and Bearer tokens (anonymous, with
credentials, an OAuth2 identity token, a credential helper), token refresh on 401, scopes for
push and for a cross-repository mount, and clear errors when access is refused."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from imagestore import ProgressEvent, Store, reference
from imagestore.registry import (
    AuthError,
    Credentials,
    Registry,
    RegistryError,
    RetryPolicy,
    check_login,
    open_transport,
    pull,
    push,
)
from imagestore.registry import credentials as creds_mod
from imagestore.registry.config import Endpoint
from tests import registry_helpers as rh
from tests import registry_images as ri
from tests.conftest import REGISTRY_USERS

pytestmark = [pytest.mark.registry]

ALICE = Credentials("alice", REGISTRY_USERS["alice"])


def _docker_config(env: dict[str, Path], doc: dict[str, Any]) -> Path:
    path = env["DOCKER_CONFIG"] / "config.json"
    path.write_text(json.dumps(doc))
    return path


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_no_credentials_is_a_clear_error(store: Store, auth_registry: rh.RegistryProcess,
                                               registry_env: Any) -> None:
    with pytest.raises(AuthError) as exc:
        await pull(store, reference.parse(f"{auth_registry.host}/private/img:1"))
    assert "unauthorized: authentication required" in str(exc.value)
    assert f"strata login {auth_registry.host}" in str(exc.value)
    assert store.images() == []


async def test_login_checks_and_stores_credentials(auth_registry: rh.RegistryProcess,
                                                   registry_env: dict[str, Path],
                                                   store: Store) -> None:
    host = auth_registry.host
    with pytest.raises(AuthError, match="incorrect username or password"):
        await check_login(host, Credentials("alice", "wrong"))
    await check_login(host, ALICE)
    where = creds_mod.store_login(host, ALICE)
    doc = json.loads(Path(where).read_text())
    assert where == str(registry_env["DOCKER_CONFIG"] / "config.json")
    assert doc["auths"][host]["auth"] == _auth("alice", ALICE.password)
    assert Path(where).stat().st_mode & 0o777 == 0o600
    res = await pull(store, reference.parse(f"{host}/private/img:1"))
    assert res.image.repo_digests[0].startswith(f"{host}/private/img@")
    assert creds_mod.erase_login(host)
    assert host not in json.loads(Path(where).read_text())["auths"]


async def test_push_with_credentials_mounts_across_repositories(
        store: Store, auth_registry: rh.RegistryProcess, registry_env: dict[str, Path]) -> None:
    host = auth_registry.host
    _docker_config(registry_env, {"auths": {host: {"auth": _auth("alice", ALICE.password)}}})
    pulled = await pull(store, reference.parse(f"{host}/private/img:1"))
    events: list[ProgressEvent] = []
    res = await push(store, pulled.image, reference.parse(f"{host}/private/copy:1"),
                     events=events.append)
    assert res.digest == pulled.digest and res.mounted == 1
    assert [e.status for e in events][-1] == "Mounted from private/img"


async def test_bearer_anonymous_pull_of_a_public_image(store: Store,
                                                       token_registry: rh.RegistryProcess,
                                                       token_server: rh.TokenServer,
                                                       registry_env: Any) -> None:
    before = len(token_server.requests)
    await pull(store, reference.parse(f"{token_registry.host}/public/img:1"))
    new = token_server.requests[before:]
    assert [(r.method, r.user, r.scopes) for r in new] == \
        [("GET", None, ["repository:public/img:pull"])]  # one token, cached for every blob


async def test_bearer_with_credentials_from_docker_config(
        store: Store, token_registry: rh.RegistryProcess, token_server: rh.TokenServer,
        registry_env: dict[str, Path]) -> None:
    host = token_registry.host
    _docker_config(registry_env, {"auths": {f"https://{host}/v1/": {
        "auth": _auth("alice", ALICE.password)}}})
    before = len(token_server.requests)
    await pull(store, reference.parse(f"{host}/private/img:1"))
    assert {(r.user, tuple(r.scopes)) for r in token_server.requests[before:]} == \
        {("alice", ("repository:private/img:pull",))}


async def test_expired_token_is_refreshed_on_401(store: Store,
                                                 token_registry: rh.RegistryProcess,
                                                 token_server: rh.TokenServer,
                                                 registry_env: dict[str, Path]) -> None:
    host = token_registry.host
    _docker_config(registry_env, {"auths": {host: {"auth": _auth("alice", ALICE.password)}}})
    token_server.stale = 1  # the first token is already expired, though it claims 300 s
    before = len(token_server.requests)
    res = await pull(store, reference.parse(f"{host}/private/img:1"))
    assert len(token_server.requests[before:]) == 2
    assert res.downloaded == 1


async def test_push_without_the_push_scope_is_refused(store: Store,
                                                      token_registry: rh.RegistryProcess,
                                                      token_server: rh.TokenServer,
                                                      registry_env: dict[str, Path]) -> None:
    host = token_registry.host
    _docker_config(registry_env, {"auths": {host: {"auth": _auth("bob", "builder")}}})
    pulled = await pull(store, reference.parse(f"{host}/private/img:1"))
    before = len(token_server.requests)
    with pytest.raises(AuthError, match="unauthorized|denied"):
        await push(store, pulled.image, reference.parse(f"{host}/private/bobs:1"))
    asked = token_server.requests[before:]
    # every request (HEAD, mount, upload; layer and config) refreshes its token at most once
    assert 1 <= len(asked) <= 6
    assert all("repository:private/bobs:pull,push" in r.scopes for r in asked)
    assert all(g["actions"] == ["pull"] for r in asked for g in r.granted)


async def test_identity_token_uses_the_oauth2_refresh_grant(
        store: Store, token_registry: rh.RegistryProcess, token_server: rh.TokenServer,
        registry_env: dict[str, Path]) -> None:
    host = token_registry.host
    _docker_config(registry_env, {"auths": {host: {"identitytoken": "refresh-alice"}}})
    before = len(token_server.requests)
    await pull(store, reference.parse(f"{host}/private/img:1"))
    assert [(r.method, r.user) for r in token_server.requests[before:]] == [("POST", "alice")]


async def test_credential_helper_and_auth_file_precedence(
        store: Store, token_registry: rh.RegistryProcess, token_server: rh.TokenServer,
        registry_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = token_registry.host
    helper = ri.write_credential_helper(tmp_path / "bin", "strata-test",
                                        {host: ("alice", ALICE.password)})
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    _docker_config(registry_env, {"credHelpers": {host: "strata-test"}})
    await pull(store, reference.parse(f"{host}/private/img:1"))
    assert f"get {host}" in Path(str(helper.parent / "strata-test.json") + ".log").read_text()
    # $REGISTRY_AUTH_FILE is read first: wrong credentials there fail the pull
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {host: {"auth": _auth("alice", "nope")}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    with pytest.raises(AuthError, match="incorrect username or password"):
        await pull(Store(str(tmp_path / "other-store")),
                   reference.parse(f"{host}/private/img:1"))


async def test_https_registry_with_system_ca_verification(
        store: Store, tls_registry: tuple[rh.RegistryProcess, Path], registry_env: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback is insecure by default (HTTPS without verification, as docker); a registry
    that is not insecure must present a certificate the system CAs (here SSL_CERT_FILE)
    trust."""
    reg, cert = tls_registry
    res = await pull(store, reference.parse(f"{reg.host}/private/img:1"))
    assert res.downloaded == 1
    strict = Endpoint(reg.host, ("https",), verify=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(registry_env["DOCKER_CONFIG"] / "none.pem"))
    async with open_transport(retry=RetryPolicy(attempts=0)) as t:
        with pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await Registry(t, strict).ping()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    async with open_transport() as t:
        r = Registry(t, strict)
        await r.ping()
        assert r.base == f"https://{reg.host}"
