"""Store: the facade over blobs, layers and refs — images, tags, removal and garbage collection.

Layout under the root (``--root``, ``STRATA_ROOT``, ``/var/lib/strata`` for root, else
``$XDG_DATA_HOME/strata``)::

    blobs/sha256/<hex>          manifests, configs, layer blobs as received
    layers/sha256/<hex>/        per diff_id: layer.tar, index, meta.json
    state.json                  tags, images (manifest, repo digests), containers
    lock, gc.lock               flock files (see state.py)
    containers/<id>/            upper/ and work/ of a container
    tmp/                        in-progress writes (same file system, so renames are atomic)

An image is named by its ID, the digest of its config.  Everything that adds an image goes
through ``add_image``, which checks that the manifest, config, every layer and every blob are
present and consistent before a ref can name it.

Caveats:
* Removal never blocks on an in-flight pull: when content is being added, ``rmi`` drops refs
  and leaves blob collection to the next ``prune``.  Likewise a failed import or load removes
  the content it added, unless another command is adding content at that moment.
* Listing readers take no lock: an image removed by another process between reading
  state.json and reading its blobs is skipped, as if the listing had come a moment later.
  Commands that read an image's content (save, export, push) hold ``reading()``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from unionfs.layers import LowerLayer
from unionfs.tarlayer import TarLayer
from unionfs.upper import remove_tree

from . import oci, reference, timefmt
from .cas import BlobStore
from .compress import parse_size
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
from .fsutil import unshared_size
from .instructions import apply_changes
from .layerstore import LayerStore, Progress
from .lazystate import LazyStore
from .reference import Reference
from .state import State, StateFile

_HEX_PREFIX = re.compile(r"^(?:sha256:)?([a-f0-9]{1,64})$")


def default_root() -> str:
    env = os.environ.get("STRATA_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/strata"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(data, "strata")


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


DEFAULT_MAX_LAYER_SIZE = 64 << 30
PARTIAL = "partial-"  # tmp/partial-<hex>: a resumable download of that blob


def default_max_layer_size() -> int:
    """``STRATA_MAX_LAYER_SIZE`` (``10G``, ``512M``…), else 64 GiB."""
    env = os.environ.get("STRATA_MAX_LAYER_SIZE")
    if not env:
        return DEFAULT_MAX_LAYER_SIZE
    try:
        return parse_size(env)
    except ValueError as exc:
        raise InvalidReference(f"STRATA_MAX_LAYER_SIZE: {exc}") from None


class Store:
    """One image store.  Safe to use from several processes at once.

    ``max_layer_size`` bounds what one layer (or a compressed archive given to ``load``) may
    decompress to, so a decompression bomb stops with ``InvalidImage`` instead of filling
    the disk (default: ``default_max_layer_size()``)."""

    def __init__(self, root: str | None = None, max_layer_size: int | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        os.makedirs(self.root, exist_ok=True)
        self.max_layer_size = max_layer_size or default_max_layer_size()
        self.blobs = BlobStore(self.root)
        self.layers = LayerStore(self.root, self.max_layer_size)
        self.lazy = LazyStore(self.root)  # layers pulled lazily, until complete (lazystate.py)
        self.state = StateFile(self.root)
        self.containers_dir = os.path.join(self.root, "containers")
        os.makedirs(self.containers_dir, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------

    def _documents(self, rec: dict[str, Any]
                   ) -> tuple[oci.Descriptor, oci.Manifest, oci.ImageConfig]:
        """An image record's manifest descriptor, manifest and config, read from the blobs."""
        desc = oci.Descriptor.from_json(rec["manifest"])
        manifest = oci.parse_manifest(self.blobs.read(desc.digest), desc.media_type)
        config = oci.ImageConfig.parse(self.blobs.read(manifest.config.digest),
                                       manifest.config.digest)
        return desc, manifest, config

    def _image(self, st: State, image_id: str) -> Image:
        rec = st.images[image_id]
        desc, manifest, config = self._documents(rec)
        # docker lists an image's references sorted by their familiar form (lexicalRefs)
        tags = tuple(sorted((reference.parse(t) for t, i in st.tags.items() if i == image_id),
                            key=lambda r: r.familiar))
        return Image(Digest(image_id), desc, manifest, config, tags,
                     tuple(rec.get("repoDigests", [])), int(rec.get("size", 0)),
                     str(rec.get("added", "")))

    def _image_unless_removed(self, st: State, image_id: str) -> Image | None:
        """The image as ``st`` records it; None when another process removed it (and
        collected its blobs) after ``st`` was read.  A blob missing from an image that is
        still recorded is corruption and raises."""
        try:
            return self._image(st, image_id)
        except ImageNotFound as exc:
            if image_id not in self.state.read().images:
                return None
            problem: StoreError = exc
        except (InvalidImage, DigestMismatch) as exc:
            problem = exc
        raise InvalidImage(f"image {image_id[7:19]} is damaged ({problem}): `strata check` "
                           "tells more, `strata rmi` removes it") from None

    def images(self, damaged: Callable[[InvalidImage], object] | None = None) -> list[Image]:
        """Every image.  One that is damaged raises, or with ``damaged`` is passed there and
        left out."""
        st = self.state.read()
        out = []
        for image_id in sorted(st.images):
            try:
                image = self._image_unless_removed(st, image_id)
            except InvalidImage as exc:
                if damaged is None:
                    raise
                damaged(exc)
                continue
            if image is not None:
                out.append(image)
        return out

    def image(self, image_id: Digest) -> Image:
        st = self.state.read()
        image = self._image_unless_removed(st, image_id) \
            if image_id in st.images else None
        if image is None:
            raise ImageNotFound(f"No such image: {image_id}")
        return image

    def resolve(self, name: str) -> Image:
        """The image ``name`` means: a tag, ``repo@digest``, an ID or a unique ID prefix."""
        st = self.state.read()
        image = self._image_unless_removed(st, self._resolve_id(st, name))
        if image is None:
            raise ImageNotFound(f"No such image: {name}")
        return image

    def _resolve_id(self, st: State, name: str) -> str:
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

    def open_layers(self, image: Image) -> list[LowerLayer]:
        """The image's layers as lower layers, top first (the caller closes them)."""
        opened: list[TarLayer] = []
        try:
            for desc, diff_id in reversed(list(zip(image.manifest.layers, image.diff_ids,
                                                   strict=True))):
                if not self.layers.has(diff_id) and self.lazy.layer_for(desc.digest, diff_id):
                    from .registry.lazy import LazyLayer  # still arriving: fetched by range

                    opened.append(LazyLayer(self.root, desc.digest))
                    continue
                opened.append(self.layers.open(diff_id))
        except BaseException:
            for layer in opened:
                layer.close()
            raise
        return list(opened)

    def lazy_layers(self, image: Image) -> list[Digest]:
        """Blob digests of the image's layers that are still arriving (pulled lazily)."""
        return [desc.digest for desc, diff_id in zip(image.manifest.layers, image.diff_ids,
                                                     strict=True)
                if not self.layers.has(diff_id) and self.lazy.layer_for(desc.digest, diff_id)]

    @contextlib.contextmanager
    def layers_of(self, image: Image) -> Iterator[list[LowerLayer]]:
        layers = self.open_layers(image)
        try:
            yield layers
        finally:
            for layer in layers:
                layer.close()

    # -- adding --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def ingesting(self) -> Iterator[None]:
        """Hold while adding content that no ref names yet (keeps GC away).  When the block
        fails, the blobs and layers it added that no image names are removed again, so a
        refused import or load leaves the store as it was (unless another command is adding
        content at that moment: then the next ``prune`` collects them)."""
        before: tuple[set[Digest], set[Digest]] | None = None
        self.sweep_leftovers()
        try:
            with self.state.ingesting():
                before = (set(self.blobs.digests()), set(self.layers.diff_ids()))
                yield
        except BaseException:
            if before is not None:
                self._discard_added(*before)
            raise

    def sweep_leftovers(self) -> None:
        """Remove what killed commands left in tmp/ (resumable downloads excepted) — only when
        no other command is adding content, collecting or changing the state, so everything
        there is known to be dead.  Never waits."""
        with self.state.collecting(wait=False) as ok, self.state.locked(wait=False) as free:
            if ok and free:
                self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Empty tmp/ but for the resumable downloads ``partial-<hex>`` of blobs not stored
        (the caller holds gc.lock and lock exclusively)."""
        for name in os.listdir(self.blobs.tmp_dir):
            if not self.resumable(name):
                remove_tree(os.path.join(self.blobs.tmp_dir, name))

    def resumable(self, name: str) -> bool:
        """Is ``tmp/name`` a resumable download (``partial-<hex>`` of a blob not stored)?"""
        hexpart = name.removeprefix(PARTIAL)
        return hexpart != name and not self.blobs.has(Digest("sha256:" + hexpart))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while reading stored images' blobs and layers (save, export): garbage
        collection waits, and an ``rmi`` meanwhile leaves the collection to the next prune,
        so nothing being read is deleted under the reader.  Resolve names inside it."""
        with self.state.ingesting():
            yield

    def _discard_added(self, blobs: set[Digest], layers: set[Digest]) -> None:
        with self.state.collecting(wait=False) as ok:
            if not ok:
                return
            keep_blobs, keep_layers = self.referenced(self.state.read())
            for diff_id in set(self.layers.diff_ids()) - layers - keep_layers:
                self.layers.delete(diff_id)
            for digest in set(self.blobs.digests()) - blobs - keep_blobs:
                self.blobs.delete(digest)

    def add_image(
        self,
        manifest_raw: bytes,
        media_type: str | None = None,
        *,
        tags: Sequence[Reference] = (),
        repo_digest: str | None = None,
        replace: bool = False,
    ) -> Image:
        """Record an image whose blobs and layers are already stored; tag it.  Verifies
        everything the manifest names before any ref can see it.

        An image already recorded under the same ID keeps its manifest, unless ``replace``
        asks for the new one (a commit that was asked for another compression or format)
        and no registry digest pins the old one."""
        manifest = oci.parse_manifest(manifest_raw, media_type)
        config_raw = self.blobs.read(manifest.config.digest)
        config = oci.ImageConfig.parse(config_raw, manifest.config.digest)
        if sha256_bytes(config_raw) != manifest.config.digest:
            raise InvalidImage(f"config blob {manifest.config.digest} is corrupt")
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidImage(
                f"manifest has {len(manifest.layers)} layers but the config lists "
                f"{len(config.diff_ids)} diff_ids")
        size = 0
        for desc, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            lazy = None if self.layers.has(diff_id) else self.lazy.layer_for(desc.digest, diff_id)
            if lazy is not None:
                size += lazy.content
                continue
            if not self.layers.has(diff_id):
                raise InvalidImage(f"layer {diff_id} is missing from the store")
            if not self.blobs.has(desc.digest):
                raise InvalidImage(f"layer blob {desc.digest} is missing from the store")
            size += self.layers.info(diff_id).content
        mdigest = self.blobs.put(manifest_raw)
        desc = oci.Descriptor(manifest.media_type, mdigest, len(manifest_raw))
        image_id = manifest.config.digest
        with self.state.transaction() as st:
            rec = st.images.get(image_id)
            if rec is None or not self.blobs.has(parse_digest(rec["manifest"]["digest"])):
                rec = {"manifest": desc.to_json(), "repoDigests": [], "size": size,
                       "added": timefmt.now()}
                st.images[image_id] = rec
            elif replace and not rec["repoDigests"]:
                rec["manifest"] = desc.to_json()
            if repo_digest and repo_digest not in rec["repoDigests"]:
                rec["repoDigests"] = [*rec["repoDigests"], repo_digest]
            for t in tags:
                st.tags[str(t)] = image_id
            return self._image(st, image_id)

    def put_config(self, config: dict[str, Any]) -> tuple[bytes, Digest]:
        raw = oci.canonical_config(config)
        return raw, self.blobs.put(raw)

    def import_tar(
        self,
        src: BinaryIO,
        *,
        source: str = "-",
        tag: Reference | None = None,
        changes: Sequence[str] = (),
        message: str | None = None,
        platform: oci.Platform | None = None,
        progress: Progress | None = None,
    ) -> Image:
        """``docker import``: a one-layer image from a rootfs tar (raw or compressed)."""
        container_config = apply_changes({}, changes)
        plat = platform or oci.host_platform()
        with self.ingesting():
            got = self.layers.ingest(self.blobs, src, keep_blob=False, progress=progress)
            diff_id = got.layer.diff_id
            self.blobs.link(self.layers.tar_path(diff_id), diff_id)
            created = timefmt.now()
            comment = message if message is not None else f"Imported from {source}"
            config: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os}
            if plat.variant:
                config["variant"] = plat.variant
            config.update({
                "created": created,
                "config": container_config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": created, "comment": comment}],
            })
            raw, cdigest = self.put_config(config)
            manifest = oci.manifest_bytes(
                oci.Descriptor(oci.OCI_CONFIG, cdigest, len(raw)),
                [oci.Descriptor(oci.OCI_LAYER, diff_id, got.layer.size)],
            )
            return self.add_image(manifest, oci.OCI_MANIFEST, tags=[tag] if tag else [])

    # -- tags and removal ------------------------------------------------------------------------

    def tag(self, src: str, dst: str) -> Reference:
        ref = reference.parse_repo_tag(dst)
        with self.state.transaction() as st:
            image_id = self._resolve_id(st, src)
            st.tags[str(ref)] = image_id
        return ref

    def _users(self, st: State, image_id: str) -> list[str]:
        return [cid for cid, c in st.containers.items() if c.get("image") == image_id]

    def remove(self, name: str, force: bool = False) -> Removed:
        """``docker rmi`` as moby's ImageDelete: a repository reference is removed, and the
        image deleted once no reference is left; an ID deletes the image with all its
        references, which needs ``force`` unless they are one tag plus digests of the same
        repository.  An image a container uses is never deleted (its references may go)."""
        untagged: list[str] = []
        with self.state.transaction() as st:
            image_id = self._resolve_id(st, name)
            rec = st.images[image_id]
            short = image_id.partition(":")[2][:12]
            users = self._users(st, image_id)
            tags = sorted((t for t, i in st.tags.items() if i == image_id),
                          key=lambda t: reference.parse(t).familiar)
            digests = list(rec.get("repoDigests", []))
            ref = self._reference_named(name, image_id, tags, digests)
            if ref is not None:
                if users and not force and _single_reference(tags, digests):
                    raise Conflict(f'conflict: unable to remove repository reference "{name}" '
                                   f"(must force) - container {users[0][:12]} is using its "
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
                if tags or digests or users:
                    return Removed(tuple(untagged), (), 0)
            else:
                if (tags or digests) and not force and not _single_reference(tags, digests):
                    raise Conflict(f"conflict: unable to delete {short} (must be forced) - "
                                   "image is referenced in multiple repositories")
                if users and not force:
                    raise Conflict(f"conflict: unable to delete {short} (must be forced) - "
                                   f"image is being used by stopped container {users[0][:12]}")
                for t in tags:
                    del st.tags[t]
                untagged += [reference.parse(x).familiar for x in [*tags, *digests]]
                rec["repoDigests"] = []
                if users:
                    return Removed(tuple(untagged), (), 0)
            del st.images[image_id]
        freed = self.collect(wait=False)
        return Removed(tuple(untagged), (image_id, *freed[0]), freed[1])

    @staticmethod
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

    def prune(self, all_images: bool = False) -> Removed:
        """``docker image prune``: delete dangling images (every unused one with ``all``)."""
        deleted: list[str] = []
        untagged: list[str] = []
        with self.state.transaction() as st:
            tagged = set(st.tags.values())
            used = {c.get("image") for c in st.containers.values()}
            for image_id in sorted(st.images):
                if image_id in used or (image_id in tagged and not all_images):
                    continue
                for t in [t for t, i in st.tags.items() if i == image_id]:
                    del st.tags[t]
                    untagged.append(reference.parse(t).familiar)
                st.images.pop(image_id)
                deleted.append(image_id)
        freed = self.collect(wait=True)
        return Removed(tuple(untagged), tuple(deleted) + freed[0], freed[1])

    def referenced(self, st: State) -> tuple[set[Digest], set[Digest]]:
        """Blobs and layers some image still needs (containers keep their image)."""
        blobs: set[Digest] = set()
        layers: set[Digest] = set()
        for rec in st.images.values():
            try:
                desc, manifest, config = self._documents(rec)
            except (StoreError, KeyError, TypeError):
                # a damaged image (``strata check`` names it) no longer says what it uses:
                # keep everything rather than delete a part of it
                return set(self.blobs.digests()), set(self.layers.diff_ids())
            blobs.update((desc.digest, manifest.config.digest))
            blobs.update(d.digest for d in manifest.layers)
            layers.update(config.diff_ids)
        return blobs, layers

    def collect(self, wait: bool) -> tuple[tuple[str, ...], int]:
        """Delete blobs and layers no image needs.  Returns (deleted layer diff_ids, bytes)."""
        with self.state.collecting(wait) as ok:
            if not ok:
                return (), 0
            st = self.state.read()
            keep_blobs, keep_layers = self.referenced(st)
            freed = 0
            deleted: list[str] = []
            for diff_id in self.layers.diff_ids():
                if diff_id not in keep_layers:
                    freed += unshared_size(self.layers.path(diff_id))
                    self.layers.delete(diff_id)
                    deleted.append(diff_id)
            for digest in self.lazy.digests():
                if digest not in keep_blobs:
                    freed += unshared_size(self.lazy.path(digest))
                    self.lazy.delete(digest)
            for digest in self.blobs.digests():
                if digest not in keep_blobs:
                    # an uncompressed layer's blob is a hardlink of its tar: counted once, here
                    freed += unshared_size(self.blobs.path(digest))
                    self.blobs.delete(digest)
            # tmp/ also holds the temp file of a state transaction in flight (``tag`` and
            # ``rmi`` do not take gc.lock): clean it only while no transaction runs
            with self.state.locked():
                self._clean_tmp()
            return tuple(deleted), freed

    # -- history and inspect ---------------------------------------------------------------------

    def history(self, image: Image) -> list[dict[str, Any]]:
        """Rows newest first: created, created_by, size, comment, empty_layer, and the layer."""
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
                size = self.layers.info(layer).content if self.layers.has(layer) else 0
                li += 1
            rows.append({"created": h.get("created", ""), "created_by": h.get("created_by", ""),
                         "comment": h.get("comment", ""), "author": h.get("author", ""),
                         "empty_layer": empty, "size": size, "layer": layer})
        rows.reverse()
        return rows

    def inspect(self, image: Image) -> dict[str, Any]:
        cfg = image.config
        out: dict[str, Any] = {
            "Id": image.id,
            "RepoTags": [t.familiar for t in image.tags],
            "RepoDigests": [reference.parse(rd).familiar for rd in image.repo_digests],
            "Parent": "",
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


def _single_reference(tags: Sequence[str], digests: Sequence[str]) -> bool:
    """moby's isSingleReference: at most one tag, and every reference in one repository."""
    if len(tags) > 1 or not (tags or digests):
        return False
    names = {reference.parse(x).name for x in [*tags, *digests]}
    return len(names) == 1


def open_input(path: str) -> BinaryIO:
    """A file argument or ``-`` for standard input, as a binary stream."""
    import sys

    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InvalidImage(f"open {path}: no such file or directory") from None
    except IsADirectoryError:
        raise InvalidImage(f"{path} is a directory") from None
    except OSError as exc:
        raise InvalidImage(f"open {path}: {(exc.strerror or str(exc)).lower()}") from None


ProgressFactory = Callable[[str, int | None], Progress | None]
