"""Pull from a real docker-registry: every manifest type and layer compression, platform
selection from an index, digests and RepoDigests, and the rootfs compared with what skopeo +
umoci make of the same image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imagestore import ProgressEvent, Store, oci, reference
from imagestore.errors import Unsupported
from imagestore.registry import NotFound, pull
from tests.builders import diff_trees
from tests.conftest import require_root, require_tool
from tests.registry_images import exported_tree, umoci_tree

pytestmark = [pytest.mark.registry]

MEDIA = {"oci-gzip": (oci.OCI_MANIFEST, oci.OCI_LAYER_GZIP),
         "docker-gzip": (oci.DOCKER_MANIFEST, oci.DOCKER_LAYER_GZIP),
         "zstd": (oci.OCI_MANIFEST, oci.OCI_LAYER_ZSTD),
         "plain": (oci.OCI_MANIFEST, oci.OCI_LAYER)}


@pytest.mark.interop
@pytest.mark.parametrize("name", list(MEDIA))
async def test_pull_matches_skopeo_and_umoci(name: str, store: Store, tmp_path: Path,
                                             registry_images: dict[str, Any],
                                             registry_env: dict[str, Path]) -> None:
    require_tool("umoci")
    require_root()  # umoci keeps owners only as root
    info = registry_images[name]
    ref = reference.parse(info["ref"])
    events: list[ProgressEvent] = []
    result = await pull(store, ref, events=events.append)
    image = result.image
    manifest_type, layer_type = MEDIA[name]
    assert image.manifest_desc.media_type == manifest_type
    assert {d.media_type for d in image.manifest.layers} == {layer_type}
    assert [str(d) for d in image.diff_ids] == info["diff_ids"]
    assert image.repo_digests == (f"{ref.name}@{result.digest}",)
    assert image.tags == (ref,)
    assert not result.up_to_date and result.downloaded == 3
    for d in image.manifest.layers:  # the blobs are kept exactly as pulled
        assert store.blobs.verify(d.digest) and store.blobs.size(d.digest) == d.size
    statuses = {e.status for e in events}
    assert {"Pulling fs layer", "Downloading", "Verifying Checksum", "Download complete",
            "Pull complete"} <= statuses
    # umoci 0.4.7 cannot read zstd layers: skopeo recompresses them (same diff_ids) for it
    extra = ("--dest-compress", "--dest-compress-format", "gzip") if name == "zstd" else ()
    assert not diff_trees(exported_tree(store, image),
                          umoci_tree(info["ref"], tmp_path, *extra))
    assert not [n for n in Path(store.root, "tmp").iterdir()]


async def test_pull_twice_is_up_to_date_and_by_digest(store: Store, registry_env: Any,
                                                      registry_images: dict[str, Any]) -> None:
    info = registry_images["oci-gzip"]
    first = await pull(store, reference.parse(info["ref"]))
    assert first.digest == info["manifest"]
    events: list[ProgressEvent] = []
    again = await pull(store, reference.parse(info["ref"]), events=events.append)
    assert again.up_to_date and again.downloaded == 0 and again.image.id == first.image.id
    assert [e.status for e in events if e.layer] == ["Already exists"] * 3
    name = info["ref"].rpartition(":")[0]
    by_digest = await pull(store, reference.parse(f"{name}@{first.digest}"))
    assert by_digest.image.id == first.image.id and by_digest.up_to_date
    # the same layers under another name: nothing is downloaded
    other = registry_images["docker-gzip"]
    events.clear()
    res = await pull(store, reference.parse(other["ref"]), events=events.append)
    # skopeo's v2s2 conversion keeps the config bytes: the same image ID, another manifest
    assert res.image.id == first.image.id and res.digest != first.digest
    assert res.downloaded == 0 and len(res.image.repo_digests) == 2
    assert {e.status for e in events if e.layer} == {"Already exists"}


async def test_pull_by_wrong_digest_and_unknown_tag(store: Store, registry_env: Any,
                                                    registry_images: dict[str, Any]) -> None:
    name = registry_images["oci-gzip"]["ref"].rpartition(":")[0]
    with pytest.raises(NotFound, match="not found"):
        await pull(store, reference.parse(f"{name}@sha256:{'0' * 64}"))
    with pytest.raises(NotFound, match="manifest unknown"):
        await pull(store, reference.parse(f"{name}:nope"))
    assert store.images() == []


@pytest.mark.parametrize("want,arch", [(None, "amd64"), ("linux/arm64", "arm64"),
                                       ("linux/arm64/v8", "arm64"), ("linux/arm/v7", "arm/v7"),
                                       ("linux/arm/v8", "arm/v7")])
async def test_platform_selection(want: str | None, arch: str, store: Store,
                                  registry_images: dict[str, Any], registry_env: Any) -> None:
    if want is None and oci.host_platform().architecture != "amd64":
        pytest.skip("the default platform is the host's; this host is not amd64")
    info = registry_images["multi"]
    platform = oci.Platform.parse(want) if want else None
    result = await pull(store, reference.parse(info["ref"]), platform=platform)
    tree = exported_tree(store, result.image)
    assert tree["etc/arch"][4] == len(arch) + 1
    assert result.image.manifest_desc.digest == info["linux/" + arch]
    assert result.digest == info["index"]  # the RepoDigest names the index
    assert result.image.repo_digests == (f"{result.ref.name}@{info['index']}",)
    config = result.image.config
    assert (config.field("architecture") + ("/" + config.field("variant")
                                            if config.field("variant") else "")) == arch


async def test_no_matching_platform_lists_the_platforms(store: Store, registry_env: Any,
                                                        registry_images: dict[str, Any]) -> None:
    info = registry_images["multi"]
    with pytest.raises(Unsupported) as exc:
        await pull(store, reference.parse(info["ref"]),
                   platform=oci.Platform.parse("linux/s390x"))
    msg = str(exc.value)
    assert "linux/s390x" in msg and "linux/amd64, linux/arm64, linux/arm/v7" in msg
    assert "unknown" not in msg
    assert store.images() == []


async def test_explicit_platform_must_match_a_single_manifest(
        store: Store, registry_env: Any, registry_images: dict[str, Any]) -> None:
    info = registry_images["oci-gzip"]
    with pytest.raises(Unsupported, match="does not match the specified platform"):
        await pull(store, reference.parse(info["ref"]),
                   platform=oci.Platform.parse("linux/arm64"))


@pytest.mark.interop
async def test_multi_platform_child_matches_umoci(store: Store, tmp_path: Path,
                                                  registry_images: dict[str, Any],
                                                  registry_env: Any) -> None:
    require_tool("umoci")
    require_root()
    info = registry_images["multi"]
    result = await pull(store, reference.parse(info["ref"]),
                        platform=oci.Platform.parse("linux/arm/v7"))
    want = umoci_tree(info["ref"], tmp_path, "--override-arch", "arm", "--override-variant",
                      "v7")
    assert not diff_trees(exported_tree(store, result.image), want)


async def test_mirror_is_tried_first(store: Store, registry_env: dict[str, Path],
                                     registry_images: dict[str, Any], fault_proxy: Any,
                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A mirror listed for a registry serves the pull; a failing mirror falls back."""
    info = registry_images["oci-gzip"]
    ref = reference.parse(info["ref"])
    cfg = tmp_path / "registries.json"
    cfg.write_text(json.dumps({"mirrors": {ref.domain: [f"http://{fault_proxy.host}"]}}))
    monkeypatch.setenv("STRATA_REGISTRIES_CONFIG", str(cfg))
    res = await pull(store, ref)
    assert fault_proxy.requests("GET", "/manifests/1")
    assert len(fault_proxy.requests("GET", "/blobs/")) == 4  # config + 3 layers
    assert res.image.repo_digests == (f"{ref.name}@{info['manifest']}",)
    fault_proxy.add("GET", "/manifests/", "status", times=99, status=404)
    second = Store(str(tmp_path / "store2"))
    res = await pull(second, ref)  # the mirror fails: the registry itself serves
    assert res.digest == info["manifest"]
