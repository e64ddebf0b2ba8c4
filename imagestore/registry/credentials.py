"""Registry credentials as docker and the containers tools keep them.

Read, first match wins::

    $REGISTRY_AUTH_FILE                          (containers auth.json format)
    $DOCKER_CONFIG/config.json                   (else ~/.docker/config.json)
    $XDG_RUNTIME_DIR/containers/auth.json
    $XDG_CONFIG_HOME/containers/auth.json        (~/.config/containers/auth.json)

In each file ``credHelpers[host]`` names a helper for that registry; otherwise an
``auths[host]`` entry (``auth`` = base64 ``user:password``, or ``username``/``password``, plus
an optional ``identitytoken``) is used; otherwise ``credsStore`` names a default helper.  A
helper is the program ``docker-credential-<name>`` speaking docker's protocol (``get``,
``store``, ``erase`` with JSON on stdin/stdout).

``login`` writes to ``$REGISTRY_AUTH_FILE`` when it is set, else to docker's config.json,
keeping every other key of the file; when that file configures a helper for the registry, the
helper stores the secret instead.

Caveats:
* Keys are compared by host: ``https://host/v1/`` and ``host`` are the same key.  Docker Hub's
  key is ``https://index.docker.io/v1/`` (``docker.io``, ``index.docker.io`` and
  ``registry-1.docker.io`` all find it).
* Files are rewritten atomically with mode 0600; a malformed file is an error, never ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from ..fsutil import atomic_write

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
HELPER_TIMEOUT = 60


class CredentialsError(StoreError):
    """A credentials file or helper failed (unreadable file, helper error)."""


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token (``identitytoken``)

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r})"


def normalize_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/v2/`` -> ``h:5000``."""
    host = key.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in _HUB_NAMES else host


def server_key(host: str) -> str:
    """The key docker writes for ``host`` (Docker Hub's legacy URL, else the host)."""
    h = normalize_host(host)
    return DOCKER_HUB_KEY if h == "docker.io" else h


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def auth_files() -> list[str]:
    """Every file credentials are read from, in order."""
    files = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        files.append(env)
    files.append(docker_config_path())
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        files.append(os.path.join(runtime, "containers", "auth.json"))
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    files.append(os.path.join(xdg, "containers", "auth.json"))
    return files


def login_file() -> str:
    return os.environ.get("REGISTRY_AUTH_FILE") or docker_config_path()


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise CredentialsError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"{path} must hold a JSON object")
    return doc


def _entry(section: Any, host: str) -> tuple[str, Any] | None:
    if not isinstance(section, dict):
        return None
    for key, value in section.items():
        if isinstance(key, str) and normalize_host(key) == host:
            return key, value
    return None


def _decode_entry(value: Any, path: str) -> Credentials | None:
    if not isinstance(value, dict):
        return None
    token = value.get("identitytoken") or ""
    auth = value.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{path}: invalid auth entry (not base64 user:password)") \
                from None
        if not sep:
            raise CredentialsError(f"{path}: invalid auth entry (no ':' in user:password)")
        return Credentials(user, password, str(token))
    name, secret = value.get("username"), value.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret, str(token))
    if token:
        return Credentials("", "", str(token))
    return None


def _run_helper(helper: str, action: str, data: str) -> str:
    prog = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([prog, action], input=data.encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT)
    except FileNotFoundError:
        raise CredentialsError(f"credential helper {prog} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CredentialsError(f"credential helper {prog} {action} timed out") from None
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        if "credentials not found" in out.lower():
            return ""
        err = out or proc.stderr.decode(errors="replace").strip()
        raise CredentialsError(f"credential helper {prog} {action} failed: {err[:200]}")
    return out


def helper_get(helper: str, host: str) -> Credentials | None:
    out = _run_helper(helper, "get", server_key(host))
    if not out:
        return None
    try:
        doc = json.loads(out)
        user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    except (ValueError, AttributeError):
        raise CredentialsError(f"credential helper docker-credential-{helper} answered "
                               "something that is not JSON") from None
    if not secret:
        return None
    if user == "<token>":
        return Credentials("", "", secret)
    return Credentials(user, secret)


def lookup(host: str) -> Credentials | None:
    """Credentials for the registry ``host`` (``name[:port]``), or None for anonymous."""
    want = normalize_host(host)
    for path in auth_files():
        doc = _read(path)
        if doc is None:
            continue
        helper = _entry(doc.get("credHelpers"), want)
        if helper is not None and isinstance(helper[1], str) and helper[1]:
            return helper_get(helper[1], want)
        entry = _entry(doc.get("auths"), want)
        if entry is not None:
            creds = _decode_entry(entry[1], path)
            if creds is not None:
                return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            creds = helper_get(store, want)
            if creds is not None:
                return creds
    return None


def _helper_for(doc: dict[str, Any], host: str) -> str | None:
    helper = _entry(doc.get("credHelpers"), host)
    if helper is not None and isinstance(helper[1], str) and helper[1]:
        return helper[1]
    store = doc.get("credsStore")
    return store if isinstance(store, str) and store else None


def _write(path: str, doc: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent="\t").encode() + b"\n", mode=0o600)


def store_login(host: str, creds: Credentials) -> str:
    """Save ``creds`` for ``host``; returns where (a file path or ``helper NAME``)."""
    path = login_file()
    doc = _read(path) or {}
    want = normalize_host(host)
    key = server_key(want)
    helper = _helper_for(doc, want)
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    old = _entry(auths, want)
    if old is not None:
        del auths[old[0]]
    if helper is not None:
        user = creds.username if not creds.identity_token else "<token>"
        secret = creds.identity_token or creds.password
        _run_helper(helper, "store",
                    json.dumps({"ServerURL": key, "Username": user, "Secret": secret}))
        auths[key] = {}
        where = f"helper docker-credential-{helper}"
    else:
        raw = f"{creds.username}:{creds.password}".encode()
        entry: dict[str, str] = {"auth": base64.b64encode(raw).decode()}
        if creds.identity_token:
            entry["identitytoken"] = creds.identity_token
        auths[key] = entry
        where = path
    doc["auths"] = auths
    _write(path, doc)
    return where


def erase_login(host: str) -> bool:
    """Forget the credentials of ``host`` in every file that has them; False if none had."""
    want = normalize_host(host)
    found = False
    for path in dict.fromkeys([login_file(), *auth_files()]):
        doc = _read(path)
        if not doc:
            continue
        auths = doc.get("auths")
        entry = _entry(auths, want)
        helper = _helper_for(doc, want)
        if helper is not None and (entry is not None
                                   or _entry(doc.get("credHelpers"), want) is not None):
            _run_helper(helper, "erase", server_key(want))
            found = True
        if entry is not None and isinstance(auths, dict):
            del auths[entry[0]]
            _write(path, doc)
            found = True
    return found
