"""Image references with docker's normalisation.

``busybox`` is ``docker.io/library/busybox:latest``; ``localhost:5000/a/b:t`` keeps its
registry; ``name@sha256:...`` pins a digest.  The first path component is a registry only if it
contains ``.`` or ``:``, is ``localhost``, or has upper-case letters (docker's rule).

Caveats:
* ``str(ref)`` is the full form stored in the store; ``familiar`` is what docker prints
  (``busybox:latest``, ``localhost:5000/a/b:t``).
* A 64-hex string is refused as a repository name, as docker does, so it can only mean an ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .digest import Digest, parse_digest
from .errors import InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DOMAIN_COMPONENT = re.compile(r"^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])$")
_PORT = re.compile(r"^[0-9]+$")
_HEX64 = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """``domain/path``: the repository, fully qualified."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    @property
    def familiar_name(self) -> str:
        if self.domain == DEFAULT_DOMAIN:
            path = self.path
            if path.startswith(OFFICIAL_PREFIX) and path.count("/") == 1:
                path = path[len(OFFICIAL_PREFIX) :]
            return path
        return self.name

    @property
    def familiar(self) -> str:
        out = self.familiar_name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    @property
    def api_host(self) -> str:
        """The host the registry API lives on (``registry-1.docker.io`` for Docker Hub)."""
        return "registry-1.docker.io" if self.domain == DEFAULT_DOMAIN else self.domain


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return first, rest
    return DEFAULT_DOMAIN, name


def _check_domain(domain: str, raw: str) -> None:
    host, _, port = domain.partition(":")
    if host.startswith("[") and host.endswith("]"):  # IPv6 literal
        return
    if port and not _PORT.match(port):
        raise InvalidReference(f"invalid reference format: {raw!r} has a bad port")
    for part in host.split("."):
        if not _DOMAIN_COMPONENT.match(part):
            raise InvalidReference(f"invalid reference format: {raw!r} has a bad registry name")


def parse(raw: str, default_tag: bool = True) -> Reference:
    """Parse and normalise ``raw``; ``default_tag`` adds ``:latest`` when neither tag nor digest
    is given.  Raises InvalidReference with docker's wording."""
    if not raw or len(raw) > 512 or raw != raw.strip():
        raise InvalidReference(f"invalid reference format: {raw!r}")
    rest, at, digest_part = raw.partition("@")
    digest = parse_digest(digest_part) if at else None
    tag = None
    last = rest.rfind(":")
    if last > rest.rfind("/"):
        rest, tag = rest[:last], rest[last + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid reference format: {raw!r} has an invalid tag")
    domain, path = _split_domain(rest)
    _check_domain(domain, raw)
    if domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if not path:
        raise InvalidReference(f"invalid reference format: {raw!r}")
    for comp in path.split("/"):
        if not _COMPONENT.match(comp):
            if comp.lower() != comp:
                raise InvalidReference(
                    f"invalid reference format: repository name ({path}) must be lowercase"
                )
            raise InvalidReference(f"invalid reference format: {raw!r}")
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    if len(domain) + 1 + len(path) > 255:
        raise InvalidReference(f"invalid reference format: repository name {raw!r} is too long")
    if _HEX64.match(path.rpartition("/")[2]) and domain == DEFAULT_DOMAIN and not tag:
        raise InvalidReference(
            f"invalid repository name ({raw}), cannot specify 64-byte hexadecimal strings"
        )
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def parse_repo_tag(raw: str) -> Reference:
    """A destination name for tag/import/commit: a tag is allowed, a digest is not."""
    ref = parse(raw)
    if ref.digest is not None:
        raise InvalidReference(f"refusing to create a tag with a digest reference: {raw}")
    return ref
