"""The union core without FUSE: copy-up, whiteouts, opaque directories, renames, on real
directories (DirLayer lowers, an UpperLayer), checking the merged view *and* the upper."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import require_root
from unionfs.errors import UnionError
from unionfs.layers import DirLayer
from unionfs.union import Union
from unionfs.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, UpperLayer


@pytest.fixture
def lowers(tmp_path: Path) -> list[Path]:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    (l1 / "d").mkdir(parents=True)
    (l1 / "d/x").write_bytes(b"x1")
    (l1 / "f").write_bytes(b"top")
    (l2 / "d/sub").mkdir(parents=True)
    (l2 / "d/y").write_bytes(b"y2")
    (l2 / "d/sub/z").write_bytes(b"z2")
    (l2 / "g").write_bytes(b"bottom")
    os.chmod(l2 / "g", 0o751)
    os.utime(l2 / "g", ns=(1_000_000_000, 2_000_000_000))
    os.setxattr(l2 / "g", "user.k", b"v")
    (l2 / "h1").write_bytes(b"linked")
    os.link(l2 / "h1", l2 / "h2")
    (l2 / "empty").mkdir()
    return [l1, l2]


@pytest.fixture
def union(tmp_path: Path, lowers: list[Path]) -> Union:
    return Union([DirLayer(str(x)) for x in lowers],
                 UpperLayer(str(tmp_path / "upper"), str(tmp_path / "work")))


def tree(u: Union) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for node in u.view.walk():
        if node.is_dir:
            out[node.path] = "dir"
        elif stat.S_ISLNK(node.entry.mode):
            out[node.path] = "-> " + node.entry.target
        else:
            out[node.path] = u.read(node, 0, 1 << 20)
    return out


def upper_kind(tmp_path: Path, rel: str) -> str:
    p = tmp_path / "upper" / rel
    if not os.path.lexists(p):
        return "absent"
    st = os.lstat(p)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "whiteout"
    if stat.S_ISDIR(st.st_mode):
        try:
            opaque = os.getxattr(p, "trusted.overlay.opaque") == b"y"
        except OSError:
            opaque = False
        return "opaque dir" if opaque else "dir"
    return "file"


def test_copy_up_keeps_data_owner_mode_times_and_xattrs(union: Union, tmp_path: Path) -> None:
    node = union.copy_up("g")
    assert union.in_upper(node)
    st = os.lstat(tmp_path / "upper/g")
    assert (tmp_path / "upper/g").read_bytes() == b"bottom"
    assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_mtime_ns == 2_000_000_000
    assert os.getxattr(tmp_path / "upper/g", "user.k") == b"v"
    assert os.listdir(tmp_path / "work/work") == []


def test_copy_up_of_a_nested_file_copies_parents_first(union: Union, tmp_path: Path) -> None:
    union.copy_up("d/sub/z")
    assert upper_kind(tmp_path, "d") == "dir"
    assert upper_kind(tmp_path, "d/sub") == "dir"
    assert (tmp_path / "upper/d/sub/z").read_bytes() == b"z2"
    assert tree(union)["d/y"] == b"y2"  # the merge still shows the lower siblings


def test_hardlinked_lower_file_copies_up_as_one(union: Union, tmp_path: Path) -> None:
    union.copy_up("h1")
    a, b = os.lstat(tmp_path / "upper/h1"), os.lstat(tmp_path / "upper/h2")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert union.resolve("h1").key == union.resolve("h2").key


def test_unlink_of_lower_file_leaves_a_whiteout(union: Union, tmp_path: Path) -> None:
    union.unlink("d", "y")
    assert upper_kind(tmp_path, "d/y") == "whiteout"
    assert "d/y" not in tree(union)
    assert union.find("d/y") is None


def test_unlink_of_upper_only_file_leaves_nothing(union: Union, tmp_path: Path) -> None:
    union.create("", "new", 0o644, 0, 0)
    union.unlink("", "new")
    assert upper_kind(tmp_path, "new") == "absent"


def test_rmdir_needs_an_empty_union_dir(union: Union) -> None:
    with pytest.raises(UnionError) as exc:
        union.rmdir("", "d")
    assert exc.value.code == errno.ENOTEMPTY
    union.rmdir("", "empty")
    assert union.find("empty") is None


def test_recreated_dir_is_opaque(union: Union, tmp_path: Path) -> None:
    for name in ("x", "y"):
        union.unlink("d", name)
    union.unlink("d/sub", "z")
    union.rmdir("d", "sub")
    union.rmdir("", "d")
    union.mkdir("", "d", 0o700, 0, 0)
    assert upper_kind(tmp_path, "d") == "opaque dir"
    assert union.listdir(union.resolve("d")) == []


def test_new_dir_where_nothing_lower_is_not_opaque(union: Union, tmp_path: Path) -> None:
    union.mkdir("", "fresh", 0o755, 0, 0)
    assert upper_kind(tmp_path, "fresh") == "dir"


def test_rename_of_a_merged_dir_copies_the_tree(union: Union, tmp_path: Path) -> None:
    before = {k.removeprefix("d"): v for k, v in tree(union).items() if k.startswith("d")}
    union.rename("", "d", "", "moved")
    after = {k.removeprefix("moved"): v for k, v in tree(union).items() if k.startswith("moved")}
    assert before == after
    assert union.find("d") is None
    assert upper_kind(tmp_path, "d") == "whiteout"
    assert (tmp_path / "upper/moved/sub/z").read_bytes() == b"z2"


def test_rename_dir_over_a_lower_empty_dir_is_opaque(union: Union, tmp_path: Path) -> None:
    union.mkdir("", "n", 0o755, 0, 0)
    union.rename("", "n", "", "empty")
    assert upper_kind(tmp_path, "empty") == "opaque dir"


def test_rename_flags(union: Union) -> None:
    with pytest.raises(UnionError) as exc:
        union.rename("", "f", "", "g", RENAME_NOREPLACE)
    assert exc.value.code == errno.EEXIST
    union.rename("", "f", "", "g", RENAME_EXCHANGE)
    t = tree(union)
    assert (t["f"], t["g"]) == (b"bottom", b"top")
    with pytest.raises(UnionError) as exc:
        union.rename("", "d", "d/sub", "x")
    assert exc.value.code == errno.EINVAL


@pytest.mark.parametrize("name, code", [(".wh.x", errno.EINVAL), ("a" * 256, errno.ENAMETOOLONG)])
def test_names_that_would_break_the_layer_format(union: Union, name: str, code: int) -> None:
    with pytest.raises(UnionError) as exc:
        union.create("", name, 0o644, 0, 0)
    assert exc.value.code == code


def test_private_xattrs_cannot_be_set(union: Union) -> None:
    with pytest.raises(UnionError) as exc:
        union.setxattr("f", "trusted.overlay.opaque", b"y")
    assert exc.value.code == errno.EOPNOTSUPP


def test_truncate_copy_up_skips_the_data(union: Union, tmp_path: Path) -> None:
    union.setattr("g", size=0)
    assert (tmp_path / "upper/g").read_bytes() == b""
    assert stat.S_IMODE(os.lstat(tmp_path / "upper/g").st_mode) == 0o751


def test_chown_and_devices_as_root(union: Union, tmp_path: Path) -> None:
    require_root()
    union.setattr("f", uid=1000, gid=1001)
    st = os.lstat(tmp_path / "upper/f")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    with pytest.raises(UnionError) as exc:
        union.mknod("", "wh", stat.S_IFCHR | 0o600, 0, 0, 0)
    assert exc.value.code == errno.EPERM
    union.mknod("", "null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0)
    assert union.resolve("null").entry.rdev == os.makedev(1, 3)


def test_readonly_union_refuses_writes(lowers: list[Path]) -> None:
    u = Union([DirLayer(str(x)) for x in lowers])
    with pytest.raises(UnionError) as exc:
        u.create("", "x", 0o644, 0, 0)
    assert exc.value.code == errno.EROFS


def test_crash_leftovers_in_the_work_dir_are_not_part_of_the_upper(tmp_path: Path,
                                                                   lowers: list[Path]) -> None:
    (tmp_path / "work/work").mkdir(parents=True)
    (tmp_path / "work/work/#partial").write_bytes(b"half a copy")
    u = Union([DirLayer(str(x)) for x in lowers],
              UpperLayer(str(tmp_path / "upper"), str(tmp_path / "work")))
    assert os.listdir(tmp_path / "work/work") == []
    assert set(tree(u)) >= {"d", "f", "g"}


def test_non_root_copy_up_records_ownership_in_the_override_xattr(tmp_path: Path,
                                                                  lowers: list[Path]) -> None:
    require_root()  # to give the lower file an owner the "non-root" writer cannot set
    os.chown(lowers[1] / "g", 1234, 1235)
    upper = UpperLayer(str(tmp_path / "upper"), str(tmp_path / "work"))
    upper.is_root = False  # behave as an unprivileged mount would
    u = Union([DirLayer(str(x)) for x in lowers], upper)
    u.copy_up("g")
    assert os.getxattr(tmp_path / "upper/g", "user.containers.override_stat") == b"1234:1235:0751"
    e = u.resolve("g").entry
    assert (e.uid, e.gid, stat.S_IMODE(e.mode)) == (1234, 1235, 0o751)
    assert "user.containers.override_stat" not in u.xattrs(u.resolve("g"))


def test_moving_a_tree_forgets_exactly_that_tree(union: Union) -> None:
    """The caches forget what a directory move invalidates — every path below both ends —
    and keep everything else (found through the per-directory index, not by scanning)."""
    for path in ("d/sub/z", "d/x", "d/nothing", "g", "empty"):
        union.find(path)
    union.listdir(union.resolve("d/sub"))
    union.rename("", "d", "", "moved", 0)
    assert union.find("d/sub/z") is None and union.find("d/x") is None
    assert union.read(union.resolve("moved/sub/z"), 0, 10) == b"z2"
    assert [name for name, _ in union.listdir(union.resolve("moved/sub"))] == ["z"]
    assert "g" in union._cache and "empty" in union._cache  # untouched by the move
    union.mkdir("", "d", 0o755, 0, 0)  # a new, opaque d: nothing of the old one shows
    assert union.find("d/sub/z") is None and union.listdir(union.resolve("d")) == []


def test_the_cache_index_lets_removed_files_go(union: Union) -> None:
    """Creating and removing files with new names over and over must not grow the index."""
    for i in range(50):
        union.create("d", f"tmp{i}", 0o644, 0, 0)
        union.unlink("d", f"tmp{i}")
    assert not any(k.startswith("d/tmp") for k in union._kids.get("d", set()))


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC,
                                   os.O_RDWR | os.O_TRUNC | os.O_APPEND])
def test_o_trunc_truncates_whatever_the_access_mode(union: Union, tmp_path: Path,
                                                   flags: int) -> None:
    node = union.open("g", flags)
    assert node.entry.size == 0 and union.in_upper(node)
    assert (tmp_path / "upper/g").read_bytes() == b""
    assert stat.S_IMODE(os.stat(tmp_path / "upper/g").st_mode) == 0o751  # copied up first


def test_a_read_only_open_changes_nothing(union: Union, tmp_path: Path) -> None:
    node = union.open("g", os.O_RDONLY)
    assert node.entry.size == 6 and not union.in_upper(node)
    assert not os.path.lexists(tmp_path / "upper/g")


def test_stat_sees_data_written_through_a_descriptor(union: Union) -> None:
    """What the kernel's LOOKUP gets: a write through an open upper file changes its size and
    times without the union knowing; ``stat`` must not answer the snapshot it cached."""
    node = union.create("", "new", 0o644, 0, 0)
    fd = union.open_file(node, True)
    assert fd is not None
    os.write(fd, b"data")
    os.close(fd)
    assert union.resolve("new").entry.size == 0  # the cached snapshot
    assert union.stat("new").entry.size == 4
    with pytest.raises(UnionError) as exc:
        union.create("", "new", 0o644, 0, 0)
    assert exc.value.code == errno.EEXIST
    assert union.stat("new").entry.size == 4


def test_copy_cost_counts_what_a_copy_up_copies(union: Union) -> None:
    assert union.copy_cost("g") == 6
    assert union.copy_cost("g", size=2) == 2
    assert union.copy_cost("d/sub") == 0  # a chmod copies the directory alone
    assert union.copy_cost("d/sub", rename=True) > 1 << 40  # a rename copies its tree up
    union.copy_up("g")
    assert union.copy_cost("g") == 0
