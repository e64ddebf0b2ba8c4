"""A completed lazy layer's tar, for the mount that completed it: ``unpack``.

Once a mount daemon has completed a lazy layer (every byte fetched, the blob checked against
its digest), the rest of that mount would still read it chunk by chunk: decompressing and
checking each chunk on its first read, in Python.  ``unpack`` decompresses the blob once
instead, in one stream (as a full pull does), into an unnamed file in the lazy state, checks it
against the layer's diff_id, and finds where each regular file's data lies in it (the chunk
table's file number to the data's offset in the tar).  The layer then serves reads with
``pread`` from it, as a tar layer does.

Caveats:
* While the mount lives, its lazy layer takes about the layer's size on disk twice (blob and
  tar); the tar is gone with the mount (or a crash: it has no name, nothing to clean up).
  The next command that holds the ingesting hold makes the layer an ordinary stored one.
* Files stored sparse in the tar, and any the TOC describes otherwise than the tar (name, size),
  stay served from their chunks.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import zstandard
from zlib_ng import gzip_ng

from unionfs.tarlayer import LayerError, normalize_name
from unionfs.tarscan import BadHeader, Fallback, scan

from .compress import fast_zlib
from .digest import Hasher
from .errors import StoreError
from .seekable import GZIP

if TYPE_CHECKING:
    from .lazylayer import LazyLayer

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def unpack(layer: LazyLayer, stop: threading.Event | None = None
           ) -> tuple[int, dict[int, int]] | None:
    """The complete ``layer``'s tar, as an open descriptor of an unnamed file in its lazy
    state (gone with the descriptor), and its offsets table (see the module docstring); None
    when the tar does not match the diff_id (logged: the promotion will drop the layer),
    cannot be written, or ``stop`` is set meanwhile."""
    info = layer.info
    # a bound on the tar a sound layer makes: its data, and headers far larger than usual
    limit = info.content + (info.entries + 16) * 65536
    fd = -1
    try:
        fd = os.open(layer.blob.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        diff = Hasher()
        for chunk in _decompressed(layer.blob.blob_path, layer.compression):
            if stop is not None and stop.is_set():
                return None
            diff.update(chunk)
            if diff.size > limit:
                raise LayerError(f"the tar runs past {limit} bytes")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if diff.digest != info.diff_id:
            log.warning("lazy layer %s: its tar hashes to %s, not its diff_id %s", info.digest,
                        diff.digest, info.diff_id)
            return None
        offsets = _offsets(layer, fd)
        fd, done = -1, fd
        return done, offsets
    except (OSError, StoreError, LayerError) as exc:
        log.warning("lazy layer %s: cannot write its tar: %s", info.digest, exc)
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _decompressed(path: str, compression: str) -> Iterator[bytes]:
    """The blob at ``path`` decompressed, in pieces of ``CHUNK`` bytes: an eStargz blob's
    thousands of gzip members (one a file) and a zstd:chunked blob's frames (skippable ones
    skipped) are walked in C, not one Python step a member."""
    try:
        if compression == GZIP:
            with gzip_ng.open(path, "rb") as f:  # type: ignore[no-untyped-call]
                while chunk := f.read(CHUNK):
                    yield chunk
            return
        with open(path, "rb") as src, zstandard.ZstdDecompressor().stream_reader(
                src, read_across_frames=True) as reader:
            while chunk := reader.read(CHUNK):
                yield chunk
    except (EOFError, zlib.error, fast_zlib.error, gzip_ng.BadGzipFile,
            zstandard.ZstdError) as exc:
        raise LayerError(f"the blob does not decompress: {exc}") from None


def _offsets(layer: LazyLayer, fd: int) -> dict[int, int]:
    """File number -> data offset in the tar, for each name whose last tar member is a regular
    file the tar stores whole and the layer's index names with the same size (a later member
    of the same name replaces an earlier one, as the indexer has it)."""
    last: dict[str, tuple[int, int] | None] = {}  # name -> (data offset, size) or None
    try:
        with open(os.dup(fd), "rb", buffering=1 << 16) as f:
            f.seek(0)
            for m in scan(f):
                try:
                    name = normalize_name(m.name)
                except LayerError:
                    continue
                whole = m.isreg() and m.sparse is None
                last[name] = (m.offset_data, m.size) if whole else None
    except (BadHeader, Fallback):
        return {}  # a tar the fast scanner leaves: served from chunks, as before
    out: dict[int, int] = {}
    for name, found in last.items():
        if found is None:
            continue
        known = layer.locate(name)
        if known is not None and known[0] >= 0 and known[1] == found[1]:
            out[known[0]] = found[0]
    return out
