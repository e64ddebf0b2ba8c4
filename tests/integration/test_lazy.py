"""Lazy pull against the real test registry: images made by independent producers (ctr-remote's
eStargz and zstd:chunked, skopeo's zstd:chunked), strata's own eStargz, and a plain gzip image;
a fault proxy in front of the registry counts the bytes and breaks them on command."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagestore.api import Store
from imagestore.lazylayer import LazyLayer
from imagestore.registry.rangefetch import Fetcher
from tests import builders as b
from tests import lazy_helpers as lh
from tests import registry_helpers as rh
from tests.registry_images import exported_tree, umoci_tree
from unionfs.resolve import UnionView

FORMS = ("estargz-ctr", "zstdchunked-ctr", "zstdchunked-skopeo", "estargz-strata", "gzip")


@pytest.fixture(scope="module")
def containerd() -> Iterator[lh.Containerd | None]:
    if shutil.which("containerd") is None or shutil.which("ctr-remote") is None:
        if os.environ.get("CI"):
            pytest.fail("containerd and ctr-remote are not installed (scripts/install)")
        yield None
        return
    c = lh.Containerd()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def images(registry: rh.RegistryProcess, containerd: lh.Containerd | None,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """name -> form -> reference: ``sample`` (every layer rule) and ``big`` (many files)."""
    base = tmp_path_factory.mktemp("lazy-images")
    sample = [lh.tight(t) for t in b.sample_layers()]
    return {"sample": lh.push_images(registry.host, base, sample, "sample", containerd),
            "big": lh.push_images(registry.host, base, lh.generated_layers(), "big",
                                  containerd)}


def _ref(images: dict[str, dict[str, str]], name: str, form: str) -> str:
    if form not in images[name]:
        pytest.skip(f"{form} needs containerd and ctr-remote")
    return images[name][form]


def _via(ref: str, proxy: rh.FaultProxy, registry: rh.RegistryProcess) -> str:
    return ref.replace(registry.host, proxy.host, 1)


def _opened(store: Store, img: Any) -> Any:
    """The image's layers, opened for a ``with`` block (lazy ones as ``LazyLayer``)."""
    return store.layers.opened(store.layers.stack(img.diff_ids))


def _walk(view: UnionView) -> dict[str, tuple[Any, ...]]:
    """path -> (mode, uid, gid, size, mtime, target, rdev, data) through the union."""
    out: dict[str, tuple[Any, ...]] = {}
    todo = [""]
    while todo:
        d = todo.pop()
        for name, node in view.listdir(view.resolve(d)):
            path = f"{d}/{name}" if d else name
            e = node.entry
            data = view.read(node, 0, e.size + 1) if stat.S_ISREG(e.mode) else b""
            out[path] = (e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.target, e.rdev, data)
            if stat.S_ISDIR(e.mode):
                todo.append(path)
    return out


@pytest.mark.parametrize("form", FORMS)
def test_lazy_layers_read_what_a_full_pull_reads(images: dict[str, dict[str, str]], form: str,
                                                  tmp_path: Path) -> None:
    ref = _ref(images, "sample", form)
    lazy, full = Store(str(tmp_path / "lazy")), Store(str(tmp_path / "full"))
    events: list[Any] = []
    img = lazy.pull(ref, lazy=True, progress=events.append).image
    full_img = full.pull(ref).image
    assert img.id == full_img.id
    pending = lazy.lazy_layers(img)
    if form == "gzip":
        assert pending == []
        assert any("Not seekable" in str(e) for e in events)
    else:
        assert len(pending) == len(img.diff_ids), [e.status for e in events]
        assert not any(os.scandir(lazy.layers.dir))
    with _opened(lazy, img) as lazy_layers, _opened(full, full_img) as full_layers:
        got, want = _walk(UnionView(lazy_layers)), _walk(UnionView(full_layers))
    assert got.keys() == want.keys()
    assert [p for p in got if got[p] != want[p]] == []
    assert exported_tree(lazy, img) == exported_tree(full, full_img)


@pytest.mark.parametrize("form", ("estargz-ctr", "zstdchunked-skopeo", "estargz-strata", "gzip"))
def test_lazy_mount_equals_full_mount(images: dict[str, dict[str, str]], form: str,
                                      mounter: Any, tmp_path: Path) -> None:
    ref = _ref(images, "sample", form)
    mounter.strata("pull", "--lazy", ref)
    full = Store(str(tmp_path / "full"))
    full.pull(ref)
    lazy_mp = mounter.mount(ref, at=mounter.mountpoint("lazy"))
    with full.mount(ref) as full_mp:
        want = b.tree_of_dir(str(full_mp))
        want_times = {p: os.lstat(os.path.join(full_mp, p)).st_mtime_ns for p in want}
    got = b.tree_of_dir(str(lazy_mp))
    assert b.diff_trees(got, want) == []
    assert {p: os.lstat(lazy_mp / p).st_mtime_ns for p in got} == want_times
    if "zstd" not in form:  # umoci 0.4.7 unpacks gzip layers, not zstd
        assert got == umoci_tree(ref, tmp_path)


@pytest.mark.parametrize("form", ("estargz-strata", "zstdchunked-skopeo", "estargz-ctr"))
def test_first_read_fetches_a_small_fraction(images: dict[str, dict[str, str]], form: str,
                                             registry: rh.RegistryProcess,
                                             fault_proxy: rh.FaultProxy, tmp_path: Path) -> None:
    ref = _via(_ref(images, "big", form), fault_proxy, registry)
    store = Store(str(tmp_path / "s"))
    img = store.pull(ref, lazy=True).image
    blobs = sum(d.size for d in img.manifest.layers)
    pulled = sum(s.sent for s in fault_proxy.requests("GET", "/blobs/"))
    assert pulled < blobs // 10  # tables of contents only
    with _opened(store, img) as layers:
        view = UnionView(layers)
        before = len(fault_proxy.requests("GET", "/blobs/"))
        node = view.resolve("etc/os-release")
        assert view.read(node, 0, 4096).startswith(b'PRETTY_NAME="strata test"')
        reads = fault_proxy.requests("GET", "/blobs/")[before:]
        assert 1 <= len(reads) <= 2 and sum(s.sent for s in reads) < blobs // 10
        view.read(node, 0, 4096)  # a second read is local
        assert len(fault_proxy.requests("GET", "/blobs/")) == before + len(reads)
        big = view.resolve("usr/lib/big.so")
        assert len(view.read(big, 0, 3 << 20)) == 2 << 20


def test_registry_that_stops_answering_gives_eio_then_recovers(
        images: dict[str, dict[str, str]], registry: rh.RegistryProcess,
        fault_proxy: rh.FaultProxy, tmp_path: Path) -> None:
    ref = _via(_ref(images, "big", "estargz-strata"), fault_proxy, registry)
    store = Store(str(tmp_path / "s"))
    img = store.pull(ref, lazy=True).image
    digest = store.lazy_layers(img)[0]
    layer = LazyLayer(store.root, digest, Fetcher(timeout=2))
    try:
        gate = threading.Event()
        rule = fault_proxy.add("GET", "/blobs/", "hang", times=1000, event=gate, timeout=60)
        entry = layer.entry("usr/share/pkg1/file1")
        assert entry is not None
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            layer.read(entry, 0, 100)
        assert info.value.errno == errno.EIO
        assert time.monotonic() - started < 30
        other = layer.entry("usr/share/pkg2/file2")
        assert other is not None and layer.entry("etc") is not None  # metadata stays local
        rule.times = 0
        gate.set()
        assert len(layer.read(entry, 0, 100)) == min(100, entry.size)
    finally:
        layer.close()


def test_corrupted_chunk_bytes_are_refused_and_not_stored(
        images: dict[str, dict[str, str]], registry: rh.RegistryProcess,
        fault_proxy: rh.FaultProxy, tmp_path: Path) -> None:
    ref = _via(_ref(images, "big", "zstdchunked-skopeo"), fault_proxy, registry)
    store = Store(str(tmp_path / "s"))
    img = store.pull(ref, lazy=True).image
    digest = store.lazy_layers(img)[0]
    ranges = Path(store.layers.lazy.path(digest)) / "ranges"
    logged = ranges.read_bytes()
    layer = LazyLayer(store.root, digest, Fetcher(timeout=10))
    try:
        entry = layer.entry("usr/lib/big.so")
        assert entry is not None
        fault_proxy.add("GET", "/blobs/", "corrupt")
        with pytest.raises(OSError) as info:
            layer.read(entry, 0, 4096)
        assert info.value.errno == errno.EIO
        assert ranges.read_bytes() == logged  # nothing recorded
        data = layer.read(entry, 0, 4096)  # fetched again, intact
        assert len(data) == 4096 and ranges.read_bytes() != logged
    finally:
        layer.close()


@pytest.mark.parametrize("form", ("estargz-ctr", "zstdchunked-skopeo"))
def test_completed_lazy_image_equals_a_full_pull(images: dict[str, dict[str, str]], form: str,
                                                 strata: Any, tmp_path: Path) -> None:
    ref = _ref(images, "sample", form)
    strata("pull", "--lazy", ref)
    store = Store(str(strata.root))
    img = store.resolve(ref)
    assert store.lazy_layers(img)
    strata("pull", ref)
    img = store.resolve(ref)
    assert store.lazy_layers(img) == [] and store.layers.lazy.digests() == []
    full = Store(str(tmp_path / "full"))
    full_img = full.pull(ref).image
    assert img.diff_ids == full_img.diff_ids
    for d in img.manifest.layers:
        assert store.blobs.has(d.digest)
    checked = strata("check")
    assert b"no problems" in checked.stdout + checked.stderr
    assert exported_tree(store, img) == exported_tree(full, full_img)


def test_a_mount_completes_its_lazy_layers_and_the_next_command_promotes_them(
        images: dict[str, dict[str, str]], strata: Any) -> None:
    ref = _ref(images, "big", "estargz-strata")
    strata("pull", "--lazy", ref)
    store = Store(str(strata.root))
    img = store.resolve(ref)
    digests = store.lazy_layers(img)
    assert digests
    with store.mount(ref) as mp:  # the daemon fetches the rest in the background
        rh.wait_for(lambda: store.lazy_layers(img) == [], timeout=60)
        assert (mp / "etc/os-release").read_bytes().startswith(b'PRETTY_NAME="strata test"')
        assert all(store.layers.lazy.is_complete(d) for d in digests)
        assert not any(store.layers.has(d) for d in img.diff_ids)  # not yet promoted
    listing = strata("images")  # marks nothing now, and promotes nothing (no ingesting hold)
    assert b"not fully local" not in listing.stderr
    assert store.layers.lazy.digests() == sorted(digests)
    tag = strata("tag", ref, "lazy/promoted:1")  # no hold either
    assert tag.returncode == 0 and store.layers.lazy.digests()
    with store.reading():  # what save, export and push hold: promotion happens on entry
        pass
    assert store.layers.lazy.digests() == []
    for desc, diff_id in zip(img.manifest.layers, img.diff_ids, strict=True):
        assert store.layers.has(diff_id) and store.blobs.has(desc.digest)
    checked = strata("check")
    assert b"no problems" in checked.stdout + checked.stderr


def test_pull_promotes_a_layer_completed_in_the_background_without_fetching(
        images: dict[str, dict[str, str]], registry: rh.RegistryProcess,
        fault_proxy: rh.FaultProxy, tmp_path: Path) -> None:
    ref = _via(_ref(images, "big", "zstdchunked-skopeo"), fault_proxy, registry)
    store = Store(str(tmp_path / "s"))
    img = store.pull(ref, lazy=True).image
    from imagestore.lazylayer import open_layer

    for digest in store.lazy_layers(img):
        layer = open_layer({"kind": "lazy", "root": store.root, "digest": digest,
                            "complete": True})
        try:
            rh.wait_for(lambda d=digest: store.layers.lazy.is_complete(d), timeout=60)
        finally:
            layer.close()
    before = len(fault_proxy.requests("GET", "/blobs/"))
    store.pull(ref)  # promotes what is complete, fetching no blob bytes
    assert len(fault_proxy.requests("GET", "/blobs/")) == before
    assert store.layers.lazy.digests() == [] and store.lazy_layers(store.resolve(ref)) == []


@pytest.mark.parametrize("fmt", ("oci", "docker"))
def test_save_of_a_lazy_image_completes_it_first(images: dict[str, dict[str, str]], fmt: str,
                                                 tmp_path: Path) -> None:
    ref = _ref(images, "sample", "zstdchunked-skopeo")
    store = Store(str(tmp_path / "s"))
    img = store.pull(ref, lazy=True).image
    assert store.lazy_layers(img)
    store.save(ref, tmp_path / "saved.tar", format=fmt)
    assert store.layers.lazy.digests() == []
    loaded = Store(str(tmp_path / "loaded"))
    got = loaded.load(tmp_path / "saved.tar")[0].image
    full = Store(str(tmp_path / "full"))
    full_img = full.pull(ref).image
    assert got.diff_ids == full_img.diff_ids
    assert exported_tree(loaded, got) == exported_tree(full, full_img)


def test_commit_and_push_of_a_container_over_a_lazy_image(
        images: dict[str, dict[str, str]], strata: Any, mounter: Any,
        tmp_path: Path) -> None:
    ref = _ref(images, "sample", "estargz-strata")
    strata("pull", "--lazy", ref)
    store = Store(str(strata.root))
    assert store.lazy_layers(store.resolve(ref))
    cid = strata.out("create", ref).split()[-1]
    mp = mounter.mount(cid, at=mounter.mountpoint("c"))
    (mp / "added").write_bytes(b"made over a lazy image\n")
    mounter.umount(mp)
    strata("commit", cid, "lazy/committed:1")
    other = rh.RegistryProcess(tmp_path / "other-registry")  # holds none of the blobs
    try:
        dest = f"{other.host}/lazy/committed:1"
        strata("push", "lazy/committed:1", dest)
        tree = umoci_tree(dest, tmp_path)
    finally:
        other.stop()
    assert tree["added"][5] == b.sha256(b"made over a lazy image\n").partition(":")[2]
    full = Store(str(tmp_path / "full"))
    full.pull(ref)
    with full.mount(ref) as full_mp:
        base = b.tree_of_dir(str(full_mp))
    assert {p: v for p, v in tree.items() if p != "added"} == base


def test_check_verifies_the_fetched_parts_and_images_marks_them(
        images: dict[str, dict[str, str]], strata: Any) -> None:
    ref = _ref(images, "big", "zstdchunked-skopeo")
    strata("pull", "--lazy", ref)
    listing = strata("images")
    assert b"not fully local" in listing.stderr
    assert strata.out("images", "--format", "{{.Local}}").split() == ["partial"]
    store = Store(str(strata.root))
    img = store.resolve(ref)
    with _opened(store, img) as layers:
        view = UnionView(layers)
        node = view.resolve("usr/lib/big.so")
        assert len(view.read(node, 0, 1 << 20)) == 1 << 20
    checked = strata("check")
    assert b"no problems" in checked.stdout + checked.stderr
    digest = next(d for d in store.lazy_layers(img)
                  if store.layers.lazy.info(d).content > 1 << 20)
    layer = LazyLayer(store.root, digest)
    chunk = next(c for c in layer.sorted if layer.present(c))
    layer.close()
    with open(Path(store.layers.lazy.path(digest)) / "blob", "r+b") as f:  # damage a stored chunk
        f.seek(chunk.start + (chunk.end - chunk.start) // 2)
        f.write(b"\xff\x00\xff\x00")
    bad = strata("check", check=False)
    assert bad.returncode != 0 and b"lazy layer" in bad.stdout + bad.stderr


def test_commit_estargz_is_lazily_pullable_and_plain_gzip_for_others(
        images: dict[str, dict[str, str]], registry: rh.RegistryProcess, strata: Any,
        mounter: Any, containerd: lh.Containerd | None, tmp_path: Path) -> None:
    ref = _ref(images, "sample", "gzip")
    strata("pull", ref)
    cid = strata.out("create", ref).split()[-1]
    mp = mounter.mount(cid, at=mounter.mountpoint("c"))
    (mp / "added").write_bytes(b"x" * 100000)
    mounter.umount(mp)
    strata("commit", "--compression", "estargz", cid, "lazy/esgz-commit:1")
    dest = f"{registry.host}/lazy/esgz-commit:1"
    strata("push", "lazy/esgz-commit:1", dest)
    store = Store(str(strata.root))
    top = store.resolve("lazy/esgz-commit:1").manifest.layers[-1]
    assert "containerd.io/snapshot/stargz/toc.digest" in top.annotations
    lazy = Store(str(tmp_path / "lazy"))
    img = lazy.pull(dest, lazy=True).image
    assert top.digest in lazy.lazy_layers(img)
    with _opened(lazy, img) as layers:
        got = _walk(UnionView(layers))
    assert got["added"][-1] == b"x" * 100000
    oracle = umoci_tree(dest, tmp_path)  # skopeo + umoci read it as plain gzip
    assert exported_tree(lazy, img) == oracle
    if containerd is not None:  # stargz-snapshotter's reader finds our footer and TOC
        containerd.ctr("content", "fetch", "--plain-http", dest)
        assert containerd.ctr("images", "get-toc-digest", top.digest).strip() == \
            top.annotations["containerd.io/snapshot/stargz/toc.digest"]


@pytest.mark.parametrize("form", ("estargz-ctr", "zstdchunked-ctr", "zstdchunked-skopeo",
                                  "estargz-strata"))
def test_served_index_agrees_with_the_completed_tars(images: dict[str, dict[str, str]],
                                                     form: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """What a lazy mount shows is what the layer's tar holds, but for eStargz's whole-second
    times; promotion compares the two and warns otherwise (it did not here)."""
    from imagestore.lazystate import index_differences
    from imagestore.registry.lazypull import complete_and_promote
    from unionfs.layerindex import LayerIndex

    ref = _ref(images, "sample", form)
    store = Store(str(tmp_path / "s"))
    img = store.pull(ref, lazy=True).image
    lazy = store.layers.lazy
    for d in store.lazy_layers(img):
        lazy.ready(d)  # built where the layer is first used: here
    served = {d: LayerIndex.load(os.path.join(lazy.path(d), "index"))
              for d in store.lazy_layers(img)}
    assert served
    with store.reading():
        for digest in served:
            complete_and_promote(store, digest)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    for desc, diff_id in zip(img.manifest.layers, img.diff_ids, strict=True):
        stored = LayerIndex.load(os.path.join(store.layers.path(diff_id), "index"))
        assert index_differences(served[desc.digest], stored, form.startswith("estargz")) == []
