"""UnionError: what the union core raises for a request it refuses; ``fuse_ops`` turns it into
the errno the caller sees."""

from __future__ import annotations

import errno
import os


class UnionError(OSError):
    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, os.strerror(code) + (f": {what}" if what else ""))

    @property
    def code(self) -> int:
        return self.errno if self.errno is not None else errno.EIO


class MountError(Exception):
    """The file system could not be mounted or unmounted (one-line message)."""
