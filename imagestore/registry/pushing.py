"""Push: an image from the store to a registry, with its blobs exactly as stored.

For every blob (layers, ``concurrency`` at a time, then the config):

1. ``HEAD /v2/NAME/blobs/DIGEST``: 200 means "Layer already exists".
2. A cross-repository mount, when ``blob-sources.json`` knows another repository of the same
   registry holding the blob (``POST .../blobs/uploads/?mount=DIGEST&from=REPO``, with a token
   scope that includes ``pull`` on REPO): 201 is "Mounted from REPO"; a 202 answer is a normal
   upload session, used for step 3.
3. An upload: monolithic (``PUT LOCATION&digest=``) up to ``chunk_size`` bytes, else one
   ``PATCH`` per chunk (``Content-Range``, the server's ``Range`` answer says where to go on)
   and a closing ``PUT``.  A 416, a 5xx or a cut connection during a chunk asks the registry
   where the upload stands (``GET LOCATION``) and resumes there; when the session is gone
   (distribution 2.8 cancels a session whose state token is stale) the upload starts over,
   after a ``HEAD`` in case the blob arrived after all.

Then ``PUT /v2/NAME/manifests/TAG`` with the manifest's exact stored bytes and media type: the
stored compressed blobs and those bytes give a pulled image the same digests it was pulled
with.  The pushed name is recorded as a RepoDigest, and the blobs' new home in
``blob-sources.json``.

Caveats:
* Blobs are read from the store as they are: an imported image pushes its uncompressed layer.
* Chunks are held in memory (``concurrency`` x ``chunk_size`` at most).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin

import httpx
import trio

from .. import gc, images, oci
from ..convert import Converted, convert_image
from ..digest import Digest, parse_digest, sha256_bytes
from ..errors import DigestMismatch, InvalidReference
from ..images import Image
from ..progress import ProgressEvent, ProgressFn, ignore, short
from ..reference import Reference
from . import lazypull
from .client import Registry, Transport, open_transport
from .errors import RegistryError, first_error
from .sources import BlobSources

if TYPE_CHECKING:
    from ..api import Store

log = logging.getLogger(__name__)

CHUNK_SIZE = 16 << 20
MAX_RESTARTS = 3


@dataclass(frozen=True)
class PushResult:
    ref: Reference
    digest: Digest  # of the manifest pushed
    size: int  # of the manifest pushed
    pushed: int
    mounted: int
    existed: int


class _Restart(Exception):
    """The upload session is lost; start a new one."""


def _range_end(resp: httpx.Response) -> int | None:
    """The offset after the last byte the registry holds (``Range: 0-N``)."""
    value = resp.headers.get("range", "")
    _, _, end = value.strip().removeprefix("bytes=").partition("-")
    return int(end) + 1 if end.isdigit() else None


def _with_digest(location: str, digest: Digest) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + quote(digest)


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise RegistryError(f"{path} is shorter than its descriptor says")
    return data


class _Pusher:
    def __init__(self, store: Store, transport: Transport, image: Image, dest: Reference,
                 emit: ProgressFn, concurrency: int, chunk_size: int) -> None:
        self.store, self.image, self.dest = store, image, dest
        self.converted: Converted | None = None  # push --compression: what is pushed instead
        self.emit = emit
        self.limiter = trio.CapacityLimiter(max(1, concurrency))
        self.chunk_size = max(1, chunk_size)
        self.reg = Registry(transport, transport.config.endpoint(dest.api_host))
        self.scopes = (f"repository:{dest.path}:pull,push",)
        self.sources = BlobSources(store.root)
        self.counts = {"pushed": 0, "mounted": 0, "existed": 0}

    async def run(self) -> PushResult:
        manifest = self.converted.manifest if self.converted else self.image.manifest
        mdigest = sha256_bytes(manifest.raw)
        if self.dest.digest is not None and self.dest.digest != mdigest:
            raise InvalidReference(f"cannot push to {self.dest.familiar}: the image's manifest "
                                   f"digest is {mdigest}")
        layers: dict[Digest, oci.Descriptor] = {}
        for desc in manifest.layers:
            layers.setdefault(desc.digest, desc)
        for digest in layers:
            self.emit(ProgressEvent("push", short(digest), "Preparing"))
        with first_error():
            async with trio.open_nursery() as nursery:
                for desc in layers.values():
                    nursery.start_soon(self._blob, desc, True)
                if manifest.config.digest not in layers:
                    nursery.start_soon(self._blob, manifest.config, False)
        raw = manifest.raw
        digest = sha256_bytes(raw)
        target = self.dest.tag or self.dest.digest or digest
        resp = await self.reg.request("PUT", f"/v2/{self.dest.path}/manifests/{target}",
                                      scopes=self.scopes, content=raw,
                                      headers={"Content-Type": manifest.media_type})
        if resp.status_code not in (200, 201, 202):
            raise await self.reg.fail(resp, f"manifest for {self.dest.familiar}")
        await resp.aclose()
        self._check_digest(resp, digest, "the manifest")
        self.sources.add(self.dest.name, [manifest.config.digest, *layers],
                         exists=lambda d: self.store.blobs.has(parse_digest(d)))
        if self.converted is None:  # a converted manifest is not the one stored
            images.record(self.store, raw, manifest.media_type,
                          repo_digest=f"{self.dest.name}@{digest}")
        return PushResult(self.dest, digest, len(raw), self.counts["pushed"],
                          self.counts["mounted"], self.counts["existed"])

    @staticmethod
    def _check_digest(resp: httpx.Response, digest: Digest, what: str) -> None:
        got = resp.headers.get("docker-content-digest")
        if got and got.strip() != digest:
            raise DigestMismatch(f"the registry stored {what} as {got.strip()}, expected "
                                 f"{digest}")

    async def _exists(self, desc: oci.Descriptor) -> bool:
        resp = await self.reg.request("HEAD", f"/v2/{self.dest.path}/blobs/{desc.digest}",
                                      scopes=self.scopes)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise await self.reg.fail(resp, f"blob {desc.digest}")

    def _mount_sources(self, digest: Digest) -> list[str]:
        out = []
        for name in self.sources.get(digest):
            domain, _, path = name.partition("/")
            if domain == self.dest.domain and path and path != self.dest.path:
                out.append(path)
        return out

    async def _blob(self, desc: oci.Descriptor, shown: bool) -> None:
        sid = short(desc.digest)
        emit = self.emit if shown else ignore
        async with self.limiter:
            if await self._exists(desc):
                emit(ProgressEvent("push", sid, "Layer already exists"))
                self.counts["existed"] += shown
                return
            location = None
            for src in self._mount_sources(desc.digest):
                location = await self._mount(desc, src)
                if location is None:
                    emit(ProgressEvent("push", sid, f"Mounted from {src}"))
                    self.counts["mounted"] += shown
                    return
                if location:
                    break
            if not self.store.blobs.has(desc.digest) and self.store.layers.lazy.has(desc.digest) \
                    and not self._converted_path(desc.digest):
                # pulled with --lazy: its bytes are needed here
                emit(ProgressEvent("push", sid, "Completing lazy layer"))
                await trio.to_thread.run_sync(lazypull.complete_or_fail, self.store, desc.digest)
            await self._upload(desc, location or None, emit)
            emit(ProgressEvent("push", sid, "Pushed"))
            self.counts["pushed"] += shown

    def _converted_path(self, digest: Digest) -> str | None:
        return self.converted.paths.get(digest) if self.converted else None

    async def _mount(self, desc: oci.Descriptor, src: str) -> str | None:
        """Try mounting from ``src``: None when mounted, else an upload location the registry
        opened instead ("" when it opened none)."""
        url = (f"/v2/{self.dest.path}/blobs/uploads/?mount={quote(desc.digest)}"
               f"&from={quote(src, safe='/')}")
        scopes = (*self.scopes, f"repository:{src}:pull")
        resp = await self.reg.request("POST", url, scopes=scopes, content=b"")
        await resp.aclose()
        if resp.status_code == 201:
            return None
        if resp.status_code == 202 and "location" in resp.headers:
            return urljoin(str(resp.request.url), resp.headers["location"])
        log.info("mounting %s from %s failed with %d", desc.digest, src, resp.status_code)
        return ""

    async def _start(self) -> str:
        resp = await self.reg.request("POST", f"/v2/{self.dest.path}/blobs/uploads/",
                                      scopes=self.scopes, content=b"")
        if resp.status_code != 202 or "location" not in resp.headers:
            raise await self.reg.fail(resp, f"starting an upload to {self.dest.familiar}")
        await resp.aclose()
        return urljoin(str(resp.request.url), resp.headers["location"])

    async def _upload(self, desc: oci.Descriptor, location: str | None, emit: ProgressFn) -> None:
        path = self._converted_path(desc.digest) or self.store.blobs.path(desc.digest)
        why = ""
        for _ in range(MAX_RESTARTS + 1):
            if location is None:
                location = await self._start()
            try:
                if desc.size <= self.chunk_size:
                    await self._finish(desc, location, await trio.to_thread.run_sync(
                        _read, path, 0, desc.size))
                else:
                    await self._chunks(desc, location, path, emit)
                return
            except _Restart as exc:
                why = str(exc)
                log.info("upload of %s: %s; starting over", short(desc.digest), exc)
                if await self._exists(desc):
                    return
                location = None
        raise RegistryError(f"uploading blob {desc.digest} failed {MAX_RESTARTS + 1} times "
                            f"(last: {why})")

    async def _send(self, method: str, url: str, content: bytes,
                    headers: dict[str, str]) -> httpx.Response | None:
        """An upload request; None when the connection failed (the caller asks the registry
        where the upload stands)."""
        try:
            return await self.reg.request(method, url, scopes=self.scopes, content=content,
                                          headers=headers, retry=False)
        except RegistryError as exc:
            if exc.status:
                raise
            log.info("%s %s: %s", method, url, exc)
            return None

    async def _finish(self, desc: oci.Descriptor, location: str, data: bytes) -> None:
        resp = await self._send("PUT", _with_digest(location, desc.digest), data,
                                {"Content-Type": "application/octet-stream"})
        if resp is None:
            raise _Restart("the connection failed")
        if resp.status_code in (201, 204):
            await resp.aclose()
            self._check_digest(resp, desc.digest, f"blob {desc.digest}")
            return
        if resp.status_code in (400, 404, 416, 429) or resp.status_code >= 500:
            await resp.aclose()
            raise _Restart(f"closing the upload answered {resp.status_code}")
        raise await self.reg.fail(resp, f"uploading blob {desc.digest}")

    async def _status(self, location: str) -> tuple[str, int]:
        """Where an upload stands: its new location and the offset to go on from."""
        resp = await self.reg.request("GET", location, scopes=self.scopes)
        await resp.aclose()
        if resp.status_code != 204:
            raise _Restart(f"upload status answered {resp.status_code}")
        new = urljoin(location, resp.headers.get("location", location))
        end = _range_end(resp)
        return new, end if end is not None and end > 1 else 0

    async def _chunks(self, desc: oci.Descriptor, location: str, path: str,
                      emit: ProgressFn) -> None:
        offset = 0
        sid = short(desc.digest)
        while offset < desc.size:
            n = min(self.chunk_size, desc.size - offset)
            data = await trio.to_thread.run_sync(_read, path, offset, n)
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{offset}-{offset + n - 1}"}
            resp = await self._send("PATCH", location, data, headers)
            if resp is not None and resp.status_code == 202:
                await resp.aclose()
                location = urljoin(location, resp.headers.get("location", location))
                end = _range_end(resp)
                offset = end if end is not None and end > 1 else offset + n
                emit(ProgressEvent("push", sid, "Pushing", offset, desc.size))
                continue
            if resp is not None:
                await resp.aclose()
                if resp.status_code == 404:
                    raise _Restart("the upload session is gone")
                if resp.status_code != 416 and resp.status_code < 500 and \
                        resp.status_code != 429:
                    raise await self.reg.fail(resp, f"uploading blob {desc.digest}")
                log.info("chunk at %d of %s answered %d", offset, sid, resp.status_code)
            location, offset = await self._status(location)
            log.info("upload of %s resumes at byte %d", sid, offset)
        await self._finish(desc, location, b"")


async def push(store: Store, image: Image, dest: Reference, *,
               transport: Transport | None = None, events: ProgressFn | None = None,
               concurrency: int = 3, chunk_size: int = CHUNK_SIZE,
               compression: str | None = None) -> PushResult:
    """Push ``image`` to ``dest`` (see the module docstring).  ``compression`` (gzip, zstd,
    estargz, zstd:chunked): push the image with its layers in that form, converted on the way
    (``convert.py``); nothing converted is kept in the store."""
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(open_transport())
        with gc.ingesting(store):
            pusher = _Pusher(store, transport, image, dest, events or ignore, concurrency,
                             chunk_size)
            if compression is None:
                return await pusher.run()
            work = tempfile.mkdtemp(dir=store.layers.tmp_dir, prefix="convert-")
            try:
                pusher.converted = await _convert(store, image, compression, work, pusher.emit)
                return await pusher.run()
            finally:
                shutil.rmtree(work, ignore_errors=True)


async def _convert(store: Store, image: Image, compression: str, work: str,
                   emit: ProgressFn) -> Converted:
    def note(digest: Digest, message: str) -> None:
        trio.from_thread.run_sync(emit, ProgressEvent("push", short(digest), message))

    return await trio.to_thread.run_sync(convert_image, store, image, compression, work, note)
