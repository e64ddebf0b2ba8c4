"""The steps of a pull that need no event loop: its GETs over ``client.Registry`` — manifests
(by tag or digest, an index resolved to one platform, mirrors first), the config, byte
ranges, each checked — the checks of what came, and the image's record.

The coroutines await only the registry client, never the event loop itself, so they run
under trio (``pulling``, ``lazypull``, ``rangefetch``) and without it (``quickpull``, through
``runtime.run_sync``) alike.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from .. import oci
from ..digest import Digest, Hasher, new_hasher, parse_digest
from ..errors import DigestMismatch, InvalidImage, InvalidReference, StoreError, Unsupported
from ..reference import Reference
from .client import Registry, Transport, read_limited
from .errors import RegistryError

if TYPE_CHECKING:
    from ..api import Store
    from ..images import Image

log = logging.getLogger(__name__)

MAX_CONFIG = 8 << 20


@dataclass(frozen=True)
class Source:
    """Where a blob is fetched from: the reference's domain, API host and repository path."""

    domain: str
    api_host: str
    path: str

    @classmethod
    def from_json(cls, d: dict[str, str]) -> Source:
        return cls(d["domain"], d["api_host"], d["path"])

    def to_json(self) -> dict[str, str]:
        return {"domain": self.domain, "api_host": self.api_host, "path": self.path}


@dataclass(frozen=True)
class PullResult:
    image: Image
    ref: Reference
    digest: Digest  # of the manifest or index the reference named (the RepoDigest)
    up_to_date: bool
    downloaded: int  # layers fetched from the registry


def pull_scope(path: str) -> str:
    return f"repository:{path}:pull"


def _content_type(resp: httpx.Response) -> str:
    return str(resp.headers.get("content-type", "")).split(";")[0].strip().lower()


async def fetch_manifest(reg: Registry, path: str, reference: str, *, scopes: tuple[str, ...],
                         expect: Digest | None = None,
                         what: str = "manifest") -> tuple[oci.Manifest | oci.Index, Digest]:
    """One manifest or index by tag or digest, checked (type, digests) and parsed."""
    resp = await reg.request("GET", f"/v2/{path}/manifests/{reference}", scopes=scopes,
                             headers={"Accept": ", ".join(oci.ACCEPT)}, stream=True)
    if resp.status_code != 200:
        err = await reg.fail(resp, what)
        if err.status == 404:
            err.args = (f"{what} not found: {str(err).partition(': ')[2] or 'manifest unknown'}",)
        raise err
    body = await read_limited(resp, oci.MAX_DOCUMENT)
    ctype: str | None = _content_type(resp)
    if ctype in oci.SCHEMA1:
        raise Unsupported(f"{what} is a schema 1 manifest ({ctype}), which is deprecated and "
                          "not supported; push it again with a current tool")
    if ctype not in oci.ACCEPT:
        if ctype not in ("", "application/json", "text/plain", "application/octet-stream"):
            raise InvalidImage(f"{what} was served as {ctype}, which is not a manifest type")
        ctype = None
    header = resp.headers.get("docker-content-digest")
    claimed: Digest | None = None
    if header:
        try:
            claimed = parse_digest(header.strip())
        except InvalidReference:
            raise InvalidImage(f"{what}: registry sent an invalid Docker-Content-Digest "
                               f"{header!r}") from None
    h = new_hasher(expect or claimed)
    h.update(body)
    digest = h.digest
    if expect is not None and digest != expect:
        raise DigestMismatch(f"{what}: manifest digest mismatch: asked for {expect}, the "
                             f"content hashes to {digest}")
    if claimed is not None and digest != claimed:
        raise DigestMismatch(f"{what}: the registry says its digest is {claimed} but the "
                             f"content hashes to {digest}")
    if not digest.startswith("sha256:"):
        h = Hasher()
        h.update(body)
        digest = h.digest
    return oci.parse_document(body, ctype, what), digest


async def fetch_blob_bytes(reg: Registry, path: str, desc: oci.Descriptor,
                           scopes: tuple[str, ...], limit: int = MAX_CONFIG) -> bytes:
    """A small blob (a config) into memory, verified against ``desc``."""
    if desc.size > limit:
        raise InvalidImage(f"blob {desc.digest} is {desc.size} bytes; at most {limit} allowed")
    resp = await reg.request("GET", f"/v2/{path}/blobs/{desc.digest}", scopes=scopes,
                             headers={"Accept-Encoding": "identity"}, stream=True)
    if resp.status_code != 200:
        raise await reg.fail(resp, f"blob {desc.digest}")
    try:
        body = await read_limited(resp, desc.size)
    except RegistryError:
        raise DigestMismatch(f"blob {desc.digest} is larger than the {desc.size} bytes "
                             "expected") from None
    h = new_hasher(desc.digest)
    h.update(body)
    h.verify(desc.digest, desc.size)
    return body


async def resolve(transport: Transport, ref: Reference, scopes: tuple[str, ...]
                  ) -> tuple[Registry, oci.Manifest | oci.Index, Digest]:
    """The manifest or index ``ref`` names, from the first endpoint that has it (mirrors
    first; a failing mirror is left for the next endpoint): (that registry, it, its digest)."""
    target = ref.digest or ref.tag or "latest"
    for ep in transport.config.pull_endpoints(ref.domain, ref.api_host):
        reg = Registry(transport, ep)
        try:
            doc, digest = await fetch_manifest(reg, ref.path, target, scopes=scopes,
                                               expect=ref.digest,
                                               what=f"manifest for {ref.familiar}")
        except StoreError as exc:
            if not ep.mirror:
                raise
            log.info("mirror %s failed (%s); trying the next endpoint", ep.host, exc)
            continue
        return reg, doc, digest
    raise AssertionError("pull_endpoints always ends with the registry itself")


async def choose(reg: Registry, ref: Reference, doc: oci.Manifest | oci.Index,
                 platform: oci.Platform | None, scopes: tuple[str, ...]) -> oci.Manifest:
    """The manifest for ``platform`` (default: this host's) of ``doc``, by containerd's rules
    (``oci.select_platform``)."""
    want = platform or oci.host_platform()
    for _ in range(4):
        if isinstance(doc, oci.Manifest):
            return doc
        chosen = oci.select_platform(doc.manifests, want)
        if chosen is None:
            have = [str(m.platform) for m in doc.manifests if m.platform is not None
                    and (m.platform.os, m.platform.architecture) != ("unknown", "unknown")]
            raise Unsupported(f"no matching manifest for {want} in the manifest list "
                              f"entries (available: {', '.join(have) or 'none'})")
        doc, _ = await fetch_manifest(reg, ref.path, chosen.digest, scopes=scopes,
                                      expect=chosen.digest,
                                      what=f"manifest {chosen.digest} ({want})")
    raise InvalidImage(f"{ref.familiar}: indexes nested too deeply")


def check_image(ref: Reference, platform: oci.Platform | None, top: oci.Manifest | oci.Index,
                manifest: oci.Manifest, config: oci.ImageConfig) -> None:
    """What a pull refuses in the manifest and config it got: a platform other than the one
    asked for (when ``ref`` named a manifest, not an index), a layer count that differs from
    the diff_ids', a layer that is not an image layer."""
    have = config.platform
    if platform is not None and isinstance(top, oci.Manifest) and have.os and \
            have.architecture:
        probe = oci.Descriptor(oci.OCI_MANIFEST, config.digest, 0, platform=have)
        if oci.select_platform([probe], platform) is None:
            raise Unsupported(f"image with reference {ref.familiar} was found but does not "
                              f"match the specified platform: wanted {platform}, actual: "
                              f"{have}")
    if len(config.diff_ids) != len(manifest.layers):
        raise InvalidImage(f"manifest has {len(manifest.layers)} layers but the config "
                           f"lists {len(config.diff_ids)} diff_ids")
    for desc in manifest.layers:
        if desc.media_type not in oci.LAYER_TYPES:
            raise Unsupported(f"layer {desc.digest} has media type {desc.media_type}, "
                              "which is not an image layer")


async def get_range(reg: Registry, path: str, digest: str, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of blob ``digest`` in repository ``path`` of ``reg``, with a
    ``Range`` request (retried when cut short); raises RegistryError."""
    attempts = reg.transport.retry.attempts
    for attempt in range(attempts + 1):
        resp = await reg.request(
            "GET", f"/v2/{path}/blobs/{digest}", scopes=(f"repository:{path}:pull",),
            headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
            stream=True)
        try:
            if resp.status_code == 206:
                got = resp.headers.get("content-range", "").removeprefix("bytes ")
                if got.split("-")[0] != str(start):
                    raise RegistryError(f"asked for bytes {start}-{end - 1}, got "
                                        f"Content-Range {got!r}")
                skip = 0
            elif resp.status_code == 200:
                skip = start
            else:
                raise await reg.fail(resp, f"blob {digest}")
            data = await _body(resp, skip, end - start)
        except httpx.TransportError as exc:
            if attempt >= attempts:
                raise RegistryError(f"blob {digest}: {exc}") from None
            log.info("range of %s cut (%s); again", digest, exc)
            await reg.transport.runtime.sleep(reg.transport.retry.delay(attempt))
            continue
        finally:
            await resp.aclose()
        if len(data) == end - start:
            return data
    raise RegistryError(f"blob {digest}: the registry sent a short range")


async def _body(resp: httpx.Response, skip: int, want: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    async with contextlib.aclosing(resp.aiter_raw()) as it:  # type: ignore[type-var]
        async for chunk in it:
            if skip:
                drop = min(skip, len(chunk))
                chunk = chunk[drop:]
                skip -= drop
            if chunk and got < want:
                parts.append(chunk[:want - got])
                got += len(parts[-1])
            # read on to the end: a stream left half-read leaves httpx's generators behind
    return b"".join(parts)


async def config_bytes(store: Store, reg: Registry, ref: Reference, manifest: oci.Manifest,
                       scopes: tuple[str, ...]) -> bytes:
    """The image's config: the stored blob, else fetched (``fetch_blob_bytes``)."""
    if store.blobs.has(manifest.config.digest):
        return store.blobs.read(manifest.config.digest)
    return await fetch_blob_bytes(reg, ref.path, manifest.config, scopes)


def image_before(store: Store, ref: Reference, top_digest: Digest) -> str | None:
    """The ID of the image ``ref`` named in the store before the pull, if any."""
    st = store.state.read()
    if ref.digest is None:
        return st.tags.get(str(ref))
    rd = f"{ref.name}@{top_digest}"
    for image_id, rec in st.images.items():
        if rd in rec.get("repoDigests", []):
            return image_id
    return None


def record_pull(store: Store, ref: Reference, manifest: oci.Manifest, config_raw: bytes,
                top_digest: Digest, before: str | None, downloaded: int) -> PullResult:
    """The last step of a pull, once every layer is stored (or recorded lazily): the config,
    the image record with its tag and RepoDigest, where its blobs came from."""
    from .. import images
    from .sources import BlobSources

    store.blobs.put(config_raw, manifest.config.digest)
    tags = [ref] if ref.digest is None else []
    image = images.record(store, manifest.raw, manifest.media_type, tags=tags,
                          repo_digest=f"{ref.name}@{top_digest}")
    BlobSources(store.root).add(
        ref.name, [manifest.config.digest, *(d.digest for d in manifest.layers)],
        exists=lambda d: store.blobs.has(parse_digest(d)))
    return PullResult(image, ref, top_digest, before == image.id and downloaded == 0,
                      downloaded)
