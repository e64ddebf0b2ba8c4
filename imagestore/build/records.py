"""The images a build makes, one per step, and the build cache that finds them again.

Every step of a stage (FROM excepted) makes an image: its parent's config with the step's
change and one history entry, plus the step's layer when the step changed files.  The images
are recorded like any other (``images.record_steps``, all of a build's in one transaction),
untagged, with their parent's ID and the step's *cache key*; these are docker's intermediate
images: hidden from ``images`` unless ``-a``, collected by ``image prune`` once nothing names
them, and the build cache itself.

The cache key of a step is a sha256 over its parent's image ID and the step's text as the
builder sees it (variables substituted, build arguments in force, the checksum of COPY/ADD
sources), so a step is reused exactly when its parent is the same image and it would do the
same thing.  ``StepImages.cached`` finds it (``--no-cache`` never asks).

Seams: ``commit_layer`` turns a rotated upper into a stored layer (``changeset.write_layer``
into ``LayerStore.ingest_produced``, as ``strata commit`` does); ``new_image`` writes config
and manifest and records.  The caller holds ``gc.ingesting`` for the whole build, so no layer
or blob it adds is collected before an image names it.

Caveats:
* An upper with no change gives no layer: the history entry is marked ``empty_layer``, as
  docker's builder marks a step whose diff is empty.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import changeset, images, oci, timefmt
from ..digest import Digest, sha256_bytes
from ..errors import ImageNotFound
from ..images import Image
from ..layerstore import Ingested

if TYPE_CHECKING:
    from ..api import Store

__all__ = ["StepImages", "cache_key", "commit_layer", "empty_config"]

COMPRESSION = "gzip"

_OCI_OF = {oci.DOCKER_LAYER: oci.OCI_LAYER, oci.DOCKER_LAYER_GZIP: oci.OCI_LAYER_GZIP,
           oci.DOCKER_LAYER_ZSTD: oci.OCI_LAYER_ZSTD}


def cache_key(parent: str, text: str) -> str:
    """The cache key of a step: its parent image ID (``scratch`` for none) and its text."""
    return "sha256:" + hashlib.sha256(f"{parent}\n{text}".encode()).hexdigest()


def empty_config(platform: oci.Platform) -> dict[str, Any]:
    """The config a ``FROM scratch`` stage starts from."""
    doc: dict[str, Any] = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        doc["variant"] = platform.variant
    doc.update({"config": {}, "rootfs": {"type": "layers", "diff_ids": []}, "history": []})
    return doc


def commit_layer(store: Store, upper: str) -> Ingested | None:
    """The rotated upper ``upper`` as a stored layer; None when it holds no change."""
    if not os.listdir(upper):
        return None
    return store.layers.ingest_produced(lambda sink: changeset.write_layer(upper, sink),
                                        COMPRESSION)


class StepImages:
    """The step images of one build: new ones, and the ones the cache finds.  New images are
    recorded together (``flush``: one state transaction instead of one per step); until
    then they live here, and the cache finds them here too."""

    def __init__(self, store: Store) -> None:
        self.store = store
        st = store.state.read()
        self.index: dict[str, str] = {}
        for image_id, rec in st.images.items():
            for key in rec.get("buildKeys") or ():
                self.index[str(key)] = image_id
        self.pending: list[tuple[bytes, str, str]] = []
        self.made: dict[str, Image] = {}
        self._content: dict[str, int] = {}

    def cached(self, key: str) -> Image | None:
        image_id = self.index.get(key)
        if image_id is None:
            return None
        if image_id in self.made:
            return self.made[image_id]
        try:
            return self.store.image(image_id)
        except ImageNotFound:
            return None

    def flush(self) -> None:
        """Record the new images (the caller still holds ``gc.ingesting``)."""
        if self.pending:
            _syncfs(self.store.blobs.dir)  # the blobs new_image left unsynced, at once
            images.record_steps(self.store, self.pending)
            self.pending = []
            self.made.clear()

    def _size(self, diff_ids: list[str]) -> int:
        total = 0
        for d in diff_ids:
            if d not in self._content:
                self._content[d] = self.store.layers.info(Digest(d)).content
            total += self._content[d]
        return total

    def new_image(self, parent: Image | None, doc: Mapping[str, Any], created_by: str,
                  layer: Ingested | None, key: str, author: str = "") -> Image:
        """A new image: ``doc`` (the step's config, ``rootfs`` and ``history`` as the parent
        left them) with one history entry for the step and, when ``layer``, one more layer.
        Its blobs are stored now, its record at ``flush``."""
        now = timefmt.now()
        cfg = dict(doc)
        cfg["created"] = now
        entry: dict[str, Any] = {"created": now, "created_by": created_by}
        if author:
            entry["author"] = author
        diff_ids = list(cfg.get("rootfs", {}).get("diff_ids") or [])
        if layer is None:
            entry["empty_layer"] = True
        else:
            diff_ids.append(layer.layer.diff_id)
        cfg["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        cfg["history"] = [*(cfg.get("history") or []), entry]
        for legacy in ("container", "container_config", "parent", "id", "docker_version"):
            cfg.pop(legacy, None)
        raw = oci.canonical_config(cfg)
        cdigest = self.store.blobs.put(raw, sync=False)
        layers = list(parent.manifest.layers) if parent is not None else []
        if layer is not None:
            layers.append(oci.Descriptor(oci.layer_media_type(layer.compression),
                                         layer.digest, layer.size))
        typed = [oci.Descriptor(_OCI_OF.get(x.media_type, x.media_type), x.digest, x.size,
                                x.annotations, None, x.urls) for x in layers]
        manifest_raw = oci.manifest_bytes(oci.Descriptor(oci.OCI_CONFIG, cdigest, len(raw)),
                                          typed)
        self.store.blobs.put(manifest_raw, sync=False)
        manifest = oci.parse_manifest(manifest_raw, oci.OCI_MANIFEST)
        parent_id = parent.id if parent is not None else ""
        image = Image(cdigest, oci.Descriptor(oci.OCI_MANIFEST, sha256_bytes(manifest_raw),
                                              len(manifest_raw)),
                      manifest, oci.ImageConfig.parse(raw, cdigest), (), (),
                      self._size(diff_ids), now, parent_id)
        self.pending.append((manifest_raw, parent_id, key))
        self.made[image.id] = image
        self.index[key] = image.id
        return image


def _syncfs(path: str) -> None:
    from unionfs.control import _libc_syncfs

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc_syncfs(fd)
    finally:
        os.close(fd)
