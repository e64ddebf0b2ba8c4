"""Commit: a container's upper (or, with ``squash``, its whole merged rootfs) becomes a new image.

The transform is pure: ``committed_config`` and ``committed_manifest`` return new documents
built from the parent's (unknown config keys kept, ``-c`` changes applied, one diff_id and one
history entry appended) and never touch disk.  ``commit`` streams the layer through
``LayerStore.ingest_produced`` (diff_id, tar, compressed blob and digest in one pass), stores
config and manifest, and names the image — exactly as a pulled image lands.

Caveats:
* ``SOURCE_DATE_EPOCH`` (or ``epoch``) clamps file mtimes and sets ``created``, so the same
  upper committed twice gives the same layer digest and image ID.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

from unionfs.layers import DirLayer, LowerLayer
from unionfs.resolve import UnionView

from . import archive, changeset, estargz_write, oci, timefmt
from .containers import Container
from .digest import Digest
from .instructions import apply_changes
from .layerstore import Progress
from .reference import Reference
from .store import Image, Store

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


def commit(store: Store, container: Container, layers: list[LowerLayer], *,
           tag: Reference | None = None, author: str = "", message: str = "",
           changes: Sequence[str] = (), squash: bool = False, compression: str = "gzip",
           oci_format: bool = True, epoch: int | None = None,
           progress: Progress | None = None) -> Image:
    """Commit ``container`` (whose image ``layers`` are open, top first).  ``progress`` is
    called with the size of each chunk of the uncompressed layer tar as it is written."""
    parent = store.image(Digest(container.image))
    if epoch is None:
        epoch = timefmt.source_date_epoch()
    created = timefmt.format_ns(epoch * 10**9 if epoch is not None else time.time_ns())
    produce: Callable[[Callable[[bytes], None]], object]
    if squash:
        view = UnionView([DirLayer(container.upper), *layers])

        def produce(sink: Callable[[bytes], None]) -> None:
            archive.export_rootfs(view, sink, epoch)
    else:

        def produce(sink: Callable[[bytes], None]) -> None:
            changeset.write_layer(container.upper, sink, epoch)

    if progress is not None:
        write = produce

        def produce(sink: Callable[[bytes], None]) -> None:
            def counted(data: bytes) -> None:
                sink(data)
                progress(len(data))

            write(counted)

    with store.ingesting():
        annotations: dict[str, str] = {}
        if compression == estargz_write.ESTARGZ:  # seekable: can be pulled lazily
            got, annotations = estargz_write.ingest_produced(store, produce)
        else:
            got = store.layers.ingest_produced(store.blobs, produce, compression)
        config = committed_config(
            parent.config, got.layer.diff_id, created=created, changes=changes, author=author,
            comment=message, created_by=f"strata commit {container.name}", squash=squash)
        raw = oci.dumps(config)
        cdigest = store.blobs.put(raw)
        layer = oci.Descriptor(oci.layer_media_type(got.compression), got.digest, got.size,
                               annotations=annotations)
        manifest = committed_manifest(None if squash else parent,
                                      oci.Descriptor(oci.OCI_CONFIG, cdigest, len(raw)), layer,
                                      oci_format)
        return store.add_image(manifest, tags=[tag] if tag else [], replace=True)
