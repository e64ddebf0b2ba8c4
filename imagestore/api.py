"""The public Python API: ``imagestore.Store`` with everything the ``strata`` command does.

``Store`` here is the store of ``store.py`` plus the operations a program (or a test suite)
wants without shelling out: pull, push, load, import, tag, remove, save, export, containers,
commit, and mounts as context managers.  Each method takes names (``"busybox"``,
``"localhost:5000/app:v1"``, an ID or ID prefix) or the values other methods returned
(``Image``, ``Container``), returns frozen dataclasses, and raises ``StoreError`` subclasses
(``errors.py``), never bare strings or ``OSError``.  ``docs/api.md`` is the reference.

Seams: this module holds no policy of its own; it parses arguments into the internal types and
calls the same functions the CLI calls (``archive``, ``commit``, ``containers``, ``registry``,
``mounting``), so the CLI and the API cannot drift.  The registry client (httpx) is imported
only when ``pull``/``push`` run.

Caveats:
* ``pull``/``push`` run their own trio loop; in trio code use ``pull_async``/``push_async``.
  The other methods block; trio code can call them through ``trio.to_thread.run_sync``.
* ``mount`` starts a daemon process per mount (about half a second); see ``mounting``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from unionfs.layers import DirLayer
from unionfs.resolve import UnionView

from . import archive, changeset, mounting, oci, reference
from . import commit as _commit
from . import store as _store
from .compress import LAYER_COMPRESSIONS
from .containers import Container, Containers, MountRecord
from .errors import InvalidImage, InvalidReference, OutputError, Unsupported
from .progress import ByteCounter, ProgressFn, from_registry, short
from .reference import Reference
from .store import Image, Removed

if TYPE_CHECKING:
    from .registry import PullResult, PushResult

ImageLike = str | Image
ContainerLike = str | Container
PathLike = str | os.PathLike[str]
Output = PathLike | BinaryIO

__all__ = ["Container", "ContainerLike", "Image", "ImageLike", "MountRecord", "Output",
           "PathLike", "Removed", "Store", "save_targets"]


class Store(_store.Store):
    """An image store (``root``: a directory, created if missing; default ``$STRATA_ROOT``,
    else ``/var/lib/strata`` for root, else ``$XDG_DATA_HOME/strata``).  Safe to use from
    several threads and processes at once; every method is atomic (a failure leaves the store
    as it was).  Inherited and public: ``root``, ``images()``, ``resolve(name)``,
    ``history(image)``, ``inspect(image)``, ``prune(all_images=False)``."""

    # -- images ------------------------------------------------------------------------------

    def _image_of(self, image: ImageLike) -> Image:
        return self.image(image.id) if isinstance(image, Image) else self.resolve(image)

    def pull(self, name: str, *, platform: str | None = None,
             progress: ProgressFn | None = None, lazy: bool = False) -> PullResult:
        """Download ``name`` (``repo[:tag]`` or ``repo@digest``) from its registry, as
        ``strata pull`` does; returns the image with the digest pulled.  Raises
        ``InvalidReference``, ``registry.RegistryError`` (``AuthError``, ``NotFound``),
        ``DigestMismatch``, ``Unsupported`` (no such platform), ``StoreFull``.  ``lazy``:
        layers in a seekable format (eStargz, zstd:chunked) are recorded by their table of
        contents only and fetched as they are read; a pull without it completes them."""
        import trio

        return trio.run(lambda: self.pull_async(name, platform=platform, progress=progress,
                                                lazy=lazy))

    async def pull_async(self, name: str, *, platform: str | None = None,
                         progress: ProgressFn | None = None, lazy: bool = False) -> PullResult:
        """``pull`` for trio code (the layers' work runs in worker threads)."""
        from . import registry

        ref = reference.parse(name)
        events = from_registry("pull", progress) if progress is not None else None
        return await registry.pull(self, ref, platform=_platform(platform), events=events,
                                   lazy=lazy)

    def push(self, image: ImageLike, dest: str | None = None, *,
             progress: ProgressFn | None = None) -> PushResult:
        """Upload ``image`` to ``dest`` (default: the name given, or the image's first tag),
        with its blobs exactly as stored.  Raises ``ImageNotFound``, ``InvalidReference``,
        ``registry.RegistryError``, ``DigestMismatch``."""
        import trio

        return trio.run(lambda: self.push_async(image, dest, progress=progress))

    async def push_async(self, image: ImageLike, dest: str | None = None, *,
                         progress: ProgressFn | None = None) -> PushResult:
        """``push`` for trio code."""
        from . import registry

        img = self._image_of(image)
        if dest is not None:
            ref = reference.parse(dest)
        elif isinstance(image, Image):
            if not img.tags:
                raise InvalidReference(f"image {img.short_id} has no tag: say where to push it")
            ref = img.tags[0]
        else:
            ref = reference.parse(image)
            if ref not in img.tags and ref.digest is None:
                raise InvalidReference(
                    f"An image does not exist locally with the tag: {ref.familiar}")
        events = from_registry("push", progress) if progress is not None else None
        return await registry.push(self, img, ref, events=events)

    def load(self, source: PathLike, *, platform: str | None = None,
             progress: ProgressFn | None = None) -> list[archive.Loaded]:
        """``docker load``: every image of a docker-archive or OCI layout (a tar, compressed
        or not, or a directory), tagged as the archive names them.  Raises ``InvalidImage``
        (also for a missing or unreadable file), ``DigestMismatch``, ``Unsupported``,
        ``StoreFull``."""
        path = os.fspath(source)
        counters: list[ByteCounter] = []

        def factory(diff_id: str, size: int | None) -> ByteCounter | None:
            if progress is None:
                return None
            counters.append(ByteCounter(progress, "load", short(diff_id), "Loading layer",
                                        size, "Loaded"))
            return counters[-1]

        try:
            loaded = archive.load(self, path, platform=_platform(platform), progress=factory)
        except OSError as exc:
            raise _input_error(path, exc) from None
        for c in counters:
            c.finish()
        return loaded

    def import_rootfs(self, source: PathLike | BinaryIO, ref: str | None = None, *,
                      changes: Sequence[str] = (), message: str | None = None,
                      platform: str | None = None,
                      progress: ProgressFn | None = None) -> Image:
        """``docker import``: a one-layer image from a rootfs tar (a path or a binary file
        object; raw, gzip, zstd, bzip2 or xz), named ``ref`` when given; ``changes`` are
        Dockerfile instructions (``"CMD ..."``, ``"ENV K=V"``...).  Raises ``InvalidImage``,
        ``InvalidLayer``, ``InvalidReference``, ``Unsupported``, ``StoreFull``."""
        tag = reference.parse_repo_tag(ref) if ref is not None else None
        plat = _platform(platform)
        if isinstance(source, str | os.PathLike):
            path = os.fspath(source)
            with _store.open_input(path) as f:
                total = os.fstat(f.fileno()).st_size or None
                return self._import(f, path, tag, changes, message, plat, total, progress)
        return self._import(source, "-", tag, changes, message, plat, None, progress)

    def _import(self, f: BinaryIO, name: str, tag: Reference | None, changes: Sequence[str],
                message: str | None, plat: oci.Platform | None, total: int | None,
                progress: ProgressFn | None) -> Image:
        counter = ByteCounter(progress, "import", "", "Importing", total, "Imported") \
            if progress is not None else None
        try:
            image = self.import_tar(f, source=name, tag=tag, changes=changes, message=message,
                                    platform=plat, progress=counter)
        except OSError as exc:
            raise _input_error(name, exc) from None
        if counter is not None:
            counter.finish(short(image.diff_ids[-1]))
        return image

    def tag(self, src: str | Image, dst: str) -> Reference:
        """Name the image ``src`` also ``dst`` (``repo[:tag]``, default tag ``latest``);
        returns the new reference.  Raises ``ImageNotFound``, ``InvalidReference``,
        ``Ambiguous``."""
        return super().tag(src.id if isinstance(src, Image) else src, dst)

    def remove(self, name: str | Image, force: bool = False) -> Removed:
        """``docker rmi``: untag ``name``; the image is deleted with its last name.  An
        ``Image`` (or an ID) deletes the image with all its names, which needs ``force`` when
        it has several.  Raises ``ImageNotFound``, ``Conflict`` (a container uses it, or
        ``force`` is needed)."""
        return super().remove(name.id if isinstance(name, Image) else name, force)

    def save(self, images: ImageLike | Sequence[ImageLike], dest: Output, *,
             format: str = "docker") -> None:
        """Write ``images`` as one archive to ``dest`` (a path, replaced atomically, or a
        binary file object): ``format="docker"`` is Docker 25+'s docker-archive, ``"oci"``
        an OCI image layout with the stored blobs unchanged.  Names follow ``docker save``:
        ``repo:tag`` saves that tag, a bare ``repo`` every tag of it, an ID the image without
        tags; an ``Image`` is saved with all its tags.  Raises ``ImageNotFound``,
        ``Unsupported`` (format), ``OutputError``."""
        if format not in ("docker", "oci"):
            raise Unsupported(f"unknown archive format {format!r} (docker or oci)")
        items = [images] if isinstance(images, str | Image) else list(images)
        targets = save_targets(self, items)
        write = archive.save_oci if format == "oci" else archive.save_docker
        with _output(dest, "the archive") as sink:
            write(self, targets, sink)

    def export(self, target: ImageLike | Container, dest: Output) -> None:
        """The flattened rootfs of an image or a container (a container's writable layer
        on top; a mounted container is paused while it is read) as one tar.  A string names
        a container first, then an image, as ``strata export``.  Raises ``ImageNotFound``,
        ``ContainerNotFound``, ``MountFailed`` (pausing failed), ``OutputError``."""
        cs = Containers(self)
        container = target if isinstance(target, Container) else \
            cs.find(target) if isinstance(target, str) else None
        if container is None:
            assert not isinstance(target, Container)
            image = self._image_of(target)
            with _output(dest, "the export") as sink, self.layers_of(image) as layers:
                archive.export_rootfs(UnionView(layers), sink)
            return
        c = cs.get(container.id)
        with _output(dest, "the export") as sink, cs.paused(c), \
                self.layers_of(self.image(c.image)) as layers:  # type: ignore[arg-type]
            archive.export_rootfs(UnionView([DirLayer(c.upper), *layers]), sink)

    # -- containers ----------------------------------------------------------------------------

    def create_container(self, image: ImageLike, name: str | None = None) -> Container:
        """A container: an empty writable layer over ``image``, named ``name`` (default: a
        random ``adjective_name``).  Raises ``ImageNotFound``, ``InvalidReference`` (a bad
        name), ``Conflict`` (the name is taken)."""
        ref = image.id if isinstance(image, Image) else image
        return Containers(self).create(ref, name)

    def container(self, name: str) -> Container:
        """The container named ``name`` (its name, ID or a unique ID prefix).  Raises
        ``ContainerNotFound``, ``Ambiguous``."""
        return Containers(self).get(name)

    def containers(self) -> list[Container]:
        """Every container, newest first."""
        return Containers(self).all()

    def _container_of(self, container: ContainerLike) -> Container:
        return Containers(self).get(container.id if isinstance(container, Container)
                                    else container)

    def remove_container(self, container: ContainerLike, *, force: bool = False) -> None:
        """Delete a container and its writable layer.  A mounted container is refused
        (``Conflict``) unless ``force``, which unmounts it first.  Raises
        ``ContainerNotFound``, ``Conflict``, ``MountFailed``."""
        cs = Containers(self)
        c = self._container_of(container)
        rec = cs.mount_of(c)
        if rec is not None and force:
            mounting.unmount_record(rec)
        cs.remove(c)

    def diff(self, container: ContainerLike) -> list[tuple[str, str]]:
        """The container's changes as ``(kind, path)``, ``kind`` one of ``"A"`` (added),
        ``"C"`` (changed), ``"D"`` (deleted), sorted by path, as ``strata diff``.  Raises
        ``ContainerNotFound``, ``Ambiguous``."""
        c = self._container_of(container)
        with self.layers_of(self.image(c.image)) as layers:  # type: ignore[arg-type]
            return changeset.changes(c.upper, UnionView(layers))

    def commit(self, container: ContainerLike, ref: str | None = None, *, author: str = "",
               message: str = "", changes: Sequence[str] = (), squash: bool = False,
               compression: str = "gzip", format: str = "oci", timestamp: int | None = None,
               pause: bool = True, progress: ProgressFn | None = None) -> Image:
        """A new image: the container's image plus one layer holding its changes (with
        ``squash``, the whole merged rootfs as the only layer), named ``ref`` when given.
        A mounted container is paused (writes held) while its layer is read, unless
        ``pause`` is false.  ``timestamp`` (default ``$SOURCE_DATE_EPOCH``) clamps mtimes and
        sets ``created`` for reproducible IDs.  Raises ``ContainerNotFound``,
        ``InvalidReference``, ``Unsupported`` (compression, format), ``MountFailed`` (the
        mount did not pause), ``StoreFull``."""
        if compression not in (*LAYER_COMPRESSIONS, "estargz"):
            raise Unsupported(f"unknown compression {compression!r} "
                              f"({', '.join(LAYER_COMPRESSIONS)}, estargz)")
        if format not in ("oci", "docker"):
            raise Unsupported(f"unknown image format {format!r} (oci or docker)")
        if timestamp is not None and timestamp < 0:
            raise Unsupported("timestamp must be a number of seconds since the epoch")
        tag = reference.parse_repo_tag(ref) if ref is not None else None
        cs = Containers(self)
        c = self._container_of(container)
        counter = ByteCounter(progress, "commit", "", "Writing layer", None, "Committed") \
            if progress is not None else None
        with cs.paused(c, pause), \
                self.layers_of(self.image(c.image)) as layers:  # type: ignore[arg-type]
            image = _commit.commit(self, c, layers, tag=tag, author=author, message=message,
                                   changes=changes, squash=squash, compression=compression,
                                   oci_format=format == "oci", epoch=timestamp,
                                   progress=counter)
        if counter is not None:
            counter.finish(short(image.manifest.layers[-1].digest))
        return image

    # -- mounts ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def mount(self, target: ImageLike | Container, mountpoint: PathLike | None = None, *,
              read_only: bool = False, allow_other: bool = False, suid: bool = False,
              dev: bool = False, timeout: float = mounting.READY_TIMEOUT) -> Iterator[Path]:
        """Mount an image (always read-only) or a container (writable unless ``read_only``)
        for the ``with`` block and yield the mountpoint: ``mountpoint`` (created if missing)
        or a new temporary directory, removed afterwards.  A string names a container first,
        then an image, as ``strata mount``.  Mounts are ``nosuid,nodev`` unless ``suid`` or
        ``dev``; ``allow_other`` lets other users in.  The daemon runs in a child process; the
        mount is taken down when the block ends, raises or is interrupted.  Raises
        ``FuseUnavailable``, ``MountFailed``, ``ImageNotFound``, ``ContainerNotFound``,
        ``Conflict`` (the container is mounted elsewhere)."""
        p = mounting.plan(self, target, mountpoint, read_only=read_only,
                          allow_other=allow_other, suid=suid, dev=dev)
        with mounting.mount_plan(p, timeout) as path:
            yield path

    @contextlib.asynccontextmanager
    async def open_mount(self, target: ImageLike | Container,
                         mountpoint: PathLike | None = None, *, read_only: bool = False,
                         allow_other: bool = False, suid: bool = False, dev: bool = False,
                         timeout: float = mounting.READY_TIMEOUT) -> AsyncIterator[Path]:
        """``mount`` for trio code: ``async with store.open_mount("busybox") as root:``.
        The event loop never blocks on the daemon; the teardown runs shielded from
        cancellation."""
        p = mounting.plan(self, target, mountpoint, read_only=read_only,
                          allow_other=allow_other, suid=suid, dev=dev)
        async with mounting.open_mount_plan(p, timeout) as path:
            yield path

    def mounts(self) -> list[MountRecord]:
        """The mounts of this store that are alive (``strata mounts``)."""
        return Containers(self).mounts()

    def check_fuse(self) -> None:
        """Mount and unmount an empty directory: raises ``FuseUnavailable`` with the reason
        (no ``/dev/fuse``, no ``fusermount3``, the kernel refused the mount) when mounts
        cannot work here, ``MountFailed`` for another failure."""
        mounting.probe(self)


# -- helpers ---------------------------------------------------------------------------------------


def _platform(text: str | None) -> oci.Platform | None:
    return oci.Platform.parse(text) if text is not None else None


def _input_error(path: str, exc: OSError) -> InvalidImage:
    reason = (exc.strerror or str(exc)).lower()
    return InvalidImage(f"open {path}: {reason}")


def save_targets(store: _store.Store, names: Sequence[ImageLike]
                 ) -> list[tuple[Image, list[Reference]]]:
    """What ``docker save`` writes for ``names``: a tag saves that tag, a bare repository every
    tag of it, an ID the image without tags, an ``Image`` the image with all its tags."""
    out: dict[str, tuple[Image, list[Reference]]] = {}

    def add(image: Image, ref: Reference | None) -> None:
        entry = out.setdefault(image.id, (image, []))
        if ref is not None and ref not in entry[1]:
            entry[1].append(ref)

    for name in names:
        if isinstance(name, Image):
            for t in name.tags or (None,):
                add(name, t)
            continue
        try:
            ref: Reference | None = reference.parse(name, default_tag=False)
        except InvalidReference:
            ref = None
        if ref is not None and ref.digest is None and ref.tag is None:
            tagged = [(i, t) for i in store.images() for t in i.tags if t.name == ref.name]
            for image, t in tagged:
                add(image, t)
            if tagged:
                continue
        image = store.resolve(name)
        named = ref is not None and ref.digest is None and ref.with_tag(
            ref.tag or "latest") in image.tags
        add(image, ref.with_tag(ref.tag or "latest") if named and ref else None)
    return list(out.values())


@contextlib.contextmanager
def _output(dest: Output, what: str) -> Iterator[Callable[[bytes], object]]:
    """A sink writing to ``dest``: a file object as is, or a path through a temp file in the
    same directory, renamed into place on success (a failure leaves nothing behind).  Errors
    writing it are ``OutputError``; errors of the block pass unchanged."""
    if not isinstance(dest, str | os.PathLike):
        out = dest

        def write_to(data: bytes) -> None:
            try:
                out.write(data)
            except OSError as exc:
                raise OutputError(f"cannot write {what}: {exc.strerror or exc}") from None

        yield write_to
        return
    path = os.fspath(dest)
    if os.path.isdir(path):
        raise OutputError(f"invalid output path: {path} is a directory")

    def fail(exc: OSError) -> OutputError:
        return OutputError(f"cannot write {path}: {exc.strerror or exc}")

    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".strata-")
    except OSError as exc:
        raise fail(exc) from None
    try:
        with os.fdopen(fd, "wb") as f:

            def write(data: bytes) -> None:
                try:
                    f.write(data)
                except OSError as exc:
                    raise fail(exc) from None

            yield write
            try:
                f.flush()
                os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.rename(tmp, path)
            except OSError as exc:
                raise fail(exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
