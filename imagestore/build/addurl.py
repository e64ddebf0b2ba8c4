"""``ADD https://...``: a file downloaded into the rootfs, as docker's ADD does it.

The file lands at the destination (or, when the destination ends in ``/``, under the last
component of the URL's path), mode ``0600``, owned by root or ``--chown``, with its mtime from
the response's ``Last-Modified`` header.  It is never extracted, whatever it holds.
``--checksum=sha256:<hex>`` is verified, and lets a step hit the cache without downloading;
without it the download's digest is part of the step's cache key (a changed file reruns it).

Seams: ``Downloads`` keeps each URL's body in an unnamed file of the store's ``tmp/`` (the digest
for the cache key and the copy come from one download); ``httpx`` does HTTP.

Caveats:
* Only ``http`` and ``https``; no git URLs (``ADD --keep-git-dir`` is refused earlier).
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Sequence
from typing import BinaryIO

from ..errors import StoreError
from .copy import CopyError, CopyOptions, DestRoot

__all__ = ["Downloads", "is_url"]

_CHECKSUM = re.compile(r"^sha256:[a-f0-9]{64}$")


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


class Downloads:
    """The URLs one build ADDs, each downloaded once into an anonymous file of the store's
    ``tmp/`` (``O_TMPFILE``: nothing is left behind, even by a killed build)."""

    def __init__(self, tmp_dir: str) -> None:
        self.tmp_dir = tmp_dir
        self.files: dict[str, tuple[BinaryIO, str, float | None]] = {}  # url: (file, digest,
        # mtime)

    def close(self) -> None:
        for f, _, _ in self.files.values():
            f.close()
        self.files.clear()

    def fetch(self, url: str, where: str) -> tuple[BinaryIO, str, float | None]:
        if url in self.files:
            return self.files[url]
        import httpx

        f = tempfile.TemporaryFile(dir=self.tmp_dir)  # noqa: SIM115 - kept for the build
        h = hashlib.sha256()
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as r:
                if r.status_code != 200:
                    raise StoreError(f"{where}: ADD failed: {url}: {r.status_code} "
                                     f"{r.reason_phrase}")
                for chunk in r.iter_bytes(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                modified = r.headers.get("last-modified")
        except httpx.HTTPError as exc:
            f.close()
            raise StoreError(f"{where}: ADD failed: {url}: {exc}") from None
        except BaseException:
            f.close()
            raise
        mtime = None
        if modified:
            try:
                mtime = email.utils.parsedate_to_datetime(modified).timestamp()
            except (TypeError, ValueError):
                mtime = None
        self.files[url] = (f, "sha256:" + h.hexdigest(), mtime)
        return self.files[url]

    def digests(self, urls: Sequence[str], checksum: str | None, where: str) -> str:
        """The part of the cache key the URLs make (``--checksum`` needs no download)."""
        if checksum is not None:
            if not _CHECKSUM.match(checksum):
                raise CopyError(f"{where}: invalid --checksum={checksum} (sha256:<64 hex "
                                "digits>)")
            if len(urls) != 1:
                raise CopyError(f"{where}: ADD --checksum takes exactly one URL source")
            return f"{urls[0]}@{checksum};"
        return "".join(f"{u}@{self.fetch(u, where)[1]};" for u in urls)

    def add(self, urls: Sequence[str], root: DestRoot, dest: str, opts: CopyOptions,
            checksum: str | None, where: str) -> None:
        for url in urls:
            src, digest, mtime = self.fetch(url, where)
            if checksum is not None and digest != checksum:
                raise CopyError(f"{where}: ADD failed: {url}: digest mismatch: the content "
                                f"is {digest}, --checksum says {checksum}")
            if dest.endswith("/"):
                name = posixpath.basename(urllib.parse.urlparse(url).path)
                if not name:
                    raise CopyError(f"{where}: ADD failed: cannot determine a file name from "
                                    f"{url}: give a destination file name")
                target = dest + name
            else:
                target = dest
            rel = root.locate(target, follow_last=False)
            st = root.lstat(rel)
            if st is not None and os.path.isdir(root.host(rel)):
                name = posixpath.basename(urllib.parse.urlparse(url).path)
                rel = root.locate(f"/{rel}/{name}", follow_last=False)
                st = root.lstat(rel)
            owner = opts.owner or (0, 0)
            root.mkdirs(posixpath.dirname(rel), owner)
            if st is not None:
                root.clear(rel, st)
            host = root.host(rel)
            src.seek(0)
            with open(host, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chown(host, *owner)
            os.chmod(host, opts.chmod if opts.chmod is not None else 0o600)
            if mtime is not None:
                os.utime(host, (mtime, mtime))
