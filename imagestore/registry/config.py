"""The registries configuration: mirrors and insecure registries, and how to reach a registry.

The file is JSON, read from the first of these that exists (they are not merged)::

    $STRATA_REGISTRIES_CONFIG
    $XDG_CONFIG_HOME/strata/registries.json     (~/.config/strata/registries.json)
    /etc/strata/registries.json

    {
      "mirrors": {"docker.io": ["https://mirror.gcr.io", "http://10.0.0.5:5000"]},
      "insecure": ["registry.lan:5000", "10.0.0.0/8"]
    }

``registry-mirrors`` (mirrors of docker.io) and ``insecure-registries`` are accepted too, with
the meaning docker's ``daemon.json`` gives them.  Docker's rule decides the scheme: loopback
addresses and ``localhost`` are insecure by default; an insecure registry is tried over HTTPS
without certificate verification first, then over plain HTTP; every other registry is HTTPS
with the system CAs.  A mirror given with a scheme is used with that scheme only.

Caveats:
* Mirrors serve pulls only, and only the manifest stage falls back from a mirror to the next
  endpoint (blobs come from the endpoint that served the manifest).
* An ``insecure`` entry matches ``host:port`` exactly, a bare host name on any port, or an IP
  address inside a CIDR range.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import StoreError

DOCKER_HUB = "docker.io"


class ConfigError(StoreError):
    """The registries configuration file is unreadable or malformed."""


@dataclass(frozen=True)
class Endpoint:
    """One place to reach a registry: ``host`` (``name[:port]``) and the schemes to try, in
    order.  ``verify`` is False for insecure registries (no certificate checks)."""

    host: str
    schemes: tuple[str, ...] = ("https",)
    verify: bool = True
    mirror: bool = False

    def __str__(self) -> str:
        return self.host


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(_hostname(host))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    name = _hostname(host).lower()
    if name == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


@dataclass(frozen=True)
class RegistriesConfig:
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: tuple[str, ...] = ()
    path: str | None = None

    def is_insecure(self, host: str) -> bool:
        if is_loopback(host):
            return True
        name = _hostname(host).lower()
        ip = _ip(host)
        for entry in self.insecure:
            e = entry.lower()
            if e == host.lower() or e == name:
                return True
            if "/" in e and ip is not None:
                try:
                    if ip in ipaddress.ip_network(e, strict=False):
                        return True
                except ValueError:
                    continue
        return False

    def endpoint(self, host: str) -> Endpoint:
        """How to reach the registry at ``host`` (for push, login and pulls)."""
        if self.is_insecure(host):
            return Endpoint(host, ("https", "http"), verify=False)
        return Endpoint(host)

    def pull_endpoints(self, domain: str, api_host: str) -> list[Endpoint]:
        """Mirrors of ``domain`` in order, then the registry itself."""
        out: list[Endpoint] = []
        for m in self.mirrors.get(domain, ()):
            if "://" in m:
                parts = urlsplit(m)
                base = self.endpoint(parts.netloc)
                out.append(Endpoint(parts.netloc, (parts.scheme,), base.verify, mirror=True))
            else:
                base = self.endpoint(m.rstrip("/"))
                out.append(Endpoint(base.host, base.schemes, base.verify, mirror=True))
        out.append(self.endpoint(api_host))
        return out


def config_path() -> str | None:
    """The configuration file in use (None when there is none)."""
    env = os.environ.get("STRATA_REGISTRIES_CONFIG")
    if env:
        return env
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for path in (os.path.join(xdg, "strata", "registries.json"), "/etc/strata/registries.json"):
        if os.path.exists(path):
            return path
    return None


def _strings(value: object, what: str, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: {what} must be a list of strings")
    return tuple(value)


def _mirror_url(m: str, path: str) -> str:
    if "://" in m:
        parts = urlsplit(m)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise ConfigError(f"{path}: mirror {m!r} must be http(s)://HOST[:PORT]")
    return m.rstrip("/")


def load_config(path: str | None = None) -> RegistriesConfig:
    """Read the configuration (``path``, else ``config_path()``); no file means defaults."""
    path = path or config_path()
    if path is None:
        return RegistriesConfig()
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        if os.environ.get("STRATA_REGISTRIES_CONFIG"):
            raise ConfigError(f"registries configuration {path} does not exist") from None
        return RegistriesConfig()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read registries configuration {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the configuration must be a JSON object")
    mirrors: dict[str, tuple[str, ...]] = {}
    raw_mirrors = doc.get("mirrors", {})
    if not isinstance(raw_mirrors, dict):
        raise ConfigError(f"{path}: mirrors must map a registry to a list of mirrors")
    for domain, items in raw_mirrors.items():
        key = DOCKER_HUB if domain in ("index.docker.io", "registry-1.docker.io") else domain
        mirrors[key] = tuple(_mirror_url(m, path) for m in _strings(items, "mirrors", path))
    if "registry-mirrors" in doc:
        extra = tuple(_mirror_url(m, path)
                      for m in _strings(doc["registry-mirrors"], "registry-mirrors", path))
        mirrors[DOCKER_HUB] = mirrors.get(DOCKER_HUB, ()) + extra
    insecure: tuple[str, ...] = ()
    for key in ("insecure", "insecure-registries"):
        if key in doc:
            insecure += _strings(doc[key], key, path)
    unknown = set(doc) - {"mirrors", "registry-mirrors", "insecure", "insecure-registries"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    return RegistriesConfig(mirrors, insecure, path)
