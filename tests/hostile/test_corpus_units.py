"""The hostile corpus against the layer indexer and the union, without the CLI: every refused
case raises ``LayerError`` with its message (from whichever layer carries it), every accepted
case gives the documented merged tree (flattened by ``export_rootfs``, read back with
Python's tarfile)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from imagestore import changeset
from tests.builders import tree_of_tar
from tests.hostile.corpus import Case, layer_cases
from unionfs.resolve import UnionView
from unionfs.tarlayer import LayerError, TarLayer, build_index

CANARY = "/nonexistent/strata-canary"
CASES = {c.name: c for c in layer_cases(CANARY) if c.compression != "bomb"}


def open_layers(tmp_path: Path, case: Case) -> list[TarLayer]:
    layers = []
    for i, data in enumerate(case.layers):
        path = tmp_path / f"l{i}.tar"
        path.write_bytes(data)
        build_index(str(path)).dump(str(path) + ".idx")
        layers.append(TarLayer(str(path), str(path) + ".idx"))
    return layers


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_layer(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    if case.refused:
        assert case.error is not None
        with pytest.raises(LayerError, match=case.error):
            open_layers(tmp_path, case)
        return
    layers = open_layers(tmp_path, case)
    try:
        out = io.BytesIO()
        changeset.export_rootfs(UnionView(list(reversed(layers))), out.write)
    finally:
        for layer in layers:
            layer.close()
    assert case.expect is not None
    case.expect(tree_of_tar(out.getvalue()))
    assert not os.path.lexists(CANARY)
