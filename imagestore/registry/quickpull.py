"""``pull --lazy`` without an event loop: ``pull_quickly``.

A lazy pull of an image whose layers are all in a seekable format (or stored already) is a
handful of small requests — the manifest (an index's too), the config, each layer's table
of contents — and writes that take milliseconds.  Under trio it first pays for the event loop
and httpx's async stack (trio and httpcore: ~60 ms of imports, a third of such a pull).  Here
the same steps (``pullsteps``, ``lazypull.fetch_toc``) go through the same client (mirrors,
credentials and tokens, redirects, retries) with blocking I/O (``Transport(blocking=True)``,
``runtime.run_sync``); the TOCs come at once, each in a thread of its own, while the config
comes in this one.

``pull_quickly`` returns None, having written nothing, when the image needs what only the
event-loop pull does: a layer to download whole (in no seekable format, with a table of
contents that cannot be used, or whose blob is here without its layer), or a proxy named in the
environment.  ``Store.pull`` then runs ``pulling.pull``, which fetches the manifest again.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import gc, oci
from ..digest import Digest
from ..progress import ProgressEvent, ProgressFn, ignore, short
from ..reference import Reference
from ..seekable import SeekableError, detect
from . import blocking, lazypull
from .client import Registry, Transport
from .pullsteps import (
    PullResult,
    Source,
    check_image,
    choose,
    config_bytes,
    image_before,
    pull_scope,
    record_pull,
    resolve,
)
from .runtime import run_sync

if TYPE_CHECKING:
    from ..api import Store

CONCURRENCY = 3  # TOCs fetched at once (as many as a pull's layer downloads)


def pull_quickly(store: Store, ref: Reference, platform: oci.Platform | None = None,
                 events: ProgressFn | None = None) -> PullResult | None:
    """``pull(store, ref, lazy=True)`` without an event loop, or None (see the module
    docstring).  Raises what ``pulling.pull`` raises."""
    if not blocking.usable():
        return None
    emit = events or ignore
    transport = Transport(blocking=True)
    try:
        with gc.ingesting(store):
            return _pull(store, transport, ref, platform, emit)
    finally:
        run_sync(transport.aclose())


def _pull(store: Store, transport: Transport, ref: Reference, platform: oci.Platform | None,
          emit: ProgressFn) -> PullResult | None:
    scopes = (pull_scope(ref.path),)
    reg, top, top_digest = run_sync(resolve(transport, ref, scopes))
    manifest = run_sync(choose(reg, ref, top, platform, scopes))
    lazy = store.layers.lazy
    wanted = list({d.digest: d for d in manifest.layers if not store.blobs.has(d.digest)
                   and not lazy.has(d.digest)}.values())
    if any(detect(d) is None for d in wanted):
        return None
    got = _concurrently([functools.partial(_fetch_toc, reg, ref.path, d) for d in wanted],
                        lambda: run_sync(config_bytes(store, reg, ref, manifest, scopes)))
    config_raw = got.pop()
    tocs = dict(zip((d.digest for d in wanted), got, strict=True))
    if any(isinstance(t, SeekableError) for t in tocs.values()):
        return None
    config = oci.ImageConfig.parse(config_raw, manifest.config.digest)
    check_image(ref, platform, top, manifest, config)
    before = image_before(store, ref, top_digest)
    pending: dict[Digest, tuple[oci.Descriptor, Digest]] = {}  # a layer repeated: once
    for desc, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        if desc.digest in pending:
            continue
        if store.blobs.has(desc.digest):
            if not store.layers.has(diff_id):
                return None  # its layer is made from the blob: the event-loop pull does
        elif desc.digest not in tocs and lazy.layer_for(desc.digest, diff_id) is None:
            return None  # a lazy layer of another diff_id: refused by the event-loop pull
        pending[desc.digest] = (desc, diff_id)
    named = ref.tag if ref.digest is None and ref.tag else str(ref.digest)
    emit(ProgressEvent("pull", "", f"{named}: Pulling from {ref.path}"))
    source = Source(ref.domain, ref.api_host, ref.path)
    for desc, diff_id in pending.values():
        sid = short(desc.digest)
        if desc.digest not in tocs:
            emit(ProgressEvent("pull", sid, "Already exists" if store.blobs.has(desc.digest)
                               else "Already exists (lazy)"))
            continue
        toc, extra = tocs.pop(desc.digest)
        lazypull.create_state(store.root, desc, diff_id, toc, extra, source)
        emit(ProgressEvent("pull", sid, "Pulled table of contents (lazy)"))
    return record_pull(store, ref, manifest, config_raw, top_digest, before, 0)


def _fetch_toc(reg: Registry, path: str, desc: oci.Descriptor) -> Any:
    return run_sync(lazypull.fetch_toc(reg, path, desc))


def _concurrently(jobs: list[Callable[[], Any]], here: Callable[[], Any]) -> list[Any]:
    """The results of ``jobs`` (``CONCURRENCY`` threads at once; a SeekableError is a
    result), then of ``here``, run in this thread meanwhile; any other error is raised, the
    first job's first."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)
    todo = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = jobs[i]()
            except SeekableError as exc:
                results[i] = exc
            except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
                errors[i] = exc

    threads = [threading.Thread(target=worker, name="strata-toc", daemon=True)
               for _ in range(min(CONCURRENCY, len(jobs)))]
    for t in threads:
        t.start()
    last = here()  # if it raises (^C included), the workers end with the process
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return [*results, last]
