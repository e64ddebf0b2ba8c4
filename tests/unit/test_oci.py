"""Manifests, indexes, configs and platform selection."""

from __future__ import annotations

import json

import pytest

from imagestore import oci
from imagestore.digest import Digest, sha256_bytes
from imagestore.errors import InvalidImage, Unsupported

D = "sha256:" + "b" * 64


def desc(plat: str | None, mt: str = oci.OCI_MANIFEST, ann: dict[str, str] | None = None
         ) -> oci.Descriptor:
    p = None
    if plat:
        parts = plat.split("/")
        p = oci.Platform(parts[0], parts[1], parts[2] if len(parts) > 2 else "")
    return oci.Descriptor(mt, Digest(D), 1, ann or {}, p)


@pytest.mark.parametrize("want, have, chosen", [
    ("linux/amd64", ["linux/arm64", "linux/amd64"], 1),
    ("linux/arm64", ["linux/arm64/v8", "linux/amd64"], 0),
    ("linux/arm64/v8", ["linux/arm64"], 0),
    ("linux/arm/v7", ["linux/arm/v6", "linux/arm/v7"], 1),
    ("linux/arm/v7", ["linux/arm/v5", "linux/arm/v6"], 1),
    ("linux/arm", ["linux/arm/v7"], 0),
    ("linux/arm/v6", ["linux/arm/v7"], None),
    ("linux/amd64/v3", ["linux/amd64"], 0),
    ("linux/amd64", ["unknown/unknown", "linux/amd64"], 1),
    ("linux/s390x", ["linux/amd64"], None),
])
def test_platform_selection(want: str, have: list[str], chosen: int | None) -> None:
    descs = [desc(h) for h in have]
    got = oci.select_platform(descs, oci.Platform.parse(want))
    assert (descs.index(got) if got is not None else None) == chosen


def test_attestations_never_match() -> None:
    att = desc("unknown/unknown", ann={"vnd.docker.reference.type": "attestation-manifest"})
    assert oci.select_platform([att], oci.Platform.parse("linux/amd64")) is None


def test_schema1_is_refused_clearly() -> None:
    raw = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    with pytest.raises(Unsupported, match="schema 1"):
        oci.parse_document(raw, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(Unsupported, match="schema 1"):
        oci.parse_document(raw)


def test_media_type_must_match_content_type() -> None:
    raw = oci.manifest_bytes(oci.Descriptor(oci.OCI_CONFIG, Digest(D), 2), [])
    with pytest.raises(InvalidImage, match="served as"):
        oci.parse_document(raw, oci.DOCKER_MANIFEST)
    assert isinstance(oci.parse_document(raw, oci.OCI_MANIFEST), oci.Manifest)


def test_manifest_without_media_type_takes_the_content_type() -> None:
    raw = json.dumps({"schemaVersion": 2, "config": {"mediaType": oci.OCI_CONFIG, "digest": D,
                                                     "size": 2}, "layers": []}).encode()
    m = oci.parse_manifest(raw, oci.OCI_MANIFEST)
    assert m.media_type == oci.OCI_MANIFEST and m.raw == raw


@pytest.mark.parametrize("raw", [
    b"{" * 100_000, b"[]", b'{"schemaVersion":2,"config":{},"layers":[]}',
    b'{"schemaVersion":2,"mediaType":"' + oci.OCI_MANIFEST.encode() +
    b'","config":{"mediaType":"x","digest":"' + D.encode() + b'","size":-1},"layers":[]}',
    b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"' + D.encode() +
    b'","size":1e400},"layers":[]}',
])
def test_hostile_documents_are_invalid(raw: bytes) -> None:
    with pytest.raises((InvalidImage, Unsupported)):
        oci.parse_document(raw, oci.OCI_MANIFEST)


def test_too_many_layers() -> None:
    layer = {"mediaType": oci.OCI_LAYER, "digest": D, "size": 1}
    raw = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                      "config": layer, "layers": [layer] * 5000}).encode()
    with pytest.raises(InvalidImage, match="at most"):
        oci.parse_document(raw)


def test_config_checks_diff_ids() -> None:
    with pytest.raises(InvalidImage):
        oci.ImageConfig.parse(b'{"rootfs":{"diff_ids":["nope"]}}', Digest(D))
    raw = b'{"rootfs":{"type":"layers","diff_ids":["' + D.encode() + b'"]},"os":"linux"}'
    assert oci.ImageConfig.parse(raw, sha256_bytes(raw)).diff_ids == [D]


def test_canonical_config_is_go_shaped() -> None:
    cfg = {"rootfs": {"diff_ids": [D], "type": "layers"}, "os": "linux",
           "architecture": "arm", "variant": "v7", "created": "2024-01-01T00:00:00Z",
           "config": {"Labels": {"b": "<&>", "a": "1"}, "Cmd": ["sh"], "Env": []},
           "history": [{"comment": "c", "created": "2024-01-01T00:00:00Z"}]}
    out = oci.canonical_config(cfg)
    assert out == (
        b'{"created":"2024-01-01T00:00:00Z","architecture":"arm","variant":"v7","os":"linux",'
        b'"config":{"Cmd":["sh"],"Labels":{"a":"1","b":"\\u003c\\u0026\\u003e"}},'
        b'"rootfs":{"type":"layers","diff_ids":["' + D.encode() + b'"]},'
        b'"history":[{"created":"2024-01-01T00:00:00Z","comment":"c"}]}')
