"""Writing eStargz: a layer tar recompressed so that it can be pulled lazily.

``convert`` reads a layer tar and writes, in one pass, the eStargz blob (gzip members cut at
every regular file's data and every ``chunk_size`` bytes of it, the TOC ``stargz.index.json``
as the last tar entry in a member of its own, the 51-byte footer) and the uncompressed tar that
blob decompresses to (the input's entries, a ``.no.prefetch.landmark`` first, the TOC entry
last), whose sha256 is the layer's new diff_id.  As stargz-snapshotter's ``estargz.Build``
without prioritised files; the result is an ordinary gzip layer for every other tool.

Caveats:
* The diff_id changes (the TOC and the landmark are tar entries), as with ``nerdctl image
  convert --estargz``; the files the layer holds do not.
* GNU sparse entries are refused (eStargz has no way to say a hole).
* Gzip members come from zlib, not Go's compress/gzip: the bytes differ from
  stargz-snapshotter's for the same input, the format does not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from unionfs.tarscan import BadHeader, Fallback, Member, scan

from .errors import InvalidLayer, Unsupported
from .estargz import TOC_NAME, footer
from .seekable import NO_PREFETCH_LANDMARK

CHUNK_SIZE = 4 << 20  # stargz-snapshotter's default
BLOCK = 512
Sink = Callable[[bytes], object]
_TYPES = {b"0": "reg", b"\0": "reg", b"7": "reg", b"1": "hardlink", b"2": "symlink",
          b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}


@dataclass(frozen=True)
class Written:
    toc_digest: str  # for the layer's containerd.io/snapshot/stargz/toc.digest annotation
    tar_size: int  # bytes of the uncompressed tar (io.containers.estargz.uncompressed-size)


def ustar_header(name: str, size: int, mode: int = 0o644, typeflag: bytes = b"0") -> bytes:
    """A plain ustar header (owner root, mtime 0) for a short name."""
    h = bytearray(BLOCK)
    h[0:len(name)] = name.encode()
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


class _Members:
    """gzip members appended to ``blob``; the uncompressed bytes also go to ``tar``."""

    def __init__(self, blob: Sink, tar: Sink, level: int) -> None:
        self.blob_sink, self.tar_sink, self.level = blob, tar, level
        self.offset = 0  # compressed bytes written
        self.tar_size = 0
        self.diff = hashlib.sha256()
        self._z: Any = None

    def _out(self, data: bytes) -> None:
        if data:
            self.blob_sink(data)
            self.offset += len(data)

    def close(self) -> None:
        if self._z is not None:
            self._out(self._z.flush(zlib.Z_FINISH))
            self._z = None

    def new(self) -> int:
        """Start a new member; returns its offset in the blob."""
        self.close()
        return self.offset

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._z is None:
            self._z = zlib.compressobj(self.level, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        self.tar_sink(data)
        self.diff.update(data)
        self.tar_size += len(data)
        self._out(self._z.compress(data))


def _xattrs(m: Member) -> dict[str, str]:
    out = {}
    for k, v in m.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            raw = v.encode("utf-8", "surrogateescape")
            out[k[len("SCHILY.xattr."):]] = base64.b64encode(raw).decode()
    return out


def _modtime(m: Member) -> str:
    import time

    # whole seconds, as stargz-snapshotter writes them: truncated, never a later time
    secs = math.floor(float(m.pax_headers.get("mtime", m.mtime)))
    if secs == 0:
        return ""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))
    except (OverflowError, OSError, ValueError):
        return ""


def _entry(m: Member, kind: str) -> dict[str, Any]:
    e: dict[str, Any] = {"name": m.name, "type": kind}
    if kind == "reg" and m.size:
        e["size"] = m.size
    if t := _modtime(m):
        e["modtime"] = t
    if kind in ("symlink", "hardlink"):
        e["linkName"] = m.linkname
    if m.mode:
        e["mode"] = m.mode
    if m.uid:
        e["uid"] = m.uid
    if m.gid:
        e["gid"] = m.gid
    if kind in ("char", "block"):
        e["devMajor"] = m.devmajor
        e["devMinor"] = m.devminor
    if x := _xattrs(m):
        e["xattrs"] = x
    return e


def convert(src: BinaryIO, blob: Sink, tar: Sink, *, chunk_size: int = CHUNK_SIZE,
            level: int = 6) -> Written:
    """Write the eStargz form of the layer tar ``src`` (a seekable file at 0) to ``blob`` and
    the tar it decompresses to to ``tar``.  Raises InvalidLayer for a tar that cannot be read,
    Unsupported for sparse files."""
    out = _Members(blob, tar, level)
    entries: list[dict[str, Any]] = []
    landmark = b"\x0f"
    out.write(ustar_header(NO_PREFETCH_LANDMARK, len(landmark)))
    offset = out.new()
    out.write(landmark + _pad(len(landmark)))
    digest = "sha256:" + hashlib.sha256(landmark).hexdigest()
    entries.append({"name": NO_PREFETCH_LANDMARK, "type": "reg", "size": 1, "mode": 0o644,
                    "offset": offset, "digest": digest, "chunkDigest": digest})
    pos = 0
    try:
        for m in scan(src):
            here = src.tell()
            kind = _TYPES.get(m.type)
            if kind is None:
                raise InvalidLayer(f"entry {m.name!r} has unsupported type {m.type!r}")
            if m.name.strip("/").removeprefix("./") == TOC_NAME:
                raise InvalidLayer(f"the layer already holds {TOC_NAME}: it is eStargz already")
            src.seek(pos)
            out.write(src.read(m.offset_data - pos))
            e = _entry(m, kind)
            entries.append(e)
            size = m.size if kind == "reg" else 0
            if size:
                _write_data(src, out, m, e, entries, chunk_size)
                out.write(_pad(size))
            pos = m.offset_data + size + len(_pad(size))
            src.seek(here)
    except Fallback:
        raise Unsupported("sparse files cannot be written as eStargz") from None
    except BadHeader as exc:
        raise InvalidLayer(f"not a valid tar archive: {exc}") from None
    toc_json = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    toc_offset = out.new()
    out.write(ustar_header(TOC_NAME, len(toc_json)) + toc_json + _pad(len(toc_json))
              + b"\0" * (2 * BLOCK))
    out.close()
    blob(footer(toc_offset))
    return Written("sha256:" + hashlib.sha256(toc_json).hexdigest(), out.tar_size)


def _write_data(src: BinaryIO, out: _Members, m: Member, first: dict[str, Any],
                entries: list[dict[str, Any]], chunk_size: int) -> None:
    src.seek(m.offset_data)
    whole = hashlib.sha256()
    e = first
    done = 0
    while done < m.size:
        n = min(chunk_size, m.size - done)
        data = src.read(n)
        if len(data) != n:
            raise InvalidLayer(f"entry {m.name!r}: data runs past the end of the archive")
        whole.update(data)
        if e is not first:
            e = {"name": m.name, "type": "chunk"}
            entries.append(e)
        e["offset"] = out.new()
        if done:
            e["chunkOffset"] = done
        if n == chunk_size and done + n < m.size:
            e["chunkSize"] = n
        e["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        out.write(data)
        done += n
        e = {}
    first["digest"] = "sha256:" + whole.hexdigest()


def convert_file(tar_path: str, blob: Sink, tar: Sink, **kw: Any) -> Written:
    with open(tar_path, "rb") as f:
        return convert(f, blob, tar, **kw)


ESTARGZ = "estargz"


def ingest_produced(store: Any, produce: Callable[[Callable[[bytes], None]], object]
                    ) -> tuple[Any, dict[str, str]]:
    """Store, as an eStargz layer, the layer tar ``produce(sink)`` writes: the tar goes to a
    temp file, is converted, and the blob goes through ``LayerStore.ingest`` (which stores the
    tar it decompresses to, the layer's new diff_id).  Returns the ``Ingested`` and the
    descriptor annotations (TOC digest, uncompressed size)."""
    import shutil
    import tempfile

    from .estargz import TOC_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION

    work = tempfile.mkdtemp(dir=store.layers.tmp_dir, prefix="estargz-")
    try:
        src, blob = os.path.join(work, "src.tar"), os.path.join(work, "blob")
        with open(src, "wb") as f:

            def sink(data: bytes) -> None:
                f.write(data)

            produce(sink)
        with open(blob, "wb") as out:
            written = convert_file(src, out.write, lambda data: None)
            out.flush()
            os.fsync(out.fileno())
        os.unlink(src)
        with open(blob, "rb") as packed:
            got = store.layers.ingest(packed, keep_blob=True)
        return got, {TOC_ANNOTATION: written.toc_digest,
                     UNCOMPRESSED_SIZE_ANNOTATION: str(written.tar_size)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
