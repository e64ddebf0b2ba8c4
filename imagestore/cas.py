"""BlobStore: content-addressed bytes under ``blobs/sha256/<hex>``.

It knows bytes and digests only (JSON is oci.py's, policy the ``Store``'s).  Every blob is
written to a temp file under ``tmp/`` (same file system), hashed and size-checked while it is
written, fsynced, and renamed into place only when it matches: a blob that is visible is
complete and verified.  ``put``/``delete`` are idempotent.

Caveats:
* Reads trust what is in ``blobs/`` (it was verified on the way in); ``verify`` re-hashes for
  ``strata check``.
* ``link`` turns an already verified file (an uncompressed layer tar) into a blob by hardlink,
  so an uncompressed layer is stored once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO

from .digest import Digest, Hasher, new_hasher, parse_digest, sha256_hex
from .errors import DigestMismatch, ImageNotFound
from .fsutil import disk_full_guard, fsync_dir


class BlobWriter:
    """Streams one blob into the store; ``commit`` verifies and publishes it."""

    def __init__(self, store: BlobStore, expected: Digest | None, size: int | None) -> None:
        self._store = store
        self.expected = expected
        self.expected_size = size
        self.hasher: Hasher = new_hasher(expected)
        fd, self.tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
        self._f = os.fdopen(fd, "wb")
        self.digest: Digest | None = None

    def write(self, data: bytes | memoryview) -> None:
        if self.expected_size is not None and self.hasher.size + len(data) > self.expected_size:
            raise DigestMismatch(
                f"blob {self.expected or ''} is larger than the {self.expected_size} bytes expected"
            )
        with disk_full_guard("a blob"):
            self._f.write(data)
        self.hasher.update(data)

    def commit(self, sync: bool = True) -> Digest:
        """Verify and publish.  ``sync=False`` leaves the fsyncs to the caller, who must
        ``syncfs`` the store before anything names the blob (a build's many small ones)."""
        with disk_full_guard("a blob"):
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
            self._f.close()
        self.hasher.verify(self.expected, self.expected_size)
        digest = self.hasher.digest
        self._store.publish(self.tmp, digest, sync)
        self.digest = digest
        return digest

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None or self.digest is None:
            self.abort()


class BlobStore:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "blobs", "sha256")
        self.tmp_dir = os.path.join(root, "tmp")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)

    def path(self, digest: Digest) -> str:
        return os.path.join(self.dir, sha256_hex(digest))

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self.path(digest))

    def size(self, digest: Digest) -> int:
        try:
            return os.path.getsize(self.path(digest))
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is missing from the store") from None

    def open(self, digest: Digest) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is missing from the store") from None

    def read(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def writer(self, expected: Digest | None = None, size: int | None = None) -> BlobWriter:
        return BlobWriter(self, expected, size)

    def put(self, data: bytes, expected: Digest | None = None, sync: bool = True) -> Digest:
        """Store ``data`` (verified against ``expected`` when given); idempotent.  ``sync``:
        as ``BlobWriter.commit``'s."""
        h = new_hasher(expected)
        h.update(data)
        h.verify(expected, None)
        if self.has(h.digest):
            return h.digest
        with self.writer(expected, len(data)) as w:
            w.write(data)
            return w.commit(sync)

    def publish(self, tmp: str, digest: Digest, sync: bool = True) -> None:
        """Move a verified temp file into place (idempotent: an existing blob wins)."""
        dst = self.path(digest)
        with disk_full_guard("a blob"):
            os.chmod(tmp, 0o644)
            os.rename(tmp, dst)
            if sync:
                fsync_dir(self.dir)

    def link(self, path: str, digest: Digest) -> None:
        """Make the verified file at ``path`` the blob ``digest`` (hardlink, else copy)."""
        if self.has(digest):
            return
        tmp = os.path.join(self.tmp_dir, f"link-{sha256_hex(digest)}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            import shutil

            with disk_full_guard("a blob"):
                shutil.copyfile(path, tmp)
        self.publish(tmp, digest)

    def delete(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(digest))

    def digests(self) -> Iterator[Digest]:
        for name in sorted(os.listdir(self.dir)):
            if len(name) == 64 and name.isalnum():
                yield parse_digest("sha256:" + name)

    def verify(self, digest: Digest) -> bool:
        h = Hasher()
        with self.open(digest) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.digest == digest
