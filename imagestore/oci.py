"""OCI and Docker image JSON: media types, descriptors, manifests, indexes, configs, platforms.

Values are frozen dataclasses parsed from the exact bytes received; ``raw`` keeps those bytes,
because digests are over bytes and JSON is never re-serialised before hashing.  New documents
(a synthesised manifest, a committed config) are written by ``dumps`` in a fixed, compact form.

Caveats:
* Parsing is defensive (issue: hostile images): size limits, layer-count limit, recursion and
  number errors all become ``InvalidImage``; schema 1 becomes ``Unsupported``.
* Configs are kept as parsed dicts in their original key order; transforms return new dicts and
  never drop unknown keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest, parse_digest
from .errors import InvalidImage, InvalidReference, Unsupported

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
DOCKER_LAYER_ZSTD = DOCKER_LAYER + ".zstd"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

LAYER_TYPES = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_ND: "none",
    OCI_LAYER_ND + "+gzip": "gzip",
    OCI_LAYER_ND + "+zstd": "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN_GZIP: "gzip",
}
_OCI_LAYER_FOR = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
_DOCKER_LAYER_FOR = {"none": DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP, "zstd": DOCKER_LAYER_ZSTD}

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

MAX_DOCUMENT = 4 << 20  # distribution's manifest size limit
MAX_LAYERS = 500  # kernel overlayfs' stack limit; beyond it a union is not a rootfs
MAX_DEPTH = 64  # JSON nesting; image documents use about 5 levels
_MAX_SIZE = (1 << 63) - 1


def layer_media_type(compression: str, oci: bool = True) -> str:
    return (_OCI_LAYER_FOR if oci else _DOCKER_LAYER_FOR)[compression]


def dumps(obj: Any) -> bytes:
    """Compact JSON as strata writes it (key order as given)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: bytes, what: str) -> Any:
    """Parse an image document: at most ``MAX_DOCUMENT`` bytes and ``MAX_DEPTH`` levels of
    nesting (a deeper document parses, then breaks every recursive use of it: copies,
    comparisons, printing); numbers of more than 4300 digits are refused by Python."""
    if len(raw) > MAX_DOCUMENT:
        raise InvalidImage(f"{what} is larger than {MAX_DOCUMENT} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidImage(f"{what} is not valid JSON: {str(exc)[:80]}") from None
    if _depth_exceeds(doc, MAX_DEPTH):
        raise InvalidImage(f"{what} nests deeper than {MAX_DEPTH} levels")
    return doc


def _depth_exceeds(doc: Any, limit: int) -> bool:
    todo: list[tuple[Any, int]] = [(doc, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        todo.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return False


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidImage(f"{what} is not a JSON object")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    d = _obj(value, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise InvalidImage(f"{what} must map strings to strings")
    return dict(d)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return out + (f"/{self.variant}" if self.variant else "")

    def to_json(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            d["os.version"] = self.os_version
        if self.variant:
            d["variant"] = self.variant
        return d

    @classmethod
    def from_json(cls, value: Any) -> Platform:
        d = _obj(value, "platform")
        os_, arch = d.get("os"), d.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            raise InvalidImage("platform needs os and architecture strings")
        variant = d.get("variant") or ""
        version = d.get("os.version") or ""
        if not isinstance(variant, str) or not isinstance(version, str):
            raise InvalidImage("platform variant and os.version must be strings")
        return cls(os_, arch, variant, version)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]`` as docker's ``--platform`` takes it."""
        parts = text.strip().lower().split("/")
        if len(parts) == 1 and parts[0]:
            if parts[0] in ("linux", "windows", "darwin", "freebsd"):
                host = host_platform()
                return cls(parts[0], host.architecture, host.variant)
            return cls("linux", *_normalize_arch(parts[0]))
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidReference(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        arch, variant = _normalize_arch(parts[1], parts[2] if len(parts) == 3 else "")
        return cls(parts[0], arch, variant)

    def normalized(self) -> Platform:
        arch, variant = _normalize_arch(self.architecture, self.variant)
        return Platform(self.os, arch, variant, self.os_version)


_ARCH_ALIASES = {
    "x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "aarch64": ("arm64", ""),
    "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "i386": ("386", ""), "i686": ("386", ""),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def _normalize_arch(arch: str, variant: str = "") -> tuple[str, str]:
    if arch in _ARCH_ALIASES:
        arch, alias_variant = _ARCH_ALIASES[arch]
        variant = variant or alias_variant
    if arch == "arm64" and variant in ("8", "v8"):
        variant = ""
    if arch == "amd64" and variant in ("v1",):
        variant = ""
    return arch, variant


def host_platform() -> Platform:
    arch, variant = _normalize_arch(os.uname().machine.lower())
    return Platform("linux", arch, variant)


def _variant_rank(want: Platform, have: Platform) -> int | None:
    """0 for an exact variant, n for the n-th compatible lower one, None for no match."""
    w, h = want.normalized(), have.normalized()
    if w.os != h.os or w.architecture != h.architecture:
        return None
    wv = w.variant or _DEFAULT_VARIANT.get(w.architecture, "")
    hv = h.variant or _DEFAULT_VARIANT.get(h.architecture, "")
    if wv == hv:
        return 0
    if w.architecture in ("arm", "amd64") and wv[1:].isdigit() and hv[1:].isdigit():
        diff = int(wv[1:]) - int(hv[1:])
        return diff if diff > 0 else None
    return None


def select_platform(manifests: Sequence[Descriptor], want: Platform) -> Descriptor | None:
    """containerd's choice: exact variant first, then the closest lower one; index order breaks
    ties; ``unknown/unknown`` (attestations) never matches."""
    best: tuple[int, int, Descriptor] | None = None
    for pos, desc in enumerate(manifests):
        p = desc.platform
        if p is None or (p.os == "unknown" and p.architecture == "unknown"):
            continue
        rank = _variant_rank(want, p)
        if rank is not None and (best is None or (rank, pos) < best[:2]):
            best = (rank, pos, desc)
    return best[2] if best else None


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        return d

    @classmethod
    def from_json(cls, value: Any, what: str = "descriptor") -> Descriptor:
        d = _obj(value, what)
        mt, dg, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mt, str) or not isinstance(dg, str):
            raise InvalidImage(f"{what} needs mediaType and digest strings")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
            raise InvalidImage(f"{what} has an invalid size")
        try:
            digest = parse_digest(dg)
        except InvalidReference as exc:
            raise InvalidImage(f"{what}: {exc}") from None
        urls = d.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InvalidImage(f"{what} has invalid urls")
        plat = Platform.from_json(d["platform"]) if d.get("platform") is not None else None
        return cls(mt, digest, size, _str_map(d.get("annotations"), f"{what} annotations"),
                   plat, tuple(urls))


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes

    @property
    def is_oci(self) -> bool:
        return self.media_type == OCI_MANIFEST


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes


def _schema2(d: dict[str, Any], what: str) -> None:
    if d.get("schemaVersion") == 1:
        raise Unsupported(f"{what} is a schema 1 manifest, which is deprecated and not supported")
    if d.get("schemaVersion") != 2:
        raise InvalidImage(f"{what} has unsupported schemaVersion {d.get('schemaVersion')!r}")


def _media_type(d: dict[str, Any], content_type: str | None, what: str) -> str:
    field_type = d.get("mediaType")
    if field_type is not None and not isinstance(field_type, str):
        raise InvalidImage(f"{what} has a non-string mediaType")
    if content_type in SCHEMA1 or field_type in SCHEMA1:
        raise Unsupported(f"{what} is a schema 1 manifest, which is deprecated and not supported")
    if field_type and content_type and field_type != content_type:
        raise InvalidImage(f"{what} says mediaType {field_type} but was served as {content_type}")
    mt = field_type or content_type
    if mt is None:
        if "manifests" in d:
            return OCI_INDEX
        if "config" in d:
            return OCI_MANIFEST
        raise InvalidImage(f"{what} has no media type")
    return mt


def parse_document(raw: bytes, content_type: str | None = None,
                   what: str = "manifest") -> Manifest | Index:
    """Parse a manifest or index from its exact bytes."""
    d = _obj(loads(raw, what), what)
    if d.get("schemaVersion") == 1:
        _schema2(d, what)
    mt = _media_type(d, content_type, what)
    _schema2(d, what)
    if mt in INDEX_TYPES:
        items = d.get("manifests")
        if not isinstance(items, list):
            raise InvalidImage(f"{what}: an index needs a manifests list")
        if len(items) > 10_000:
            raise InvalidImage(f"{what} lists too many manifests ({len(items)})")
        descs = tuple(Descriptor.from_json(m, f"{what} entry") for m in items)
        return Index(mt, descs, _str_map(d.get("annotations"), "annotations"), raw)
    if mt in MANIFEST_TYPES:
        config = Descriptor.from_json(d.get("config"), f"{what} config")
        layers = d.get("layers")
        if not isinstance(layers, list):
            raise InvalidImage(f"{what} needs a layers list")
        if len(layers) > MAX_LAYERS:
            raise InvalidImage(
                f"{what} has {len(layers)} layers; at most {MAX_LAYERS} are supported")
        descs = tuple(Descriptor.from_json(x, f"{what} layer") for x in layers)
        return Manifest(mt, config, descs, _str_map(d.get("annotations"), "annotations"), raw)
    raise Unsupported(f"{what} has unsupported media type {mt}")


def parse_manifest(raw: bytes, content_type: str | None = None) -> Manifest:
    doc = parse_document(raw, content_type)
    if not isinstance(doc, Manifest):
        raise InvalidImage("expected an image manifest, found an index")
    return doc


def manifest_bytes(config: Descriptor, layers: Sequence[Descriptor], oci: bool = True,
                   annotations: Mapping[str, str] | None = None) -> bytes:
    d: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.to_json(),
        "layers": [x.to_json() for x in layers],
    }
    if annotations:
        d["annotations"] = dict(annotations)
    return dumps(d)


def index_bytes(manifests: Sequence[Descriptor]) -> bytes:
    return dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                  "manifests": [m.to_json() for m in manifests]})


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _obj_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())


# the runtime fields strata reads and changes, typed as Go's image-spec structs type them
# (a mistyped field fails docker's unmarshal too); unknown fields are kept as they are
_RUNTIME_TYPES: dict[str, Any] = {
    "User": lambda v: isinstance(v, str), "WorkingDir": lambda v: isinstance(v, str),
    "StopSignal": lambda v: isinstance(v, str), "Env": _strs, "OnBuild": _strs,
    "Cmd": lambda v: isinstance(v, str) or _strs(v),  # a StrSlice: a string or a list
    "Entrypoint": lambda v: isinstance(v, str) or _strs(v),
    "Shell": _strs, "Labels": _str_dict, "ExposedPorts": _obj_dict, "Volumes": _obj_dict,
    "Healthcheck": lambda v: isinstance(v, dict), "ArgsEscaped": lambda v: isinstance(v, bool),
}


@dataclass(frozen=True)
class ImageConfig:
    """An image config: its exact bytes and the parsed object (original key order)."""

    raw: bytes
    data: Mapping[str, Any]
    digest: Digest

    @classmethod
    def parse(cls, raw: bytes, digest: Digest) -> ImageConfig:
        d = _obj(loads(raw, "image config"), "image config")
        rootfs = d.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise InvalidImage("image config has no rootfs.diff_ids")
        ids = rootfs["diff_ids"]
        if len(ids) > MAX_LAYERS:
            raise InvalidImage(f"image config has {len(ids)} layers; at most {MAX_LAYERS}")
        for x in ids:
            if not isinstance(x, str):
                raise InvalidImage("image config diff_ids must be strings")
            try:
                parse_digest(x)
            except InvalidReference as exc:
                raise InvalidImage(f"image config: {exc}") from None
        runtime = d.get("config")
        if runtime is not None and not isinstance(runtime, dict):
            raise InvalidImage("image config field config has the wrong type")
        for key, ok in _RUNTIME_TYPES.items():
            if runtime is not None and runtime.get(key) is not None and not ok(runtime[key]):
                raise InvalidImage(f"image config field config.{key} has the wrong type")
        hist = d.get("history")
        if hist is not None and (not isinstance(hist, list)
                                 or not all(isinstance(h, dict) for h in hist)):
            raise InvalidImage("image config history must be a list of objects")
        for h in hist or []:
            for key in ("created", "created_by", "author", "comment"):
                if h.get(key) is not None and not isinstance(h[key], str):
                    raise InvalidImage(f"image config history field {key} has the wrong type")
        return cls(raw, d, digest)

    @property
    def diff_ids(self) -> list[Digest]:
        return [Digest(x) for x in self.data["rootfs"]["diff_ids"]]

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.data.get("history") or [])

    @property
    def container_config(self) -> dict[str, Any]:
        c = self.data.get("config")
        return dict(c) if isinstance(c, dict) else {}

    def field(self, name: str) -> str:
        v = self.data.get(name)
        return v if isinstance(v, str) else ""

    @property
    def platform(self) -> Platform:
        return Platform(self.field("os"), self.field("architecture"), self.field("variant"),
                        self.field("os.version"))

    @property
    def labels(self) -> dict[str, str]:
        labels = self.container_config.get("Labels")
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


# image-spec 1.1.0-rc2 as vendored by skopeo 1.9 (Debian 12): variant sits before os
_CONFIG_ORDER = ("created", "author", "architecture", "variant", "os", "os.version",
                 "os.features", "config", "rootfs", "history")
_RUNTIME_ORDER = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir",
                  "Labels", "StopSignal", "ArgsEscaped")
_HISTORY_ORDER = ("created", "created_by", "author", "comment", "empty_layer")
_MAPS = ("ExposedPorts", "Volumes", "Labels")


def _ordered(d: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    out = {k: d[k] for k in order if k in d and d[k] not in (None, "", [], {}, False)}
    out.update((k, v) for k, v in d.items() if k not in order and v not in (None, "", [], {}))
    return out


def go_json(obj: Any) -> bytes:
    """Compact JSON escaped as Go's encoding/json does (<, >, &, U+2028/9)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def canonical_config(config: Mapping[str, Any]) -> bytes:
    """An image config laid out as Go marshals image-spec's ``Image`` (field order, omitempty,
    sorted maps), so tools that re-marshal it (skopeo converting Docker to OCI) keep its
    digest.  Extra keys are kept after the known ones."""
    d = dict(config)
    runtime = dict(d.get("config") or {})
    for key in _MAPS:
        if isinstance(runtime.get(key), dict):
            runtime[key] = dict(sorted(runtime[key].items()))
    d["config"] = _ordered(runtime, _RUNTIME_ORDER)
    if "history" in d:
        d["history"] = [_ordered(h, _HISTORY_ORDER) for h in d["history"]]
    out = _ordered(d, _CONFIG_ORDER)
    out.setdefault("architecture", "")
    out.setdefault("os", "")
    out["config"] = d["config"]
    out["rootfs"] = {"type": d["rootfs"].get("type", "layers"),
                     "diff_ids": list(d["rootfs"]["diff_ids"])}
    return go_json(_ordered(out, _CONFIG_ORDER))
