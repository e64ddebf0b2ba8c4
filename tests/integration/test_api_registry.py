"""``Store.pull``/``push`` (and their trio forms) against a real docker-registry: the progress
events a caller draws from, and the typed results and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagestore import NotFound, ProgressEvent, Store
from imagestore.progress import short

pytestmark = [pytest.mark.registry]


def test_pull_and_push_report_progress(store_root: Path, registry_images: dict[str, Any],
                                       registry_env: dict[str, Path]) -> None:
    s = Store(str(store_root))
    info = registry_images["oci-gzip"]
    events: list[ProgressEvent] = []
    result = s.pull(info["ref"], progress=events.append)
    assert [str(d) for d in result.image.diff_ids] == info["diff_ids"]
    assert events[0] == ProgressEvent("pull", "", "1: Pulling from test/oci-gzip")
    layers = {short(d) for d in info["layers"]}
    for layer in layers:  # every layer: announced, downloaded with its size, completed
        mine = [e for e in events if e.layer == layer]
        assert mine[0].status == "Pulling fs layer" and mine[-1].status == "Pull complete"
        sizes = {e.total_bytes for e in mine if e.status == "Downloading"}
        assert len(sizes) == 1 and sizes.pop()
    assert {e.operation for e in events} == {"pull"}

    again: list[ProgressEvent] = []
    assert s.pull(info["ref"], progress=again.append).up_to_date
    assert {e.status for e in again if e.layer} == {"Already exists"}

    host = info["ref"].split("/")[0]
    pushed: list[ProgressEvent] = []
    out = s.push(result.image, f"{host}/api/copy:2", progress=pushed.append)
    assert out.digest == result.image.manifest_desc.digest  # the stored bytes, unchanged
    for layer in layers:
        mine = [e.status for e in pushed if e.layer == layer]
        assert mine[0] == "Preparing" and mine[-1] in ("Pushed", "Mounted from test/oci-gzip")


async def test_pull_async_and_typed_errors(store_root: Path, registry_images: dict[str, Any],
                                           registry_env: dict[str, Path]) -> None:
    s = Store(str(store_root))
    host = registry_images["zstd"]["ref"].split("/")[0]
    result = await s.pull_async(registry_images["zstd"]["ref"])
    assert result.image.tags[0].familiar == registry_images["zstd"]["ref"]
    with pytest.raises(NotFound):
        await s.pull_async(f"{host}/test/no-such-repo:1")
    out = await s.push_async(registry_images["zstd"]["ref"], f"{host}/api/zstd:1")
    assert out.ref.familiar == f"{host}/api/zstd:1"
