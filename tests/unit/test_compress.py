"""Compression detection and streaming decompression."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zlib

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


def _skippable(payload: bytes) -> bytes:
    return (0x184D2A50).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_thousands_of_members_across_buffer_and_slice_ends(kind: str) -> None:
    """An eStargz blob is a gzip member a file, a zstd:chunked one a frame a file with
    skippable frames between: members of every size end anywhere in the 1 MiB input buffers
    and the decoder's slices, and the stream reads back whole (and a truncated one fails)."""
    rnd = __import__("random").Random(5)
    parts = [rnd.randbytes(rnd.choice([0, 1, 100, 5000, 70_000, 300_000])) for _ in range(600)]
    z = zstandard.ZstdCompressor()
    packed = b"".join(gzip.compress(p, 1) if kind == "gzip" else
                      z.compress(p) + (_skippable(b"meta") if i % 7 == 0 else b"")
                      for i, p in enumerate(parts))
    if kind == "gzip":
        packed += b"\0" * 1024  # tar-style zero padding after the last member
    assert DecompressReader(io.BytesIO(packed)).read() == b"".join(parts)
    with pytest.raises(InvalidImage, match="truncated|corrupt"):
        DecompressReader(io.BytesIO(packed[:len(packed) * 2 // 3])).read()


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


@pytest.mark.parametrize("kind, pack", [
    ("gzip", lambda b: gzip.compress(b, 1) + gzip.compress(b"tail", 1)),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b) * 2),
    ("bzip2", lambda b: bz2.compress(b) + bz2.compress(b"tail")),
    ("xz", lambda b: lzma.compress(b)),
])
def test_small_reads_across_steps_and_members(kind: str, pack: object) -> None:
    data = DATA * 5  # several steps of output
    packed = pack(data)  # type: ignore[operator]
    want = {"gzip": data + b"tail", "zstd": data * 2, "bzip2": data + b"tail", "xz": data}[kind]
    r = DecompressReader(io.BytesIO(packed))
    got = bytearray()
    while piece := r.read(513):
        got += piece
    assert bytes(got) == want and r.total == len(want)


@pytest.mark.parametrize("kind, size, bound", [
    ("gzip", 256 << 20, 16 << 20),  # 256 MiB of zeros: ~250 KiB of gzip
    ("zstd", 1 << 30, 200 << 20),  # 1 GiB of zeros: a few KiB of zstd RLE blocks
])
def test_a_bomb_is_never_inflated_whole(kind: str, size: int, bound: int) -> None:
    """Before: one decompress call inflated a whole read of input (1 MiB of gzip of zeros is
    1 GiB), then every read copied the rest of it — a 4 GiB bomb took 2 GiB and 4 minutes."""
    import tracemalloc

    if kind == "gzip":
        z = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        chunk = bytes(1 << 20)
        packed = b"".join(z.compress(chunk) for _ in range(size >> 20)) + z.flush()
    else:
        packed = zstandard.ZstdCompressor().compress(bytes(size))
    tracemalloc.start()
    try:
        r = DecompressReader(io.BytesIO(packed), limit=size // 2)
        with pytest.raises(InvalidImage, match="exceeds the limit"):
            while r.read(1 << 20):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound, f"{kind}: peak {peak >> 20} MiB"


def test_gzip_with_zlib_ng_and_without() -> None:
    """gzip goes through zlib-ng when it imports, else the standard zlib: both write gzip the
    stdlib reads, both read the stdlib's, and zlib-ng reads what either wrote."""
    import subprocess
    import sys
    from pathlib import Path

    import imagestore.compress

    assert imagestore.compress.fast_zlib.__name__ == "zlib_ng.zlib_ng"  # a dependency
    probe = (
        "import sys, gzip, io\n"
        "if sys.argv[1] == 'without':\n"
        "    sys.modules['zlib_ng'] = None  # the import fails, as where it is not installed\n"
        "from imagestore.compress import Compressor, DecompressReader, fast_zlib\n"
        "data = bytes(range(256)) * 20000 + b'tail'\n"
        "c = Compressor('gzip')\n"
        "packed = c.compress(data) + c.flush()\n"
        "assert gzip.decompress(packed) == data\n"
        "assert DecompressReader(io.BytesIO(gzip.compress(data))).read() == data\n"
        "sys.stdout.buffer.write(fast_zlib.__name__.encode() + b' ' + packed)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    outs = {}
    for mode in ("with", "without"):
        proc = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True,
                              cwd=repo, env={**os.environ, "PYTHONPATH": repo})
        assert proc.returncode == 0, proc.stderr.decode()
        name, _, packed = proc.stdout.partition(b" ")
        outs[name.decode()] = packed
    assert set(outs) == {"zlib_ng.zlib_ng", "zlib"}
    for packed in outs.values():
        assert DecompressReader(io.BytesIO(packed)).read() == bytes(range(256)) * 20000 + b"tail"
