"""Push to a real docker-registry, read back by skopeo and umoci: round trips, exact manifest
digests for re-pushed pulls, cross-repository mounts, imported (uncompressed) images, and
chunked uploads that recover from a 416 and from a lost response."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagestore import Image, ProgressEvent, Store, archive, oci, reference
from imagestore.digest import sha256_bytes
from imagestore.registry import RetryPolicy, open_transport, pull, push
from tests import builders as b
from tests import registry_helpers as rh
from tests import registry_images as ri
from tests.builders import diff_trees
from tests.conftest import require_root, require_tool

pytestmark = [pytest.mark.registry, pytest.mark.interop]

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)


def _raw_manifest(ref: str) -> bytes:
    proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{ref}"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def _loaded(store: Store, tmp_path: Path, layers: list[bytes], compression: str = "gzip"
            ) -> Image:
    layout = str(tmp_path / "src-layout")
    b.oci_layout(layout, layers, compression=compression)
    (loaded,) = archive.load(store, layout)
    return loaded.image


def _random_layer(size: int, name: str = "big.bin") -> bytes:
    import random

    data = random.Random(size).randbytes(size)
    return b.tar_bytes([b.d("data"), b.file(f"data/{name}", data)])


async def test_push_round_trip_read_by_skopeo_and_umoci(
        store: Store, tmp_path: Path, registry: rh.RegistryProcess, registry_env: Any) -> None:
    require_tool("umoci")
    require_root()
    image = _loaded(store, tmp_path, [b.tar_bytes(b.busybox_entries()),
                                      b.tar_bytes([b.file("etc/motd", b"pushed\n", uid=7)])])
    dest = reference.parse(f"{registry.host}/push/roundtrip:1")
    events: list[ProgressEvent] = []
    res = await push(store, image, dest, events=events.append)
    assert [e.status for e in events].count("Pushed") == 2
    raw = _raw_manifest(str(dest))
    assert raw == image.manifest.raw and res.digest == sha256_bytes(raw)
    assert res.size == len(raw)
    assert store.resolve(f"{dest.name}@{res.digest}").id == image.id  # RepoDigest
    assert not diff_trees(ri.exported_tree(store, image), ri.umoci_tree(str(dest), tmp_path))


async def test_repush_of_a_pulled_image_keeps_its_digest_and_mounts(
        store: Store, registry: rh.RegistryProcess, registry_images: dict[str, Any],
        registry_env: Any) -> None:
    info = registry_images["docker-gzip"]
    pulled = await pull(store, reference.parse(info["ref"]))
    assert pulled.image.manifest_desc.media_type == oci.DOCKER_MANIFEST
    dest = reference.parse(f"{registry.host}/push/copy-of-docker:2")
    events: list[ProgressEvent] = []
    res = await push(store, pulled.image, dest, events=events.append)
    assert res.digest == pulled.digest and res.mounted == 3 and res.pushed == 0
    assert {e.status for e in events} == {"Preparing", "Mounted from test/docker-gzip"}
    assert sha256_bytes(_raw_manifest(str(dest))) == pulled.digest
    events.clear()
    again = await push(store, pulled.image, dest.with_tag("3"), events=events.append)
    assert again.existed == 3 and again.digest == pulled.digest
    assert {e.status for e in events} == {"Preparing", "Layer already exists"}


async def test_push_of_an_imported_image(store: Store, tmp_path: Path,
                                         registry: rh.RegistryProcess,
                                         registry_env: Any) -> None:
    require_tool("umoci")
    require_root()
    rootfs = b.tar_bytes([b.d("etc"), b.file("etc/hostname", b"imported\n"),
                          b.sym("etc/alias", "hostname")])
    image = store.import_rootfs(io.BytesIO(rootfs), "imported:1")
    assert image.manifest.layers[0].media_type == oci.OCI_LAYER
    dest = reference.parse(f"{registry.host}/push/imported:1")
    await push(store, image, dest)
    manifest = json.loads(_raw_manifest(str(dest)))
    layer = manifest["layers"][0]
    assert layer["mediaType"] == oci.OCI_LAYER and layer["digest"] == str(image.diff_ids[0])
    assert registry.blob_path(layer["digest"]).read_bytes() == rootfs
    assert not diff_trees(ri.exported_tree(store, image), ri.umoci_tree(str(dest), tmp_path))


async def test_chunked_upload_resumes_after_416(store: Store, tmp_path: Path,
                                                fault_proxy: rh.FaultProxy,
                                                registry_env: Any) -> None:
    image = _loaded(store, tmp_path, [_random_layer(1 << 20)], compression="none")
    size = image.manifest.layers[0].size
    dest = reference.parse(f"{fault_proxy.host}/push/chunked:1")
    fault_proxy.add("PATCH", "/blobs/uploads/", "pass")  # the first chunk goes through
    fault_proxy.add("PATCH", "/blobs/uploads/", "status", status=416)  # the second: 416
    async with open_transport(retry=FAST) as t:
        await push(store, image, dest, transport=t, chunk_size=256 << 10)
    patches = fault_proxy.requests("PATCH", "/blobs/uploads/")
    assert [p.status for p in patches][:2] == [202, 416]
    ranges = [p.headers["content-range"] for p in patches]
    assert ranges[1] == ranges[2] == f"{256 << 10}-{(512 << 10) - 1}"  # resumed, not redone
    status = fault_proxy.requests("GET", "/blobs/uploads/")
    assert len(status) == 1 and status[0].status == 204
    assert len(patches) == 1 + (size + (256 << 10) - 1) // (256 << 10)
    assert _raw_manifest(f"{fault_proxy.host}/push/chunked:1") == image.manifest.raw


async def test_chunked_upload_starts_over_when_the_session_is_lost(
        store: Store, tmp_path: Path, fault_proxy: rh.FaultProxy, registry_env: Any) -> None:
    """The registry took a chunk but the answer was lost: distribution 2.8 cancels a session
    resumed with a stale state, so the upload starts over (and succeeds)."""
    image = _loaded(store, tmp_path, [_random_layer(1 << 20, "other.bin")], compression="none")
    dest = reference.parse(f"{fault_proxy.host}/push/restart:1")
    fault_proxy.add("PATCH", "/blobs/uploads/", "pass")
    fault_proxy.add("PATCH", "/blobs/uploads/", "cut_request")
    async with open_transport(retry=FAST) as t:
        await push(store, image, dest, transport=t, chunk_size=256 << 10)
    layer = str(image.manifest.layers[0].digest)
    starts = fault_proxy.requests("POST", "/blobs/uploads/")
    assert len(starts) == 3  # the layer twice, the config once
    assert [s.status for s in fault_proxy.requests("GET", "/blobs/uploads/")] == [404]
    assert _raw_manifest(f"{fault_proxy.host}/push/restart:1") == image.manifest.raw
    assert fault_proxy.requests("HEAD", f"/blobs/{layer}")


async def test_manifest_put_is_retried_and_wrong_digest_refused(
        store: Store, tmp_path: Path, fault_proxy: rh.FaultProxy, registry_env: Any) -> None:
    image = _loaded(store, tmp_path, [b.tar_bytes([b.file("x", b"manifest retry")])])
    fault_proxy.add("PUT", "/manifests/1", "status", status=500)
    async with open_transport(retry=FAST) as t:
        res = await push(store, image, reference.parse(f"{fault_proxy.host}/push/m:1"),
                         transport=t)
        assert [r.status for r in fault_proxy.requests("PUT", "/manifests/1")] == [500, 201]
        assert res.digest == image.manifest_desc.digest
        with pytest.raises(Exception, match="manifest digest is"):
            await push(store, image, reference.parse(
                f"{fault_proxy.host}/push/m@sha256:{'1' * 64}"), transport=t)
