"""Pull: an image from a registry into the store, verified, resumable, ready to mount.

1. ``GET /v2/NAME/manifests/REF`` with every manifest and index type in ``Accept``; the
   ``Content-Type`` must be one of them (schema 1 is refused), the body must hash to the
   digest asked for and to ``Docker-Content-Digest``.  An index or manifest list is resolved
   to one platform by containerd's rules (``oci.select_platform``).  Mirrors from the
   registries configuration are tried first.
2. The config blob, verified; the manifest's layer count must match its ``diff_ids``.
3. The layers, ``concurrency`` at a time, skipping those already stored.  Each layer streams
   once through ``LayerStore.ingest`` (blob digest and size, decompression, diff_id and the
   entry index in one pass) from a worker thread; the bytes arrive from the async side
   (``BlobStream``) and are appended to ``tmp/partial-<hex>`` on the way, so a cut
   connection resumes with ``Range`` inside the same pass and an interrupted command resumes
   from the partial file next time.  The partial file becomes the stored blob by rename.
4. ``images.record`` with the tag and the RepoDigest (``NAME@DIGEST`` of what the reference
   named: the index for a multi-platform image).  Nothing is visible before this step.

``gc.ingesting`` is held throughout, so garbage collection never sees a half-pulled image.

Caveats:
* Blobs come from the endpoint that served the manifest; a failing mirror is left only at the
  manifest stage.
* Foreign layers (``urls``) are fetched from the registry like any other blob.
* A partial file whose content turns out wrong is deleted and the layer is fetched once more
  from the start; content that is wrong on a fresh download is an error.
* Awaits separate "this layer is already stored" from the ``images.record`` that relies on it;
  ``gc.ingesting`` is what keeps garbage collection from deleting it in between.
* Layers completed before a failure stay stored (verified, named by no image) so a retry
  skips them; the next garbage collection removes them if no pull claims them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING

import trio

from .. import gc, oci
from ..compress import NONE
from ..digest import Digest, sha256_hex
from ..errors import DigestMismatch, InvalidImage, StoreError
from ..layerstore import Ingested
from ..progress import ProgressEvent, ProgressFn, ignore, short
from ..reference import Reference
from . import lazypull
from .client import Registry, Transport, open_transport
from .download import BlobStream, PartialReader, open_partial
from .errors import RegistryError, first_error
from .pullsteps import (
    PullResult,
    check_image,
    choose,
    config_bytes,
    image_before,
    pull_scope,
    record_pull,
    resolve,
)

if TYPE_CHECKING:
    from ..api import Store

log = logging.getLogger(__name__)


class _Puller:
    def __init__(self, store: Store, transport: Transport, ref: Reference,
                 platform: oci.Platform | None, emit: ProgressFn, concurrency: int,
                 lazy: bool = False) -> None:
        self.store, self.transport, self.ref = store, transport, ref
        self.lazy = lazy
        self.platform = platform
        self.emit = emit
        self.limiter = trio.CapacityLimiter(max(1, concurrency))
        self.scopes = (pull_scope(ref.path),)
        self.downloaded = 0

    async def run(self) -> PullResult:
        ref = self.ref
        named = ref.tag if ref.digest is None and ref.tag else str(ref.digest)
        self.emit(ProgressEvent("pull", "", f"{named}: Pulling from {ref.path}"))
        reg, top, top_digest = await resolve(self.transport, ref, self.scopes)
        manifest = await choose(reg, ref, top, self.platform, self.scopes)
        tocs: dict[Digest, lazypull.FetchedToc] = {}
        if self.lazy:  # the tables of contents come while the config does
            with first_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lazypull.fetch_tocs, self, reg, manifest.layers, tocs)
                    config_raw = await config_bytes(self.store, reg, ref, manifest,
                                                    self.scopes)
        else:
            config_raw = await config_bytes(self.store, reg, ref, manifest, self.scopes)
        config = oci.ImageConfig.parse(config_raw, manifest.config.digest)
        check_image(ref, self.platform, top, manifest, config)
        before = image_before(self.store, ref, top_digest)
        todo: dict[Digest, tuple[oci.Descriptor, Digest]] = {}
        for desc, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            if self.store.blobs.has(desc.digest) and self.store.layers.has(diff_id):
                self.emit(ProgressEvent("pull", short(desc.digest), "Already exists"))
            else:
                todo.setdefault(desc.digest, (desc, diff_id))
        if self.lazy:
            await lazypull.take_seekable(self, tocs, todo)
        for digest in todo:
            self.emit(ProgressEvent("pull", short(digest), "Pulling fs layer"))
        with first_error():
            async with trio.open_nursery() as nursery:
                for desc, diff_id in todo.values():
                    nursery.start_soon(self._layer, reg, desc, diff_id)
        return record_pull(self.store, ref, manifest, config_raw, top_digest, before,
                           self.downloaded)

    async def _layer(self, reg: Registry, desc: oci.Descriptor, diff_id: Digest) -> None:
        sid = short(desc.digest)
        async with self.limiter:
            if await lazypull.completed(self, desc):
                return
            if self.store.blobs.has(desc.digest):
                await trio.to_thread.run_sync(self._ingest_local, desc, diff_id)
                self.emit(ProgressEvent("pull", sid, "Pull complete"))
                return
            for _ in range(2):
                stream = BlobStream(reg, self.ref.path, desc, self.scopes,
                                     self.transport.retry, self.emit)
                try:
                    resumed = await trio.to_thread.run_sync(self._download, stream, desc,
                                                            diff_id)
                finally:
                    await stream.aclose()
                if resumed is not None:
                    break
                log.info("the partial download of %s was corrupt; starting over", sid)
            if resumed is None:
                raise DigestMismatch(f"layer {desc.digest}: the content is wrong")
            if stream.fetched or resumed:
                self.downloaded += 1
            self.emit(ProgressEvent("pull", sid, "Verifying Checksum"))
            self.emit(ProgressEvent("pull", sid, "Download complete"))
            self.emit(ProgressEvent("pull", sid, "Pull complete"))

    def _ingest_local(self, desc: oci.Descriptor, diff_id: Digest) -> None:
        with self.store.blobs.open(desc.digest) as f:
            self.store.layers.ingest(f, digest=desc.digest, size=desc.size,
                                     diff_id=diff_id, keep_blob=False)

    def _download(self, stream: BlobStream, desc: oci.Descriptor,
                  diff_id: Digest) -> int | None:
        """In a worker thread: fetch (or resume) and ingest one layer.  Returns the bytes that
        were already in the partial file, or None when those turned out to be wrong (the
        partial file is gone; try again)."""
        blobs, layers = self.store.blobs, self.store.layers
        path = os.path.join(blobs.tmp_dir, f"partial-{sha256_hex(desc.digest)}")
        fd = open_partial(path, blobs, desc.digest)
        if fd is None:
            if not layers.has(diff_id):
                self._ingest_local(desc, diff_id)
            return 0
        try:
            reader = PartialReader(fd, desc,
                                    lambda off: trio.from_thread.run(stream.chunk, off))
            if reader.resumed:
                log.info("resuming %s from byte %d of its partial file", stream.sid,
                         reader.resumed)
            try:
                got = self._pumped(reader, desc, diff_id)
            except RegistryError:
                raise  # a network failure: keep the partial file for the next attempt
            except StoreError as exc:
                os.unlink(path)
                if isinstance(exc, DigestMismatch) and reader.resumed:
                    return None
                raise
            if got.compression == NONE:
                blobs.link(layers.tar_path(got.layer.diff_id), desc.digest)
                os.unlink(path)
            else:
                blobs.publish(path, desc.digest)  # (synced by the pump)
            return reader.resumed
        finally:
            os.close(fd)

    def _pumped(self, reader: PartialReader, desc: oci.Descriptor,
                diff_id: Digest) -> Ingested:
        """``_ingest`` on a thread of its own while this one pumps the blob into ``reader``;
        the first failure of either is raised here (a network failure first: it keeps the
        partial file)."""
        out: list[Ingested] = []
        failed: list[BaseException] = []

        def ingest() -> None:
            try:
                out.append(self._ingest(reader, desc, diff_id))
            except BaseException as exc:
                failed.append(exc)
            finally:
                reader.finish()

        thread = threading.Thread(target=ingest, name=f"ingest {short(desc.digest)}")
        thread.start()
        try:
            reader.pump()
        except BaseException as exc:
            reader.fail(exc)
            thread.join()
            raise
        thread.join()
        if failed:
            raise failed[0]
        return out[0]

    def _ingest(self, reader: PartialReader, desc: oci.Descriptor,
                diff_id: Digest) -> Ingested:
        try:
            return self.store.layers.ingest(reader,  # type: ignore[arg-type]
                                            digest=desc.digest, size=desc.size,
                                            diff_id=diff_id, keep_blob=False)
        except InvalidImage as exc:
            if isinstance(exc, DigestMismatch):
                raise
            reader.drain()  # a stream that does not decompress is usually the wrong blob
            got = reader.digest()
            if got != desc.digest:
                raise DigestMismatch(f"layer digest mismatch: expected {desc.digest}, got "
                                     f"{got}") from None
            raise


async def pull(store: Store, ref: Reference, *, platform: oci.Platform | None = None,
               transport: Transport | None = None, events: ProgressFn | None = None,
               concurrency: int = 3, lazy: bool = False) -> PullResult:
    """Pull ``ref`` into ``store`` (see the module docstring).  ``lazy``: layers in a seekable
    format are recorded with their table of contents only (``lazy.py``); without it, layers
    pulled lazily before are completed."""
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(open_transport())
        with gc.ingesting(store):
            puller = _Puller(store, transport, ref, platform, events or ignore,
                             concurrency, lazy)
            return await puller.run()
