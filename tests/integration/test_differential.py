"""Differential tests: strata against kernel overlayfs on the very same lower directories.

Hypothesis generates sequences of operations; each runs on a kernel overlay mount and on a
strata mount (``strata mount --lower ... --upper ... --work ...``).  Every step must give the
same errno, and afterwards the merged trees must be equal (type, mode, owner, size, content,
link target, user xattrs, nlink).  Then each upper is read by the other implementation: the
kernel mounts strata's upper, strata mounts the kernel's, and both must show the same tree.

The kernel mounts with ``index=on`` (a copied-up hardlink stays one file, as strata keeps it)
and ``redirect_dir=off`` (a directory rename answers EXDEV, which the test turns into what mv(1)
does; strata renames the directory itself).  Reading each other's uppers both sides mount with
``index=off``: strata does not consult the kernel's index directory (see the README).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Mounter, require_root
from tests.integration.treeops import Op, apply, diff, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.root]

PATHS = ["d", "d/x", "d/y", "d/sub", "d/sub/z", "f", "g", "wd", "wd/inner", "opq", "opq/new",
         "opq/old", "hl1", "hl2", "sym", "emptyd", "e", "e/k", "big", "n1", "n2", "d/n3",
         "e/n4", "newdir", "newdir/n5"]


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def build_lowers(base: Path) -> list[Path]:
    """Two lower layers in overlayfs format, top first."""
    l1, l2 = base / "l1", base / "l2"
    for d in ("d", "opq", "emptyd"):
        (l1 / d).mkdir(parents=True)
    (l1 / "d/x").write_bytes(b"x1")
    (l1 / "f").write_bytes(b"f-top")
    _whiteout(l1 / "wd")
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    (l1 / "opq/new").write_bytes(b"new")
    (l1 / "hl1").write_bytes(b"hardlinked")
    os.link(l1 / "hl1", l1 / "hl2")
    os.symlink("d/x", l1 / "sym")
    for d in ("d/sub", "wd", "opq", "e"):
        (l2 / d).mkdir(parents=True)
    (l2 / "d/y").write_bytes(b"y2")
    (l2 / "d/sub/z").write_bytes(b"z2")
    (l2 / "wd/inner").write_bytes(b"hidden")
    (l2 / "opq/old").write_bytes(b"old")
    (l2 / "g").write_bytes(b"g-bottom")
    os.chown(l2 / "g", 1000, 1000)
    os.chmod(l2 / "g", 0o640)
    os.setxattr(l2 / "g", "user.origin", b"bottom")
    (l2 / "big").write_bytes(os.urandom(100_000))
    (l2 / "e/k").write_bytes(b"k")
    return [l1, l2]


@pytest.fixture(scope="module")
def lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    require_root()
    return build_lowers(tmp_path_factory.mktemp("lowers"))


path = st.sampled_from(PATHS)
data = st.binary(max_size=64)
ops = st.one_of(
    st.builds(lambda p, d: Op("create", (p, d)), path, data),
    st.builds(lambda p, o, d: Op("write", (p, o, d)), path, st.integers(0, 200_000), data),
    st.builds(lambda p, d: Op("append", (p, d)), path, data),
    st.builds(lambda p, d: Op("overwrite", (p, d)), path, data),
    st.builds(lambda p, n: Op("truncate", (p, n)), path, st.integers(0, 150_000)),
    st.builds(lambda p: Op("mkdir", (p,)), path),
    st.builds(lambda p: Op("unlink", (p,)), path),
    st.builds(lambda p: Op("rmdir", (p,)), path),
    st.builds(lambda a, b: Op("rename", (a, b)), path, path),
    st.builds(lambda a, b: Op("link", (a, b)), path, path),
    st.builds(lambda t, p: Op("symlink", (t, p)), st.sampled_from(["/abs", "d/x", "../up", "x"]),
              path),
    st.builds(lambda p, m: Op("chmod", (p, m)), path, st.sampled_from([0o600, 0o755, 0o4755,
                                                                        0o1777, 0o000])),
    st.builds(lambda p, u: Op("chown", (p, u, u)), path, st.sampled_from([0, 1000, 65534])),
    st.builds(lambda p, t: Op("utime", (p, t, t)), path,
              st.integers(0, 2_000_000_000).map(lambda s: s * 10**9)),
    st.builds(lambda p, v: Op("setxattr", (p, "user.test", v)), path, st.binary(max_size=8)),
    st.builds(lambda p: Op("removexattr", (p, "user.origin")), path),
    st.builds(lambda p: Op("mkfifo", (p,)), path),
)


def _dirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir()
        out.append(base / n)
    return out


@settings(max_examples=int(os.environ.get("STRATA_DIFF_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seq=st.lists(ops, min_size=1, max_size=10))
def test_same_as_kernel_overlayfs(lowers: list[Path], mounter: Mounter, seq: list[Op]) -> None:
    base = Path(tempfile.mkdtemp(dir=mounter.tmp))
    ku, kw, su, sw, km, sm = _dirs(base, "ku", "kw", "su", "sw", "km", "sm")
    mounter.overlay(lowers, km, ku, kw, "index=on,redirect_dir=off")
    mounter.mount("--lower", ":".join(map(str, lowers)), "--upper", str(su), "--work", str(sw),
                  at=sm)
    try:
        for i, op in enumerate(seq):
            rk = apply(km, op, emulate_exdev=True)
            rs = apply(sm, op)
            assert rk == rs, f"step {i} {op}: kernel errno {rk}, strata errno {rs}"
        problems = diff(snapshot(km), snapshot(sm))
        assert not problems, "merged trees differ:\n" + "\n".join(problems)
    finally:
        mounter.umount(km)
        mounter.umount(sm)
    _cross_read(mounter, lowers, base, su, sw, ku, kw)


def _cross_read(mounter: Mounter, lowers: list[Path], base: Path, su: Path, sw: Path,
                ku: Path, kw: Path) -> None:
    """Each implementation reads the other's upper the same way the writer's kind does."""
    for upper, work, tag in ((su, sw, "strata's"), (ku, kw, "the kernel's")):
        k2, s2 = _dirs(base, f"k-{tag[:3]}", f"s-{tag[:3]}")
        kwork = base / f"kw-{tag[:3]}"
        kwork.mkdir()
        # the kernel wants its own empty work dir; strata uses the given one
        mounter.overlay(lowers, k2, upper, kwork, "index=off,redirect_dir=off")
        try:
            kernel_view = snapshot(k2, with_nlink=False)
        finally:
            mounter.umount(k2)
        mounter.mount("--lower", ":".join(map(str, lowers)), "--upper", str(upper), "--work",
                      str(work), "-o", "ro", at=s2)
        try:
            strata_view = snapshot(s2, with_nlink=False)
        finally:
            mounter.umount(s2)
        problems = diff(kernel_view, strata_view)
        assert not problems, f"{tag} upper reads differently:\n" + "\n".join(problems)


@pytest.mark.parametrize("seq", [
    [Op("rename", ("d", "n1"))],
    [Op("rename", ("e", "d/n3"))],
    [Op("append", ("hl1", b"more")), Op("unlink", ("hl2",))],
    [Op("rmdir", ("emptyd",)), Op("mkdir", ("emptyd",)), Op("create", ("emptyd/n", b"1"))],
    [Op("unlink", ("d/y",)), Op("create", ("d/y", b"again"))],
    [Op("mkdir", ("wd",)), Op("create", ("wd/n", b"1"))],
    [Op("rename", ("f", "g")), Op("link", ("g", "n1"))],
    [Op("chown", ("big", 1000, 1000)), Op("chmod", ("big", 0o4755))],
    [Op("overwrite", ("d/x", b"")), Op("overwrite", ("big", b"short"))],
    [Op("unlink", ("hl1",))],
    [Op("rename", ("f", "hl2"))],
], ids=["rename-merged-dir", "rename-lower-dir-deeper", "hardlink-copy-up", "recreate-dir",
        "recreate-file", "dir-over-whiteout", "rename-over-lower", "chown-then-setuid",
        "open-o-trunc", "unlink-lower-hardlink", "rename-over-lower-hardlink"])
def test_known_sequences(lowers: list[Path], mounter: Mounter, seq: list[Op]) -> None:
    """Hand-picked sequences that once went wrong or that the random search may miss."""
    test_same_as_kernel_overlayfs.hypothesis.inner_test(lowers, mounter, seq)  # type: ignore[attr-defined]
