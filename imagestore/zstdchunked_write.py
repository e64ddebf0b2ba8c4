"""Writing zstd:chunked: a layer tar recompressed so that podman (containers/storage) and strata
can pull it lazily, while it stays an ordinary zstd stream of the very same tar.

``convert`` reads a layer tar once and writes the blob as containers/storage's chunked
compressor does (``pkg/chunked/compressor``): tar headers and padding in zstd frames of their
own, each regular file's data starting a new frame and cut into frames of ``chunk_size`` bytes,
then three zstd skippable frames that decoders ignore — the TOC (zstd-compressed JSON: every
entry's metadata as Go's ``archive/tar`` reads it from the header, with the offsets and sha256
digests of its data and chunks, and ``tarSplitDigest``), the tar-split (the JSON lines of
``vbatts/tar-split``: every header and padding byte verbatim, every file's size and crc64, so
the exact tar can be rebuilt from the TOC's files), and the 64-byte footer.  The layer
descriptor gets the ``io.github.containers.zstd-chunked.*`` annotations (TOC position and
checksum, tar-split position), and the older ``io.containers.zstd-chunked.*`` names too, which
skopeo 1.9 and the containers/storage of Debian's buildah read.

The tar is not changed, so the diff_id is not either.

Caveats:
* Chunks have a fixed size (containers/storage cuts at a rolling checksum, for sharing chunks
  between layers); readers take any cut.  Runs of zeros are stored as data, not as ``zeros``
  chunks.
* As containers/storage's, refused: GNU sparse files, two entries for one path (tar-split and
  the TOC match entries by name), entry types other than the seven of the TOC format, times
  outside the years 0-9999 (Go cannot write them as JSON).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import posixpath
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import crcmod
import zstandard

from unionfs.tarscan import BadHeader, Fallback, Member, scan

from .errors import InvalidLayer, Unsupported

CHUNK_SIZE = 1 << 20
LEVEL = 10  # containers/storage's default for zstd:chunked
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
FOOTER_MAGIC = b"GnUlInUx"
PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
Sink = Callable[[bytes], object]
_TYPES = {b"0": "reg", b"\0": "reg", b"7": "reg", b"1": "hardlink", b"2": "symlink",
          b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}
_crc64 = crcmod.mkCrcFun(0x1000000000000001B, initCrc=0, rev=True,
                         xorOut=0xFFFFFFFFFFFFFFFF)  # Go's hash/crc64 with the ISO table


@dataclass(frozen=True)
class Written:
    annotations: dict[str, str]  # for the layer descriptor
    toc_digest: str  # sha256 of the compressed TOC (the manifest-checksum)
    tar_size: int


def pax_time(text: str) -> str:
    """A PAX time (``1700000000.5``) as RFC 3339 with nanoseconds, as Go writes a time."""
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise InvalidLayer(f"invalid PAX time {text!r}")
    secs, nanos = int(whole), int((frac + "000000000")[:9])
    if neg:
        secs, nanos = -secs - (1 if nanos else 0), (10**9 - nanos) % 10**9
    return unix_time(secs, nanos)


def unix_time(secs: int, nanos: int = 0) -> str:
    try:
        t = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            seconds=secs)
    except OverflowError:
        raise Unsupported(f"time {secs} cannot be written in a zstd:chunked TOC") from None
    out = t.strftime("%Y-%m-%dT%H:%M:%S")
    if len(out) != 19:
        raise Unsupported(f"time {secs} cannot be written in a zstd:chunked TOC")
    if nanos:
        out += "." + f"{nanos:09d}".rstrip("0")
    return out + "Z"


def _gnu_time(header: bytes, start: int) -> int | None:
    """A GNU header's access or change time (Go's reader sets them when non-zero)."""
    raw = header[start:start + 12]
    if header[257:265] != b"ustar  \0" or not raw.strip(b"\0 "):
        return None
    try:
        return int(raw.strip(b"\0 ").decode(), 8)
    except ValueError:
        return None


def toc_entry(m: Member, header: bytes) -> dict[str, Any]:
    """The TOC entry of ``m`` with the fields containers/storage's ``NewFileMetadata`` takes
    from Go's reading of the same header (``header``: its last 512-byte block)."""
    kind = _TYPES.get(m.type)
    if kind is None:
        raise Unsupported(f"entry {m.name!r} has type {m.type!r}, which zstd:chunked cannot "
                          "hold")
    e: dict[str, Any] = {"type": kind, "name": m.name}
    if m.linkname:
        e["linkName"] = m.linkname
    for key, value in (("mode", m.mode), ("size", m.size), ("uid", m.uid), ("gid", m.gid)):
        if value:
            e[key] = value
    pax = m.pax_headers
    mtime = pax_time(pax["mtime"]) if "mtime" in pax else unix_time(int(m.mtime))
    e["modtime"] = mtime
    for key, pkey, at in (("accesstime", "atime", 345), ("changetime", "ctime", 357)):
        if pkey in pax:
            e[key] = pax_time(pax[pkey])
        elif (gnu := _gnu_time(header, at)) is not None:
            e[key] = unix_time(gnu)
    if m.devmajor:
        e["devMajor"] = m.devmajor
    if m.devminor:
        e["devMinor"] = m.devminor
    xattrs = {k.removeprefix("SCHILY.xattr."):
              base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
              for k, v in pax.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        e["xattrs"] = xattrs
    return e


class _TarSplit:
    """The tar-split JSON lines, zstd-compressed as they are made."""

    def __init__(self, level: int) -> None:
        self.pos = 0
        self.size = 0
        self._out: list[bytes] = []
        self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def _add(self, doc: dict[str, Any]) -> None:
        doc["position"] = self.pos
        self.pos += 1
        line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        self.size += len(line)
        self._out.append(self._z.compress(line))

    def segment(self, raw: bytes) -> None:
        self._add({"type": 2, "payload": base64.b64encode(raw).decode()})

    def file(self, name: str, size: int, crc: int | None) -> None:
        doc: dict[str, Any] = {"type": 1}
        raw = name.encode("utf-8", "surrogateescape")
        try:
            doc["name"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            doc["name_raw"] = base64.b64encode(raw).decode()
        if size:
            doc["size"] = size
        doc["payload"] = None if crc is None else base64.b64encode(struct.pack(">Q", crc)).decode()
        self._add(doc)

    def finish(self) -> bytes:
        self._out.append(self._z.flush())
        return b"".join(self._out)


class _Blob:
    """The blob as it is written: frames appended to ``sink``, their offsets counted."""

    def __init__(self, sink: Sink, level: int) -> None:
        self.sink, self.offset = sink, 0
        self.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.pending = bytearray()  # tar bytes that are no file data, for the next frame

    def write(self, data: bytes) -> None:
        self.sink(data)
        self.offset += len(data)

    def flush_pending(self) -> None:
        if self.pending:
            self.write(self.cctx.compress(bytes(self.pending)))
            self.pending.clear()

    def frame(self, data: bytes) -> None:
        self.write(self.cctx.compress(data))

    def skippable(self, data: bytes) -> int:
        """Append a skippable frame; returns where its data starts."""
        self.write(SKIPPABLE_MAGIC + struct.pack("<I", len(data)))
        at = self.offset
        self.write(data)
        return at


def convert(src: BinaryIO, blob: Sink, *, chunk_size: int = CHUNK_SIZE,
            level: int = LEVEL) -> Written:
    """Write the zstd:chunked form of the layer tar ``src`` (a seekable file at 0) to ``blob``.
    Raises InvalidLayer for a tar that cannot be read, Unsupported for what the format cannot
    hold (see the module docstring)."""
    out = _Blob(blob, level)
    split = _TarSplit(level)
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    pos = 0  # the tar bytes up to here are written
    try:
        for m in scan(src):
            here = src.tell()
            clean = posixpath.normpath("/" + m.name)
            if clean in seen:
                raise Unsupported(f"the layer holds {m.name!r} twice, which zstd:chunked "
                                  "cannot hold")
            seen.add(clean)
            src.seek(pos)
            raw = src.read(m.offset_data - pos)
            out.pending += raw
            split.segment(raw)
            e = toc_entry(m, raw[-512:])
            entries.append(e)
            size = m.size if _TYPES[m.type] == "reg" else 0
            crc = None
            if size:
                crc = _file_data(src, out, m, e, entries, chunk_size)
            elif m.size:
                crc = _crc64(b"")  # a header-only type with a size: Go reads no data
            split.file(m.name, m.size, crc)
            pos = m.offset_data + size
            src.seek(here)
    except Fallback:
        raise Unsupported("sparse files cannot be written as zstd:chunked") from None
    except BadHeader as exc:
        raise InvalidLayer(f"not a valid tar archive: {exc}") from None
    src.seek(pos)
    rest = src.read()
    end = min(len(rest), 1024 + (-pos % 512))
    split.segment(rest[:end])  # padding and end-of-archive blocks, as tar-split cuts them
    split.segment(rest[end:])
    out.pending += rest
    out.flush_pending()
    tar_size = pos + len(rest)
    tarsplit = split.finish()
    toc = json.dumps({"version": 1, "entries": entries,
                      "tarSplitDigest": "sha256:" + hashlib.sha256(tarsplit).hexdigest()},
                     separators=(",", ":")).encode()
    packed = zstandard.ZstdCompressor(level=level).compress(toc)
    toc_at = out.skippable(packed)
    split_at = out.skippable(tarsplit)
    footer = struct.pack("<QQQQQQQ", toc_at, len(packed), len(toc), 1, split_at, len(tarsplit),
                         split.size) + FOOTER_MAGIC
    out.skippable(footer)
    checksum = "sha256:" + hashlib.sha256(packed).hexdigest()
    annotations = {}
    for prefix in PREFIXES:
        annotations[prefix + "manifest-checksum"] = checksum
        annotations[prefix + "manifest-position"] = f"{toc_at}:{len(packed)}:{len(toc)}:1"
        annotations[prefix + "tarsplit-position"] = f"{split_at}:{len(tarsplit)}:{split.size}"
    return Written(annotations, checksum, tar_size)


def _file_data(src: BinaryIO, out: _Blob, m: Member, first: dict[str, Any],
               entries: list[dict[str, Any]], chunk_size: int) -> int:
    """Write ``m``'s data as frames of ``chunk_size`` bytes and fill in the TOC; returns the
    data's crc64 (for the tar-split)."""
    src.seek(m.offset_data)
    out.flush_pending()
    whole = hashlib.sha256()
    crc = 0
    chunks: list[dict[str, Any]] = []
    done = 0
    first["offset"] = out.offset
    while done < m.size:
        n = min(chunk_size, m.size - done)
        data = src.read(n)
        if len(data) != n:
            raise InvalidLayer(f"entry {m.name!r}: data runs past the end of the archive")
        whole.update(data)
        crc = _crc64(data, crc)
        chunks.append({"offset": out.offset, "chunkOffset": done, "chunkSize": n,
                       "chunkDigest": "sha256:" + hashlib.sha256(data).hexdigest()})
        out.frame(data)
        done += n
    first["digest"] = "sha256:" + whole.hexdigest()
    first["endOffset"] = out.offset
    if len(chunks) > 1:  # as containers/storage: chunk fields only for files cut in several
        first.update({k: v for k, v in chunks[0].items() if k != "chunkOffset"})
        for c in chunks[1:]:
            entries.append({"type": "chunk", "name": m.name, **c})
    return crc


def convert_file(tar_path: str, blob: Sink, **kw: Any) -> Written:
    with open(tar_path, "rb") as f:
        return convert(f, blob, **kw)
