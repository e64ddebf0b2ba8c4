"""Compression: detection by magic bytes, streaming decompression and compression.

``sniff`` recognises gzip, zstd, bzip2 and xz by their magic bytes (anything else is taken as
an uncompressed tar).  ``DecompressReader`` turns any of them into a readable stream of the tar,
following multi-member gzip/bzip2 and multi-frame zstd.  ``Compressor`` writes gzip, zstd or
nothing with fixed headers, so the same tar always compresses to the same bytes.

Caveats:
* ``limit`` bounds the decompressed size (a decompression bomb stops with ``InvalidImage``);
  the store passes its ``max_layer_size`` (``STRATA_MAX_LAYER_SIZE``, 64 GiB by default).
* gzip output uses zlib's header with mtime 0, so it is deterministic but not byte-identical to
  Go's gzip writer; digests of committed layers are stable run to run, not across tools.
* gzip goes through ``fast_zlib``: zlib-ng (PyPI ``zlib-ng``, a dependency), a drop-in for zlib
  that inflates about twice and deflates several times as fast; where it does not import,
  the standard zlib.  Its deflate output differs from zlib's, so a layer committed with one
  has another digest than with the other (each is deterministic); what a pull or load stores
  is the blob as received, whatever inflated it.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import zlib
from types import ModuleType
from typing import BinaryIO, Protocol, cast

import zstandard

from .errors import InvalidImage, Unsupported

fast_zlib: ModuleType = zlib  # zlib's interface, faster where zlib-ng imports
try:
    from zlib_ng import zlib_ng

    fast_zlib = zlib_ng
except ImportError:  # pragma: no cover - zlib-ng is a dependency; an odd platform may lack it
    pass

NONE, GZIP, ZSTD, BZIP2, XZ = "none", "gzip", "zstd", "bzip2", "xz"
LAYER_COMPRESSIONS = (GZIP, ZSTD, NONE)

_MAGIC = (
    (b"\x1f\x8b", GZIP),
    (b"\x28\xb5\x2f\xfd", ZSTD),
    (b"BZh", BZIP2),
    (b"\xfd7zXZ\x00", XZ),
)


def sniff(head: bytes) -> str:
    """The compression of a stream starting with ``head`` (at least 6 bytes when available)."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return NONE


def human_size(n: int) -> str:
    """``n`` bytes as the largest binary unit that divides it (``64 GiB``), else bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``64k``, ``1T`` or a number of bytes (binary units); raises
    ValueError unless it is a positive size."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 512M, 10G, 1T)")
    n = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2)]
    if n <= 0:
        raise ValueError(f"invalid size {text!r}: it must be positive")
    return n


OUT = 1 << 20  # decompressed bytes per step for gzip, bzip2 and xz (their max_length)
ZSTD_SLICE = 2 << 10  # compressed bytes per zstd call: at most 64 MiB out (RLE blocks)
GZIP_SLICE = 256 << 10  # compressed bytes per gzip call
_ERRORS = (zlib.error, fast_zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError,
           ValueError)


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview, max_length: int = ..., /) -> bytes: ...


def _decoder(kind: str) -> _Decoder:
    if kind == GZIP:
        return cast(_Decoder, fast_zlib.decompressobj(zlib.MAX_WBITS | 16))
    if kind == BZIP2:
        return bz2.BZ2Decompressor()
    if kind == XZ:
        return lzma.LZMADecompressor()
    if kind == ZSTD:
        return cast(_Decoder, zstandard.ZstdDecompressor().decompressobj())  # no max_length
    raise Unsupported(f"unsupported compression {kind!r}")


class DecompressReader(io.RawIOBase):
    """A readable stream of the decompressed content of ``src``.

    Memory stays bounded whatever the input: each step decompresses at most ``OUT`` bytes
    (gzip, bzip2, xz; zstd, which has no output bound, takes ``ZSTD_SLICE`` bytes of input
    at a time until ``OUT`` bytes came out), and reads hand out slices of that step's output,
    so a bomb is stopped by ``limit`` one step after it crosses it, never inflated whole."""

    def __init__(self, src: BinaryIO, kind: str | None = None, limit: int | None = None,
                 head: bytes = b"") -> None:
        self._src = src
        self._head = head
        if kind is None:
            self._head += src.read(max(0, 8 - len(head)))
            kind = sniff(self._head)
        self.kind = kind
        self._dec: _Decoder | None = None if kind == NONE else _decoder(kind)
        self._pending: bytes | memoryview = b""  # input the decoder has not taken yet
        self._more = False  # the decoder holds output it can give without new input
        self._between = False  # a member (frame) ended; the next one has not begun
        self._buf = b""  # the last step's output, handed out from _pos on
        self._pos = 0
        self._eof = False
        self._limit = limit
        self.total = 0
        self.compressed = 0

    def readable(self) -> bool:
        return True

    def _raw(self, n: int) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        data = self._src.read(n)
        self.compressed += len(data)
        return data

    def _fill(self) -> None:
        while self._pos >= len(self._buf) and not self._eof:
            self._buf, self._pos = self._step(), 0

    def _step(self) -> bytes:
        if self._dec is None:
            raw = self._raw(1 << 20)
            self._eof = not raw
            return raw
        if not self._pending and not self._more:
            self._pending = self._raw(1 << 20)
            if not self._pending:
                if not self._between:
                    raise InvalidImage(f"truncated {self.kind} stream")
                self._eof = True
                return b""
        if self._between:  # multi-member gzip/bzip2/xz, multi-frame zstd: a new decoder
            if self.kind == GZIP and bytes(self._pending[:1]) == b"\0" and \
                    not bytes(self._pending).strip(b"\0"):
                self._pending = b""  # zero padding after the last gzip member
                return b""
            self._dec, self._between = _decoder(self.kind), False
        try:
            out = self._decompress(self._dec)
        except _ERRORS as exc:
            raise InvalidImage(f"corrupt {self.kind} stream: {exc}") from None
        if self._dec.eof:  # (gzip and zstd: ``_decompress`` has left the rest in _pending)
            if self.kind not in (GZIP, ZSTD):
                self._pending = self._dec.unused_data + bytes(self._pending)
            self._between, self._more = True, False
        return out

    def _decompress(self, dec: _Decoder) -> bytes:
        """One step; the input not used is left in ``_pending`` as a view of the same buffer
        (an eStargz or zstd:chunked blob ends a member or frame every few KiB: copying the
        rest of the buffer at each end cost more than decompressing)."""
        view = memoryview(self._pending)
        if self.kind == ZSTD:  # small slices until OUT bytes came out or the frame ended
            outs, got, pos = [], 0, 0
            while pos < len(view) and got < OUT and not dec.eof:
                piece = view[pos:pos + ZSTD_SLICE]
                outs.append(dec.decompress(piece))
                pos += len(piece)
                got += len(outs[-1])
            if dec.eof:
                pos -= len(dec.unused_data)
            self._pending = view[pos:]
            return b"".join(outs)
        if self.kind == GZIP:  # slices, so that a member's end leaves little to copy
            piece = view[:GZIP_SLICE]
            out = dec.decompress(piece, OUT)
            left = dec.unused_data if dec.eof else dec.unconsumed_tail  # type: ignore[attr-defined]
            self._pending = view[len(piece) - len(left):]
            self._more = len(out) == OUT
            return out
        out = dec.decompress(bytes(view), OUT)  # bzip2 and xz keep what they cannot use yet
        self._pending = b""
        self._more = not dec.needs_input  # type: ignore[attr-defined]
        return out

    def _take(self, n: int) -> bytes:
        self._fill()
        avail = len(self._buf) - self._pos
        if avail <= 0:
            return b""
        n = min(n, avail)
        if self._pos == 0 and n == len(self._buf):
            out = self._buf
        else:
            out = self._buf[self._pos:self._pos + n]
        self._pos += n
        self.total += n
        if self._limit is not None and self.total > self._limit:
            raise InvalidImage(
                f"decompressed data exceeds the limit of {human_size(self._limit)} (a "
                "decompression bomb?); raise it with --max-layer-size or STRATA_MAX_LAYER_SIZE")
        return out

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._take(len(b))
        b[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self._take(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        return self._take(size)


class Compressor:
    """Deterministic streaming compression to ``kind`` (gzip, zstd or none).  gzip is
    compressed in parallel (``ParallelGzip``); the bytes never depend on the thread count."""

    def __init__(self, kind: str, level: int | None = None) -> None:
        if kind not in LAYER_COMPRESSIONS:
            raise Unsupported(f"cannot write {kind!r} layers (use gzip, zstd or none)")
        self.kind = kind
        self._gz: ParallelGzip | None = None
        self._zs: zstandard.ZstdCompressionObj | None = None
        if kind == GZIP:
            self._gz = ParallelGzip(6 if level is None else level)
        elif kind == ZSTD:
            self._zs = zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()

    def compress(self, data: bytes | memoryview) -> bytes:
        if self._gz is not None:
            return self._gz.compress(data)
        if self._zs is not None:
            return self._zs.compress(bytes(data))
        return bytes(data)

    def flush(self) -> bytes:
        if self._gz is not None:
            return self._gz.flush()
        if self._zs is not None:
            return self._zs.flush()
        return b""

    def close(self) -> None:
        """Stop the worker threads (after ``flush``, or when giving up)."""
        if self._gz is not None:
            self._gz.close()


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, OS unknown
_FINAL_BLOCK = b"\x03\x00"  # an empty, final, fixed-Huffman deflate block
_WINDOW = 32 << 10


def _deflate(level: int, data: bytes, zdict: bytes) -> bytes:
    """Deflate one block; a block whose first 64 KiB do not compress (media, archives,
    random data) is stored as it is, which is as small and many times faster."""
    sample = data[: 1 << 16]
    if sample and len(fast_zlib.compress(sample, 1)) > len(sample) * 0.97:
        level = 0
    c = fast_zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL,
                              zlib.Z_DEFAULT_STRATEGY, zdict) if zdict else \
        fast_zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    out: bytes = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out


class ParallelGzip:
    """gzip as pigz writes it: the input cut into 1 MiB blocks, each deflated on a worker
    thread (zlib releases the GIL) primed with the 32 KiB before it, joined by sync flushes,
    closed by an empty final block and the CRC-32/size trailer.  One valid gzip member;
    the same input always gives the same bytes (the block size, level and the stored-block
    rule depend on the data only, never on the thread count)."""

    BLOCK = 1 << 20

    def __init__(self, level: int, threads: int | None = None) -> None:
        import concurrent.futures
        import os

        self.level = level
        workers = threads or os.cpu_count() or 1
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="gzip")
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._tail = b""
        self._jobs: list[concurrent.futures.Future[bytes]] = []
        self._crc = 0
        self._size = 0
        self._started = False
        self._max_jobs = 2 * workers

    def compress(self, data: bytes | memoryview) -> bytes:
        data = bytes(data)
        self._crc = fast_zlib.crc32(data, self._crc)
        self._size += len(data)
        self._pending.append(data)
        self._pending_size += len(data)
        while self._pending_size >= self.BLOCK:
            joined = b"".join(self._pending)
            block, rest = joined[: self.BLOCK], joined[self.BLOCK :]
            self._pending, self._pending_size = ([rest], len(rest)) if rest else ([], 0)
            self._submit(block)
        return self._ready(block=len(self._jobs) >= self._max_jobs)

    def _submit(self, block: bytes) -> None:
        self._jobs.append(self._pool.submit(_deflate, self.level, block, self._tail))
        self._tail = block[-_WINDOW:]

    def _ready(self, block: bool) -> bytes:
        out = [] if self._started else [_GZIP_HEADER]
        self._started = True
        while self._jobs and (self._jobs[0].done() or block):
            out.append(self._jobs.pop(0).result())
            block = False
        return b"".join(out)

    def flush(self) -> bytes:
        if self._pending_size:
            self._submit(b"".join(self._pending))
            self._pending, self._pending_size = [], 0
        out = [self._ready(block=False)]
        while self._jobs:
            out.append(self._jobs.pop(0).result())
        out.append(_FINAL_BLOCK)
        out.append(self._crc.to_bytes(4, "little") + (self._size & 0xFFFFFFFF).to_bytes(
            4, "little"))
        self.close()
        return b"".join(out)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
