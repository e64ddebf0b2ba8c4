"""Inode numbers derived from the objects (architecture.md, decision 6): every name of a hardlink
group shares one, a forgotten inode gets the same one back, a copy-up keeps it, and a number
the host hands out again for a new object gets a new generation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs.inodes import OBJ_BITS, ROOT_INO, InodeTable
from unionfs.layers import DirLayer
from unionfs.union import Union
from unionfs.upper import UpperLayer


@pytest.fixture
def union(tmp_path: Path) -> Union:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d/a").write_bytes(b"a")
    os.link(lower / "d/a", lower / "b")
    (lower / "c").write_bytes(b"c")
    return Union([DirLayer(str(lower))], UpperLayer(str(tmp_path / "up"), str(tmp_path / "wk")))


def table(u: Union) -> InodeTable:
    return InodeTable(u.resolve(""), u.identity)


def test_hardlinks_share_a_number_that_survives_forget(union: Union) -> None:
    t = table(union)
    a = t.ref(union.resolve("d/a"))
    b = t.ref(union.resolve("b"))
    assert a is b and a.ino > ROOT_INO and sorted(a.paths) == ["b", "d/a"]
    t.forget(a.ino, 2)
    assert t.get(a.ino) is None  # the kernel forgot it: the record goes
    again = t.ref(union.resolve("b"))
    assert again.ino == a.ino  # and the same number comes back
    assert t.ref(union.resolve("c")).ino != a.ino
    assert a.ino >> OBJ_BITS == 1  # layer 1 (the upper is 0)


def test_copy_up_keeps_the_number_of_every_name(union: Union) -> None:
    t = table(union)
    before = {p: t.number(union.resolve(p)) for p in ("d", "d/a", "b", "c")}
    union.setattr("d/a", mode=0o600)  # copies the group up: d/a and b, linked in the upper
    union.setattr("c", mode=0o600)
    after = {p: t.number(union.resolve(p)) for p in ("d", "d/a", "b", "c")}
    assert all(union.in_upper(union.resolve(p)) for p in before)
    assert after == before


def test_a_new_object_with_a_reused_number_gets_a_new_generation(union: Union) -> None:
    t = table(union)
    node = union.create("", "x", 0o644, 0, 0)
    old = t.ref(node, new=True)
    union.unlink("", "x")
    t.unlinked("x")  # the kernel still holds it (no forget yet)
    # the host gives a new file the inode number the dead one had: same number, new generation
    ino = node.entry.obj
    made = union.create("", "y", 0o644, 0, 0)
    if made.entry.obj != ino:
        pytest.skip("the host did not reuse the inode number this time")
    new = t.ref(made, new=True)
    assert new.ino == old.ino and new.generation == 1 and new.paths == ["y"]
    assert new.lookups == 2  # the old reference comes back in a forget


def test_a_new_upper_object_does_not_inherit_a_stale_origin(union: Union) -> None:
    t = table(union)
    lower_number = t.number(union.resolve("c"))
    union.setattr("c", mode=0o600)
    host = union.resolve("c").entry.obj
    assert t.number(union.resolve("c")) == lower_number and (0, host) in union.origins
    union.unlink("", "c")  # the copy goes; its origin record stays behind
    for i in range(64):  # until the host hands the number out again
        made = union.create("", f"n{i}", 0o644, 0, 0)
        if made.entry.obj == host:
            break
    else:
        pytest.skip("the host did not reuse the inode number")
    assert union.identity(made) == (0, host)  # a new object: its own number, not c's


def test_numbers_outside_the_layout_come_from_the_spare_range(union: Union) -> None:
    t = table(union)
    node = union.resolve("c")
    big = node.__class__(node.path, node.entry.__class__(mode=node.entry.mode,
                                                         obj=1 << OBJ_BITS), 1, node.stack)
    n1 = t.number(big)
    assert n1 == t.number(big) and n1 >> OBJ_BITS == (1 << (64 - OBJ_BITS)) - 1
