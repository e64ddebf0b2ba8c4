"""The pyfuse3 adapter called directly (no mount): names, inodes, handles, error mapping, and
the rule that a handler bug answers EIO instead of killing the mount."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from unionfs.fuse_ops import Operations
from unionfs.inodes import ROOT_INO
from unionfs.layers import DirLayer
from unionfs.union import Union
from unionfs.upper import UpperLayer

CTX = pyfuse3.RequestContext()


@pytest.fixture
def ops(tmp_path: Path) -> Operations:
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "dir/file").write_bytes(b"lower data")
    (lower / "a").write_bytes(b"A")
    union = Union([DirLayer(str(lower))], UpperLayer(str(tmp_path / "up"), str(tmp_path / "wk")))
    return Operations(union)


async def test_lookup_getattr_read(ops: Operations) -> None:
    d = await ops.lookup(ROOT_INO, b"dir", CTX)
    f = await ops.lookup(d.st_ino, b"file", CTX)
    assert f.st_size == len(b"lower data")
    fi = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 6, 100) == b"data"
    await ops.release(fi.fh)
    missing = await ops.lookup(ROOT_INO, b"missing", CTX)  # a miss the kernel may cache
    assert missing.st_ino == 0 and missing.entry_timeout == ops.timeout
    with pytest.raises(pyfuse3.FUSEError) as exc:  # not a directory: an error, not cached
        await ops.lookup(f.st_ino, b"x", CTX)
    assert exc.value.errno == errno.ENOTDIR


async def test_copy_up_on_open_for_write_keeps_the_inode(ops: Operations, tmp_path: Path) -> None:
    a = await ops.lookup(ROOT_INO, b"a", CTX)
    reader = await ops.open(a.st_ino, os.O_RDONLY, CTX)
    writer = await ops.open(a.st_ino, os.O_RDWR, CTX)
    assert await ops.write(writer.fh, 1, b"BC") == 2
    assert await ops.read(reader.fh, 0, 10) == b"ABC"  # the reader follows the copy-up
    attr = await ops.getattr(a.st_ino, CTX)
    assert attr.st_ino == a.st_ino and attr.st_size == 3
    assert (tmp_path / "up/a").read_bytes() == b"ABC"
    for fh in (reader.fh, writer.fh):
        await ops.release(fh)


async def test_create_unlink_then_release(ops: Operations) -> None:
    fi, attr = await ops.create(ROOT_INO, b"new", 0o100644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"hello")
    await ops.unlink(ROOT_INO, b"new", CTX)
    assert await ops.read(fi.fh, 0, 5) == b"hello"
    assert (await ops.getattr(attr.st_ino, CTX)).st_nlink == 0
    await ops.release(fi.fh)
    await ops.forget([(attr.st_ino, 1)])
    assert ops.inodes.get(attr.st_ino) is None


async def test_hardlinks_share_an_inode(ops: Operations) -> None:
    a = await ops.lookup(ROOT_INO, b"a", CTX)
    b = await ops.link(a.st_ino, ROOT_INO, b"b", CTX)
    assert b.st_ino == a.st_ino and b.st_nlink == 2


async def test_rename_moves_inodes_with_their_names(ops: Operations) -> None:
    d = await ops.lookup(ROOT_INO, b"dir", CTX)
    f = await ops.lookup(d.st_ino, b"file", CTX)
    await ops.rename(ROOT_INO, b"dir", ROOT_INO, b"moved", 0, CTX)
    m = await ops.lookup(ROOT_INO, b"moved", CTX)
    g = await ops.lookup(m.st_ino, b"file", CTX)
    assert (m.st_ino, g.st_ino) == (d.st_ino, f.st_ino)
    fi = await ops.open(g.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 5) == b"lower"
    await ops.release(fi.fh)


async def test_a_bug_answers_eio_and_the_mount_goes_on(ops: Operations,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def broken(path: str) -> None:
        raise RuntimeError("a bug")

    real = ops.union.resolve
    ops.union.resolve = broken  # type: ignore[method-assign,assignment]
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(ROOT_INO, b"a", CTX)
    assert exc.value.errno == errno.EIO
    assert ops.errors == 1
    assert "a bug" in caplog.text
    ops.union.resolve = real  # type: ignore[method-assign]
    assert (await ops.lookup(ROOT_INO, b"a", CTX)).st_size == 1


async def test_readonly_union_answers_erofs(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    (tmp_path / "l/f").write_bytes(b"x")
    ops = Operations(Union([DirLayer(str(tmp_path / "l"))]))
    f = await ops.lookup(ROOT_INO, b"f", CTX)
    for call in (ops.open(f.st_ino, os.O_WRONLY, CTX), ops.mkdir(ROOT_INO, b"d", 0o755, CTX),
                 ops.unlink(ROOT_INO, b"f", CTX)):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call
        assert exc.value.errno == errno.EROFS


async def test_fallocate_goes_to_the_upper_file_and_waits_for_a_thaw(ops: Operations,
                                                                     tmp_path: Path) -> None:
    a = await ops.lookup(ROOT_INO, b"a", CTX)
    reader = await ops.open(a.st_ino, os.O_RDONLY, CTX)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.fallocate(reader.fh, 0, 0, 4096)
    assert exc.value.errno == errno.EBADF
    writer = await ops.open(a.st_ino, os.O_WRONLY, CTX)  # copies "a" up
    await ops.freeze()
    done = []

    async def grow() -> None:
        await ops.fallocate(writer.fh, 0, 0, 8192)
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(grow)
        await trio.sleep(0.2)  # time for a worker thread to run, were one started
        assert not done and os.stat(tmp_path / "up/a").st_size == 1  # held while frozen
        ops.thaw()
    attr = await ops.getattr(a.st_ino, CTX)
    assert (attr.st_size, attr.st_blocks) == (8192, os.stat(tmp_path / "up/a").st_blocks)
    assert attr.st_blocks >= 16
    assert await ops.read(reader.fh, 0, 2) == b"A\0"
    with pytest.raises(pyfuse3.FUSEError) as exc:  # errors of the file system are passed on
        await ops.fallocate(writer.fh, 0x100, 0, 4096)
    assert exc.value.errno == errno.EOPNOTSUPP
    for fh in (reader.fh, writer.fh):
        await ops.release(fh)


async def test_lookup_and_readdir_answer_what_was_written(ops: Operations) -> None:
    """The kernel applies the attributes of a LOOKUP (sent again for exclusive creates and
    rename targets) and of READDIRPLUS to inodes it holds: they must carry the data written
    through open handles, or the file reads back empty (issue 13, item 1)."""
    fi, attr = await ops.create(ROOT_INO, b"new", 0o100644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"data")
    await ops.release(fi.fh)
    with pytest.raises(pyfuse3.FUSEError) as exc:  # what O_CREAT|O_EXCL sends
        await ops.create(ROOT_INO, b"new", 0o100644, os.O_RDWR | os.O_EXCL, CTX)
    assert exc.value.errno == errno.EEXIST
    again = await ops.lookup(ROOT_INO, b"new", CTX)
    assert (again.st_ino, again.st_size) == (attr.st_ino, 4)
    # a listing made before a write, continued after it
    for name in (b"f1", b"f2", b"f3"):
        fi, _ = await ops.create(ROOT_INO, name, 0o100644, os.O_RDWR, CTX)
        await ops.release(fi.fh)
    fh = await ops.opendir(ROOT_INO, CTX)
    fh = fh.fh if isinstance(fh, pyfuse3.FileInfo) else fh
    seen: list[tuple[bytes, int, int]] = []

    def collect(token: object, name: bytes, a: pyfuse3.EntryAttributes, off: int) -> bool:
        seen.append((name, a.st_size, off))
        return len(seen) != 3  # the kernel's buffer is full after two entries

    real = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = collect  # type: ignore[assignment]
    try:
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        last = seen[-2][2]
        for name in (b"new", b"f1", b"f2", b"f3"):
            node = ops.union.resolve(name.decode())
            wfd = ops.union.open_file(node, True)
            assert wfd is not None
            os.write(wfd, b"more data")
            os.close(wfd)
        seen.clear()
        await ops.readdir(fh, last, None)  # type: ignore[arg-type]
    finally:
        pyfuse3.readdir_reply = real  # type: ignore[assignment]
    written = [size for name, size, _ in seen if name in (b"new", b"f1", b"f2", b"f3")]
    assert written and all(size == 9 for size in written)
    await ops.releasedir(fh)


async def test_statfs_of_an_image_counts_its_layers(tmp_path: Path) -> None:
    """df on an image mount shows the layers' bytes and entries, as a full read-only file
    system would (issue 13, item 9), and symlinks of a tar show 0777 (item 6)."""
    from tests import builders as b
    from unionfs.tarlayer import TarLayer, build_index

    layers = []
    for i, entries in enumerate([[b.d("etc"), b.file("etc/a", b"x" * 10000)],
                                 [b.sym("link", "etc/a", mode=0o644), b.file("b", b"y")]]):
        path = tmp_path / f"l{i}.tar"
        path.write_bytes(b.tar_bytes(entries))
        build_index(str(path)).dump(str(tmp_path / f"l{i}.idx"))
        layers.append(TarLayer(str(path), str(tmp_path / f"l{i}.idx")))
    ops = Operations(Union(layers[::-1]))
    st = await ops.statfs(CTX)
    size = sum(os.path.getsize(tmp_path / f"l{i}.tar") for i in range(2))
    assert (st.f_blocks, st.f_bfree, st.f_bavail) == ((size + 4095) // 4096, 0, 0)
    assert st.f_files == sum(layer.entries for layer in layers) and st.f_ffree == 0
    link = await ops.lookup(ROOT_INO, b"link", CTX)
    assert link.st_mode == 0o120777


async def test_rotate_makes_the_upper_a_layer_and_keeps_inode_numbers(ops: Operations,
                                                                      tmp_path: Path) -> None:
    """A build step ends: the writable layer becomes read-only, a fresh one takes its place,
    in the same mount (issue 17), and nothing the kernel holds changes its number."""
    fi, new = await ops.create(ROOT_INO, b"new", 0o100644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"step 1")
    a = await ops.lookup(ROOT_INO, b"a", CTX)
    with pytest.raises(OSError) as busy:  # a file open for writing: not now
        await ops.rotate(UpperLayer(str(tmp_path / "up2"), str(tmp_path / "wk2")))
    assert busy.value.errno == errno.EBUSY
    await ops.release(fi.fh)
    await ops.rotate(UpperLayer(str(tmp_path / "up2"), str(tmp_path / "wk2")))
    again = await ops.lookup(ROOT_INO, b"new", CTX)
    assert (again.st_ino, again.st_size) == (new.st_ino, 6)
    assert (await ops.lookup(ROOT_INO, b"a", CTX)).st_ino == a.st_ino
    fi = await ops.open(again.st_ino, os.O_WRONLY | os.O_APPEND, CTX)  # copied up from step 1
    await ops.write(fi.fh, 6, b", step 2")
    await ops.release(fi.fh)
    assert (tmp_path / "up/new").read_bytes() == b"step 1"  # the finished step is untouched
    assert (tmp_path / "up2/new").read_bytes() == b"step 1, step 2"
    assert (await ops.getattr(new.st_ino, CTX)).st_size == 14
    await ops.unlink(ROOT_INO, b"a", CTX)
    assert os.path.exists(tmp_path / "up2/a") and not os.path.exists(tmp_path / "up/a")
