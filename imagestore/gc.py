"""Garbage collection: deleting blobs and layers no image needs, and sweeping ``tmp/``.

Three locks make it safe beside other commands (``state.py``): collection holds ``gc.lock``
exclusively, so it waits for (or, with ``wait=False``, gives way to) every command adding
content or reading images, which hold it shared (``ingesting`` here, ``Store.reading``);
``tmp/`` is emptied only while ``lock`` is held too, because a state transaction writes its
temp file there.

Caveats:
* A damaged image record (``strata check`` names it) no longer says what it uses: while one
  exists, nothing is collected.
* ``tmp/partial-<hex>`` is a resumable download (the next pull of that blob continues it); it
  is kept until the blob is stored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from unionfs.upper import remove_tree

from .digest import Digest
from .errors import StoreError
from .fsutil import unshared_size
from .images import documents
from .lazystate import promote_complete
from .state import State

if TYPE_CHECKING:
    from .api import Store

PARTIAL = "partial-"  # tmp/partial-<hex>: a resumable download of that blob


@contextlib.contextmanager
def ingesting(store: Store) -> Iterator[None]:
    """Hold while adding content that no ref names yet (keeps collection away); lazily
    pulled layers completed since (by a mount daemon) become ordinary layers here.  When the
    block fails, the blobs and layers it added that no image names are removed again, so a
    refused import or load leaves the store as it was (unless another command is adding
    content at that moment: then the next ``prune`` collects them)."""
    before: tuple[set[Digest], set[Digest]] | None = None
    sweep_leftovers(store)
    try:
        with store.state.ingesting():
            before = (set(store.blobs.digests()), set(store.layers.diff_ids()))
            promote_complete(store.layers)  # lazy layers a mount daemon completed
            yield
    except BaseException:
        if before is not None:
            discard_added(store, *before)
        raise


def referenced(store: Store, st: State) -> tuple[set[Digest], set[Digest]]:
    """Blobs and layers some image still needs (containers keep their image)."""
    blobs: set[Digest] = set()
    layers: set[Digest] = set()
    for rec in st.images.values():
        try:
            desc, manifest, config = documents(store.blobs, rec)
        except (StoreError, KeyError, TypeError):
            return ({*store.blobs.digests(), *store.layers.lazy.digests()},
                    set(store.layers.diff_ids()))
        blobs.update((desc.digest, manifest.config.digest))
        blobs.update(d.digest for d in manifest.layers)
        layers.update(config.diff_ids)
    return blobs, layers


def collect(store: Store, wait: bool) -> tuple[tuple[str, ...], int]:
    """Delete blobs and layers no image needs.  Returns (deleted layer diff_ids, bytes).
    Without ``wait``, does nothing while another command adds content or reads images."""
    with store.state.collecting(wait) as ok:
        if not ok:
            return (), 0
        keep_blobs, keep_layers = referenced(store, store.state.read())
        freed = 0
        deleted: list[str] = []
        for diff_id in store.layers.diff_ids():
            if diff_id not in keep_layers:
                freed += unshared_size(store.layers.path(diff_id))
                store.layers.delete(diff_id)
                deleted.append(diff_id)
        for digest in store.layers.lazy.digests():  # layers pulled with --lazy
            if digest not in keep_blobs:
                freed += unshared_size(store.layers.lazy.path(digest))
                store.layers.lazy.delete(digest)
        for digest in store.blobs.digests():
            if digest not in keep_blobs:
                # an uncompressed layer's blob is a hardlink of its tar: counted once, here
                freed += unshared_size(store.blobs.path(digest))
                store.blobs.delete(digest)
        # tmp/ also holds the temp file of a state transaction in flight (``tag`` and
        # ``rmi`` do not take gc.lock): clean it only while no transaction runs
        with store.state.locked():
            clean_tmp(store)
        return tuple(deleted), freed


def discard_added(store: Store, blobs: set[Digest], layers: set[Digest]) -> None:
    """Delete the blobs and layers that are not in ``blobs``/``layers`` (what was there
    before a failed ingest) and that no image names; nothing while another command adds."""
    with store.state.collecting(wait=False) as ok:
        if not ok:
            return
        keep_blobs, keep_layers = referenced(store, store.state.read())
        for diff_id in set(store.layers.diff_ids()) - layers - keep_layers:
            store.layers.delete(diff_id)
        for digest in set(store.blobs.digests()) - blobs - keep_blobs:
            store.blobs.delete(digest)
        for digest in set(store.layers.lazy.digests()) - keep_blobs:
            store.layers.lazy.delete(digest)  # no image names it: a pull --lazy that failed


def sweep_leftovers(store: Store) -> None:
    """Remove what killed commands left in tmp/ (resumable downloads excepted) — only when
    no other command is adding content, collecting or changing the state, so everything
    there is known to be dead.  Never waits."""
    with store.state.collecting(wait=False) as ok, store.state.locked(wait=False) as free:
        if ok and free:
            clean_tmp(store)


def clean_tmp(store: Store) -> None:
    """Empty tmp/ but for the resumable downloads ``partial-<hex>`` of blobs not stored
    (the caller holds gc.lock and lock exclusively)."""
    for name in os.listdir(store.blobs.tmp_dir):
        if not resumable(store, name):
            remove_tree(os.path.join(store.blobs.tmp_dir, name))


def resumable(store: Store, name: str) -> bool:
    """Is ``tmp/name`` a resumable download (``partial-<hex>`` of a blob not stored)?"""
    hexpart = name.removeprefix(PARTIAL)
    return hexpart != name and not store.blobs.has(Digest("sha256:" + hexpart))
