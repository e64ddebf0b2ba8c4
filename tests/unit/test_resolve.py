"""UnionView: top-down lookup, whiteouts, opaque directories, merged readdir (FORMATS.md b)."""

from __future__ import annotations

import pytest

from tests.memlayer import DIR, OPQ, WH, Link, MemLayer
from unionfs.resolve import UnionView


def view(*specs: dict[str, object]) -> UnionView:
    """Layers given top first."""
    return UnionView([MemLayer(s) for s in specs])


def names(v: UnionView, path: str = "") -> list[str]:
    node = v.resolve(path)
    assert node is not None
    return [n for n, _ in v.listdir(node)]


def flatten(v: UnionView) -> dict[str, str]:
    out = {}
    for node in v.walk():
        if node.is_dir:
            out[node.path] = "dir"
        elif node.entry.target:
            out[node.path] = "-> " + node.entry.target
        else:
            out[node.path] = v.read(node, 0, 1 << 20).decode()
    return out


CASES = [
    # (name, layers top-first, expected flattened tree)
    ("upper file hides lower",
     [{"a": b"top"}, {"a": b"bottom"}], {"": "dir", "a": "top"}),
    ("whiteout hides a file",
     [{".wh.a": WH}, {"a": b"x", "b": b"y"}], {"": "dir", "b": "y"}),
    ("whiteout hides a whole tree",
     [{".wh.d": WH}, {"d/e/f": b"x"}], {"": "dir"}),
    ("whiteout only hides lower layers",
     [{".wh.a": WH, "a": b"new"}, {"a": b"old"}], {"": "dir", "a": "new"}),
    ("dirs merge",
     [{"d/x": b"1"}, {"d/y": b"2"}], {"": "dir", "d": "dir", "d/x": "1", "d/y": "2"}),
    ("opaque dir hides lower children",
     [{"d/": DIR, "d/.wh..wh..opq": OPQ, "d/n": b"n"}, {"d/old": b"o"}],
     {"": "dir", "d": "dir", "d/n": "n"}),
    ("whiteout then re-create shows only new content",
     [{"d/new": b"n"}, {".wh.d": WH}, {"d/old": b"o"}], {"": "dir", "d": "dir", "d/new": "n"}),
    ("file replaces dir without whiteout",
     [{"d": b"file"}, {"d/x": b"1"}], {"": "dir", "d": "file"}),
    ("dir replaces file",
     [{"d/x": b"1"}, {"d": b"file"}], {"": "dir", "d": "dir", "d/x": "1"}),
    ("dir below a non-dir is hidden",
     [{"d/x": b"1"}, {"d": b"file"}, {"d/y": b"2"}], {"": "dir", "d": "dir", "d/x": "1"}),
    ("symlink replaces dir",
     [{"d": Link("/etc")}, {"d/x": b"1"}], {"": "dir", "d": "-> /etc"}),
    ("whiteout in a middle layer",
     [{"a": b"top"}, {".wh.a": WH}, {"a": b"bottom"}], {"": "dir", "a": "top"}),
    ("whiteout of a missing name is a no-op",
     [{".wh.ghost": WH}, {"a": b"1"}], {"": "dir", "a": "1"}),
    ("look-alike names are ordinary",
     [{".whatever": b"1", "wh.file": b"2"}], {"": "dir", ".whatever": "1", "wh.file": "2"}),
    ("opaque root hides every lower layer",
     [{".wh..wh..opq": OPQ, "a": b"1"}, {"b": b"2"}], {"": "dir", "a": "1"}),
]


@pytest.mark.parametrize("layers, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_union_cases(layers: list[dict[str, object]], expected: dict[str, str]) -> None:
    assert flatten(view(*layers)) == expected


def test_lookup_agrees_with_listdir() -> None:
    v = view({"d/a": b"1", ".wh.x": WH}, {"d/b": b"2", "x/y": b"3"}, {"d/c": b"4"})
    root = v.root()
    for name, child in v.listdir(root):
        assert v.lookup(root, name) == child
    assert v.lookup(root, "x") is None


def test_implicit_dir_takes_attributes_from_below() -> None:
    import stat

    from unionfs.layers import Entry

    lower = MemLayer({"d/old": b"1"})
    lower.entries["d"] = Entry(mode=stat.S_IFDIR | 0o700, uid=7, gid=8, obj=99, ref="d")
    v = UnionView([MemLayer({"d/new": b"2"}), lower])
    node = v.resolve("d")
    assert node is not None
    assert (stat.S_IMODE(node.entry.mode), node.entry.uid) == (0o700, 7)
    assert node.merged and node.nlink == 1


def test_implicit_opaque_dir_keeps_the_lower_directory_s_attributes() -> None:
    # a layer holding only d/.wh..wh..opq (no entry for d) empties d, as umoci and containerd
    # apply it: the directory itself, with its owner and mode, stays
    import stat

    from unionfs.layers import Entry

    def lower() -> MemLayer:
        layer = MemLayer({"d/old": b"1"})
        layer.entries["d"] = Entry(mode=stat.S_IFDIR | 0o700, uid=7, gid=8, obj=99, ref="d")
        return layer

    v = UnionView([MemLayer({"d/.wh..wh..opq": OPQ, "d/new": b"2"}), lower()])
    node = v.resolve("d")
    assert node is not None and names(v, "d") == ["new"]
    assert (stat.S_IMODE(node.entry.mode), node.entry.uid, node.entry.gid) == (0o700, 7, 8)
    # below a whiteout the old directory is gone: the implicit one is root's 0755
    v = UnionView([MemLayer({"d/.wh..wh..opq": OPQ, "d/new": b"2"}), MemLayer({".wh.d": WH}),
                   lower()])
    node = v.resolve("d")
    assert node is not None and (stat.S_IMODE(node.entry.mode), node.entry.uid) == (0o755, 0)


def test_readdir_is_sorted() -> None:
    assert names(view({"b": b"", "a": b""}, {"c": b"", "A": b""})) == ["A", "a", "b", "c"]
