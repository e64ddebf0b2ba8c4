"""New local images from one layer: ``commit`` (a container's upper or, with ``squash``, its
whole merged rootfs) and ``import_rootfs`` (a rootfs tarball, ``docker import``).

The transform is pure: ``committed_config`` and ``committed_manifest`` return new documents
built from the parent's (unknown config keys kept, ``-c`` changes applied, one diff_id and one
history entry appended) and never touch disk.  Both then take the same steps
(``_new_image``): the layer goes through ``LayerStore`` (diff_id, tar, compressed blob and
digest in one pass), then config and manifest, and ``images.record`` names the image —
exactly as a pulled image lands.

Caveats:
* ``SOURCE_DATE_EPOCH`` (or ``epoch``) clamps file mtimes and sets ``created``, so the same
  upper committed twice gives the same layer digest and image ID.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from unionfs.resolve import UnionView

from . import changeset, estargz_write, gc, images, oci, timefmt
from .compress import NONE
from .containers import Container, Containers
from .digest import Digest
from .images import Image
from .instructions import apply_changes
from .layerstore import Ingested, Progress
from .reference import Reference

if TYPE_CHECKING:
    from .api import Store

_DOCKER_OF = {
    oci.OCI_LAYER: oci.DOCKER_LAYER, oci.OCI_LAYER_GZIP: oci.DOCKER_LAYER_GZIP,
    oci.OCI_LAYER_ZSTD: oci.DOCKER_LAYER_ZSTD,
}
_OCI_OF = {v: k for k, v in _DOCKER_OF.items()}


def committed_config(parent: oci.ImageConfig, diff_id: Digest, *, created: str,
                     changes: Sequence[str] = (), author: str = "", comment: str = "",
                     created_by: str = "", squash: bool = False) -> dict[str, Any]:
    """The parent's config with ``changes`` applied and one layer appended."""
    cfg = copy.deepcopy(dict(parent.data))
    cfg["created"] = created
    if author:
        cfg["author"] = author
    cfg["config"] = apply_changes(dict(cfg.get("config") or {}), changes)
    history = [dict(h) for h in parent.history]
    if not history and parent.diff_ids:
        history = [{"created": parent.field("created")} for _ in parent.diff_ids]
    if squash:
        history = [{**h, "empty_layer": True} for h in history]
        cfg["rootfs"] = {"type": "layers", "diff_ids": [diff_id]}
    else:
        cfg["rootfs"] = {"type": "layers", "diff_ids": [*parent.diff_ids, diff_id]}
    entry: dict[str, Any] = {"created": created}
    if created_by:
        entry["created_by"] = created_by
    if author:
        entry["author"] = author
    if comment:
        entry["comment"] = comment
    cfg["history"] = [*history, entry]
    for legacy in ("container", "container_config", "parent", "id"):
        cfg.pop(legacy, None)  # docker-only leftovers describe the parent, not this image
    return cfg


def committed_manifest(parent: Image | None, config: oci.Descriptor, layer: oci.Descriptor,
                       oci_format: bool) -> bytes:
    """The parent's layers (as stored) plus ``layer``, typed for the chosen format."""
    layers = list(parent.manifest.layers) if parent is not None else []
    table = _OCI_OF if oci_format else _DOCKER_OF
    typed = [oci.Descriptor(table.get(x.media_type, x.media_type), x.digest, x.size,
                            x.annotations, None, x.urls) for x in [*layers, layer]]
    cfg = oci.Descriptor(oci.OCI_CONFIG if oci_format else oci.DOCKER_CONFIG, config.digest,
                         config.size)
    return oci.manifest_bytes(cfg, typed, oci=oci_format)


def commit(store: Store, container: Container, *, tag: Reference | None = None,
           author: str = "", message: str = "", changes: Sequence[str] = (),
           squash: bool = False, compression: str = "gzip", oci_format: bool = True,
           epoch: int | None = None, progress: Progress | None = None) -> Image:
    """Commit ``container`` (the caller holds its mount paused).  ``progress`` is called with
    the size of each chunk of the uncompressed layer tar as it is written."""
    parent = store.image(container.image)
    if epoch is None:
        epoch = timefmt.source_date_epoch()
    created = timefmt.format_ns(epoch * 10**9 if epoch is not None else time.time_ns())
    with contextlib.ExitStack() as stack:
        produce: Callable[[Callable[[bytes], None]], object]
        if squash:
            layers = stack.enter_context(Containers(store).layers(container, upper=True))
            view = UnionView(layers)

            def produce(sink: Callable[[bytes], None]) -> None:
                changeset.export_rootfs(view, sink, epoch)
        else:

            def produce(sink: Callable[[bytes], None]) -> None:
                changeset.write_layer(container.upper, sink, epoch)

        def config(diff_id: Digest) -> dict[str, Any]:
            return committed_config(
                parent.config, diff_id, created=created, changes=changes, author=author,
                comment=message, created_by=f"strata commit {container.name}", squash=squash)

        return _new_image(store, produce, compression, config, None if squash else parent,
                          tag, oci_format, progress, replace=True)


def import_rootfs(store: Store, src: BinaryIO, *, source: str = "-",
                  tag: Reference | None = None, changes: Sequence[str] = (),
                  message: str | None = None, platform: oci.Platform | None = None,
                  progress: Progress | None = None) -> Image:
    """``docker import``: a one-layer image from a rootfs tar (raw or compressed), stored
    uncompressed (the blob is the layer tar itself)."""
    container_config = apply_changes({}, changes)
    plat = platform or oci.host_platform()
    created = timefmt.now()
    comment = message if message is not None else f"Imported from {source}"

    def config(diff_id: Digest) -> dict[str, Any]:
        doc: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os}
        if plat.variant:
            doc["variant"] = plat.variant
        doc.update({"created": created, "config": container_config,
                    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                    "history": [{"created": created, "comment": comment}]})
        return doc

    return _new_image(store, src, NONE, config, None, tag, True, progress, canonical=True)


def _new_image(store: Store, layer: Callable[[Callable[[bytes], None]], object] | BinaryIO,
               compression: str, config: Callable[[Digest], dict[str, Any]],
               parent: Image | None, tag: Reference | None, oci_format: bool,
               progress: Progress | None, replace: bool = False,
               canonical: bool = False) -> Image:
    """The steps every new local image takes: store its layer (``layer`` writes it, or is
    a stream to ingest as received), then its config and manifest, and record it — all
    under ``gc.ingesting``, so a failure leaves nothing behind."""
    with gc.ingesting(store):
        annotations: dict[str, str] = {}
        if callable(layer):
            produce = layer if progress is None else _counted(layer, progress)
            if compression == estargz_write.ESTARGZ:  # seekable: can be pulled lazily
                got, annotations = estargz_write.ingest_produced(store, produce)
            else:
                got = store.layers.ingest_produced(produce, compression)
        else:
            got = store.layers.ingest(layer, keep_blob=False, progress=progress)
            store.blobs.link(store.layers.tar_path(got.layer.diff_id), got.layer.diff_id)
            got = Ingested(got.layer.diff_id, got.layer.size, NONE, got.layer)
        doc = config(got.layer.diff_id)
        raw = oci.canonical_config(doc) if canonical else oci.dumps(doc)
        cdigest = store.blobs.put(raw)
        desc = oci.Descriptor(oci.layer_media_type(got.compression), got.digest, got.size,
                              annotations=annotations)
        manifest = committed_manifest(parent, oci.Descriptor(oci.OCI_CONFIG, cdigest, len(raw)),
                                      desc, oci_format)
        return images.record(store, manifest, tags=[tag] if tag else [], replace=replace)


def _counted(produce: Callable[[Callable[[bytes], None]], object], progress: Progress
             ) -> Callable[[Callable[[bytes], None]], object]:
    def counted_produce(sink: Callable[[bytes], None]) -> None:
        def counted(data: bytes) -> None:
            sink(data)
            progress(len(data))

        produce(counted)

    return counted_produce
