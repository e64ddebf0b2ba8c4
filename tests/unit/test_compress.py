"""Compression detection and streaming decompression."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os

import pytest
import zstandard

from imagestore.compress import Compressor, DecompressReader, sniff
from imagestore.errors import InvalidImage

DATA = os.urandom(200_000) + b"\0" * 300_000


@pytest.mark.parametrize("kind, pack", [
    ("gzip", lambda b: gzip.compress(b)),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b)),
    ("bzip2", bz2.compress),
    ("xz", lzma.compress),
    ("none", lambda b: b),
])
def test_sniff_and_decompress(kind: str, pack: object) -> None:
    packed = pack(DATA)  # type: ignore[operator]
    assert sniff(packed[:8]) == kind
    r = DecompressReader(io.BytesIO(packed))
    assert r.kind == kind and r.read() == DATA


def test_multi_member_gzip_and_multi_frame_zstd() -> None:
    two = gzip.compress(b"first ") + gzip.compress(b"second")
    assert DecompressReader(io.BytesIO(two)).read() == b"first second"
    z = zstandard.ZstdCompressor()
    assert DecompressReader(io.BytesIO(z.compress(b"a") + z.compress(b"b"))).read() == b"ab"


def test_truncated_stream_is_an_error() -> None:
    packed = gzip.compress(DATA)
    with pytest.raises(InvalidImage, match="truncated|corrupt"):
        DecompressReader(io.BytesIO(packed[: len(packed) // 2])).read()


def test_bomb_limit() -> None:
    bomb = gzip.compress(b"\0" * 10_000_000)
    with pytest.raises(InvalidImage, match="exceeds"):
        DecompressReader(io.BytesIO(bomb), limit=1_000_000).read()


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compressor_round_trip_and_determinism(kind: str) -> None:
    outs = []
    for _ in range(2):
        c = Compressor(kind)
        outs.append(c.compress(DATA) + c.flush())
    assert outs[0] == outs[1]
    assert DecompressReader(io.BytesIO(outs[0])).read() == DATA


def test_parallel_gzip_is_one_valid_member_whatever_the_threads(tmp_path: object) -> None:
    import subprocess

    from imagestore.compress import ParallelGzip

    data = os.urandom(3_500_000) + b"abc" * 900_000
    outs = []
    for threads in (1, 3):
        gz = ParallelGzip(6, threads=threads)
        pieces = [gz.compress(data[i : i + 70_000]) for i in range(0, len(data), 70_000)]
        outs.append(b"".join(pieces) + gz.flush())
    assert outs[0] == outs[1]
    assert gzip.decompress(outs[0]) == data
    proc = subprocess.run(["gzip", "-t"], input=outs[0], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert len(outs[0]) < len(data)  # the repeated tail compresses
