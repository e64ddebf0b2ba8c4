"""TarLayer: the index of a layer tar and reads through it, checked against the tar itself."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tests.builders import E, chardev, d, fifo, file, link, opaque, sym, tar_bytes, whiteout
from unionfs.layers import IMPLICIT, OPAQUE
from unionfs.tarlayer import LayerError, LayerIndex, TarLayer, build_index

LONG = "deep/" + "/".join(["x" * 60] * 4) + "/file-with-a-long-name.txt"


def layer(tmp_path: Path, entries: list[E] | bytes, name: str = "layer.tar") -> TarLayer:
    path = tmp_path / name
    path.write_bytes(entries if isinstance(entries, bytes) else tar_bytes(entries))
    idx = build_index(str(path))
    idx.dump(str(tmp_path / (name + ".idx")))
    return TarLayer(str(path), str(tmp_path / (name + ".idx")))


def test_every_entry_kind_reads_back_as_in_the_tar(tmp_path: Path) -> None:
    big = os.urandom(300_000)
    entries = [
        d("etc", mode=0o750, uid=5, gid=6),
        file("etc/passwd", b"root:x:0:0\n", mode=0o640, uid=1, gid=2),
        file("bin/tool", big, mode=0o4755),
        link("bin/tool2", "bin/tool"),
        sym("bin/abs", "/etc/passwd"),
        sym("bin/dangling", "../nowhere/at/all"),
        fifo("run/fifo", mode=0o600),
        chardev("dev/null", 1, 3, mode=0o666),
        file("data/x", b"v", xattrs={"user.k": b"value", "security.capability": b"\x01\x00\xff"}),
        file(LONG, b"long"),
        d("tmp", mode=0o1777),
    ]
    t = layer(tmp_path, entries)
    raw = (tmp_path / "layer.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = {m.name: m for m in tf.getmembers()}

    etc = t.entry("etc")
    assert etc is not None and stat.S_ISDIR(etc.mode)
    assert (stat.S_IMODE(etc.mode), etc.uid, etc.gid) == (0o750, 5, 6)
    pw = t.entry("etc/passwd")
    assert pw is not None and t.read(pw, 0, 100) == b"root:x:0:0\n"
    assert (pw.uid, pw.gid, stat.S_IMODE(pw.mode)) == (1, 2, 0o640)
    assert pw.mtime_ns == members["etc/passwd"].mtime * 10**9

    tool = t.entry("bin/tool")
    assert tool is not None and stat.S_IMODE(tool.mode) == 0o4755
    assert t.read(tool, 0, len(big)) == big
    assert t.read(tool, 123_456, 1000) == big[123_456:124_456]
    assert t.read(tool, len(big) - 10, 1000) == big[-10:]
    assert t.read(tool, len(big) + 5, 10) == b""
    tool2 = t.entry("bin/tool2")
    assert tool2 is not None and tool2.obj == tool.obj
    assert tool.nlink == tool2.nlink == 2
    assert sorted(t.hardlinks(tool)) == ["bin/tool", "bin/tool2"]
    assert t.read(tool2, 0, 16) == big[:16]

    abs_link = t.entry("bin/abs")
    assert abs_link is not None and stat.S_ISLNK(abs_link.mode)
    assert abs_link.target == "/etc/passwd"
    dangling = t.entry("bin/dangling")
    assert dangling is not None and dangling.target == "../nowhere/at/all"

    ff = t.entry("run/fifo")
    assert ff is not None and stat.S_ISFIFO(ff.mode)
    null = t.entry("dev/null")
    assert null is not None and stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)

    x = t.entry("data/x")
    assert x is not None
    assert t.xattrs(x) == {"user.k": b"value", "security.capability": b"\x01\x00\xff"}

    long_entry = t.entry(LONG)
    assert long_entry is not None and t.read(long_entry, 0, 10) == b"long"
    tmp = t.entry("tmp")
    assert tmp is not None and stat.S_IMODE(tmp.mode) == 0o1777

    # parents that the tar never listed are implicit root-owned 0755 directories
    run = t.entry("run")
    assert run is not None and run.flags & IMPLICIT and stat.S_IMODE(run.mode) == 0o755
    assert [n for n, _ in t.children("bin")] == ["abs", "dangling", "tool", "tool2"]
    assert [n for n, _ in t.children("")] == ["bin", "data", "deep", "dev", "etc", "run", "tmp"]
    # every data offset really is where the tar keeps the bytes
    for name, m in members.items():
        if m.isreg():
            e = t.entry(name)
            assert e is not None and t.read(e, 0, m.size) == raw[m.offset_data:][: m.size]


def test_copy_data_writes_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    t = layer(tmp_path, [file("f", data)])
    e = t.entry("f")
    assert e is not None
    fd = os.open(tmp_path / "out", os.O_CREAT | os.O_WRONLY)
    t.copy_data(e, fd)
    os.close(fd)
    assert (tmp_path / "out").read_bytes() == data


def test_gnu_sparse_files_read_with_holes(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(3 << 20)
        f.write(b"end")
    import subprocess

    subprocess.run(["tar", "--sparse", "-C", str(tmp_path), "-cf", str(tmp_path / "s.tar"),
                    "sparse"], check=True)
    t = layer(tmp_path, (tmp_path / "s.tar").read_bytes(), "s2.tar")
    e = t.entry("sparse")
    assert e is not None and e.size == sparse.stat().st_size
    assert t.read(e, (1 << 20) - 2, 10) == b"\0\0middle\0\0"
    assert t.read(e, (3 << 20), 10) == b"end"
    fd = os.open(tmp_path / "copy", os.O_CREAT | os.O_WRONLY)
    t.copy_data(e, fd)
    os.close(fd)
    assert (tmp_path / "copy").read_bytes() == sparse.read_bytes()


def test_whiteouts_and_opaque_markers_are_indexed_not_materialised(tmp_path: Path) -> None:
    t = layer(tmp_path, [
        d("a"), whiteout("a/gone"), opaque("b"), file("b/new", b"n"),
        whiteout("c"), file("c", b"same layer wins"),
        d("e"), whiteout("e"), file("e/kept", b"k"),
        file(".wh..wh.plnk/ignored", b""),
    ])
    gone = t.entry("a/gone")
    assert gone is not None and gone.is_whiteout
    b = t.entry("b")
    assert b is not None and b.flags & OPAQUE and b.flags & IMPLICIT
    assert [n for n, _ in t.children("b")] == ["new"]
    c = t.entry("c")
    assert c is not None and not c.is_whiteout and t.read(c, 0, 100) == b"same layer wins"
    e = t.entry("e")  # a whiteout beside a same-layer directory makes it opaque
    assert e is not None and e.is_dir and e.flags & OPAQUE
    assert t.entry(".wh..wh.plnk") is None
    assert all(not n.startswith(".wh.") for n, _ in t.children("a"))


def test_duplicates_last_one_wins_and_dirs_merge(tmp_path: Path) -> None:
    t = layer(tmp_path, [
        file("f", b"first"), file("f", b"second"),
        d("dd", mode=0o700), file("dd/child", b"c"), d("dd", mode=0o755),
        d("gone"), file("gone/x", b"x"), file("gone", b"now a file"),
    ])
    f = t.entry("f")
    assert f is not None and t.read(f, 0, 10) == b"second"
    dd = t.entry("dd")
    assert dd is not None and stat.S_IMODE(dd.mode) == 0o755
    assert [n for n, _ in t.children("dd")] == ["child"]
    gone = t.entry("gone")
    assert gone is not None and stat.S_ISREG(gone.mode)
    assert t.entry("gone/x") is None


def test_overlay_private_xattrs_are_dropped(tmp_path: Path) -> None:
    t = layer(tmp_path, [file("x", b"", xattrs={"trusted.overlay.redirect": b"/etc",
                                                 "user.overlay.metacopy": b"",
                                                 "user.fine": b"1"})])
    e = t.entry("x")
    assert e is not None and t.xattrs(e) == {"user.fine": b"1"}


def test_the_index_says_whether_any_entry_has_xattrs(tmp_path: Path) -> None:
    """``xattr_free`` (the kernel engine's lower stops getxattr requests on it): True only
    when no entry, the root included, has one; None for an index written before the count."""
    assert layer(tmp_path, [d("a"), file("a/f", b"x")], "plain.tar").xattr_free() is True
    assert layer(tmp_path, [d("a"), file("a/f", b"x", xattrs={"user.k": b"v"})],
                 "deep.tar").xattr_free() is False
    assert layer(tmp_path, [d(".", xattrs={"user.k": b"v"}), file("f", b"x")],
                 "root.tar").xattr_free() is False
    old = layer(tmp_path, [file("f", b"x")], "old.tar")
    old._index.stats = old._index.stats[:2]  # as an index of the last release
    assert old.xattr_free() is None


def _hostile(name: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        for k, v in kw.items():
            setattr(ti, k, v)
        tf.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isreg() else None)
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (_hostile("../etc/passwd", size=1), "climbs out"),
    (_hostile("a/../../b", size=1), "climbs out"),
    (_hostile("/etc/passwd", size=1), "absolute"),
    (_hostile("x", type=tarfile.LNKTYPE, linkname="../../etc/shadow"), "climbs out"),
    (_hostile("x", type=tarfile.LNKTYPE, linkname="later"), "earlier entry"),
    (_hostile("x", type=tarfile.LNKTYPE, linkname="/etc/shadow"), "absolute"),
    (_hostile(".wh."), "invalid whiteout"),
    (_hostile("a/.wh.."), "invalid whiteout"),
    (b"this is not a tar archive at all" * 40, "not a valid tar"),
], ids=["dotdot", "dotdot-inner", "absolute", "link-out", "link-later", "link-abs",
        "empty-whiteout", "whiteout-dotdot", "garbage"])
def test_unsafe_layers_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    p = tmp_path / "bad.tar"
    p.write_bytes(data)
    with pytest.raises(LayerError, match=message):
        build_index(str(p))


def test_entries_below_a_symlink_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "bad.tar"
    p.write_bytes(tar_bytes([sym("a", "/etc"), file("a/passwd", b"pwned")]))
    with pytest.raises(LayerError, match="not a directory"):
        build_index(str(p))


def test_truncated_tar_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([file("big", os.urandom(100_000))])
    p = tmp_path / "cut.tar"
    p.write_bytes(data[:50_000])
    with pytest.raises(LayerError):
        build_index(str(p))


def test_trailing_garbage_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([file("a", b"1")])
    p = tmp_path / "tail.tar"
    p.write_bytes(data[:-1024] + b"\x01" * 512 + b"\0" * 512)
    with pytest.raises(LayerError, match="trailing|header"):
        build_index(str(p))


def test_ustar_and_gnu_formats_index_alike(tmp_path: Path) -> None:
    entries = [d("a"), file("a/" + "n" * 120, b"data"), sym("a/l", "x" * 150)]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        t = layer(tmp_path, tar_bytes(entries, fmt), f"f{fmt}.tar")
        e = t.entry("a/" + "n" * 120)
        assert e is not None and t.read(e, 0, 10) == b"data"
        sl = t.entry("a/l")
        assert sl is not None and sl.target == "x" * 150


def test_index_round_trips_and_detects_foreign_versions(tmp_path: Path) -> None:
    p = tmp_path / "l.tar"
    p.write_bytes(tar_bytes([file("a", b"1"), file("b/c", b"2")]))
    idx = build_index(str(p))
    idx.dump(str(tmp_path / "i"))
    assert LayerIndex.load(str(tmp_path / "i")).same_as(idx)
    (tmp_path / "bad").write_bytes(b"\x00garbage")
    with pytest.raises(LayerError):
        LayerIndex.load(str(tmp_path / "bad"))


def _index_both(path: Path) -> tuple[LayerIndex, LayerIndex]:
    from unionfs import tarlayer

    size = path.stat().st_size
    fast, fast_end = tarlayer._index_fast(str(path), size)
    slow, slow_end = tarlayer._index_tarfile(str(path), size)
    assert fast_end == slow_end
    return fast.finish(), slow.finish()


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_fast_scanner_agrees_with_tarfile_on_gnu_tar_output(tmp_path: Path, fmt: str) -> None:
    """The fast header scanner and Python's tarfile index every GNU tar format alike."""
    import subprocess

    src = tmp_path / "src"
    deep = src / ("long-directory-name-" * 4) / ("nested-" * 10)
    deep.mkdir(parents=True)
    (deep / ("file-" * 25)).write_bytes(b"deep data")
    (src / "plain").write_bytes(os.urandom(5000))
    os.link(src / "plain", src / "hard")
    os.symlink("/an/absolute/target/" + "x" * 120, src / "longlink")
    os.symlink("../dangling", src / "dangling")
    os.mkfifo(src / "fifo")
    os.chmod(src / "plain", 0o4755)
    if fmt in ("posix",):
        os.setxattr(src / "plain", "user.attr", b"\x00\xffbinary")
    if fmt not in ("v7", "ustar"):  # those cannot store such names
        (src / os.fsdecode(b"bad-\xff-utf8")).write_bytes(b"x")
    out = tmp_path / f"{fmt}.tar"
    args = ["tar", f"--format={fmt}", "--numeric-owner", "-C", str(src), "-cf", str(out), "."]
    if fmt == "posix":
        args.insert(1, "--xattrs")
    proc = subprocess.run(args, capture_output=True)
    assert proc.returncode in (0, 2)  # 2: ustar and v7 skip the names they cannot store
    fast, slow = _index_both(out)
    assert fast.same_as(slow)
    assert len(fast.paths) >= 6


def test_fast_scanner_agrees_on_strata_and_python_writers(tmp_path: Path) -> None:
    from imagestore.tarstream import REG, TarEntry, TarWriter

    entries = [d("a"), file("a/" + "n" * 150, b"pax name"), sym("a/l", "t" * 200),
               file("x", b"v", xattrs={"user.k": b"\x01\x02"}, uid=3_000_000, gid=70_000),
               chardev("dev/null", 1, 3), link("a/h", "x")]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        p = tmp_path / f"py{fmt}.tar"
        p.write_bytes(tar_bytes(entries, fmt))
        fast, slow = _index_both(p)
        assert fast.same_as(slow)
    for uid, ok in ((1 << 31, True), (1 << 40, False)):
        chunks: list[bytes] = []
        w = TarWriter(chunks.append)
        w.add(TarEntry(name="z" * 300, typeflag=REG, size=3, mtime=1, uid=uid,
                       xattrs={"user.q": b"\xff"}), [b"abc"])
        w.close()
        p = tmp_path / "strata.tar"
        p.write_bytes(b"".join(chunks))
        if ok:
            fast, slow = _index_both(p)
            assert fast.same_as(slow)
        else:  # an owner beyond 32 bits is refused either way
            for reader in ("_index_fast", "_index_tarfile"):
                from unionfs import tarlayer

                with pytest.raises(LayerError, match="out-of-range owner"):
                    getattr(tarlayer, reader)(str(p), p.stat().st_size)


def test_a_small_directory_layer_says_whether_it_has_xattrs(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """``DirLayer.xattr_free`` (a run's init layer of stubs under the kernel engine): True
    for a small tree without any, False with one anywhere, None past ``XATTR_SCAN``."""
    from unionfs.layers import DirLayer

    root = tmp_path / "init"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_bytes(b"")
    (root / "proc").mkdir()
    assert DirLayer(str(root)).xattr_free() is True
    monkeypatch.setattr(DirLayer, "XATTR_SCAN", 2)
    assert DirLayer(str(root)).xattr_free() is None
    monkeypatch.undo()
    try:
        os.setxattr(root / "etc/hosts", "user.k", b"v")
    except OSError:
        pytest.skip("this file system has no user xattrs")
    assert DirLayer(str(root)).xattr_free() is False
