"""Seekable layers: what eStargz and zstd:chunked have in common.

A seekable layer is a compressed layer tar in which every regular file's data starts a new
gzip member (eStargz) or zstd frame (zstd:chunked), large files in several chunks, plus a table
of contents (TOC): a JSON list of the tar's entries with, for each chunk of file data, where
its member or frame lies in the blob and the digest of the chunk's bytes.  The blob stays an
ordinary gzip or zstd stream of the whole tar for every other tool.

This module is the format-neutral part: ``parse_toc`` turns a TOC (already verified against
the digest the image manifest gives) into ``Toc``: the entries as ``tarscan.Member`` values the
layer indexer (``unionfs.tarlayer.index_members``) turns into the same index a tar gives —
with the indexer's refusals of hostile names, hardlinks and whiteouts — and, per regular file,
its ``Chunk`` list.  ``chunk_bytes`` decompresses one chunk from the bytes of its member or
frame and checks its digest.  The format modules (``estargz``, ``zstdchunked``) find and
verify the TOC; ``detect`` says which one a layer descriptor names.

Seams: nothing here does I/O; the lazy layer (``lazylayer``) fetches and stores bytes.

Caveats:
* eStargz TOCs carry modification times in whole seconds; a tar entry with a sub-second PAX
  mtime then shows the TOC's time until the layer is complete and served from its tar.
* A chunk without a digest cannot be verified: such a TOC is refused (the layer is then pulled
  whole).  Only sha256 digests are accepted.
* zstd:chunked comes in two dialects: containers/storage's (``endOffset``, ``chunkType``
  zeros) and stargz-snapshotter's (eStargz's fields in zstd frames); both are read.
"""

from __future__ import annotations

import base64
import bisect
import calendar
import contextlib
import functools
import hashlib
import io
import json
import marshal
import re
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import zstandard

from unionfs.tarlayer import LayerError, LayerIndex, index_members
from unionfs.tarscan import Member

from . import oci
from .compress import fast_zlib
from .errors import SeekableError as SeekableError

ESTARGZ = "estargz"
ZSTD_CHUNKED = "zstd:chunked"
FORMATS = (ESTARGZ, ZSTD_CHUNKED)
GZIP, ZSTD = "gzip", "zstd"
MAX_TOC = 64 << 20  # bytes of TOC JSON (compressed or not) accepted
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
ESTARGZ_TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
_TYPES = {"reg": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "block": b"4",
          "dir": b"5", "fifo": b"6"}
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                   r"(Z|z|[+-]\d\d:\d\d)$")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}$")


class Chunk(NamedTuple):
    """One run of a regular file's data (a tuple: a layer's table of thousands is loaded at
    every mount)."""

    start: int  # where the gzip member / zstd frame holding it starts in the blob
    end: int  # where that member or frame ends (exclusive)
    inner: int  # where the data starts in the member's decompressed bytes
    offset: int  # where the data lies in the file
    size: int
    digest: str  # "sha256:..." of the data; "" for a run of zeros (nothing to fetch)

    @property
    def zeros(self) -> bool:
        return not self.digest


@dataclass
class Toc:
    """A parsed, verified table of contents."""

    format: str
    compression: str
    members: list[Member]
    files: list[list[Chunk]]  # by ``Member.offset_data`` of regular files
    data_end: int  # the blob's file data ends here (the TOC region starts)
    prefetch_end: int = 0  # files whose data starts before this are prioritised
    digests: list[str] = field(default_factory=list)  # whole-file digest per file ("" unknown)
    toc_file: int = -1  # the file number of the TOC's own tar entry (eStargz), served locally

    def index(self) -> LayerIndex:
        """The layer's entry index, built by the tar indexer's rules (raises SeekableError)."""
        try:
            return index_members(self.members)
        except LayerError as exc:
            raise SeekableError(f"table of contents: {exc}") from None

    def chunks(self) -> list[Chunk]:
        """Every chunk that holds data, in blob order, each once."""
        seen: dict[tuple[int, int], Chunk] = {}
        for chunks in self.files:
            for c in chunks:
                if not c.zeros:
                    seen.setdefault((c.start, c.inner), c)
        return sorted(seen.values(), key=lambda c: (c.start, c.inner))


def detect(desc: oci.Descriptor) -> str | None:
    """The seekable format a layer descriptor announces (its media type and TOC annotation),
    or None for a layer that can only be pulled whole."""
    from . import zstdchunked

    ann = desc.annotations or {}
    kind = oci.LAYER_TYPES.get(desc.media_type)
    if kind == ZSTD and zstdchunked.toc_position(ann) is not None:
        return ZSTD_CHUNKED
    if kind == GZIP and ESTARGZ_TOC_ANNOTATION in ann:
        return ESTARGZ
    return None


# -- parsing -------------------------------------------------------------------------------------


def _int(e: dict[str, Any], key: str, default: int = 0, low: int = 0,
         high: int = (1 << 63) - 1) -> int:
    v = e.get(key, default)
    if type(v) is int and low <= v <= high:  # the common case, first (a TOC has 10^5 fields)
        return v
    if v is None:
        v = default
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise SeekableError(f"table of contents: entry {e.get('name')!r} has an invalid "
                            f"{key} {v!r}")
    return v


def _str(e: dict[str, Any], key: str) -> str:
    v = e.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise SeekableError(f"table of contents: entry {e.get('name')!r} has an invalid {key}")
    return v


@functools.lru_cache(maxsize=4096)  # files of one layer share a few times
def parse_time(text: str) -> str | None:
    """An RFC 3339 time as a PAX ``mtime`` value (seconds with nanoseconds); None if empty."""
    if not text:
        return None
    m = _TIME.match(text)
    if m is None:
        raise SeekableError(f"table of contents: invalid time {text!r}")
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    frac = (m.group(7) or "").ljust(9, "0")
    tz = m.group(8)
    shift = 0
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        shift = sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    try:
        secs = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - shift
    except (ValueError, OverflowError):
        raise SeekableError(f"table of contents: invalid time {text!r}") from None
    if secs < 0 and int(frac):
        return f"-{-secs - 1}.{10**9 - int(frac):09d}"
    return f"{secs}.{frac}"


def _xattrs(e: dict[str, Any]) -> dict[str, str]:
    raw = e.get("xattrs") or {}
    if not isinstance(raw, dict):
        raise SeekableError(f"table of contents: entry {e.get('name')!r} has invalid xattrs")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SeekableError(f"table of contents: entry {e.get('name')!r} has invalid xattrs")
        try:
            data = base64.b64decode(v, validate=True)
        except ValueError:
            raise SeekableError(f"table of contents: entry {e.get('name')!r}: xattr {k!r} is "
                                "not base64") from None
        out["SCHILY.xattr." + k] = data.decode("utf-8", "surrogateescape")
    return out


@dataclass(slots=True)
class _Raw:
    """A chunk as the TOC states it, before its end is known."""

    start: int
    inner: int
    offset: int
    size: int  # 0: to the end of the file
    digest: str
    end: int  # 0: unknown (the next member boundary)
    zeros: bool


_IDS = (1 << 32) - 1


def _member(e: dict[str, Any], typeflag: bytes, file_no: int) -> Member:
    get = e.get
    pax = _xattrs(e) if "xattrs" in e else {}
    text = get("modtime")
    mtime = parse_time(text if type(text) is str else _str(e, "modtime"))
    if mtime is not None:
        pax["mtime"] = mtime
    size = _int(e, "size") if typeflag == b"0" else 0
    name, link = get("name", ""), get("linkName", "")
    mode, uid, gid = get("mode", 0), get("uid", 0), get("gid", 0)
    major, minor = get("devMajor", 0), get("devMinor", 0)
    if not (type(name) is str and type(link) is str and type(mode) is int
            and type(uid) is int and type(gid) is int and type(major) is int
            and type(minor) is int and 0 <= mode <= _IDS and 0 <= uid <= _IDS
            and 0 <= gid <= _IDS and 0 <= major < 1 << 63 and 0 <= minor < 1 << 63):
        # the uncommon case (null, out of range, a wrong type): checked field by field
        name, link = _str(e, "name"), _str(e, "linkName")
        mode, uid, gid = (_int(e, k, high=_IDS) for k in ("mode", "uid", "gid"))
        major, minor = _int(e, "devMajor"), _int(e, "devMinor")
    return Member(name, typeflag, mode, uid, gid, size,
                  float(mtime.partition(".")[0]) if mtime else 0.0, link, major, minor,
                  file_no, pax)


_SIZE_FIELD = re.compile(rb'"size":\s*(\d+)')


def content_size(raw: bytes) -> int:
    """The bytes of regular-file data a TOC JSON lists — the sum of its ``"size"`` fields,
    which only regular files carry (strata's, stargz-snapshotter's and containers/storage's
    writers; a JSON string cannot hold the pattern unescaped) — found without parsing the
    JSON (a TOC of 10^4 entries takes 20-40 ms to parse, 5 to scan): for the image record of
    a lazy pull, before ``parse_toc`` runs where the layer is first used, which counts it
    exactly (hardlinked and repeated names once)."""
    return sum(map(int, _SIZE_FIELD.findall(raw)))


def parse_toc(raw: bytes, fmt: str, data_end: int) -> Toc:
    """The TOC JSON ``raw`` (verified by the caller) of a ``fmt`` blob whose file data ends at
    ``data_end``; raises SeekableError for anything malformed or inconsistent."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise SeekableError("table of contents is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or \
            not isinstance(doc.get("entries"), list):
        raise SeekableError("table of contents: not a version 1 TOC")
    entries: list[Any] = doc["entries"]
    toc = Toc(fmt, GZIP if fmt == ESTARGZ else ZSTD, [], [], data_end)
    raws: list[list[_Raw]] = []
    sizes: list[int] = []
    current: list[_Raw] | None = None
    current_size = 0
    prefetch_at = -1
    for e in entries:
        if not isinstance(e, dict):
            raise SeekableError("table of contents: an entry is not an object")
        kind = e.get("type")
        if kind == "chunk":
            if current is None:
                raise SeekableError("table of contents: a chunk entry follows no regular file")
            current.append(_chunk(e, current_size))
            continue
        typeflag = _TYPES.get(kind) if isinstance(kind, str) else None
        if typeflag is None:
            raise SeekableError(f"table of contents: entry {e.get('name')!r} has unknown type "
                                f"{kind!r}")
        current = None
        file_no = -1
        if typeflag == b"0":
            file_no = len(raws)
            current = []
            current_size = _int(e, "size")
            if current_size:
                current.append(_chunk(e, current_size))
            raws.append(current)
            sizes.append(current_size)
            toc.digests.append(_str(e, "digest"))
        m = _member(e, typeflag, file_no)
        if current and PREFETCH_LANDMARK in m.name and \
                m.name.strip("/").removeprefix("./") == PREFETCH_LANDMARK:
            prefetch_at = current[0].start
        toc.members.append(m)
    boundaries = sorted({c.start for cs in raws for c in cs} | {data_end})
    for file_no, cs in enumerate(raws):
        toc.files.append(_finish(cs, sizes[file_no], boundaries, toc.digests[file_no], data_end))
    toc.prefetch_end = max(0, prefetch_at)
    return toc


_MAX = (1 << 63) - 1
_CHUNK_INTS = ("offset", "innerOffset", "chunkOffset", "chunkSize", "endOffset")


def _chunk(e: dict[str, Any], file_size: int) -> _Raw:
    get = e.get
    digest, kind = get("chunkDigest", ""), get("chunkType", "")
    start, inner, offset = get("offset", 0), get("innerOffset", 0), get("chunkOffset", 0)
    size, end = get("chunkSize", 0), get("endOffset", 0)
    # the common case, unrolled (a TOC has 10^4 chunks): every field of its type, in range
    if not (type(digest) is str and type(kind) is str and type(start) is int
            and type(inner) is int and type(offset) is int and type(size) is int
            and type(end) is int and 0 <= start <= _MAX and 0 <= inner <= _MAX
            and 0 <= offset <= _MAX and 0 <= size <= _MAX and 0 <= end <= _MAX):
        # the uncommon case (null, out of range, a wrong type): checked field by field
        digest, kind = _str(e, "chunkDigest"), _str(e, "chunkType")
        start, inner, offset, size, end = (_int(e, k) for k in _CHUNK_INTS)
    return _Raw(start, inner, offset, size, digest, end, kind == "zeros")


def _finish(raws: list[_Raw], size: int, boundaries: Sequence[int], file_digest: str,
            data_end: int) -> list[Chunk]:
    """Chunks with their ends and sizes resolved, checked to tile the file exactly.  A chunk
    ends where the next chunk of its file starts (containers/storage), at its ``endOffset``,
    or at the next member boundary of the blob (eStargz, whose members also hold the next
    entries' tar headers)."""
    out: list[Chunk] = []
    pos = 0
    file_end = raws[0].end if raws else 0  # containers/storage: where the file's frames end
    for i, r in enumerate(raws):
        nxt = raws[i + 1] if i + 1 < len(raws) else None
        if r.offset != pos:
            raise SeekableError(f"table of contents: chunks of a file do not follow each other "
                                f"(chunk at {r.offset}, expected {pos})")
        n = r.size or (nxt.offset if nxt is not None else size) - r.offset
        if n <= 0 or r.offset + n > size:
            raise SeekableError("table of contents: a chunk runs past the end of its file")
        pos += n
        if r.zeros:
            out.append(Chunk(r.start, r.start, 0, r.offset, n, ""))
            continue
        j = bisect.bisect_right(boundaries, r.start)
        end = boundaries[j] if j < len(boundaries) else data_end
        if nxt is not None and nxt.start > r.start:
            end = nxt.start
        elif nxt is None and (r.end or file_end):
            end = r.end or file_end
        digest = r.digest or (file_digest if len(raws) == 1 else "")
        if not _SHA256.match(digest):
            raise SeekableError("table of contents: a chunk has no sha256 digest")
        if not 0 <= r.start < end <= data_end:
            raise SeekableError(f"table of contents: chunk at {r.start} lies outside the "
                                "file data")
        out.append(Chunk(r.start, end, r.inner, r.offset, n, digest))
    if pos != size:
        raise SeekableError(f"table of contents: chunks cover {pos} of a file's {size} bytes")
    return out


# -- chunk data ----------------------------------------------------------------------------------


_local = threading.local()


def _zstd_context() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (making one costs more than a small frame's work)."""
    dctx = getattr(_local, "zstd", None)
    if dctx is None:
        dctx = _local.zstd = zstandard.ZstdDecompressor()
    return dctx


def decompress_member(compression: str, raw: bytes, want: int) -> bytes:
    """Up to ``want`` bytes of the first gzip member / zstd frame of ``raw``."""
    try:
        if compression == GZIP:
            d = fast_zlib.decompressobj(zlib.MAX_WBITS | 16)
            out: bytes = d.decompress(raw, want)
            while len(out) < want and d.unconsumed_tail and not d.eof:
                out += d.decompress(d.unconsumed_tail, want - len(out))
            return out
        dctx = _zstd_context()
        if 0 <= zstandard.frame_content_size(raw) <= want:  # one call, sized by the header
            with contextlib.suppress(zstandard.ZstdError):
                whole: bytes = dctx.decompress(raw, max_output_size=want,
                                               read_across_frames=False, allow_extra_data=True)
                return whole
        reader = dctx.stream_reader(io.BytesIO(raw), read_across_frames=False)
        parts = []
        got = 0
        while got < want:
            part = reader.read(want - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)
    except (zlib.error, fast_zlib.error, zstandard.ZstdError) as exc:
        raise SeekableError(f"chunk does not decompress: {exc}") from None


def chunk_bytes(compression: str, chunk: Chunk, raw: bytes) -> bytes:
    """The data of ``chunk`` from ``raw`` (the blob's bytes ``chunk.start:chunk.end``),
    verified against its digest; raises SeekableError."""
    if chunk.zeros:
        return bytes(chunk.size)
    out = decompress_member(compression, raw, chunk.inner + chunk.size)
    data = out[chunk.inner:chunk.inner + chunk.size]
    if len(data) != chunk.size:
        raise SeekableError(f"chunk at {chunk.start} holds {len(data)} of {chunk.size} bytes")
    if "sha256:" + hashlib.sha256(data).hexdigest() != chunk.digest:
        raise SeekableError(f"chunk at {chunk.start}+{chunk.inner} does not match its digest "
                            f"{chunk.digest}")
    return data


# -- the stored chunk table ----------------------------------------------------------------------


def dump_files(files: list[list[Chunk]]) -> bytes:
    # (start, end, inner, offset, size, digest): a Chunk's fields, as plain tuples (marshal)
    return marshal.dumps([list(map(tuple, cs)) for cs in files], 4)


def load_files(raw: bytes) -> list[list[Chunk]]:
    try:
        rows = marshal.loads(raw)
        make = Chunk._make
        return [list(map(make, cs)) for cs in rows]
    except (ValueError, EOFError, TypeError) as exc:
        raise SeekableError(f"corrupt chunk table: {exc}") from None
