"""eStargz (stargz-snapshotter's seekable gzip layers): the footer, the TOC, and a writer.

An eStargz blob is a gzip stream of a layer tar cut into members so that each regular file's
data (or each chunk of it) starts a member; the last tar entry is ``stargz.index.json``, the
TOC, in a member of its own, and a 51-byte footer (an empty gzip member whose Extra field
says ``%016xSTARGZ`` with the TOC's offset) ends the blob.  The layer descriptor carries the
TOC's digest in ``containerd.io/snapshot/stargz/toc.digest``; that is what makes the TOC, and
through its chunk digests every file, verifiable before the whole blob is there.

``toc_offset`` reads the footer, ``check_toc`` checks the TOC member (a lazy pull stores what
it returns) and ``toc_from`` parses it (where the layer is first used); ``read_toc`` does
both.  The writer (``EstargzWriter``) is in ``estargz_write``.

Caveats:
* The legacy stargz footer (47 bytes, no Extra subfield header) and external TOCs are not read:
  such layers are pulled whole.
"""

from __future__ import annotations

import hashlib
import io
import struct

from unionfs.tarscan import BadHeader, Fallback, scan

from .seekable import (
    ESTARGZ,
    ESTARGZ_TOC_ANNOTATION,
    GZIP,
    MAX_TOC,
    SeekableError,
    Toc,
    decompress_member,
    parse_toc,
)

FOOTER_SIZE = 51
TOC_NAME = "stargz.index.json"
TOC_ANNOTATION = ESTARGZ_TOC_ANNOTATION
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"


def footer(toc_offset: int) -> bytes:
    """The 51-byte footer naming ``toc_offset``."""
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    return (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
            + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)


def toc_offset(tail: bytes, blob_size: int) -> int:
    """The TOC's offset from the last ``FOOTER_SIZE`` bytes of a blob of ``blob_size``."""
    if len(tail) != FOOTER_SIZE or tail[:4] != b"\x1f\x8b\x08\x04" or \
            tail[10:16] != b"\x1a\x00SG\x16\x00" or tail[32:38] != b"STARGZ":
        raise SeekableError("not an eStargz blob: no eStargz footer")
    try:
        offset = int(tail[16:32], 16)
    except ValueError:
        raise SeekableError("eStargz footer: invalid TOC offset") from None
    if not 0 <= offset < blob_size - FOOTER_SIZE:
        raise SeekableError(f"eStargz footer: TOC offset {offset} lies outside the blob")
    return offset


def check_toc(member: bytes, digest: str) -> tuple[bytes, bytes]:
    """Check the TOC member (the blob's bytes from the TOC's offset to the footer) against
    ``digest`` (the layer's TOC annotation).  Returns the TOC JSON and the tar header before
    it (the TOC's own tar entry, which ``toc_from`` lists as a file)."""
    tar = decompress_member(GZIP, member, MAX_TOC + 64 * 512)
    try:
        members = scan(io.BytesIO(tar))
        m = next(members)
    except (BadHeader, Fallback, StopIteration) as exc:
        raise SeekableError(f"eStargz TOC member is not a tar entry ({exc})") from None
    if m.name.removeprefix("./") != TOC_NAME or not m.isreg():
        raise SeekableError(f"eStargz TOC member holds {m.name!r}, not {TOC_NAME}")
    if m.size > MAX_TOC or m.offset_data + m.size > len(tar):
        raise SeekableError(f"eStargz TOC of {m.size} bytes is too large or truncated")
    raw = tar[m.offset_data:m.offset_data + m.size]
    got = "sha256:" + hashlib.sha256(raw).hexdigest()
    if got != digest:
        raise SeekableError(f"eStargz TOC digest mismatch: the layer says {digest}, the TOC "
                            f"hashes to {got}")
    return raw, tar[:m.offset_data]


def toc_from(raw: bytes, head: bytes, offset: int, digest: str) -> Toc:
    """The TOC JSON ``raw`` (checked by ``check_toc``, with its tar header ``head``; at
    ``offset`` in the blob, whose TOC annotation is ``digest``) parsed."""
    toc = parse_toc(raw, ESTARGZ, offset)
    try:
        m = next(scan(io.BytesIO(head + raw)))
    except (BadHeader, Fallback, StopIteration) as exc:
        raise SeekableError(f"eStargz TOC member is not a tar entry ({exc})") from None
    # the TOC is a tar entry too: a full pull shows it, so the lazy layer does (from the TOC)
    m.offset_data = toc.toc_file = len(toc.files)
    toc.files.append([])
    toc.digests.append(digest)
    toc.members.append(m)
    return toc


def read_toc(member: bytes, digest: str, offset: int) -> tuple[bytes, Toc]:
    """``check_toc``, then ``toc_from``: the TOC JSON and the parsed TOC."""
    raw, head = check_toc(member, digest)
    return raw, toc_from(raw, head, offset, digest)
