"""``strata check``: verify the whole store, and with ``repair`` remove what no ref needs.

What is checked, one ``Problem`` per finding:

* **blobs** — every file under ``blobs/sha256`` hashes to its name; stray names.
* **layers** — every ``layers/sha256/<hex>``: the tar hashes to the diff_id, the stored index
  equals a fresh index of the tar (``LayerStore.check``), ``meta.json`` is readable.
* **images and refs** — every image record: its manifest and config blobs are present, parse
  and match (the image ID is the config's digest); the layer count matches the diff_ids; every
  layer blob and every layer (by diff_id) is present; an uncompressed layer's blob is its tar.
  Every tag and repo digest parses and names a recorded image.
* **containers** — every container record names a recorded image; its ``upper`` exists and
  can be read all the way down; ``work/`` holds no leftovers (unless it is mounted); no
  container directory lacks a record.
* **runtime** — no OCI runtime state under ``runtime/`` (``crun --root``) of a container whose
  ``strata run`` is gone: one killed with SIGKILL leaves its command running, orphaned, and
  the runtime's state behind.
* **mounts** — no record of a daemon that is gone, no FUSE mount left without its daemon, and
  no daemon left serving only another mount namespace (unmounted here, still holding its
  container).
* **tmp/** — nothing but resumable downloads (``partial-<hex>`` of a blob not yet stored).

Repairs touch only what no ref needs: a corrupt blob or layer no image uses is deleted, an index
that disagrees with a sound tar is rebuilt, a tag naming no image is dropped; leftovers (tmp/,
work/, orphan container directories, stale mount records, dead mounts) are removed, a
leftover container of the runtime is deleted (``RUNTIME delete --force``: what still runs of it
is killed), and a daemon serving only another mount namespace is stopped.  A blob or
layer an image uses is never removed: that problem stays reported (pull or load the image
again).  Content no image names (layers kept by an interrupted pull) is valid: it is counted,
not reported; ``strata image prune`` collects it.

Locks: the whole check holds ``gc.lock`` exclusively (no ingest or collection runs, so nothing
appears in or vanishes from ``blobs/``, ``layers/`` and ``tmp/``), and the scan of the refs,
containers, mounts and tmp/ — and every repair of them — also holds ``lock``.

Caveats:
* A process killed with SIGKILL cannot clean up: its temp files stay in tmp/ and its
  copy-up in the container's work dir.  They are reported as leftovers until ``--repair``;
  every writing command also sweeps tmp/ leftovers when it is the only one running
  (``gc.ingesting``), and mounting a container empties its work dir.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from unionfs.control import is_mounted, unmount
from unionfs.errors import MountError
from unionfs.upper import remove_tree

from . import gc, lazystate, mounting, oci, reference
from .cas import BlobStore
from .containers import Containers
from .digest import Digest, parse_digest
from .errors import InvalidReference, StoreError
from .gc import PARTIAL
from .layerstore import LayerStore
from .mounts import MountRecord, Mounts
from .state import State

if TYPE_CHECKING:
    from .api import Store

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` (blob, layer, image, tag, container, mount, tmp, state),
    ``subject`` (a digest, a name, a path) and what is wrong; ``repair`` fixes it (None when
    only the user can: the content is needed by an image)."""

    kind: str
    subject: str
    message: str
    repair: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.kind} {self.subject}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    repaired: list[Problem] = field(default_factory=list)
    failed: list[tuple[Problem, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """No problem is left (found ones were all repaired)."""
        return len(self.repaired) == len(self.problems) and not self.failed


def check(store: Store, repair: bool = False) -> Report:
    """Check ``store``; with ``repair`` fix what can be fixed (see the module docstring)."""
    report = Report()
    with store.state.collecting(wait=True):
        _Checker(store, report).run(repair)
    return report


class _Checker:
    def __init__(self, store: Store, report: Report) -> None:
        self.store = store
        self.blobs: BlobStore = store.blobs
        self.layers: LayerStore = store.layers
        self.report = report
        self.bad_blobs: set[Digest] = set()
        self.bad_layers: set[Digest] = set()

    def add(self, kind: str, subject: str, message: str,
            repair: Callable[[], None] | None = None) -> None:
        self.report.problems.append(Problem(kind, subject, message, repair))

    def run(self, repair: bool) -> None:
        # content first (long: hashing), under gc.lock only; refs and the rest under lock too
        self.report.counts["blobs"] = self._blobs()
        self.report.counts["layers"] = self._layers()
        with self.store.state.locked():
            try:
                st = self.store.state.read()
            except StoreError as exc:
                self.add("state", "state.json", str(exc))
                return
            keep_blobs, keep_layers = gc.referenced(self.store, st)
            self._mark_needed(keep_blobs, keep_layers)
            self.report.counts["images"] = self._images(st)
            self._tags(st)
            self.report.counts["containers"] = self._containers(st)
            self._runtime(st)  # before the mounts: ending a container lets its mount go
            self._mounts()
            self._tmp()
            self.report.counts["unreferenced blobs"] = len(
                set(self.blobs.digests()) - keep_blobs)
            self.report.counts["unreferenced layers"] = len(
                set(self.layers.diff_ids()) - keep_layers)
            if repair:
                self._repair()
        if repair:
            self._repair_state()

    # -- content -----------------------------------------------------------------------------

    def _blobs(self) -> int:
        n = 0
        for name in sorted(os.listdir(self.blobs.dir)):
            path = os.path.join(self.blobs.dir, name)
            if not _HEX64.match(name) or not _is_file(path):
                self.add("blob", name, "stray entry in blobs/sha256 (not a blob)",
                         _remover(path))
                continue
            n += 1
            digest = Digest("sha256:" + name)
            try:
                ok = self.blobs.verify(digest)
            except OSError as exc:
                self.bad_blobs.add(digest)
                self.add("blob", digest, f"unreadable: {exc.strerror or exc}",
                         partial(self.blobs.delete, digest))
                continue
            if not ok:
                self.bad_blobs.add(digest)
                self.add("blob", digest, "content does not match its digest",
                         partial(self.blobs.delete, digest))
        return n

    def _layers(self) -> int:
        n = 0
        for name in sorted(os.listdir(self.layers.dir)):
            path = os.path.join(self.layers.dir, name)
            if not _HEX64.match(name) or not os.path.isdir(path) or os.path.islink(path):
                self.add("layer", name, "stray entry in layers/sha256 (not a layer)",
                         _remover(path))
                continue
            n += 1
            diff_id = Digest("sha256:" + name)
            messages = [m.removeprefix(f"layer {diff_id}: ") for m in self.layers.check(diff_id)]
            if not messages:
                continue
            # only the index or meta.json is wrong: check() found the tar there, hashing to
            # its diff_id (it says so otherwise), so it can be indexed again
            if all("index" in m or "meta.json" in m for m in messages):
                self.add("layer", diff_id, "; ".join(messages) + " (the tar is sound: the "
                         "index can be rebuilt)", partial(self.layers.rebuild_index, diff_id))
                continue
            self.bad_layers.add(diff_id)
            self.add("layer", diff_id, "; ".join(messages),
                     partial(self.layers.delete, diff_id))
        return n

    def _mark_needed(self, keep_blobs: set[Digest], keep_layers: set[Digest]) -> None:
        """A corrupt blob or layer that an image needs cannot be removed: the user must get
        the image again."""
        probs = self.report.problems
        for i, p in enumerate(probs):
            if p.repair is None:
                continue
            needed = (p.kind == "blob" and p.subject in keep_blobs and p.subject in self.bad_blobs
                      ) or (p.kind == "layer" and p.subject in keep_layers
                            and p.subject in self.bad_layers)
            if needed:
                probs[i] = Problem(p.kind, p.subject, p.message + " (an image needs it: pull or "
                                   "load that image again)")

    # -- images and refs ---------------------------------------------------------------------

    def _images(self, st: State) -> int:
        for image_id, rec in sorted(st.images.items()):
            for message in self._image_problems(image_id, rec):
                self.add("image", image_id, message)
        return len(st.images)

    def _image_problems(self, image_id: str, rec: object) -> list[str]:
        try:
            parse_digest(image_id)
            if not isinstance(rec, dict):
                raise TypeError("not an object")
            desc = oci.Descriptor.from_json(rec.get("manifest"), "manifest descriptor")
            digests = rec.get("repoDigests", [])
            if not isinstance(digests, list) or not all(isinstance(x, str) for x in digests):
                raise TypeError("repoDigests is not a list of strings")
        except (StoreError, TypeError) as exc:
            return [f"record is malformed: {exc}"]
        out = []
        for rd in digests:
            try:
                if reference.parse(rd).digest is None:
                    out.append(f"repo digest {rd!r} has no digest")
            except InvalidReference as exc:
                out.append(f"repo digest {rd!r}: {exc}")
        try:
            manifest = oci.parse_manifest(self._blob(desc.digest, "manifest"), desc.media_type)
            if manifest.config.digest != image_id:
                return [*out, f"manifest {desc.digest} names config {manifest.config.digest}"]
            config = oci.ImageConfig.parse(self._blob(Digest(image_id), "config"),
                                           Digest(image_id))
        except StoreError as exc:
            return [*out, str(exc)]
        if len(config.diff_ids) != len(manifest.layers):
            out.append(f"manifest has {len(manifest.layers)} layers but the config lists "
                       f"{len(config.diff_ids)} diff_ids")
        for ldesc, diff_id in zip(manifest.layers, config.diff_ids, strict=False):
            if not self.layers.has(diff_id) and \
                    self.layers.lazy.layer_for(ldesc.digest, diff_id) is not None:
                out += lazystate.check(self.layers.lazy, ldesc.digest)  # pulled with --lazy
                continue
            try:
                self._blob(ldesc.digest, "layer blob")
                if self.blobs.size(ldesc.digest) != ldesc.size:
                    out.append(f"layer blob {ldesc.digest} has {self.blobs.size(ldesc.digest)} "
                               f"bytes, the manifest says {ldesc.size}")
            except StoreError as exc:
                out.append(str(exc))
            if not self.layers.has(diff_id):
                out.append(f"layer {diff_id} is missing from the store")
            elif diff_id in self.bad_layers:
                out.append(f"layer {diff_id} is corrupt")
            if oci.LAYER_TYPES.get(ldesc.media_type) == "none" and ldesc.digest != diff_id:
                out.append(f"uncompressed layer blob {ldesc.digest} is not its diff_id "
                           f"{diff_id}")
        return out

    def _blob(self, digest: Digest, what: str) -> bytes:
        if digest in self.bad_blobs:
            raise StoreError(f"{what} {digest} is corrupt")
        if not self.blobs.has(digest):
            raise StoreError(f"{what} {digest} is missing from the store")
        if what == "layer blob":
            return b""
        if self.blobs.size(digest) > oci.MAX_DOCUMENT:
            raise StoreError(f"{what} {digest} is larger than {oci.MAX_DOCUMENT} bytes")
        return self.blobs.read(digest)

    def _tags(self, st: State) -> None:
        for tag, image_id in sorted(st.tags.items()):
            try:
                ref = reference.parse(tag)
                if str(ref) != tag:
                    self.add("tag", tag, f"is not in its normal form {str(ref)!r}")
            except InvalidReference as exc:
                self.add("tag", tag, str(exc))
            if image_id not in st.images:
                self.add("tag", tag, f"names image {image_id}, which does not exist",
                         partial(self._drop_tag, tag))

    # -- containers, mounts, tmp ---------------------------------------------------------------

    def _containers(self, st: State) -> int:
        cs = Containers(self.store)
        root = Containers(self.store).dir
        for cid, rec in sorted(st.containers.items()):
            path = os.path.join(root, cid)
            if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
                self.add("container", cid, "record is malformed")
                continue
            if rec.get("image") not in st.images:
                self.add("container", cid, f"names image {rec.get('image')}, which does not "
                         "exist")
            upper, work = os.path.join(path, "upper"), os.path.join(path, "work")
            if not os.path.isdir(upper) or os.path.islink(upper):
                self.add("container", cid, "its upper directory is missing")
                continue
            for message in _unreadable(upper):
                self.add("container", cid, message)
            if not os.path.isdir(work) or os.path.islink(work):
                self.add("container", cid, "its work directory is missing",
                         partial(os.makedirs, work, exist_ok=True))
                continue
            if not cs.mounts.where(cid, path):  # a mount owns its work dir
                left = os.listdir(os.path.join(work, "work")) if os.path.isdir(
                    os.path.join(work, "work")) else []
                if left:
                    self.add("container", cid, f"{len(left)} leftover(s) in work/ (an "
                             "interrupted copy-up)", partial(_empty, os.path.join(work, "work")))
        for name in sorted(os.listdir(root)):
            if name not in st.containers:
                self.add("container", name, "directory without a container record",
                         _remover(os.path.join(root, name)))
        return len(st.containers)

    def _runtime(self, st: State) -> None:
        from . import run

        cs = Containers(self.store)
        for kind, cid in run.runtime_leftovers(self.store.root):
            rec = st.containers.get(cid)
            if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                c = cs.of_record(cid, rec)
                ran = c.last_run
                if ran is not None and ran.status == "running" and not ran.orphaned:
                    continue  # its strata run runs it
                if cs.mounts.where(cid, c.root):
                    continue  # mounted: a strata run starting it (killed, the mount goes too)
            whose = f"container {rec['name']}" if isinstance(rec, dict) and "name" in rec else \
                "a removed container"
            self.add("runtime", cid[:12], f"{kind} still holds {whose}, whose strata run is "
                     "gone (killed?); --repair deletes it, ending what still runs of it",
                     partial(run.clear_runtime, self.store.root, cid))

    def _mounts(self) -> None:
        mounts = Mounts(self.store.root)
        live = {r.mountpoint: r for r in mounts.records()}
        for path in mounts.files():
            try:
                rec = mounts.read(path)
            except (OSError, ValueError, TypeError):
                self.add("mount", os.path.basename(path), "unreadable mount record",
                         _remover(path))
                continue
            now = live.get(rec.mountpoint)
            if now is not None and now.elsewhere:
                self.add("mount", rec.mountpoint,
                         f"unmounted here, but its daemon (pid {rec.pid}) still serves it to "
                         f"another mount namespace, holding its {rec.kind}; `strata umount` "
                         "again (or --repair) stops it",
                         partial(mounting.release, self.store.root, now))
                continue
            if now is not None:
                continue
            message = f"record of a mount whose daemon (pid {rec.pid}) is gone"
            if is_mounted(rec.mountpoint, rec.dev or None):
                message += f"; {rec.mountpoint} is still mounted (strata umount clears it)"
            self.add("mount", rec.mountpoint, message, partial(self._clear_mount, rec, path))

    def _clear_mount(self, rec: MountRecord, path: str) -> None:
        if is_mounted(rec.mountpoint, rec.dev or None):
            try:
                unmount(rec.mountpoint, lazy=True)
            except MountError as exc:
                raise OSError(str(exc)) from None
        for p in (path, path[: -len(".json")] + ".sock"):
            _remover(p)()

    def _tmp(self) -> None:
        tmp = self.blobs.tmp_dir
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if name.startswith(PARTIAL) and _HEX64.match(name[len(PARTIAL):]) and _is_file(path):
                if gc.resumable(self.store, name):
                    continue
                self.add("tmp", name, "partial download of a blob that is stored",
                         _remover(path))
                continue
            self.add("tmp", name, "leftover of an interrupted command", _remover(path))

    # -- repair ------------------------------------------------------------------------------

    def _repair(self) -> None:
        for p in self.report.problems:
            if p.repair is None or p.kind == "tag":
                continue
            self._do(p)

    def _repair_state(self) -> None:
        for p in self.report.problems:
            if p.repair is not None and p.kind == "tag":
                self._do(p)

    def _do(self, p: Problem) -> None:
        assert p.repair is not None
        try:
            p.repair()
        except (OSError, StoreError) as exc:
            self.report.failed.append((p, str(exc)))
        else:
            self.report.repaired.append(p)

    def _drop_tag(self, tag: str) -> None:
        with self.store.state.transaction() as st:
            if st.tags.get(tag) is not None and st.tags[tag] not in st.images:
                del st.tags[tag]


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remover(path: str) -> Callable[[], None]:
    return partial(remove_tree, path)


def _empty(path: str) -> None:
    for name in os.listdir(path):
        remove_tree(os.path.join(path, name))


def _unreadable(top: str) -> list[str]:
    """Everything under ``top`` can be listed and stat'ed (no symlink is followed).  What
    vanishes meanwhile (a mounted container changes) is not unreadable."""
    out: list[str] = []

    def onerror(exc: OSError) -> None:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return
        out.append(f"cannot read {os.path.relpath(exc.filename or top, top)} in its upper: "
                   f"{exc.strerror}")

    for dirpath, _dirs, files in os.walk(top, onerror=onerror):
        for name in files:
            try:
                os.lstat(os.path.join(dirpath, name))
            except OSError as exc:
                onerror(exc)
    return out[:20]
