"""Digests: parsing, hashing, and a verifying hasher.

A digest is written ``algorithm:hex``.  Only ``sha256`` (64 lowercase hex) and ``sha512``
(128) are accepted; everything the store names by digest goes through ``parse_digest``.

Caveats:
* ``Digest`` is a ``NewType`` over ``str``: parse at the edge, pass typed values inside.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

from .errors import DigestMismatch, InvalidReference

Digest = NewType("Digest", str)

_HEX = {"sha256": 64, "sha512": 128}
_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def parse_digest(value: str) -> Digest:
    """Validate ``value`` as a digest; raises InvalidReference."""
    if not _GRAMMAR.match(value):
        raise InvalidReference(f"invalid digest {value!r}")
    algo, _, hexpart = value.partition(":")
    want = _HEX.get(algo)
    if want is None:
        raise InvalidReference(f"unsupported digest algorithm {algo!r}")
    if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise InvalidReference(f"invalid {algo} digest {value!r}")
    return Digest(value)


def is_digest(value: str) -> bool:
    try:
        parse_digest(value)
    except InvalidReference:
        return False
    return True


def hex_of(digest: Digest) -> str:
    return digest.partition(":")[2]


def sha256_bytes(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def sha256_hex(digest: Digest) -> str:
    """The hex part of a sha256 digest (the store only keeps sha256 content)."""
    if not digest.startswith("sha256:"):
        raise InvalidReference(f"only sha256 content is stored, not {digest!r}")
    return hex_of(digest)


class Hasher:
    """Hash a stream as it passes, counting bytes; ``verify`` checks digest and size."""

    def __init__(self, algorithm: str = "sha256") -> None:
        self.algorithm = algorithm
        self._h = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    @property
    def digest(self) -> Digest:
        return Digest(f"{self.algorithm}:{self._h.hexdigest()}")

    def verify(self, expected: Digest | None, size: int | None = None, what: str = "blob") -> None:
        if size is not None and self.size != size:
            raise DigestMismatch(f"{what} {expected or ''} has {self.size} bytes, expected {size}")
        if expected is not None and self.digest != expected:
            raise DigestMismatch(f"{what} digest mismatch: expected {expected}, got {self.digest}")


def new_hasher(expected: Digest | None) -> Hasher:
    """A hasher using the algorithm of ``expected`` (sha256 when None)."""
    return Hasher(expected.partition(":")[0] if expected else "sha256")
