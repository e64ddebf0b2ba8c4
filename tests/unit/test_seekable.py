"""The seekable formats without a registry: TOC parsing (malformed and hostile TOCs), chunk
verification, the eStargz footer, zstd:chunked annotations, the lazy state's range log (torn
records), and the two writers (what they write reads back, decompresses to the tar, and for
zstd:chunked rebuilds the tar from its tar-split)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import zstandard

from imagestore import estargz, estargz_write, lazystate, seekable, zstdchunked
from imagestore import zstdchunked_write as zcw
from imagestore.errors import InvalidLayer, Unsupported
from imagestore.seekable import SeekableError, parse_toc
from tests import builders as b
from tests import lazy_helpers as lh
from unionfs.tarlayer import build_index

SHA = "sha256:" + "ab" * 32


def _toc(*entries: dict[str, Any], version: int = 1) -> bytes:
    return json.dumps({"version": version, "entries": list(entries)}).encode()


def _reg(name: str, size: int, offset: int = 0, **kw: Any) -> dict[str, Any]:
    e = {"name": name, "type": "reg", "size": size, "offset": offset, "chunkDigest": SHA}
    e.update(kw)
    return e


# -- malformed and hostile TOCs ----


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[" * 100000, "not valid JSON"),
    (b"[]", "not a version 1 TOC"),
    (_toc(version=2), "not a version 1 TOC"),
    (json.dumps({"version": 1, "entries": {}}).encode(), "not a version 1 TOC"),
    (json.dumps({"version": 1, "entries": [1]}).encode(), "not an object"),
    (_toc({"name": "a", "type": "socket"}), "unknown type"),
    (_toc({"name": "a", "type": None}), "unknown type"),
    (_toc({"name": "a", "type": "chunk", "offset": 0}), "follows no regular file"),
    (_toc({"name": "d", "type": "dir"}, {"name": "d", "type": "chunk"}),
     "follows no regular file"),
    (_toc({"name": "a", "type": "dir", "mode": -1}), "invalid mode"),
    (_toc({"name": "a", "type": "dir", "mode": 1 << 40}), "invalid mode"),
    (_toc({"name": "a", "type": "dir", "uid": "0"}), "invalid uid"),
    (_toc({"name": "a", "type": "dir", "gid": True}), "invalid gid"),
    (_toc({"name": 7, "type": "dir"}), "invalid name"),
    (_toc({"name": "a", "type": "symlink", "linkName": ["x"]}), "invalid linkName"),
    (_toc({"name": "a", "type": "dir", "modtime": "yesterday"}), "invalid time"),
    (_toc({"name": "a", "type": "dir", "modtime": "2024-13-45T99:00:00Z"}), "invalid time"),
    (_toc({"name": "a", "type": "dir", "xattrs": {"user.a": "%%%"}}), "not base64"),
    (_toc({"name": "a", "type": "dir", "xattrs": ["user.a"]}), "invalid xattrs"),
    (_toc(_reg("a", -5)), "invalid size"),
    (_toc(_reg("a", 10, offset=-1)), "invalid offset"),
])
def test_malformed_tocs_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(SeekableError, match=message):
        parse_toc(raw, seekable.ESTARGZ, 1000).index()


@pytest.mark.parametrize(("entries", "message"), [
    ([_reg("a", 10, chunkDigest="")], "no sha256 digest"),
    ([_reg("a", 10, chunkDigest="md5:" + "ab" * 16)], "no sha256 digest"),
    ([_reg("a", 10, chunkDigest="sha256:AB" + "ab" * 31)], "no sha256 digest"),
    ([_reg("a", 10, offset=1000)], "outside the file data"),  # starts at the TOC
    ([_reg("a", 10, offset=5000)], "outside the file data"),
    ([_reg("a", 10, chunkSize=20)], "past the end of its file"),
    ([_reg("a", 10, chunkSize=4), {"name": "a", "type": "chunk", "offset": 50,
                                    "chunkOffset": 6, "chunkDigest": SHA}],
     "do not follow each other"),  # a gap in the file
    ([_reg("a", 10, chunkSize=4), {"name": "a", "type": "chunk", "offset": 50,
                                    "chunkOffset": 2, "chunkSize": 8, "chunkDigest": SHA}],
     "do not follow each other"),  # overlapping chunks
    ([_reg("a", 10, chunkSize=4), {"name": "a", "type": "chunk", "offset": 50,
                                    "chunkOffset": 4, "chunkSize": 2, "chunkDigest": SHA}],
     "cover 6 of a file's 10 bytes"),
])
def test_inconsistent_chunks_are_refused(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(SeekableError, match=message):
        parse_toc(_toc(*entries), seekable.ESTARGZ, 1000)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "/etc/passwd", ".wh..wh..opq/x",
                                  "a\0b"])
def test_hostile_names_meet_the_tar_indexers_refusals(name: str) -> None:
    toc = parse_toc(_toc({"name": name, "type": "dir"}), seekable.ESTARGZ, 1000)
    with pytest.raises(SeekableError, match="table of contents"):
        toc.index()


def test_hostile_hardlinks_are_refused_as_in_a_tar() -> None:
    toc = parse_toc(_toc({"name": "a", "type": "hardlink", "linkName": "../../etc/shadow"}),
                    seekable.ESTARGZ, 1000)
    with pytest.raises(SeekableError):
        toc.index()
    toc = parse_toc(_toc({"name": "a", "type": "hardlink", "linkName": "missing"}),
                    seekable.ESTARGZ, 1000)
    with pytest.raises(SeekableError):
        toc.index()


def test_a_toc_matches_the_index_of_its_own_rules() -> None:
    # ./ names are normalised as in a tar; a whiteout is a whiteout
    raw = _toc({"name": "./etc/", "type": "dir", "mode": 0o755},
               _reg("./etc/a", 3), {"name": "etc/.wh.b", "type": "reg"},
               {"name": "etc/h", "type": "hardlink", "linkName": "etc/a"})
    idx = parse_toc(raw, seekable.ESTARGZ, 1000).index()
    assert {"etc", "etc/a", "etc/h", "etc/b"} <= set(idx.paths)  # etc/b: the whiteout


def test_times_parse_as_pax_values() -> None:
    assert seekable.parse_time("2024-01-02T03:04:05Z") == "1704164645.000000000"
    assert seekable.parse_time("2024-01-02T03:04:05.5+01:00") == "1704161045.500000000"
    assert seekable.parse_time("1969-12-31T23:59:59.25Z") == "-0.750000000"
    assert seekable.parse_time("") is None


def test_times_past_the_int64_range_are_clamped_not_an_error(tmp_path: Path) -> None:
    """The fast paths of the indexer's time conversion clamp as the slow one does."""
    raw = _toc({"name": "late", "type": "reg", "modtime": "2300-01-01T00:00:00Z"})
    idx = parse_toc(raw, seekable.ESTARGZ, 1000).index()
    assert idx.cols["mtime"][idx.paths.index("late")] == (1 << 63) - 1
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("late")
        ti.pax_headers = {"mtime": "9999999999.5"}
        tf.addfile(ti, io.BytesIO(b""))
    (tmp_path / "t.tar").write_bytes(tar.getvalue())
    idx = build_index(str(tmp_path / "t.tar"))
    assert idx.cols["mtime"][idx.paths.index("late")] == (1 << 63) - 1


# -- chunk data ----


def test_chunk_bytes_verify_their_digest() -> None:
    data = b"hello world" * 100
    member = zlib.compressobj(6, zlib.DEFLATED, 31)
    raw = member.compress(b"H" * 7 + data) + member.flush()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    c = seekable.Chunk(0, len(raw), 7, 0, len(data), digest)
    assert seekable.chunk_bytes("gzip", c, raw) == data
    with pytest.raises(SeekableError, match="does not match its digest"):
        seekable.chunk_bytes("gzip", seekable.Chunk(0, len(raw), 6, 0, len(data), digest), raw)
    with pytest.raises(SeekableError, match="does not decompress"):
        seekable.chunk_bytes("gzip", c, b"\x1f\x8b\x08\x00garbage" + raw[12:])
    with pytest.raises(SeekableError, match="holds"):
        seekable.chunk_bytes("gzip", c, raw[:-20])  # cut short
    z = zstandard.ZstdCompressor().compress(data)
    assert seekable.chunk_bytes("zstd", seekable.Chunk(0, len(z), 0, 0, len(data), digest),
                                z) == data


def test_a_zstd_frame_is_read_only_as_far_as_wanted() -> None:
    """A frame that declares more than the chunk wants (or nothing) is streamed up to what
    is wanted, never inflated whole; one that declares no more is read in one call."""
    big = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # declares 64 MiB
    assert zstandard.frame_content_size(big) == 64 << 20
    assert seekable.decompress_member("zstd", big, 4096) == bytes(4096)
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc" * 1000)
    assert zstandard.frame_content_size(streamed) == -1
    assert seekable.decompress_member("zstd", streamed, 30) == b"abc" * 10
    sized = zstandard.ZstdCompressor().compress(b"xyz" * 10)
    assert seekable.decompress_member("zstd", sized + b"trailing", 30) == b"xyz" * 10
    with pytest.raises(SeekableError, match="does not decompress"):
        seekable.decompress_member("zstd", b"not a frame at all", 10)


# -- eStargz and zstd:chunked framing ----


def test_estargz_footer_round_trip_and_refusals() -> None:
    assert estargz.toc_offset(estargz.footer(1234), 10000) == 1234
    with pytest.raises(SeekableError, match="no eStargz footer"):
        estargz.toc_offset(b"\0" * estargz.FOOTER_SIZE, 10000)
    with pytest.raises(SeekableError, match="outside the blob"):
        estargz.toc_offset(estargz.footer(9990), 10000)
    bad = bytearray(estargz.footer(1))
    bad[16:32] = b"zzzzzzzzzzzzzzzz"
    with pytest.raises(SeekableError, match="invalid TOC offset"):
        estargz.toc_offset(bytes(bad), 10000)


def test_estargz_toc_member_must_be_the_toc_and_match_its_digest() -> None:
    toc = _toc({"name": "a", "type": "dir"})
    good = _gz(estargz_write.ustar_header(estargz.TOC_NAME, len(toc)) + toc)
    digest = "sha256:" + hashlib.sha256(toc).hexdigest()
    assert estargz.read_toc(good, digest, 100)[0] == toc
    with pytest.raises(SeekableError, match="digest mismatch"):
        estargz.read_toc(good, SHA, 100)
    other = _gz(estargz_write.ustar_header("other.json", len(toc)) + toc)
    with pytest.raises(SeekableError, match="not stargz.index.json"):
        estargz.read_toc(other, digest, 100)
    cut = _gz(estargz_write.ustar_header(estargz.TOC_NAME, len(toc) + 100) + toc)
    with pytest.raises(SeekableError, match="too large or truncated"):
        estargz.read_toc(cut, digest, 100)


def _gz(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


@pytest.mark.parametrize(("position", "known"), [
    ("100:20:50:1", True), ("100:20:50:2", False), ("100:20:50", False), ("a:b:c:1", False),
    ("-1:20:50:1", False),
])
def test_zstd_chunked_position_annotation(position: str, known: bool) -> None:
    for prefix in zcw.PREFIXES:
        ann = {prefix + "manifest-position": position, prefix + "manifest-checksum": SHA}
        assert (zstdchunked.toc_position(ann) is not None) == known


def test_zstd_chunked_toc_checks() -> None:
    toc = _toc({"name": "a", "type": "dir"})
    packed = zstandard.ZstdCompressor().compress(toc)
    good = "sha256:" + hashlib.sha256(packed).hexdigest()
    ann = {zcw.PREFIXES[0] + "manifest-checksum": good,
           zcw.PREFIXES[0] + "manifest-position": f"100:{len(packed)}:{len(toc)}:1"}
    assert zstdchunked.read_toc(packed, ann, 1000)[0] == toc
    with pytest.raises(SeekableError, match="checksum mismatch"):
        zstdchunked.read_toc(packed, {**ann, zcw.PREFIXES[0] + "manifest-checksum": SHA}, 1000)
    with pytest.raises(SeekableError, match="out of range"):
        zstdchunked.read_toc(packed, ann, 110)  # the TOC would run past the blob
    lying = {**ann, zcw.PREFIXES[0] + "manifest-position": f"100:{len(packed)}:5:1"}
    with pytest.raises(SeekableError, match="the layer says 5"):
        zstdchunked.read_toc(packed, lying, 1000)


# -- the range log ----


def test_ranges_merge_and_report_gaps() -> None:
    r = lazystate.Ranges()
    for s, e in [(10, 20), (30, 40), (20, 25), (5, 8), (39, 50), (0, 0)]:
        r.add(s, e)
    assert list(zip(r.starts, r.ends, strict=True)) == [(5, 8), (10, 25), (30, 50)]
    assert r.covers(10, 25) and not r.covers(9, 12) and not r.covers(24, 31)
    assert list(r.gaps(0, 60)) == [(0, 5), (8, 10), (25, 30), (50, 60)]
    assert list(r.gaps(12, 20)) == [] and r.total() == 38


def _state(tmp_path: Path, size: int = 1000) -> str:
    d = tmp_path / "state"
    d.mkdir()
    (d / "blob").write_bytes(b"\0" * size)
    (d / "ranges").write_bytes(b"")
    return str(d)


def test_range_log_survives_a_torn_record(tmp_path: Path) -> None:
    path = _state(tmp_path)
    blob = lazystate.LazyBlob(path, 1000)
    blob.store([(0, b"a" * 100)], lazystate.VERIFIED)
    blob.store([(200, b"b" * 50)], lazystate.RAW)
    blob.close()
    log = Path(path) / "ranges"
    whole = log.read_bytes()
    for cut in range(len(whole) - 23, len(whole)):  # a crash while the last record was written
        log.write_bytes(whole[:cut])
        again = lazystate.LazyBlob(path, 1000)
        assert again.verified.covers(0, 100) and not again.present.covers(200, 250)
        again.close()
    torn = bytearray(whole)
    torn[-5] ^= 0xFF  # a record whose checksum does not match: it and all after are unsure
    log.write_bytes(bytes(torn) + whole[-24:])
    again = lazystate.LazyBlob(path, 1000)
    assert again.missing() == [(100, 1000)]
    again.close()


def test_range_log_refuses_records_outside_the_blob(tmp_path: Path) -> None:
    path = _state(tmp_path)
    head = struct.pack("<QQB3x", 900, 2000, lazystate.VERIFIED)
    (Path(path) / "ranges").write_bytes(head + struct.pack("<I", zlib.crc32(head)))
    blob = lazystate.LazyBlob(path, 1000)
    assert blob.missing() == [(0, 1000)]
    with pytest.raises(InvalidLayer, match="outside the blob"):
        blob.store([(990, b"x" * 20)], lazystate.VERIFIED)
    blob.close()


def test_another_process_sees_logged_ranges_on_refresh(tmp_path: Path) -> None:
    path = _state(tmp_path)
    one, two = lazystate.LazyBlob(path, 1000), lazystate.LazyBlob(path, 1000)
    one.store([(100, b"x" * 10)], lazystate.VERIFIED)
    assert not two.verified.covers(100, 110)
    two.refresh()
    assert two.verified.covers(100, 110) and two.read(100, 110) == b"x" * 10
    one.close()
    two.close()


# -- the writers ----


def _layers() -> list[bytes]:
    fractional = b.tar_bytes([b.d("t"), b.file("t/f", b"sub-second", mtime=1_700_000_000.75),
                              b.file("t/x", b"xattr", xattrs={"user.k": b"\xff\x00v"})])
    return [*b.sample_layers(), *lh.generated_layers(files=60), fractional]


def _comparable(index: Any) -> dict[str, tuple[Any, ...]]:
    """Index rows without the data offset (a TOC's file number, a tar's byte offset)."""
    off = 7  # layerindex._ROW.index("offset")
    return {p: row[:off] + row[off + 1:] for p, row in index.rows().items()}


@pytest.mark.parametrize("i", range(len(_layers())))
def test_zstd_chunked_writer_reads_back_as_the_tar_does(i: int) -> None:
    tar = _layers()[i]
    blob = bytearray()
    written = zcw.convert(io.BytesIO(tar), blob.extend, chunk_size=4096)
    assert _unzstd(bytes(blob)) == tar
    ann = written.annotations
    offset, length, _ = zstdchunked.toc_position(ann) or (0, 0, 0)
    raw, toc = zstdchunked.read_toc(bytes(blob[offset:offset + length]), ann, len(blob))
    files = _files_of(tar)
    for m, chunks in zip([m for m in toc.members if m.offset_data >= 0 and m.type == b"0"],
                         toc.files, strict=True):
        got = b"".join(seekable.chunk_bytes("zstd", c, bytes(blob[c.start:c.end]))
                       for c in chunks)
        assert got == files[m.name]
    # the index a lazy mount serves equals the tar's, times to the nanosecond included
    with_tar = build_index(_write(tar))
    assert _comparable(toc.index()) == _comparable(with_tar)
    # and the pull's count of its data, without parsing, is the index's
    assert seekable.content_size(raw) == with_tar.content_size()


def test_zstd_chunked_tar_split_rebuilds_the_tar() -> None:
    import crcmod

    crc64 = crcmod.mkCrcFun(0x1000000000000001B, initCrc=0, rev=True,
                            xorOut=0xFFFFFFFFFFFFFFFF)
    tar = lh.generated_layers(files=30)[0]
    blob = bytearray()
    written = zcw.convert(io.BytesIO(tar), blob.extend, chunk_size=2048)
    pos = written.annotations[zcw.PREFIXES[0] + "tarsplit-position"]
    offset, length, size = (int(x) for x in pos.split(":"))
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(
        bytes(blob[offset:offset + length]))
    assert len(lines) == size
    files = _files_of(tar)
    rebuilt = bytearray()
    positions = []
    for line in lines.splitlines():
        e = json.loads(line)
        positions.append(e["position"])
        if e["type"] == 2:
            rebuilt += base64.b64decode(e["payload"])
        else:
            data = files.get(e["name"], b"")
            assert len(data) == e.get("size", 0)
            if data:
                assert base64.b64decode(e["payload"]) == struct.pack(">Q", crc64(data))
            rebuilt += data
    assert bytes(rebuilt) == tar and positions == list(range(len(positions)))
    toc_at, toc_len = (int(x) for x in written.annotations[
        zcw.PREFIXES[0] + "manifest-position"].split(":")[:2])
    toc = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(
        bytes(blob[toc_at:toc_at + toc_len])))
    assert toc["tarSplitDigest"] == "sha256:" + hashlib.sha256(
        blob[offset:offset + length]).hexdigest()
    footer = bytes(blob[-64:])
    assert footer[-8:] == zcw.FOOTER_MAGIC
    assert struct.unpack("<QQQQQQQ", footer[:56]) == (toc_at, toc_len, len(json.dumps(
        toc, separators=(",", ":"))), 1, offset, length, size)


def test_zstd_chunked_writer_refusals() -> None:
    dup = b.tar_bytes([b.file("a", b"1"), b.file("./a", b"2")])
    with pytest.raises(Unsupported, match="twice"):
        zcw.convert(io.BytesIO(dup), lambda d: None)
    with pytest.raises(InvalidLayer):
        zcw.convert(io.BytesIO(b"\x01" * 1024), lambda d: None)
    sparse = io.BytesIO()
    with tarfile.open(fileobj=sparse, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("s")
        ti.type = tarfile.GNUTYPE_SPARSE
        tf.addfile(ti)
    with pytest.raises(Unsupported, match="sparse"):
        zcw.convert(io.BytesIO(sparse.getvalue()), lambda d: None)


def test_zstd_chunked_times_as_go_writes_them() -> None:
    assert zcw.pax_time("1700000000.75") == "2023-11-14T22:13:20.75Z"
    assert zcw.pax_time("1700000000") == "2023-11-14T22:13:20Z"
    assert zcw.pax_time("-1.25") == "1969-12-31T23:59:58.75Z"
    assert zcw.unix_time(0) == "1970-01-01T00:00:00Z"
    with pytest.raises(Unsupported):
        zcw.unix_time(400_000_000_000)  # past the year 9999


def test_estargz_writer_reads_back_and_tells_its_whole_second_times() -> None:
    tar = _layers()[-1]  # sub-second mtimes
    blob, out = bytearray(), bytearray()
    written = estargz_write.convert(io.BytesIO(tar), blob.extend, out.extend, chunk_size=4096)
    assert gzip.decompress(bytes(blob)) == bytes(out)  # one gzip stream of the new tar
    off = estargz.toc_offset(bytes(blob[-estargz.FOOTER_SIZE:]), len(blob))
    raw, toc = estargz.read_toc(bytes(blob[off:-estargz.FOOTER_SIZE]), written.toc_digest,
                                off)
    lazy = _comparable(toc.index())
    full_index = build_index(_write(bytes(out)))
    full = _comparable(full_index)
    # the pull's count of the data, without parsing (the TOC's own file is not in its JSON:
    # lazypull adds it)
    assert seekable.content_size(raw) + len(raw) == full_index.content_size()
    mtime = 4  # layerindex._ROW.index("mtime")
    assert set(lazy) == set(full)
    for path, row in full.items():
        # eStargz TOCs hold whole seconds: the lazy view shows the time truncated, never later
        assert lazy[path][mtime] == row[mtime] // 10**9 * 10**9, path
        assert lazy[path][:mtime] + lazy[path][mtime + 1:] == row[:mtime] + row[mtime + 1:]
    assert full["t/f"][mtime] % 10**9 == 750_000_000


def test_estargz_blob_is_plain_gzip_for_gzip(tmp_path: Path) -> None:
    tar = lh.generated_layers(files=20)[0]
    blob, out = bytearray(), bytearray()
    estargz_write.convert(io.BytesIO(tar), blob.extend, out.extend)
    path = tmp_path / "l.tar.gz"
    path.write_bytes(bytes(blob))
    got = subprocess.run(["gzip", "-dc", str(path)], capture_output=True, check=True).stdout
    assert got == bytes(out)


def _unzstd(data: bytes) -> bytes:
    """Every frame of ``data`` decompressed (skippable frames skipped), as zstd(1) does."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                        read_across_frames=True)
    return reader.read()


def _files_of(tar: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti in tf:
            if ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                out[ti.name] = f.read()
    return out


def _write(data: bytes) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".tar")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def test_index_differences_name_what_a_toc_told_otherwise() -> None:
    tar = b.tar_bytes([b.d("t"), b.file("t/f", b"abc", mtime=1_700_000_000.75)])
    full = build_index(_write(tar))
    toc = _toc({"name": "t", "type": "dir", "mode": 0o755, "modtime": "2023-11-14T22:13:20Z"},
               _reg("t/f", 3, mode=0o644, modtime="2023-11-14T22:13:20Z"))
    served = parse_toc(toc, seekable.ESTARGZ, 1000).index()
    assert lazystate.index_differences(served, full, whole_seconds=True) == []
    assert [d.split(":")[0] for d in
            lazystate.index_differences(served, full, whole_seconds=False)] == ["t/f"]
    lying = _toc({"name": "t", "type": "dir", "mode": 0o755, "modtime": "2023-11-14T22:13:20Z"},
                 _reg("t/f", 3, mode=0o4755, modtime="2023-11-14T22:13:20Z"),
                 {"name": "t/extra", "type": "dir"})
    got = lazystate.index_differences(parse_toc(lying, seekable.ESTARGZ, 1000).index(), full,
                                      whole_seconds=True)
    assert got[0] == "t/extra: only in the TOC"
    assert any(d.startswith(f"t/f: mode {0o104755} != {0o100644}") for d in got)
