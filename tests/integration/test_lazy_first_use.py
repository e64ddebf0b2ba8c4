"""``pull --lazy`` stores each table of contents checked but not parsed, without an event loop;
the layer's index is built where it is first used (its first mount), and a TOC that cannot
serve is found there: that layer is then downloaded whole, with a note.  Against the real
test registry."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import pytest

from imagestore import estargz_write
from imagestore.api import Store
from tests import builders as b
from tests import lazy_helpers as lh
from tests import registry_helpers as rh
from tests.conftest import REPO, Mounter
from tests.registry_images import upload_layout

pytestmark = [pytest.mark.registry]


@pytest.fixture(scope="module")
def refs(registry: rh.RegistryProcess, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, str]:
    base = tmp_path_factory.mktemp("lazy-first-use")
    return lh.push_images(registry.host, base, lh.generated_layers(files=200), "first", None)


@pytest.mark.parametrize("form", ["estargz-strata", "zstdchunked-skopeo"])
def test_a_lazy_pull_needs_no_event_loop_and_builds_no_index(
        refs: dict[str, str], form: str, tmp_path: Path) -> None:
    """The pull runs without trio or httpcore (their imports were a third of it); the
    first use builds the index, once."""
    root = tmp_path / "s"
    code = ("import sys; from imagestore.api import Store; "
            f"Store({str(root)!r}).pull({refs[form]!r}, lazy=True); "
            "print(sorted(m for m in ('trio', 'httpcore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.stdout.decode().strip() == "[]"
    store = Store(str(root))
    img = store.images()[0]
    lazy = store.layers.lazy
    digests = store.lazy_layers(img)
    assert digests
    for d in digests:
        assert not lazy.info(d).built
        assert not os.path.exists(os.path.join(lazy.path(d), "index"))
    descs = store.layers.stack(img.diff_ids)  # what a mount's planning does first
    assert [x["kind"] for x in descs] == ["lazy"] * len(img.diff_ids)
    for d in digests:
        info = lazy.info(d)
        assert info.built and info.entries > 0
        before = os.stat(os.path.join(lazy.path(d), "index")).st_mtime_ns
        assert lazy.ready(d) == info  # built once
        assert os.stat(os.path.join(lazy.path(d), "index")).st_mtime_ns == before


def _estargz_with_a_toc_that_cannot_serve(layout: str, tar: bytes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An OCI layout of ``tar`` as eStargz whose TOC (consistent with its digest annotation)
    begins with a chunk entry that follows no file: a producer's bug the parser refuses, in
    an otherwise valid gzip tar (other tools unpack it)."""
    real = json.dumps

    def dumps(doc: Any, **kw: Any) -> str:
        if isinstance(doc, dict) and "entries" in doc:
            doc = {**doc, "entries": [{"name": "orphan", "type": "chunk", "chunkSize": 1},
                                      *doc["entries"]]}
        return real(doc, **kw)

    monkeypatch.setattr(estargz_write, "json", types.SimpleNamespace(dumps=dumps))
    lh.estargz_layout(layout, [tar])
    monkeypatch.undo()


def test_a_toc_that_cannot_serve_is_found_at_the_first_mount_and_the_layer_fetched_whole(
        registry: rh.RegistryProcess, strata: Any, mounter: Mounter, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tar = lh.tight(b.tar_bytes([b.d("etc"), b.file("etc/os-release", b"ID=bad-toc\n"),
                                b.file("big", os.urandom(300_000))]))
    layout = str(tmp_path / "layout")
    _estargz_with_a_toc_that_cannot_serve(layout, tar, monkeypatch)
    ref = f"{registry.host}/lazy/bad-toc:1"
    upload_layout(registry.host, layout, "lazy/bad-toc", "1")
    strata("pull", "--lazy", ref)  # the TOC matches its digest: recorded lazily
    store = Store(str(strata.root))
    assert store.lazy_layers(store.images()[0])
    mp = mounter.mountpoint("mnt")
    proc = strata("mount", ref, str(mp))
    mounter.active.append(mp)
    err = proc.stderr.decode()
    assert "unusable table of contents" in err and "downloading the whole layer" in err
    assert (mp / "etc" / "os-release").read_bytes() == b"ID=bad-toc\n"
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        big = tf.extractfile("big")
        assert big is not None and (mp / "big").read_bytes() == big.read()
    mounter.umount(mp)
    img = store.images()[0]
    assert store.lazy_layers(img) == [] and store.layers.lazy.digests() == []
    assert all(store.layers.has(d) for d in img.diff_ids)  # an ordinary layer now
    assert "not fully local" not in strata("images").stderr.decode()


def test_a_state_written_by_the_previous_version_is_served_as_it_is(
        refs: dict[str, str], tmp_path: Path) -> None:
    """A lazy state of the version that built the index at pull time (its meta counts the
    entries, has no TOC offset, no toc.head) is taken as built: opened and read, not rebuilt."""
    from imagestore.lazylayer import LazyLayer
    from imagestore.registry.rangefetch import Fetcher

    store = Store(str(tmp_path / "s"))
    img = store.pull(refs["estargz-strata"], lazy=True).image
    lazy = store.layers.lazy
    digest = store.lazy_layers(img)[0]
    lazy.ready(digest)
    path = Path(lazy.path(digest))
    meta = json.loads((path / "meta.json").read_text())
    del meta["toc_offset"]
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "toc.head").unlink()
    before = (path / "index").stat().st_mtime_ns
    layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
    try:
        entry = layer.entry("etc/os-release")
        assert entry is not None and layer.read(entry, 0, 100).startswith(b"PRETTY_NAME")
        toc = layer.entry("stargz.index.json")  # the TOC's own file, served from the state
        assert toc is not None and json.loads(layer.read(toc, 0, toc.size))["version"] == 1
    finally:
        layer.close()
    assert (path / "index").stat().st_mtime_ns == before


def test_the_loop_free_pull_leaves_what_it_cannot_do_to_the_pull_having_written_nothing(
        refs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagestore import reference
    from imagestore.registry.quickpull import pull_quickly

    store = Store(str(tmp_path / "s"))
    assert pull_quickly(store, reference.parse(refs["gzip"])) is None  # not seekable
    monkeypatch.setenv("https_proxy", "socks5://127.0.0.1:1")  # a proxy it cannot use
    assert pull_quickly(store, reference.parse(refs["estargz-strata"])) is None
    assert store.images() == [] and list(store.blobs.digests()) == []
    assert store.layers.lazy.digests() == [] and store.layers.diff_ids() == []
