"""Where stored blobs came from, so a push can mount them instead of uploading.

``<root>/blob-sources.json`` maps a blob digest to the repositories (``registry/path``, most
recent first, at most ``KEEP``) known to hold it: pull records the repository it pulled from,
push the one it pushed to.  A push to another repository of the same registry then tries a
cross-repository mount (``POST .../blobs/uploads/?mount=DIGEST&from=REPO``) first.

Caveats:
* A hint, not a truth: a stale entry only costs a mount attempt that falls back to an upload.
  Entries of blobs no longer in the store are dropped on the next write.
* Writes are serialised by ``flock`` on the file's own lock and replace the file atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator

from ..fsutil import atomic_write

FILE = "blob-sources.json"
KEEP = 4


class BlobSources:
    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, FILE)
        self._lock = self.path + ".lock"
        self._tmp = os.path.join(root, "tmp")

    def _read(self) -> dict[str, list[str]]:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        return {k: [r for r in v if isinstance(r, str)] for k, v in doc.items()
                if isinstance(k, str) and isinstance(v, list)}

    def get(self, digest: str) -> list[str]:
        """Repositories (``registry/path``) known to hold ``digest``, most recent first."""
        return list(self._read().get(digest, []))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def add(self, repository: str, digests: Iterable[str],
            exists: Callable[[str], bool] | None = None) -> None:
        """Record that ``repository`` holds ``digests``; ``exists`` prunes other entries."""
        digests = list(digests)
        if not digests:
            return
        with self._locked():
            doc = self._read()
            if exists is not None:
                doc = {k: v for k, v in doc.items() if k in digests or exists(k)}
            for d in digests:
                repos = [repository] + [r for r in doc.get(d, []) if r != repository]
                doc[d] = repos[:KEEP]
            os.makedirs(self._tmp, exist_ok=True)
            atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(),
                         tmp_dir=self._tmp)
