"""Registry client pieces without a registry: challenge parsing, scopes, the registries
configuration, credential files and helpers, progress lines."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from cli.progress import ProgressPrinter, bar
from imagestore import ProgressEvent
from imagestore.registry import credentials as cr
from imagestore.registry.auth import merge_scopes, parse_challenges
from imagestore.registry.config import ConfigError, load_config
from tests.registry_images import write_credential_helper


@pytest.mark.parametrize("header,want", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/busybox:pull"',
     [("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                  "scope": "repository:library/busybox:pull"})]),
    ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
    ('Bearer realm="r",scope="repository:a:pull,push repository:b:pull",'
     'error="insufficient_scope"',
     [("bearer", {"realm": "r", "scope": "repository:a:pull,push repository:b:pull",
                  "error": "insufficient_scope"})]),
    ('Basic realm="x", Bearer realm="y", service=s', [("basic", {"realm": "x"}),
                                                      ("bearer", {"realm": "y", "service": "s"})]),
    ('bearer realm="with \\"quote\\""', [("bearer", {"realm": 'with "quote"'})]),
])
def test_parse_challenges(header: str, want: list[tuple[str, dict[str, str]]]) -> None:
    got = parse_challenges([header])
    assert [(c.scheme, c.params) for c in got] == want


def test_merge_scopes() -> None:
    assert merge_scopes(["repository:a:pull"], ["repository:a:push", "repository:b:pull"]) == \
        ("repository:a:pull,push", "repository:b:pull")
    assert merge_scopes(["repository:a:push,pull"], []) == ("repository:a:pull,push",)


def test_registries_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATA_REGISTRIES_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_config().mirrors == {}
    path = tmp_path / "strata" / "registries.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"mirrors": {"index.docker.io": ["https://mirror.example"]},
                                "registry-mirrors": ["10.0.0.9:5000"],
                                "insecure": ["reg.lan:5000", "192.168.0.0/16", "plain.lan"]}))
    cfg = load_config()
    assert cfg.path == str(path)
    eps = cfg.pull_endpoints("docker.io", "registry-1.docker.io")
    assert [(e.host, e.schemes, e.verify, e.mirror) for e in eps] == [
        ("mirror.example", ("https",), True, True),
        ("10.0.0.9:5000", ("https",), True, True),
        ("registry-1.docker.io", ("https",), True, False)]
    assert cfg.endpoint("reg.lan:5000").schemes == ("https", "http")
    assert not cfg.endpoint("reg.lan:5000").verify
    assert cfg.endpoint("reg.lan:6000").schemes == ("https",)  # host:port entries are exact
    assert cfg.endpoint("plain.lan:1234").schemes == ("https", "http")  # a bare host: any port
    assert cfg.endpoint("192.168.7.7:80").schemes == ("https", "http")
    assert cfg.endpoint("[::1]:5000").schemes == ("https", "http")  # loopback
    assert cfg.endpoint("localhost").schemes == ("https", "http")
    assert cfg.endpoint("quay.io").schemes == ("https",)
    path.write_text('{"mirrors": {"docker.io": "not-a-list"}}')
    with pytest.raises(ConfigError, match="must be a list"):
        load_config()
    path.write_text('{"insecure-registry": []}')
    with pytest.raises(ConfigError, match="unknown keys insecure-registry"):
        load_config()
    monkeypatch.setenv("STRATA_REGISTRIES_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_lookup_order_and_keys(registry_env: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    docker = registry_env["DOCKER_CONFIG"] / "config.json"
    containers = registry_env["XDG_RUNTIME_DIR"] / "containers" / "auth.json"
    containers.parent.mkdir()
    assert cr.lookup("reg.example") is None
    containers.write_text(json.dumps({"auths": {"reg.example": {"auth": _b64("c", "1")}}}))
    assert cr.lookup("reg.example") == cr.Credentials("c", "1")
    docker.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hub", "2")},
        "http://reg.example/v2/": {"auth": _b64("d", "3")},
        "other:5000": {"username": "u", "password": "p", "identitytoken": "tok"}}}))
    assert cr.lookup("reg.example") == cr.Credentials("d", "3")  # docker's file first
    assert cr.lookup("docker.io") == cr.Credentials("hub", "2")
    assert cr.lookup("registry-1.docker.io") == cr.Credentials("hub", "2")
    assert cr.lookup("other:5000") == cr.Credentials("u", "p", "tok")
    auth_file = registry_env["DOCKER_CONFIG"].parent / "auth.json"
    auth_file.write_text(json.dumps({"auths": {"reg.example": {"auth": _b64("a", "4")}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    assert cr.lookup("reg.example") == cr.Credentials("a", "4")
    auth_file.write_text(json.dumps({"auths": {"reg.example": {"auth": "!!!"}}}))
    with pytest.raises(cr.CredentialsError, match="invalid auth entry"):
        cr.lookup("reg.example")
    assert "secret" not in repr(cr.Credentials("x", "secret"))


def test_login_writes_docker_format_and_keeps_other_keys(registry_env: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    docker = registry_env["DOCKER_CONFIG"] / "config.json"
    docker.write_text(json.dumps({"auths": {"keep.example": {"auth": _b64("k", "k")}},
                                  "psFormat": "table {{.ID}}"}))
    assert cr.store_login("reg.example:5000", cr.Credentials("me", "pw")) == str(docker)
    assert cr.store_login("docker.io", cr.Credentials("hub", "pw")) == str(docker)
    doc = json.loads(docker.read_text())
    assert doc["psFormat"] == "table {{.ID}}"
    assert doc["auths"]["reg.example:5000"] == {"auth": _b64("me", "pw")}
    assert doc["auths"]["https://index.docker.io/v1/"] == {"auth": _b64("hub", "pw")}
    assert doc["auths"]["keep.example"] == {"auth": _b64("k", "k")}
    assert docker.stat().st_mode & 0o777 == 0o600
    assert cr.erase_login("reg.example:5000") and not cr.erase_login("reg.example:5000")
    assert "reg.example:5000" not in json.loads(docker.read_text())["auths"]
    auth_file = registry_env["DOCKER_CONFIG"].parent / "sub" / "auth.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    assert cr.store_login("reg.example", cr.Credentials("me", "pw")) == str(auth_file)
    assert json.loads(auth_file.read_text())["auths"]["reg.example"]["auth"] == _b64("me", "pw")


def test_credential_helpers(registry_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    helper = write_credential_helper(registry_env["DOCKER_CONFIG"].parent / "bin", "strata-unit",
                                     {"reg.example": ("helped", "secret"),
                                      "tok.example": ("<token>", "refresh")})
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    docker = registry_env["DOCKER_CONFIG"] / "config.json"
    docker.write_text(json.dumps({"credHelpers": {"reg.example": "strata-unit"}}))
    assert cr.lookup("reg.example") == cr.Credentials("helped", "secret")
    docker.write_text(json.dumps({"credsStore": "strata-unit"}))
    assert cr.lookup("tok.example") == cr.Credentials("", "", "refresh")
    assert cr.lookup("unknown.example") is None  # "credentials not found" is not an error
    assert cr.store_login("new.example", cr.Credentials("n", "pw")) == \
        "helper docker-credential-strata-unit"
    assert json.loads(docker.read_text())["auths"] == {"new.example": {}}
    assert cr.lookup("new.example") == cr.Credentials("n", "pw")
    assert cr.erase_login("new.example")
    assert cr.lookup("new.example") is None
    docker.write_text(json.dumps({"credsStore": "missing-helper"}))
    with pytest.raises(cr.CredentialsError, match="docker-credential-missing-helper"):
        cr.lookup("reg.example")


def Event(layer: str, status: str, done: int | None = None,  # noqa: N802
          total: int | None = None) -> ProgressEvent:
    return ProgressEvent("pull", layer, status, done, total)


def test_progress_lines() -> None:
    assert bar(0, 100) == "[>" + " " * 49 + "]  0B/100B"
    assert bar(50, 100) == "[" + "=" * 25 + ">" + " " * 24 + "]  50B/100B"
    assert bar(100, 100) == "[" + "=" * 50 + "]  100B/100B"
    out = io.StringIO()
    p = ProgressPrinter(out, tty=False)
    for e in (Event("", "1: Pulling from t/x"), Event("abc", "Pulling fs layer"),
              Event("abc", "Downloading", 0, 2_000_000), Event("abc", "Downloading", 5, 2_000_000),
              Event("abc", "Downloading", 2_000_000, 2_000_000), Event("abc", "Pull complete")):
        p(e)
    assert out.getvalue().splitlines() == [
        "1: Pulling from t/x", "abc: Pulling fs layer", "abc: Downloading 0B/2MB",
        "abc: Downloading 2MB/2MB", "abc: Pull complete"]
    out = io.StringIO()
    p = ProgressPrinter(out, tty=True)
    p(Event("a", "Pulling fs layer"))
    p(Event("b", "Pulling fs layer"))
    p(Event("a", "Pull complete"))
    assert out.getvalue() == ("a: Pulling fs layer\nb: Pulling fs layer\n"
                              "\x1b[2A\r\x1b[2Ka: Pull complete\x1b[2B\r")
