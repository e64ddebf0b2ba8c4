"""Where a completed lazy layer's files lie in its tar (``lazyunpack._offsets``): a name maps
to its last tar member, as the indexer has it, and only when that member is a regular file of
the size the layer's index gives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imagestore import lazyunpack
from tests import builders as b


class _Layer:
    """What ``_offsets`` asks of a ``LazyLayer``: ``locate(path) -> (file number, size)``."""

    def __init__(self, files: dict[str, tuple[int, int]]) -> None:
        self.files = files

    def locate(self, path: str) -> tuple[int, int] | None:
        return self.files.get(path)


def _offsets(tmp_path: Path, entries: list[Any], files: dict[str, tuple[int, int]]
             ) -> tuple[bytes, dict[int, int]]:
    data = b.tar_bytes(entries)
    fd = os.open(tmp_path / "t.tar", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        return data, lazyunpack._offsets(_Layer(files), fd)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_a_name_maps_to_its_last_member(tmp_path: Path) -> None:
    # "a" is first a file of its own, then a hardlink to "b": the index gives "a" b's file
    # number; a's first data must not be taken for b's
    entries = [b.file("b", b"BBBB"), b.file("a", b"XXXX"), b.link("a", "b"),
               b.file("c", b"old"), b.file("c", b"newer")]
    data, got = _offsets(tmp_path, entries, {"a": (0, 4), "b": (0, 4), "c": (1, 5)})
    assert data[got[0]:got[0] + 4] == b"BBBB"
    assert data[got[1]:got[1] + 5] == b"newer"


def test_a_size_the_index_does_not_give_is_not_mapped(tmp_path: Path) -> None:
    _, got = _offsets(tmp_path, [b.file("a", b"12345"), b.d("d"), b.sym("s", "a")],
                      {"a": (0, 4), "d": (1, 0)})
    assert got == {}
