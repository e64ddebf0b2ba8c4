"""zstd:chunked (containers/storage's seekable zstd layers): annotations, TOC, and a writer.

A zstd:chunked blob is a zstd stream of a layer tar in which each regular file's data (or each
chunk of it) starts a frame; after the tar come zstd skippable frames that decoders ignore: the
TOC (zstd-compressed JSON), in newer versions the tar-split, and a footer.  The layer descriptor
says where the TOC lies (``...manifest-position``: ``offset:length:uncompressed:type``) and its
digest (``...manifest-checksum``, the sha256 of the compressed TOC bytes).  Both the current
annotation names (``io.github.containers.zstd-chunked.*``) and the older ones
(``io.containers.zstd-chunked.*``, written by skopeo 1.9 and stargz-snapshotter 0.12) are read.

Caveats:
* Only the TOC is needed to serve files; the tar-split is not read (the completed layer is
  served from its tar, which the blob decompresses to).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from .seekable import MAX_TOC, ZSTD, ZSTD_CHUNKED, SeekableError, Toc, decompress_member, parse_toc

_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
CHECKSUM = "manifest-checksum"
POSITION = "manifest-position"
TARSPLIT = "tarsplit-position"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
FOOTER_MAGIC = b"GnUlInUx"
MANIFEST_TYPE_CRFS = 1


def _get(ann: Mapping[str, str], key: str) -> str | None:
    for prefix in _PREFIXES:
        if prefix + key in ann:
            return ann[prefix + key]
    return None


def toc_position(ann: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(offset, compressed length, uncompressed length) of the TOC the annotations announce;
    None when they announce none (or one this reader does not know)."""
    pos, checksum = _get(ann, POSITION), _get(ann, CHECKSUM)
    if pos is None or checksum is None:
        return None
    try:
        offset, length, ulength, kind = (int(x) for x in pos.split(":"))
    except ValueError:
        return None
    if kind != MANIFEST_TYPE_CRFS or min(offset, length, ulength) < 0:
        return None
    return offset, length, ulength


def toc_checksum(ann: Mapping[str, str]) -> str:
    return _get(ann, CHECKSUM) or ""


def check_toc(compressed: bytes, ann: Mapping[str, str], blob_size: int) -> tuple[bytes, int]:
    """Check the compressed TOC (the blob's bytes at the announced position) against the
    checksum annotation and decompress it.  Returns the TOC JSON and the offset ``parse_toc``
    takes (where the TOC region starts)."""
    where = toc_position(ann)
    if where is None:
        raise SeekableError("zstd:chunked layer without a TOC position annotation")
    offset, length, ulength = where
    if ulength > MAX_TOC or length > MAX_TOC or offset + length > blob_size or offset < 8:
        raise SeekableError("zstd:chunked TOC position is out of range")
    got = "sha256:" + hashlib.sha256(compressed).hexdigest()
    if got != toc_checksum(ann):
        raise SeekableError(f"zstd:chunked TOC checksum mismatch: the layer says "
                            f"{toc_checksum(ann)}, the TOC hashes to {got}")
    raw = decompress_member(ZSTD, compressed, ulength + 1)
    if len(raw) != ulength:
        raise SeekableError(f"zstd:chunked TOC is {len(raw)} bytes, the layer says {ulength}")
    return raw, offset - 8


def read_toc(compressed: bytes, ann: Mapping[str, str], blob_size: int) -> tuple[bytes, Toc]:
    """``check_toc``, then ``parse_toc``: the TOC JSON and the parsed TOC."""
    raw, offset = check_toc(compressed, ann, blob_size)
    return raw, parse_toc(raw, ZSTD_CHUNKED, offset)
