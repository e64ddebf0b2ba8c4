"""Pulls through a fault proxy in front of a real registry: a cut connection resumes with
Range, a corrupt partial file or blob is refused and never stored, 5xx/429 are retried,
redirects to another host get no credentials, bad manifests are refused clearly."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from imagestore import Store, gc, reference
from imagestore.digest import Digest, parse_digest
from imagestore.errors import DigestMismatch, InvalidImage, Unsupported
from imagestore.registry import RetryPolicy, open_transport, pull
from tests import registry_helpers as rh
from tests.builders import listing
from tests.conftest import REGISTRY_USERS

pytestmark = [pytest.mark.registry]

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)
CUT = 300_000


def _big(info: dict[str, Any]) -> str:
    return str(info["layers"][0])  # the busybox layer, about 1 MB gzipped


def parse(d: str) -> Digest:
    return parse_digest(d)


def _nothing_stored(store: Store) -> None:
    assert store.images() == []
    assert list(store.blobs.digests()) == []
    assert store.layers.diff_ids() == []


async def test_cut_connection_resumes_with_range(store: Store, fault_proxy: rh.FaultProxy,
                                                 registry_images: dict[str, Any],
                                                 registry_env: Any,
                                                 registry: rh.RegistryProcess) -> None:
    info = registry_images["oci-gzip"]
    big = _big(info)
    size = registry.blob_path(big).stat().st_size
    fault_proxy.add("GET", f"/blobs/{big}", "cut", after=CUT)
    async with open_transport(retry=FAST) as t:
        res = await pull(store, reference.parse(f"{fault_proxy.host}/test/oci-gzip:1"),
                         transport=t)
    reqs = fault_proxy.requests("GET", f"/blobs/{big}")
    assert [r.headers.get("range") for r in reqs] == [None, f"bytes={CUT}-"]
    assert [r.status for r in reqs] == [200, 206]
    assert [r.sent for r in reqs] == [CUT, size - CUT]  # nothing fetched twice
    assert store.blobs.verify(parse(big)) and res.image.manifest.layers[0].digest == big
    assert not os.listdir(store.blobs.tmp_dir)


async def test_interrupted_pull_resumes_from_the_partial_file(
        store: Store, fault_proxy: rh.FaultProxy, registry_images: dict[str, Any],
        registry_env: Any, registry: rh.RegistryProcess) -> None:
    """Cancelled mid-blob (as Ctrl-C does): nothing visible, a partial file kept; the next
    pull asks only for the rest."""
    info = registry_images["oci-gzip"]
    big = _big(info)
    size = registry.blob_path(big).stat().st_size
    release = threading.Event()
    fault_proxy.add("GET", f"/blobs/{big}", "cut", after=CUT)
    fault_proxy.add("GET", f"/blobs/{big}", "hang", event=release)
    ref = reference.parse(f"{fault_proxy.host}/test/oci-gzip:1")
    try:
        with trio.CancelScope() as cs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pull, store, ref)
                while len(fault_proxy.requests("GET", f"/blobs/{big}")) < 2:
                    await trio.sleep(0.02)
                cs.cancel()
    finally:
        release.set()
    assert store.images() == [] and not store.blobs.has(parse(big))
    partial = Path(store.blobs.tmp_dir, f"partial-{big[7:]}")
    assert partial.stat().st_size == CUT
    assert [n for n in os.listdir(store.blobs.tmp_dir) if not n.startswith("partial-")] == []
    gc.collect(store, wait=True)  # garbage collection keeps partial files
    assert partial.exists()
    before = len(fault_proxy.requests("GET", f"/blobs/{big}"))
    await pull(store, ref)
    again = fault_proxy.requests("GET", f"/blobs/{big}")[before:]
    assert [(r.headers.get("range"), r.sent) for r in again] == [(f"bytes={CUT}-", size - CUT)]
    assert store.blobs.verify(parse(big)) and not partial.exists()


async def test_corrupt_partial_file_is_discarded_and_fetched_again(
        store: Store, fault_proxy: rh.FaultProxy, registry_images: dict[str, Any],
        registry_env: Any, registry: rh.RegistryProcess) -> None:
    info = registry_images["oci-gzip"]
    big = _big(info)
    size = registry.blob_path(big).stat().st_size
    partial = Path(store.blobs.tmp_dir, f"partial-{big[7:]}")
    partial.write_bytes(b"\x1f\x8b garbage from a previous life" * 100)
    await pull(store, reference.parse(f"{fault_proxy.host}/test/oci-gzip:1"))
    reqs = fault_proxy.requests("GET", f"/blobs/{big}")
    assert [r.headers.get("range") for r in reqs] == ["bytes=3100-", None]
    assert reqs[1].sent == size and store.blobs.verify(parse(big))


async def test_wrong_content_is_rejected_and_not_stored(
        store: Store, fault_proxy: rh.FaultProxy, registry_images: dict[str, Any],
        registry_env: Any) -> None:
    info = registry_images["oci-gzip"]
    fault_proxy.add("GET", f"/blobs/{_big(info)}", "corrupt", times=5)
    before = listing(store.root)
    with pytest.raises(DigestMismatch, match="digest mismatch"):
        await pull(store, reference.parse(f"{fault_proxy.host}/test/oci-gzip:1"))
    assert store.images() == [] and not store.blobs.has(parse(_big(info)))
    assert not store.layers.has(parse(info["diff_ids"][0]))
    assert not os.listdir(store.blobs.tmp_dir)  # no partial file of known-bad content
    assert {k for k in listing(store.root) if k.startswith("state")} == \
        {k for k in before if k.startswith("state")}


async def test_wrong_config_and_manifest_are_rejected(
        store: Store, fault_proxy: rh.FaultProxy, registry_images: dict[str, Any],
        registry_env: Any) -> None:
    info = registry_images["oci-gzip"]
    ref = reference.parse(f"{fault_proxy.host}/test/oci-gzip:1")
    fault_proxy.add("GET", f"/blobs/{info['config']}", "corrupt")
    with pytest.raises(DigestMismatch):
        await pull(store, ref)
    fault_proxy.add("GET", "/manifests/1", "corrupt")  # Docker-Content-Digest disagrees
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest|registry says"):
        await pull(store, ref)
    _nothing_stored(store)


async def test_schema1_and_foreign_content_types_are_refused(
        store: Store, fault_proxy: rh.FaultProxy, registry_images: dict[str, Any],
        registry_env: Any) -> None:
    ref = reference.parse(f"{fault_proxy.host}/test/oci-gzip:1")
    fault_proxy.add("GET", "/manifests/1", "schema1")
    with pytest.raises(Unsupported, match="schema 1"):
        await pull(store, ref)
    fault_proxy.add("GET", "/manifests/1", "content_type", value="text/html")
    with pytest.raises(InvalidImage, match="text/html, which is not a manifest type"):
        await pull(store, ref)
    accept = fault_proxy.requests("GET", "/manifests/1")[0].headers["accept"]
    for media in ("application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"):
        assert media in accept
    _nothing_stored(store)


async def test_5xx_and_429_are_retried(store: Store, fault_proxy: rh.FaultProxy,
                                       registry_images: dict[str, Any], registry_env: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    info = registry_images["oci-gzip"]
    small = str(info["layers"][1])
    fault_proxy.add("GET", "/manifests/1", "status", times=2, status=500)
    fault_proxy.add("GET", f"/blobs/{small}", "status", status=429,
                    headers={"Retry-After": "1"})
    fault_proxy.add("GET", f"/blobs/{info['config']}", "status", status=503)
    caplog.set_level(logging.INFO, "imagestore.registry")
    start = trio.current_time()
    async with open_transport(retry=FAST) as t:
        await pull(store, reference.parse(f"{fault_proxy.host}/test/oci-gzip:1"), transport=t)
    assert trio.current_time() - start >= 1.0  # Retry-After: 1 was honoured
    assert [r.status for r in fault_proxy.requests("GET", "/manifests/1")] == [500, 500, 200]
    assert [r.status for r in fault_proxy.requests("GET", f"/blobs/{small}")] == [429, 200]
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 4
    assert any("status 429" in m and "in 1.0s" in m for m in retries)


async def test_5xx_gives_up_after_the_retries(store: Store, fault_proxy: rh.FaultProxy,
                                              registry_images: dict[str, Any],
                                              registry_env: Any) -> None:
    fault_proxy.add("GET", "/manifests/1", "status", times=10, status=502)
    async with open_transport(retry=FAST) as t:
        with pytest.raises(Exception, match="HTTP 502|unknown: injected"):
            await pull(store, reference.parse(f"{fault_proxy.host}/test/oci-gzip:1"),
                       transport=t)
    assert len(fault_proxy.requests("GET", "/manifests/1")) == FAST.attempts + 1
    _nothing_stored(store)


async def test_redirect_to_another_host_gets_no_authorization(
        store: Store, auth_registry: rh.RegistryProcess,
        registry_env: dict[str, Path]) -> None:
    reg, creds = auth_registry, f"alice:{REGISTRY_USERS['alice']}"
    proxy = rh.FaultProxy(reg)
    try:
        config = {"auths": {proxy.host: {"auth": base64.b64encode(creds.encode()).decode()}}}
        (registry_env["DOCKER_CONFIG"] / "config.json").write_text(json.dumps(config))
        proxy.add("GET", r"/blobs/sha256:", "redirect", times=99)
        res = await pull(store, reference.parse(f"{proxy.host}/private/img:1"))
        cdn = proxy.requests("GET", listener="cdn")
        assert len(cdn) == 2 and all(r.status == 200 for r in cdn)  # config + layer
        assert not any("authorization" in r.headers for r in cdn)
        redirected = proxy.requests("GET", "/blobs/")
        assert redirected and all("authorization" in r.headers for r in redirected)
        assert res.image.repo_digests[0].startswith(f"{proxy.host}/private/img@")
    finally:
        proxy.close()
