"""Layer descriptions and their kinds (``unionfs.layerkinds``): the built-in ``tar`` and
``dir``, the ``strata.layers`` entry points this project declares, and dispatch of any other
kind to its entry point (injected here; ``tests/integration/test_layer_kinds.py`` installs a
real one and mounts it)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from imagestore import Store
from tests.builders import d, file, tar_bytes
from tests.memlayer import MemLayer
from unionfs import layerkinds
from unionfs.layers import DirLayer
from unionfs.resolve import UnionView
from unionfs.tarheaders import LayerError
from unionfs.tarlayer import TarLayer


def test_the_project_declares_its_kinds_as_entry_points() -> None:
    found = layerkinds.installed()
    assert {"tar", "dir"} <= set(found)
    assert found["tar"]() is layerkinds.open_tar and found["dir"]() is layerkinds.open_dir


def test_built_in_kinds_open_stored_layers_and_directories(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    image = store.import_rootfs(io.BytesIO(tar_bytes([d("etc"), file("etc/a", b"A")])))
    desc = store.layers.describe(image.diff_ids[0])
    assert desc["kind"] == "tar"
    layer = layerkinds.open_layer(desc)
    try:
        assert isinstance(layer, TarLayer)
        view = UnionView([layer])
        assert view.read(view.resolve("etc/a"), 0, 9) == b"A"
    finally:
        layer.close()
    (tmp_path / "dir").mkdir()
    assert isinstance(layerkinds.open_layer({"kind": "dir", "path": str(tmp_path / "dir")}),
                      DirLayer)


def test_other_kinds_go_to_their_entry_point() -> None:
    opened: list[dict[str, object]] = []

    def open_mem(desc: layerkinds.Description) -> MemLayer:
        opened.append(dict(desc))
        return MemLayer({"hello": str(desc["text"]).encode()})

    registry = {"mem": lambda: open_mem}
    layer = layerkinds.open_layer({"kind": "mem", "text": "hi"}, registry)
    view = UnionView([layer])
    assert view.read(view.resolve("hello"), 0, 10) == b"hi"
    assert opened == [{"kind": "mem", "text": "hi"}]
    # built-in kinds are not looked up
    assert layerkinds.opener("dir", {"dir": lambda: open_mem}) is layerkinds.open_dir


@pytest.mark.parametrize("desc, message", [
    ({"kind": "lazy"}, r"unknown layer kind 'lazy' \(known: dir, mem, tar;"),
    ({"path": "/x"}, "needs a 'kind'"),
    ({"kind": "tar", "tar": "/x"}, "needs 'index'"),
])
def test_bad_descriptions_are_layer_errors(desc: dict[str, object], message: str) -> None:
    with pytest.raises(LayerError, match=message):
        layerkinds.open_layer(desc, {"mem": lambda: layerkinds.open_dir})


def test_a_description_may_name_its_opener() -> None:
    """The store's own kinds name their opener (the entry point's value): no entry-point
    lookup; the same opener the entry point gives."""
    layer = layerkinds.open_layer({"kind": "mem", "opener": "tests.memlayer:from_description",
                                   "files": {"hello": "hi"}})
    view = UnionView([layer])
    assert view.read(view.resolve("hello"), 0, 10) == b"hi"
    assert layerkinds.installed()["lazy"]() is layerkinds._named(
        "imagestore.lazylayer:open_layer")
    with pytest.raises(LayerError, match="layer opener 'tests.memlayer:nothing'"):
        layerkinds.open_layer({"kind": "mem", "opener": "tests.memlayer:nothing"})
