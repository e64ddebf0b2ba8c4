"""``strata push --compression``: an image recompressed on the way (gzip, zstd, eStargz,
zstd:chunked) and checked by readers strata did not write: strata's lazy pull of it against a
full pull of the original; skopeo + umoci for the gzip forms; zstd(1) for the zstd forms (the
blob decompresses to exactly the original layer tar); ctr-remote's TOC reader for eStargz; and
buildah's containers/storage, whose partial pull of a zstd:chunked layer builds the rootfs from
our TOC alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagestore.api import Store
from tests import builders as b
from tests import lazy_helpers as lh
from tests import registry_helpers as rh
from tests.registry_images import exported_tree, umoci_tree, upload_layout

ZC_PREFIX = "io.github.containers.zstd-chunked."


@pytest.fixture(scope="module")
def source(registry: rh.RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A plain gzip image in the registry: the many-file image plus every layer rule."""
    layout = str(tmp_path_factory.mktemp("push-src") / "layout")
    layers = [*lh.generated_layers(files=200), *(lh.tight(t) for t in b.sample_layers())]
    b.oci_layout(layout, layers, tag="latest", compression="gzip")
    upload_layout(registry.host, layout, "lazy/push-src", "1")
    return f"{registry.host}/lazy/push-src:1"


@pytest.fixture(scope="module")
def original(source: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Any]:
    store = Store(str(tmp_path_factory.mktemp("push-original")))
    return store, store.pull(source).image


def _push(strata: Any, source: str, dest: str, compression: str) -> Store:
    strata("pull", source)
    before = Store(str(strata.root)).resolve(source)
    strata("push", "--compression", compression, source, dest)
    store = Store(str(strata.root))
    after = store.resolve(source)
    assert after.manifest_desc == before.manifest_desc  # the stored image is unchanged
    assert not any(dest.rpartition(":")[0] in d for d in after.repo_digests)
    assert not [n for n in os.listdir(store.blobs.tmp_dir) if n.startswith("convert-")]
    return store


@pytest.mark.parametrize("compression", ("estargz", "zstd:chunked"))
def test_pushed_seekable_image_pulls_lazily_as_the_original_reads(
        source: str, original: tuple[Store, Any], registry: rh.RegistryProcess, strata: Any,
        compression: str, tmp_path: Path) -> None:
    dest = f"{registry.host}/lazy/push-{compression.replace(':', '-')}:1"
    _push(strata, source, dest, compression)
    lazy = Store(str(tmp_path / "lazy"))
    img = lazy.pull(dest, lazy=True).image
    assert len(lazy.lazy_layers(img)) == len(img.manifest.layers)  # every layer seekable
    full_store, full = original
    if compression == "zstd:chunked":
        assert img.diff_ids == full.diff_ids  # the same tars
        for d in img.manifest.layers:
            assert d.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
            assert ZC_PREFIX + "manifest-checksum" in d.annotations
            assert ZC_PREFIX + "tarsplit-position" in d.annotations
    else:
        assert img.diff_ids != full.diff_ids  # the TOC and the landmark are tar entries
    assert _plain(exported_tree(lazy, img)) == exported_tree(full_store, full)
    strata_again = Store(str(tmp_path / "again"))  # pushed with the same bytes twice
    strata_again.pull(dest)
    assert strata_again.resolve(dest).diff_ids == img.diff_ids


@pytest.mark.parametrize("compression", ("gzip", "estargz"))
def test_pushed_gzip_forms_unpack_with_skopeo_and_umoci(
        source: str, registry: rh.RegistryProcess, strata: Any, compression: str,
        tmp_path: Path) -> None:
    dest = f"{registry.host}/lazy/push-umoci-{compression}:1"
    _push(strata, source, dest, compression)
    (tmp_path / "pushed").mkdir()
    (tmp_path / "source").mkdir()
    got = umoci_tree(dest, tmp_path / "pushed")
    want = umoci_tree(source, tmp_path / "source")
    assert _plain(got) == want


def _plain(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the files eStargz adds at the root (its TOC and landmark), as
    stargz-snapshotter and ``nerdctl image convert`` leave them in the tar."""
    return {p: v for p, v in tree.items()
            if p not in ("stargz.index.json", ".no.prefetch.landmark")}


@pytest.mark.parametrize("compression", ("zstd", "zstd:chunked"))
def test_pushed_zstd_forms_decompress_with_zstd_to_the_original_tars(
        source: str, original: tuple[Store, Any], registry: rh.RegistryProcess, strata: Any,
        compression: str, tmp_path: Path) -> None:
    dest = f"{registry.host}/lazy/push-zstd-{compression.replace(':', '-')}:1"
    store = _push(strata, source, dest, compression)
    layout = tmp_path / "layout"
    rh.skopeo_copy(f"docker://{dest}", f"oci:{layout}:t")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    _, full = original
    assert config["rootfs"]["diff_ids"] == list(full.diff_ids)
    for desc, diff_id in zip(manifest["layers"], full.diff_ids, strict=True):
        blob = layout / "blobs" / "sha256" / desc["digest"].partition(":")[2]
        tar = subprocess.run(["zstd", "-dc", str(blob)], capture_output=True, check=True,
                             timeout=60).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        assert tar == Path(store.layers.tar_path(diff_id)).read_bytes()


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()


def test_pushed_estargz_toc_is_found_by_ctr_remote(
        source: str, registry: rh.RegistryProcess, strata: Any) -> None:
    if shutil.which("containerd") is None or shutil.which("ctr-remote") is None:
        if os.environ.get("CI"):
            pytest.fail("containerd and ctr-remote are not installed (scripts/install)")
        pytest.skip("needs containerd and ctr-remote")
    dest = f"{registry.host}/lazy/push-ctr-estargz:1"
    _push(strata, source, dest, "estargz")
    img = Store(str(strata.root)).resolve(source)
    lazy = Store(str(strata.root) + "-lazy")
    layers = lazy.pull(dest, lazy=True).image.manifest.layers
    c = lh.Containerd()
    try:
        c.ctr("content", "fetch", "--plain-http", dest)
        for d in layers:
            assert c.ctr("images", "get-toc-digest", d.digest).strip() == \
                d.annotations["containerd.io/snapshot/stargz/toc.digest"]
    finally:
        c.stop()
    assert len(layers) == len(img.manifest.layers)


@pytest.fixture
def buildah(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment for buildah with a containers/storage of its own (overlay, partial
    pulls enabled) under ``tmp_path``; its containers and images are removed afterwards."""
    if shutil.which("buildah") is None:
        if os.environ.get("CI"):
            pytest.fail("buildah is not installed (scripts/install)")
        pytest.skip("needs buildah")
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp_path}/c-root"\n'
        f'runroot = "{tmp_path}/c-run"\n[storage.options]\n'
        'pull_options = {enable_partial_images = "true", use_hard_links = "false", '
        'ostree_repos = ""}\n')
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf))
    try:
        yield env
    finally:
        subprocess.run(["buildah", "umount", "-a"], env=env, capture_output=True, timeout=60)
        subprocess.run(["buildah", "rm", "-a"], env=env, capture_output=True, timeout=60)
        subprocess.run(["buildah", "rmi", "-a", "-f"], env=env, capture_output=True, timeout=60)
        subprocess.run(["umount", "-R", "-l", str(tmp_path / "c-root" / "overlay")],
                       capture_output=True, timeout=60)


def test_pushed_zstd_chunked_is_pulled_partially_by_containers_storage(
        registry: rh.RegistryProcess, strata: Any, buildah: dict[str, str],
        tmp_path: Path) -> None:
    # the many-file image only: buildah 1.28 refuses some of sample_layers' replacements
    # (a directory by a file) in any form, gzip included
    layout = str(tmp_path / "layout")
    b.oci_layout(layout, lh.generated_layers(files=200), tag="latest", compression="gzip")
    upload_layout(registry.host, layout, "lazy/push-buildah-src", "1")
    source = f"{registry.host}/lazy/push-buildah-src:1"
    dest = f"{registry.host}/lazy/push-buildah-zc:1"
    store = _push(strata, source, dest, "zstd:chunked")
    img = store.resolve(source)

    def run(*args: str) -> str:
        proc = subprocess.run(["buildah", *args], env=buildah, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"buildah {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc.stdout + proc.stderr

    pulled = run("--log-level=debug", "pull", "--tls-verify=false", dest)
    partial = [line for line in pulled.splitlines() if "Retrieved partial blob" in line]
    assert len(partial) == len(img.manifest.layers)  # built from our TOC, not the tar stream
    name = run("from", "--pull=never", dest).split()[-1]
    root = run("mount", name).split()[-1]
    try:
        tree = b.tree_of_dir(root)
    finally:
        run("umount", name)
    with store.mount(img) as mp:
        assert tree == b.tree_of_dir(str(mp))
