"""Image records: the ``Image`` value, recording an image (``record``), reading records from
``state.json`` and the blobs, resolving names, and docker's rules for removing and pruning.

Everything that adds an image goes through ``record`` (or ``record_steps``, a build's
images in one transaction), which checks that the manifest, config,
every layer and every blob are present and consistent before a ref can name it.  The rest has
no side effects beyond the ``State`` it is given: ``Store`` (``api.py``) runs the rules inside
its state transactions, so they can be read — and tested — apart from locking and collection.

Caveats:
* Listing readers take no lock: an image removed by another process between reading
  state.json and reading its blobs is skipped (``image_unless_removed``), as if the listing had
  come a moment later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import oci, reference, timefmt
from .cas import BlobStore
from .digest import Digest, is_digest, parse_digest, sha256_bytes
from .errors import (
    Ambiguous,
    Conflict,
    DigestMismatch,
    ImageNotFound,
    InvalidImage,
    InvalidReference,
    StoreError,
)
from .reference import Reference
from .state import State

if TYPE_CHECKING:
    from .api import Store

_HEX_PREFIX = re.compile(r"^(?:sha256:)?([a-f0-9]{1,64})$")


@dataclass(frozen=True)
class Image:
    id: Digest
    manifest_desc: oci.Descriptor
    manifest: oci.Manifest
    config: oci.ImageConfig
    tags: tuple[Reference, ...]
    repo_digests: tuple[str, ...]
    size: int
    added: str
    parent: str = ""  # the image a build step started from (docker's intermediate images)

    @property
    def short_id(self) -> str:
        return self.id.partition(":")[2][:12]

    @property
    def created(self) -> str:
        return self.config.field("created")

    @property
    def diff_ids(self) -> list[Digest]:
        return self.config.diff_ids


@dataclass(frozen=True)
class Removed:
    """What ``remove``/``prune`` did, in docker's words."""

    untagged: tuple[str, ...]
    deleted: tuple[str, ...]
    reclaimed: int


def record(store: Store, manifest_raw: bytes, media_type: str | None = None, *,
           tags: Sequence[Reference] = (), repo_digest: str | None = None,
           replace: bool = False) -> Image:
    """Record an image whose blobs and layers are already stored; tag it.  Verifies
    everything the manifest names before any ref can see it.  (The caller holds
    ``gc.ingesting``, so nothing it stored is collected meanwhile.)

    An image already recorded under the same ID keeps its manifest, unless ``replace``
    asks for the new one (a commit that was asked for another compression or format)
    and no registry digest pins the old one."""
    checked = _verified(store, manifest_raw, media_type)
    with store.state.transaction() as st:
        image_id = _enter(store, st, checked, replace=replace, repo_digest=repo_digest)
        for t in tags:
            st.tags[str(t)] = image_id
        return image_of(store.blobs, st, image_id)


def record_steps(store: Store, steps: Sequence[tuple[bytes, str, str]]) -> None:
    """Record the images of a build's steps in one state transaction: each a manifest (its
    blobs and layers stored), its parent's ID and its cache key (``build.records``).  The
    record names the parent, as docker's intermediate images do, and the key finds the image
    again.  Verified as ``record`` verifies."""
    checked = [(_verified(store, raw, None), parent, key) for raw, parent, key in steps]
    with store.state.transaction() as st:
        for c, parent, key in checked:
            image_id = _enter(store, st, c)
            rec = st.images[image_id]
            rec["parent"] = parent
            if key not in rec.setdefault("buildKeys", []):
                rec["buildKeys"].append(key)


def _verified(store: Store, manifest_raw: bytes, media_type: str | None
              ) -> tuple[Digest, oci.Descriptor, int]:
    """Check what the manifest names, store it; (image ID, manifest descriptor, size)."""
    manifest = oci.parse_manifest(manifest_raw, media_type)
    config_raw = store.blobs.read(manifest.config.digest)
    config = oci.ImageConfig.parse(config_raw, manifest.config.digest)
    if sha256_bytes(config_raw) != manifest.config.digest:
        raise InvalidImage(f"config blob {manifest.config.digest} is corrupt")
    if len(config.diff_ids) != len(manifest.layers):
        raise InvalidImage(
            f"manifest has {len(manifest.layers)} layers but the config lists "
            f"{len(config.diff_ids)} diff_ids")
    size = 0
    for desc, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        lazy = None if store.layers.has(diff_id) else \
            store.layers.lazy.layer_for(desc.digest, diff_id)
        if lazy is not None:  # pulled with --lazy: its bytes arrive as they are read
            size += lazy.content
            continue
        if not store.layers.has(diff_id):
            raise InvalidImage(f"layer {diff_id} is missing from the store")
        if not store.blobs.has(desc.digest):
            raise InvalidImage(f"layer blob {desc.digest} is missing from the store")
        size += store.layers.info(diff_id).content
    mdigest = store.blobs.put(manifest_raw)
    return (manifest.config.digest, oci.Descriptor(manifest.media_type, mdigest,
                                                    len(manifest_raw)), size)


def _enter(store: Store, st: State, checked: tuple[Digest, oci.Descriptor, int], *,
           replace: bool = False, repo_digest: str | None = None) -> str:
    image_id, desc, size = checked
    rec = st.images.get(image_id)
    if rec is None or not store.blobs.has(parse_digest(rec["manifest"]["digest"])):
        rec = {"manifest": desc.to_json(), "repoDigests": [], "size": size,
               "added": timefmt.now()}
        st.images[image_id] = rec
    elif replace and not rec["repoDigests"]:
        rec["manifest"] = desc.to_json()
    if repo_digest and repo_digest not in rec["repoDigests"]:
        rec["repoDigests"] = [*rec["repoDigests"], repo_digest]
    return image_id


def documents(blobs: BlobStore, rec: dict[str, Any]
              ) -> tuple[oci.Descriptor, oci.Manifest, oci.ImageConfig]:
    """An image record's manifest descriptor, manifest and config, read from the blobs."""
    desc = oci.Descriptor.from_json(rec["manifest"])
    manifest = oci.parse_manifest(blobs.read(desc.digest), desc.media_type)
    config = oci.ImageConfig.parse(blobs.read(manifest.config.digest), manifest.config.digest)
    return desc, manifest, config


def image_of(blobs: BlobStore, st: State, image_id: str) -> Image:
    rec = st.images[image_id]
    desc, manifest, config = documents(blobs, rec)
    # docker lists an image's references sorted by their familiar form (lexicalRefs)
    tags = tuple(sorted((reference.parse(t) for t, i in st.tags.items() if i == image_id),
                        key=lambda r: r.familiar))
    return Image(Digest(image_id), desc, manifest, config, tags,
                 tuple(rec.get("repoDigests", [])), int(rec.get("size", 0)),
                 str(rec.get("added", "")), str(rec.get("parent", "")))


def image_unless_removed(blobs: BlobStore, st: State, image_id: str,
                         still_recorded: Callable[[str], bool]) -> Image | None:
    """The image as ``st`` records it; None when another process removed it (and collected
    its blobs) after ``st`` was read (``still_recorded`` reads the state again).  A blob
    missing from an image that is still recorded is corruption and raises."""
    try:
        return image_of(blobs, st, image_id)
    except ImageNotFound as exc:
        if not still_recorded(image_id):
            return None
        problem: StoreError = exc
    except (InvalidImage, DigestMismatch) as exc:
        problem = exc
    raise InvalidImage(f"image {image_id[7:19]} is damaged ({problem}): `strata check` "
                       "tells more, `strata rmi` removes it") from None


def resolve_id(st: State, name: str) -> str:
    """The ID of the image ``name`` means: a tag, ``repo@digest``, an ID or a unique ID
    prefix.  Raises ``ImageNotFound``, ``Ambiguous``, ``InvalidReference``."""
    full = name if name.startswith("sha256:") else "sha256:" + name
    if is_digest(full) and full in st.images:
        return full
    ref: Reference | None = None
    try:
        ref = reference.parse(name)
    except InvalidReference:
        if not _HEX_PREFIX.match(name):
            raise
    if ref is not None:
        if ref.digest is not None:
            for image_id, rec in st.images.items():
                for rd in rec.get("repoDigests", []):
                    if rd == f"{ref.name}@{ref.digest}":
                        return image_id
            for image_id, rec in st.images.items():
                if rec["manifest"]["digest"] == ref.digest:
                    return image_id
        elif str(ref) in st.tags:
            return st.tags[str(ref)]
    m = _HEX_PREFIX.match(name)
    if m:
        matches = [i for i in st.images if i.partition(":")[2].startswith(m.group(1))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise Ambiguous(f"short ID {name} is ambiguous: it matches {len(matches)} images")
    shown = ref.familiar if ref is not None else name
    raise ImageNotFound(f"No such image: {shown}")


def users(st: State, image_id: str) -> list[str]:
    """The containers that use the image."""
    return [cid for cid, c in st.containers.items() if c.get("image") == image_id]


def remove(st: State, name: str, force: bool) -> tuple[list[str], str | None]:
    """``docker rmi`` as moby's ImageDelete, applied to ``st``: a repository reference is
    removed, and the image deleted once no reference is left; an ID deletes the image with
    all its references, which needs ``force`` unless they are one tag plus digests of the
    same repository.  An image a container uses is never deleted (its references may go).
    Returns (the references untagged, the ID of the image deleted or None)."""
    untagged: list[str] = []
    image_id = resolve_id(st, name)
    rec = st.images[image_id]
    short = image_id.partition(":")[2][:12]
    used = users(st, image_id)
    tags = sorted((t for t, i in st.tags.items() if i == image_id),
                  key=lambda t: reference.parse(t).familiar)
    digests = list(rec.get("repoDigests", []))
    ref = _reference_named(name, image_id, tags, digests)
    if ref is not None:
        if used and not force and _single_reference(tags, digests):
            raise Conflict(f'conflict: unable to remove repository reference "{name}" '
                           f"(must force) - container {used[0][:12]} is using its "
                           f"referenced image {short}")
        gone = [str(ref)]
        if ref.digest is None and not any(
                reference.parse(t).name == ref.name for t in tags if t != str(ref)):
            # the repository's last tag: its digest references go with it
            gone += [x for x in digests if reference.parse(x).name == ref.name]
        tags = [t for t in tags if t not in gone]
        digests = [x for x in digests if x not in gone]
        st.tags.pop(str(ref), None)
        rec["repoDigests"] = digests
        untagged += [reference.parse(x).familiar for x in gone]
        if tags or digests or used:
            return untagged, None
    else:
        if (tags or digests) and not force and not _single_reference(tags, digests):
            raise Conflict(f"conflict: unable to delete {short} (must be forced) - "
                           "image is referenced in multiple repositories")
        if used and not force:
            raise Conflict(f"conflict: unable to delete {short} (must be forced) - "
                           f"image is being used by stopped container {used[0][:12]}")
        for t in tags:
            del st.tags[t]
        untagged += [reference.parse(x).familiar for x in [*tags, *digests]]
        rec["repoDigests"] = []
        if used:
            return untagged, None
    del st.images[image_id]
    return untagged, image_id


def _reference_named(name: str, image_id: str, tags: Sequence[str],
                     digests: Sequence[str]) -> Reference | None:
    """The repository reference ``name`` removes, or None when it names the image by ID
    (an ID prefix, or a digest that is no recorded reference of the image)."""
    hexid = image_id.partition(":")[2]
    if image_id.startswith(name) or hexid.startswith(name):
        return None
    try:
        ref = reference.parse(name)
    except InvalidReference:
        return None
    key = str(ref) if ref.digest is None else f"{ref.name}@{ref.digest}"
    return ref if key in tags or key in digests else None


def _single_reference(tags: Sequence[str], digests: Sequence[str]) -> bool:
    """moby's isSingleReference: at most one tag, and every reference in one repository."""
    if len(tags) > 1 or not (tags or digests):
        return False
    names = {reference.parse(x).name for x in [*tags, *digests]}
    return len(names) == 1


def prune(st: State, all_images: bool) -> tuple[list[str], list[str]]:
    """``docker image prune`` applied to ``st``: dangling images (every unused one with
    ``all_images``) go.  As docker's, a build's intermediate image is not dangling while an
    image it led to is kept (it is that image's build cache), nor is any image a container
    uses or an intermediate image of it.  Returns (references untagged, image IDs
    deleted)."""
    deleted: list[str] = []
    untagged: list[str] = []
    tagged = set(st.tags.values())
    used = {str(c.get("image")) for c in st.containers.values()}
    keep = _with_parents(st, used | (set() if all_images else tagged))
    for image_id in sorted(st.images):
        if image_id in keep:
            continue
        for t in [t for t, i in st.tags.items() if i == image_id]:
            del st.tags[t]
            untagged.append(reference.parse(t).familiar)
        st.images.pop(image_id)
        deleted.append(image_id)
    return untagged, deleted


def _with_parents(st: State, ids: set[str]) -> set[str]:
    """``ids`` and the images they were built from, step by step (the records' parents)."""
    out: set[str] = set()
    for image_id in ids:
        while image_id and image_id in st.images and image_id not in out:
            out.add(image_id)
            image_id = str(st.images[image_id].get("parent") or "")
    return out


def history(image: Image, layer_size: Callable[[Digest], int]) -> list[dict[str, Any]]:
    """Rows newest first: id (the image's on the newest row, "" below it, as docker shows
    ``<missing>``), created, created_by, size, comment, empty_layer, and the layer."""
    ids = image.diff_ids
    entries = image.config.history or [{} for _ in ids]
    rows = []
    li = 0
    for h in entries:
        empty = bool(h.get("empty_layer"))
        size = 0
        layer = None
        if not empty and li < len(ids):
            layer = ids[li]
            size = layer_size(layer)
            li += 1
        rows.append({"id": "", "created": h.get("created", ""),
                     "created_by": h.get("created_by", ""), "comment": h.get("comment", ""),
                     "author": h.get("author", ""), "empty_layer": empty, "size": size,
                     "layer": layer})
    rows.reverse()
    if rows:
        rows[0]["id"] = image.id
    return rows


def inspect(image: Image) -> dict[str, Any]:
    """docker's ``image inspect`` document."""
    cfg = image.config
    out: dict[str, Any] = {
        "Id": image.id,
        "RepoTags": [t.familiar for t in image.tags],
        "RepoDigests": [reference.parse(rd).familiar for rd in image.repo_digests],
        "Parent": image.parent,
        "Comment": cfg.field("comment"),
        "Created": cfg.field("created"),
        "DockerVersion": cfg.field("docker_version"),
        "Author": cfg.field("author"),
        "Config": cfg.container_config,
        "Architecture": cfg.field("architecture"),
        "Os": cfg.field("os"),
        "Size": image.size,
        "RootFS": {"Type": "layers", "Layers": list(image.diff_ids)},
        "Metadata": {"LastTagTime": image.added},
        "Descriptor": image.manifest_desc.to_json(),
    }
    if cfg.field("variant"):
        out["Variant"] = cfg.field("variant")
    return out
