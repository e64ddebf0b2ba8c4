"""A lazy layer that a mount completes: the completion's unchecked bytes, the tar it is read
from afterwards (lazyunpack), and reads served on the request loop (``read_would_block``),
against the real test registry (strata's eStargz, skopeo's zstd:chunked)."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from imagestore.api import Store
from imagestore.errors import DigestMismatch
from imagestore.lazylayer import LazyLayer
from imagestore.lazystate import check
from imagestore.registry.rangefetch import Fetcher
from tests import lazy_helpers as lh
from tests import registry_helpers as rh

FORMS = ("estargz-strata", "zstdchunked-skopeo")


@pytest.fixture(scope="module")
def refs(registry: rh.RegistryProcess, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, str]:
    base = tmp_path_factory.mktemp("lazy-complete")
    return lh.push_images(registry.host, base, lh.generated_layers(files=300), "complete", None)


def _layers(store: Store, ref: str) -> list[str]:
    """The image's lazy layers, its base first (the top layer's content is that of other
    modules' test images too: skopeo's blob-info cache may push it as plain gzip)."""
    img = store.pull(ref, lazy=True).image
    digests = store.lazy_layers(img)
    assert digests and digests[0] == img.manifest.layers[0].digest
    return digests


def _files(layer: LazyLayer) -> dict[str, Any]:
    """path -> entry of every regular file of ``layer``."""
    out = {}
    todo = [""]
    while todo:
        d = todo.pop()
        for name, e in layer.children(d):
            path = f"{d}/{name}" if d else name
            if stat.S_ISDIR(e.mode):
                todo.append(path)
            elif stat.S_ISREG(e.mode):
                out[path] = e
    return out


def _contents(layer: LazyLayer, files: dict[str, Any], tmp_path: Path
              ) -> dict[str, tuple[bytes, bytes, bytes]]:
    """path -> (the whole file, a read from its middle, what copy_data writes)."""
    out = {}
    for path, e in files.items():
        with open(tmp_path / "copy", "w+b") as f:
            layer.copy_data(e, f.fileno())
            f.seek(0)
            copied = f.read()
        out[path] = (layer.read(e, 0, e.size + 1), layer.read(e, e.size // 3, 5000), copied)
    return out


@pytest.mark.parametrize("form", FORMS)
def test_a_completed_layer_reads_from_its_tar_what_its_chunks_hold(
        refs: dict[str, str], form: str, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    for digest in _layers(store, refs[form]):
        layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
        try:
            files = _files(layer)
            assert files
            waiting = [p for p, e in files.items() if layer.read_would_block(e, 0, e.size)]
            assert len(waiting) > len(files) // 2  # not the TOC's file, nor any the pull's
            # fetch of the TOC region happened to hold
            assert layer.complete()
            from_chunks = _contents(layer, files, tmp_path)
            layer._unpack()
            tar = layer._tar
            assert tar is not None  # reads come from the tar now
            served = {p for p, e in files.items() if layer._data(e)[0] in tar[1]}
            assert served == set(files)
            assert not any(layer.read_would_block(e, 0, e.size) for e in files.values())
            assert _contents(layer, files, tmp_path) == from_chunks
            for path, (data, _, copied) in from_chunks.items():
                assert data == copied and len(data) == files[path].size
        finally:
            layer.close()


def test_reads_of_bytes_at_hand_do_not_block(refs: dict[str, str], tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    digest = _layers(store, refs["estargz-strata"])[0]
    layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
    try:
        entry = layer.entry("etc/os-release")
        assert entry is not None
        assert layer.read_would_block(entry, 0, entry.size)  # not fetched yet
        assert layer.read(entry, 0, entry.size).startswith(b"PRETTY_NAME")
        assert not layer.read_would_block(entry, 0, entry.size)
    finally:
        layer.close()


@pytest.mark.parametrize("form", FORMS)
def test_the_completion_fetches_again_what_came_wrong(
        refs: dict[str, str], form: str, registry: rh.RegistryProcess,
        fault_proxy: rh.FaultProxy, tmp_path: Path) -> None:
    """Completion windows are stored unchecked; when one the registry sent corrupted makes
    the blob fail its digest, what was not checked is fetched again: the layer completes
    whole, and its tar matches the diff_id."""
    store = Store(str(tmp_path / "s"))
    ref = refs[form].replace(registry.host, fault_proxy.host, 1)
    digest = _layers(store, ref)[0]
    layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
    try:
        fault_proxy.add("GET", "/blobs/", "corrupt")  # the first window the completion takes
        assert layer.complete()
        assert [s for s in fault_proxy.requests("GET", "/blobs/") if s.action == "corrupt"]
        assert check(store.layers.lazy, digest) == []
        with open(layer.blob.blob_path, "rb") as f:
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == digest
        layer._unpack()
        assert layer._tar is not None
    finally:
        layer.close()
    assert os.path.exists(os.path.join(store.layers.lazy.path(digest), "complete"))


def test_a_registry_that_keeps_sending_wrong_bytes_is_given_up_on(
        refs: dict[str, str], registry: rh.RegistryProcess, fault_proxy: rh.FaultProxy,
        tmp_path: Path) -> None:
    """The blob is fetched again once; when that fails its digest too, completing stops for
    good (DigestMismatch) instead of fetching the whole blob again every few seconds, and the
    chunks reads checked stay readable."""
    store = Store(str(tmp_path / "s"))
    ref = refs["estargz-strata"].replace(registry.host, fault_proxy.host, 1)
    digest = _layers(store, ref)[0]  # the base: it holds etc/os-release
    layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
    try:
        entry = layer.entry("etc/os-release")
        assert entry is not None
        before = layer.read(entry, 0, entry.size)  # fetched and checked by a read
        fault_proxy.add("GET", "/blobs/", "corrupt", times=10_000)
        layer.start_completing(delay=0, retry_delay=0.1)  # as the mount daemon does
        completer = layer._completer
        assert completer is not None
        completer.join(60)
        assert not completer.is_alive()  # given up: no retry every retry_delay
        fetched = len(fault_proxy.requests("GET", "/blobs/"))
        time.sleep(0.5)
        assert len(fault_proxy.requests("GET", "/blobs/")) == fetched
        with pytest.raises(DigestMismatch):
            layer.complete()  # what the background thread met
        assert layer.read(entry, 0, entry.size) == before
    finally:
        layer.close()
