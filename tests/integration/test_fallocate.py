"""fallocate(2) through real mounts, against the same calls on kernel overlayfs over the same
directories and on a plain directory of the same file system: sizes, allocated blocks, data
read back and errnos.  Needs pyfuse3 built with patches/pyfuse3-fallocate.patch (stock pyfuse3
has no handler: the kernel answers EOPNOTSUPP to every call)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest

from tests.conftest import Mounter, Strata

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not hasattr(pyfuse3.Operations, "fallocate"),
                       reason=f"pyfuse3 {pyfuse3.__version__} has no fallocate handler (stock "
                              "pyfuse3; scripts/install builds it with "
                              "patches/pyfuse3-fallocate.patch)"),
]

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
MiB, TiB = 1 << 20, 1 << 40
POSIX = -1  # a step done with os.posix_fallocate

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """libc fallocate; 0 or the errno."""
    if mode == POSIX:
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as exc:
            return exc.errno or -1
        return 0
    if _libc.fallocate(fd, mode, offset, length) != 0:
        return ctypes.get_errno()
    return 0


def state(path: Path) -> tuple[int, int, str]:
    """Size, allocated blocks and a digest of the data, read back through ``path``."""
    st = os.stat(path)
    return st.st_size, st.st_blocks, hashlib.sha256(path.read_bytes()).hexdigest()


Steps = list[tuple[int, int, int]]

EXT4_STEPS: Steps = [
    (POSIX, 0, MiB),  # grows the file: size and blocks
    (0, 2 * MiB, 4096),  # past the end: grows it, the gap is a hole
    (KEEP_SIZE, 3 * MiB, MiB),  # allocates beyond the end, the size stays
    (PUNCH_HOLE | KEEP_SIZE, 4096, 8192),  # zeroes (and frees) data written before
    (ZERO_RANGE, 100, 200),  # zeroes part of a block
    (ZERO_RANGE | KEEP_SIZE, 5 * MiB, 4096),
    (ZERO_RANGE, 6 * MiB, 4096),  # grows it
    (PUNCH_HOLE, 0, 4096),  # EOPNOTSUPP: a punch must keep the size
    (0x100, 0, 4096),  # EOPNOTSUPP: no such mode
    (0, 0, 0),  # EINVAL
    (KEEP_SIZE, 17 * TiB, 4096),  # EFBIG from ext4 (FUSE allows bigger files)
]


def run_steps(root: Path, steps: Steps, name: str = "f") -> list[object]:
    """The steps on a file ``name`` under ``root`` that starts as 10000 written bytes."""
    path = root / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    out: list[object] = []
    try:
        os.pwrite(fd, b"x" * 10000, 0)
        out.append(state(path))
        for mode, offset, length in steps:
            out.append(((mode, offset, length), fallocate(fd, mode, offset, length),
                        state(path)))
    finally:
        os.close(fd)
    return out


def _dirs(base: Path, *names: str) -> list[Path]:
    for n in names:
        (base / n).mkdir()
    return [base / n for n in names]


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    d = tmp_path / "lower"
    (d / "sub").mkdir(parents=True)
    (d / "sub/data").write_bytes(b"lower data\n" * 1000)
    return d


def two_mounts(mounter: Mounter, lower: Path, base: Path) -> tuple[Path, Path, Path, Path]:
    """Kernel overlayfs and strata over ``lower``, uppers in ``base``: (kernel mount, strata
    mount, kernel upper, strata upper)."""
    km, ku, kw, sm, su, sw = _dirs(base, "km", "ku", "kw", "sm", "su", "sw")
    mounter.overlay([lower], km, ku, kw)
    mounter.mount("--lower", str(lower), "--upper", str(su), "--work", str(sw), at=sm)
    return km, sm, ku, su


def test_modes_as_on_overlayfs_and_the_backing_file_system(mounter: Mounter, lower: Path,
                                                           tmp_path: Path) -> None:
    km, sm, _, _ = two_mounts(mounter, lower, tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    expected = run_steps(plain, EXT4_STEPS)
    assert run_steps(km, EXT4_STEPS) == expected
    assert run_steps(sm, EXT4_STEPS) == expected
    data = (sm / "f").read_bytes()
    assert data[:100] == b"x" * 100 and data[100:300] == bytes(200)
    assert data[300:4096] == b"x" * 3796 and data[4096:12288] == bytes(8192)
    assert len(data) == 6 * MiB + 4096


def test_collapse_and_insert_range_stop_at_fuse(mounter: Mounter, lower: Path,
                                                tmp_path: Path) -> None:
    """A difference: the FUSE kernel module refuses COLLAPSE_RANGE and INSERT_RANGE itself
    (EOPNOTSUPP, strata never sees them); overlayfs passes them on to ext4."""
    km, sm, _, _ = two_mounts(mounter, lower, tmp_path)
    steps: Steps = [(POSIX, 0, MiB), (COLLAPSE_RANGE, 4096, 4096), (INSERT_RANGE, 0, 4096)]
    kernel, ours = run_steps(km, steps), run_steps(sm, steps)
    assert [r[1] for r in kernel[1:]] == [0, 0, 0]  # type: ignore[index]
    assert [r[1] for r in ours[1:]] == [0, errno.EOPNOTSUPP, errno.EOPNOTSUPP]  # type: ignore[index]
    assert ours[-1][2][0] == MiB  # type: ignore[index]


@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_WRONLY])
def test_a_lower_file_is_copied_up_first(mounter: Mounter, lower: Path, tmp_path: Path,
                                         flags: int) -> None:
    km, sm, ku, su = two_mounts(mounter, lower, tmp_path)
    results = []
    for mp in (km, sm):
        fd = os.open(mp / "sub/data", flags)
        try:
            results.append([fallocate(fd, KEEP_SIZE, 0, MiB), state(mp / "sub/data"),
                            fallocate(fd, 0, 0, 2 * MiB), state(mp / "sub/data")])
        finally:
            os.close(fd)
    assert results[0] == results[1]
    assert results[1][0] == results[1][2] == 0
    assert results[1][1][0] == 11000 and results[1][1][1] >= MiB // 512  # type: ignore[index]
    for upper in (ku, su):
        data = (upper / "sub/data").read_bytes()
        assert data == b"lower data\n" * 1000 + bytes(2 * MiB - 11000)
    assert (lower / "sub/data").read_bytes() == b"lower data\n" * 1000


def test_container_mount(strata: Strata, mounter: Mounter, sample_image: str,
                         tmp_path: Path) -> None:
    cid = strata.out("create", "--name", "fa", sample_image).strip()
    mp = mounter.mount("fa", at=mounter.mountpoint("c"))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_steps(mp, EXT4_STEPS) == run_steps(plain, EXT4_STEPS)
    upper = strata.root / "containers" / cid / "upper"
    assert (upper / "f").stat().st_size == 6 * MiB + 4096
    # a file of the image: copied up at the open for writing, its data kept
    (plain / "conf").write_bytes(b"v3")
    results = []
    for path in (mp / "etc/app/conf", plain / "conf"):
        fd = os.open(path, os.O_WRONLY)
        try:
            results.append([fallocate(fd, KEEP_SIZE, 0, MiB), state(path),
                            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 4096), state(path)])
        finally:
            os.close(fd)
    assert results[0] == results[1]
    assert results[0][1][:2] == (2, MiB // 512)  # type: ignore[index]
    assert (mp / "etc/app/conf").read_bytes() == (upper / "etc/app/conf").read_bytes() == bytes(2)
    assert os.stat(mp / "etc/app/conf").st_mode & 0o7777 == 0o600
    # read-only descriptors: EBADF from the kernel, as on any file system
    fd = os.open(mp / "etc/passwd", os.O_RDONLY)
    try:
        assert fallocate(fd, 0, 0, 4096) == errno.EBADF
    finally:
        os.close(fd)
    assert not (upper / "etc/passwd").exists()
    # an unlinked file open for writing
    results = []
    for root in (mp, plain):
        fd = os.open(root / "gone", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.unlink(root / "gone")
            st0 = os.fstat(fd)
            results.append([fallocate(fd, 0, 0, MiB), os.fstat(fd).st_size,
                            os.fstat(fd).st_blocks - st0.st_blocks])
        finally:
            os.close(fd)
    assert results[0] == results[1] == [0, MiB, MiB // 512]


def test_read_only_image_mount(strata: Strata, mounter: Mounter, sample_image: str,
                               lower: Path, tmp_path: Path) -> None:
    mp = mounter.mount(sample_image, at=mounter.mountpoint("ro"))
    km = mounter.overlay([lower, mounter.mountpoint("empty")], mounter.mountpoint("kro"))
    for path in (mp / "etc/passwd", km / "sub/data"):
        with pytest.raises(OSError) as exc:
            os.open(path, os.O_RDWR)
        assert exc.value.errno == errno.EROFS
        fd = os.open(path, os.O_RDONLY)
        try:
            assert fallocate(fd, 0, 0, 4096) == errno.EBADF
            assert fallocate(fd, KEEP_SIZE, 0, 4096) == errno.EBADF
        finally:
            os.close(fd)


TMPFS_STEPS: Steps = [
    (ZERO_RANGE, 0, 4096),  # EOPNOTSUPP: tmpfs has no ZERO_RANGE
    (KEEP_SIZE, 0, MiB),  # works: the EOPNOTSUPP above did not turn fallocate off
    (PUNCH_HOLE | KEEP_SIZE, 0, 8192),
    (0, 0, 2 * MiB),
]


def test_an_unsupported_mode_answers_as_the_backing_file_system(
        mounter: Mounter, lower: Path, small_fs: Callable[[str], Path]) -> None:
    ram = small_fs("64m")
    km, sm, _, _ = two_mounts(mounter, lower, ram)
    plain = ram / "plain"
    plain.mkdir()
    expected = run_steps(plain, TMPFS_STEPS)
    assert expected[1][1] == errno.EOPNOTSUPP and expected[2][1] == 0  # type: ignore[index]
    assert run_steps(km, TMPFS_STEPS) == expected
    assert run_steps(sm, TMPFS_STEPS) == expected
