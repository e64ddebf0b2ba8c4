"""``pull --lazy``: a seekable layer recorded by its table of contents alone; completing and
promoting lazy layers for the commands that need their bytes (pull, push, save).

``fetch_tocs`` (called by ``pulling.py`` for a lazy pull, while the config comes) fetches every
seekable layer's TOC at once — the tail of an eStargz blob, the announced frames of a
zstd:chunked one — and verifies it against the layer's annotation; ``take_seekable`` records
the lazy states (``lazystate``); layers in no seekable format stay in the pull's list and are
downloaded whole, with a note.  ``completed`` (a pull without
``--lazy``) and ``complete_or_fail`` (push, save) fetch what is missing of a lazy layer and
promote it (``lazystate.promote``: the blob goes through ``LayerStore.ingest``, which checks its
digest and diff_id and indexes the tar).

Caveats:
* Promotion needs the store's ingesting hold (``gc.ingesting`` or ``Store.reading``): the
  callers have it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import estargz, oci, zstdchunked
from ..digest import Digest
from ..errors import DigestMismatch, InvalidImage, StoreError
from ..lazystate import RAW, CheckedToc, LazyInfo, LazyStore, promote
from ..progress import ProgressEvent, short
from ..seekable import ESTARGZ, SeekableError, content_size, detect
from .client import Registry
from .pullsteps import Source, get_range

if TYPE_CHECKING:
    from ..api import Store
    from ..layerstore import LayerStore

log = logging.getLogger(__name__)

TAIL = 256 << 10  # the first TOC fetch of an eStargz layer takes at least this much of its end,
TAIL_SHARE = 64  # ... or this share of the layer (its TOC is most often within, so one request
TAIL_MAX = 4 << 20  # is enough), at most this much


async def fetch_toc(reg: Registry, path: str, desc: oci.Descriptor
                    ) -> tuple[CheckedToc, list[tuple[int, bytes]]]:
    """The TOC of a seekable layer, checked against the layer's annotation (not parsed: that
    waits for the layer's first use, ``LazyStore.ready``), and the blob bytes fetched for it
    (offset, bytes): the TOC region, kept so completion need not fetch it again."""
    fmt = detect(desc)
    size = desc.size
    ann = desc.annotations or {}
    if fmt == ESTARGZ:
        n = min(size, max(TAIL, min(TAIL_MAX, size // TAIL_SHARE)))
        tail = await get_range(reg, path, desc.digest, size - n, size)
        off = estargz.toc_offset(tail[-estargz.FOOTER_SIZE:], size)
        if off < size - n:
            tail = await get_range(reg, path, desc.digest, off, size - n) + tail
            n = size - off
        region = tail[len(tail) - (size - off):]
        raw, head = estargz.check_toc(region[:-estargz.FOOTER_SIZE],
                                      ann[estargz.TOC_ANNOTATION])
        # the TOC is a file of the layer too (its tar's last entry): counted as a full pull does
        return CheckedToc(fmt, raw, off, head, content_size(raw) + len(raw)), [(off, region)]
    if fmt is None:
        raise SeekableError(f"layer {desc.digest} is in no seekable format")
    where = zstdchunked.toc_position(ann)
    assert where is not None
    offset, length, _ = where
    if not 8 <= offset <= size - length:
        raise SeekableError("zstd:chunked TOC position lies outside the blob")
    region = await get_range(reg, path, desc.digest, offset - 8, size)
    raw, start = zstdchunked.check_toc(region[8:8 + length], ann, size)
    return CheckedToc(fmt, raw, start, content=content_size(raw)), [(offset - 8, region)]


def create_state(store_root: str, desc: oci.Descriptor, diff_id: Digest, toc: CheckedToc,
                 extra: list[tuple[int, bytes]], source: Source) -> LazyInfo:
    return LazyStore(store_root).create(desc, diff_id, toc, source.to_json(), extra)


def complete_and_promote(store: Store, digest: str) -> None:
    """Complete the lazy layer of blob ``digest`` (fetching what is missing) and make it an
    ordinary stored layer (``lazystate.promote``; the caller holds the ingesting hold).  A blob
    that turns out wrong is dropped (the next pull fetches it whole) and raises
    DigestMismatch; bytes that cannot be had raise OSError."""
    lazy = store.layers.lazy
    if not lazy.has(digest):
        return
    if not lazy.is_complete(digest):
        from ..lazylayer import LazyLayer

        try:
            layer = LazyLayer(store.root, digest)
        except SeekableError as exc:
            fetch_whole(store.layers, digest, exc)
            return
        try:
            done = layer.complete()
        except DigestMismatch:
            layer.close()
            lazy.delete(digest)
            raise
        finally:
            layer.close()
        if not done:
            raise OSError(errno.EIO, f"lazy layer {digest} could not be completed")
    promote(store.layers, digest)


def complete_or_fail(store: Any, digest: str) -> None:
    """``complete_and_promote`` for commands that need the blob (push, save): a StoreError
    when it cannot be had."""
    try:
        complete_and_promote(store, digest)
    except OSError as exc:
        raise StoreError(f"layer {digest}: cannot complete the lazy layer: "
                         f"{exc.strerror or exc}") from None


FetchedToc = tuple[CheckedToc, list[tuple[int, bytes]]] | SeekableError


async def fetch_tocs(puller: Any, reg: Registry, layers: Sequence[oci.Descriptor],
                     out: dict[Digest, FetchedToc]) -> None:
    """``pull --lazy``: the verified TOC (``fetch_toc``) of every layer in a seekable format
    not in the store yet, all at once, into ``out``; an unusable TOC is kept as its error."""
    import trio

    store = puller.store

    async def one(desc: oci.Descriptor) -> None:
        try:
            async with puller.limiter:  # as many at once as layer downloads
                out[desc.digest] = await fetch_toc(reg, puller.ref.path, desc)
        except SeekableError as exc:
            out[desc.digest] = exc

    wanted = {d.digest: d for d in layers if detect(d) is not None
              and not store.blobs.has(d.digest) and not store.layers.lazy.has(d.digest)}
    async with trio.open_nursery() as nursery:
        for desc in wanted.values():
            nursery.start_soon(one, desc)


async def take_seekable(puller: Any, tocs: dict[Digest, FetchedToc],
                        todo: dict[Digest, Any]) -> None:
    """``pull --lazy``: record every layer of ``todo`` in a seekable format by its TOC alone
    (``tocs``, from ``fetch_tocs``), removing it from ``todo``; the others stay in ``todo``,
    downloaded whole, with a note."""
    import trio

    store, ref = puller.store, puller.ref
    source = Source(ref.domain, ref.api_host, ref.path)
    for digest, (desc, diff_id) in list(todo.items()):
        sid = short(digest)
        if store.layers.lazy.layer_for(digest, diff_id) is not None:
            puller.emit(ProgressEvent("pull", sid, "Already exists (lazy)"))
            del todo[digest]
            continue
        fetched = tocs.get(digest)
        if store.blobs.has(digest):
            continue  # the blob is here: its layer is made from it
        if detect(desc) is None or fetched is None:
            puller.emit(ProgressEvent("pull", sid, "Not seekable: pulling the whole layer"))
            continue
        try:
            if isinstance(fetched, SeekableError):
                raise fetched
            toc, extra = fetched
            await trio.to_thread.run_sync(create_state, store.root, desc, diff_id, toc, extra,
                                          source)
        except SeekableError as exc:
            log.warning("layer %s: %s; pulling it whole", sid, exc)
            puller.emit(ProgressEvent("pull", sid,
                                      "Unusable table of contents: pulling the whole layer"))
            continue
        del todo[digest]
        puller.emit(ProgressEvent("pull", sid, "Pulled table of contents (lazy)"))


async def completed(puller: Any, desc: oci.Descriptor) -> bool:
    """In a pull that is not lazy: complete and promote the layer if it was pulled lazily
    before (True: done); a lazy blob that turns out wrong is dropped (False: pull it)."""
    import trio

    store = puller.store
    if not store.layers.lazy.has(desc.digest):
        return False
    sid = short(desc.digest)
    puller.emit(ProgressEvent("pull", sid, "Completing lazy layer"))
    try:
        await trio.to_thread.run_sync(complete_and_promote, store, desc.digest)
    except DigestMismatch as exc:
        log.warning("layer %s: %s; pulling it again", sid, exc)
        return False
    except OSError as exc:
        raise StoreError(f"layer {desc.digest}: cannot complete the lazy layer: "
                         f"{exc.strerror or exc}") from None
    puller.downloaded += 1
    puller.emit(ProgressEvent("pull", sid, "Pull complete"))
    return True


WHOLE_WINDOW = 8 << 20  # bytes a request while fetching a layer whole


def fetch_whole(layers: LayerStore, digest: str, why: Exception) -> None:
    """A lazy layer whose TOC cannot serve (``LazyStore.ready`` refused it where the layer was
    first used): fetch the rest of its blob, check it against its digest and promote it to an
    ordinary layer (``promote``: diff_id, the tar indexer's rules), with a note.  One process
    downloads (an exclusive lock on the state); the others wait and find it promoted.  Raises
    DigestMismatch (the state is dropped), InvalidImage (the blob is no layer strata can
    serve; dropped too) or OSError (EIO: the bytes cannot be had)."""
    from ..state import StateFile
    from .rangefetch import shared

    lazy = layers.lazy
    with StateFile(lazy.root).ingesting():
        try:
            fd = os.open(lazy.path(digest), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # promoted meanwhile, by another command
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not lazy.has(digest):
                return  # promoted while this one waited
            log.warning("layer %s: unusable table of contents (%s); downloading the whole "
                        "layer", short(digest), why)
            info = lazy.info(digest)
            blob = lazy.open(info)
            try:
                for start, end in blob.missing():
                    for pos in range(start, end, WHOLE_WINDOW):
                        stop = min(end, pos + WHOLE_WINDOW)
                        data = shared().fetch(info.source, digest, pos, stop)
                        blob.store([(pos, data)], RAW)
                if not blob.mark_complete(digest):
                    lazy.delete(digest)
                    raise DigestMismatch(f"layer {digest}: the downloaded blob does not match "
                                         "its digest")
            finally:
                blob.close()
            try:
                promote(layers, digest)
            except InvalidImage as exc:
                raise InvalidImage(f"layer {digest} cannot be served: {exc}; remove the image "
                                   "(strata rmi)") from None
        finally:
            os.close(fd)
