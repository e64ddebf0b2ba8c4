"""An image with its layers recompressed, for ``push --compression`` (as ``nerdctl image
convert`` does before a push): gzip, zstd, eStargz or zstd:chunked.

``convert_image`` reads each stored layer tar that is not in the wanted form yet and writes the
new blob into a work directory (never into the store: nothing stays behind after the push); a
layer already in that form is kept as it is, so its digest does not change.  The result is an
OCI manifest and config (zstd has no Docker media type; an eStargz layer decompresses to a new
tar, so the config's diff_ids change) and the paths of the blobs that are not stored.

Caveats:
* A layer pulled with ``--lazy`` is completed first (its whole tar is read); the caller holds
  the store's ingesting hold for that.
* For eStargz and zstd:chunked the blob differs from what stargz-snapshotter or
  containers/storage would write for the same tar (other compressor, other chunk cuts); the
  formats, the files and (zstd:chunked, gzip, zstd) the diff_ids do not.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import estargz_write, oci, seekable, zstdchunked_write
from .compress import GZIP, ZSTD, Compressor
from .digest import Digest, Hasher, sha256_bytes
from .errors import Unsupported
from .estargz import TOC_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from .fsutil import disk_full_guard
from .images import Image

if TYPE_CHECKING:
    from .api import Store

FORMATS = (GZIP, ZSTD, seekable.ESTARGZ, seekable.ZSTD_CHUNKED)
CHUNK = 1 << 20


@dataclass
class Converted:
    manifest: oci.Manifest
    paths: dict[Digest, str] = field(default_factory=dict)  # blobs not in the store
    converted: list[Digest] = field(default_factory=list)  # layers recompressed (old digests)


def form_of(desc: oci.Descriptor) -> str:
    """The form a stored layer is in: ``estargz``, ``zstd:chunked``, or its compression."""
    return seekable.detect(desc) or oci.LAYER_TYPES.get(desc.media_type, "")


def convert_image(store: Store, image: Image, compression: str, work: str,
                  note: Callable[[Digest, str], object] = lambda d, s: None) -> Converted:
    """``image`` with every layer in ``compression`` (see the module docstring); new blobs go
    into the directory ``work``.  ``note(old digest, message)`` reports progress.  Raises
    ``Unsupported`` for an unknown form or a layer the form cannot hold."""
    if compression not in FORMATS:
        raise Unsupported(f"unknown compression {compression!r} ({', '.join(FORMATS)})")
    out = Converted(image.manifest)
    layers: list[oci.Descriptor] = []
    diff_ids: list[Digest] = []
    for desc, diff_id in zip(image.manifest.layers, image.diff_ids, strict=True):
        if form_of(desc) == compression:
            layers.append(_oci_layer(desc))
            diff_ids.append(diff_id)
            continue
        if not store.layers.has(diff_id):  # pulled with --lazy: its tar is needed
            from .registry import lazypull

            note(desc.digest, "Completing lazy layer")
            lazypull.complete_or_fail(store, desc.digest)
        note(desc.digest, f"Converting to {compression}")
        path = os.path.join(work, f"layer-{len(out.converted)}")
        new, new_diff_id = _layer(store.layers.tar_path(diff_id), path, compression)
        out.paths[new.digest] = path
        out.converted.append(desc.digest)
        layers.append(new)
        diff_ids.append(new_diff_id or diff_id)
    config = image.manifest.config
    if diff_ids != image.diff_ids:
        doc = copy.deepcopy(dict(image.config.data))
        doc["rootfs"] = {**doc["rootfs"], "diff_ids": list(diff_ids)}
        raw = oci.dumps(doc)
        path = os.path.join(work, "config")
        _write(path, raw)
        digest = sha256_bytes(raw)
        out.paths[digest] = path
        config = oci.Descriptor(oci.OCI_CONFIG, digest, len(raw))
    elif config.media_type != oci.OCI_CONFIG:
        config = oci.Descriptor(oci.OCI_CONFIG, config.digest, config.size)
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": config.to_json(),
           "layers": [d.to_json() for d in layers]}
    if image.manifest.annotations:
        doc["annotations"] = dict(image.manifest.annotations)
    out.manifest = oci.parse_manifest(oci.dumps(doc), oci.OCI_MANIFEST)
    return out


def _oci_layer(desc: oci.Descriptor) -> oci.Descriptor:
    kind = oci.LAYER_TYPES.get(desc.media_type)
    if kind is None or desc.media_type.startswith("application/vnd.oci."):
        return desc
    return oci.Descriptor(oci.layer_media_type(kind), desc.digest, desc.size, desc.annotations)


def _write(path: str, data: bytes) -> None:
    with disk_full_guard("a converted layer"), open(path, "wb") as f:
        f.write(data)


def _layer(tar_path: str, path: str, compression: str) -> tuple[oci.Descriptor, Digest | None]:
    """Write the layer tar ``tar_path`` in ``compression`` to ``path``: its descriptor, and its
    new diff_id when it changes (eStargz)."""
    blob = Hasher()
    tar = Hasher()
    annotations: dict[str, str] = {}
    new_diff_id = None
    with disk_full_guard("a converted layer"), open(path, "wb") as f:

        def sink(data: bytes) -> None:
            blob.update(data)
            f.write(data)

        if compression == seekable.ESTARGZ:
            written = estargz_write.convert_file(tar_path, sink, tar.update)
            annotations = {TOC_ANNOTATION: written.toc_digest,
                           UNCOMPRESSED_SIZE_ANNOTATION: str(written.tar_size)}
            new_diff_id = tar.digest
            kind = GZIP
        elif compression == seekable.ZSTD_CHUNKED:
            annotations = zstdchunked_write.convert_file(tar_path, sink).annotations
            kind = ZSTD
        else:
            comp = Compressor(compression)
            try:
                with open(tar_path, "rb") as src:
                    while chunk := src.read(CHUNK):
                        sink(comp.compress(chunk))
                sink(comp.flush())
            finally:
                comp.close()
            kind = compression
        f.flush()
        os.fsync(f.fileno())
    desc = oci.Descriptor(oci.layer_media_type(kind), blob.digest, blob.size, annotations)
    return desc, new_diff_id
