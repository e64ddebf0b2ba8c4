"""The public Python API: ``imagestore.Store``, the one class behind every ``strata`` command.

A ``Store`` is one store directory and every operation a program (or a test suite, or the CLI)
wants: images, tags, removal, pull and push, load, import, save and export, containers, diff
and commit, mounts (as context managers, or detached as ``strata mount`` makes them), and the
store check.  Each ``strata`` command is one call here.  Methods take names (``"busybox"``,
``"localhost:5000/app:v1"``, an ID or ID prefix) or the values other methods returned
(``Image``, ``Container``), return frozen dataclasses, and raise ``StoreError`` subclasses
(``errors.py``), never bare strings or ``OSError``.  ``docs/api.md`` is the reference;
``docs/architecture.md`` says which module does the work behind each method.

Layout under the root (``root``, ``$STRATA_ROOT``, ``/var/lib/strata`` for root, else
``$XDG_DATA_HOME/strata``)::

    blobs/sha256/<hex>          manifests, configs, layer blobs as received
    layers/sha256/<hex>/        per diff_id: layer.tar, index, meta.json
    state.json                  tags, images (manifest, repo digests), containers
    lock, gc.lock               flock files (state.py)
    containers/<id>/            upper/ and work/ of a container, mount.lock; after a run also
                                init/ (stubs of mount targets), hosts, hostname, resolv.conf,
                                run/ (the runtime bundle and state.json)
    mounts/<key>.json .log .sock    a live mount's record, its daemon's log, control socket
    runtime/<crun|runc>/<id>    the OCI runtime's state of a running container (crun --root)
    blob-sources.json           repositories each blob came from or went to (push mounts)
    tmp/                        in-progress writes (same file system, so renames are atomic)

Seams: the class holds argument handling and locking order only.  ``layers`` (a
``LayerStore``, which owns the ``BlobStore`` ``blobs``) and ``state`` (``StateFile``) are the
storage; ``images`` (records, names, docker's removal rules), ``gc`` (collection, ingesting),
``archive``, ``commit``, ``changeset``, ``containers``, ``mounts``, ``mounting`` (the only
spawner of the mount daemon; the mount methods are in ``storemounts``), ``run`` (the OCI
runtime), ``check`` and ``registry`` do the work.  The registry client (httpx, trio) is
imported only when ``pull``/``push`` run, and ``archive``, ``changeset``, ``commit``, ``gc``
and ``run`` only by the methods that use them (every ``strata`` command pays for what it
imports).

Caveats:
* ``pull``/``push`` run their own trio loop; in trio code use ``pull_async``/``push_async``.
  The other methods block; trio code can call them through ``trio.to_thread.run_sync``.
* A mount starts a daemon process (about half a second); see ``mounting``.
* Removal never blocks on an in-flight pull: when content is being added, ``remove`` drops
  refs and leaves blob collection to the next ``prune``.  Readers of content (save, export,
  push, and whoever holds ``reading()``) keep collection away the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from . import images, oci, reference
from .containers import Container, Containers
from .errors import ImageNotFound, InvalidImage, InvalidReference, Unsupported
from .fsutil import output_sink
from .images import Image, Removed
from .layerstore import LayerStore
from .lazystate import promote_complete
from .mounts import MountRecord, Mounts
from .paths import default_root
from .progress import ByteCounter, ProgressEvent, ProgressFn, short
from .reference import Reference
from .state import StateFile
from .storemounts import ImageLike, MountMethods, PathLike
from .targets import Directories

if TYPE_CHECKING:
    from . import archive
    from .build.builder import BuildProgress
    from .check import Report
    from .registry import PullResult, PushResult
    from .runner import RunResult

ContainerLike = str | Container
Output = PathLike | BinaryIO

__all__ = ["Container", "ContainerLike", "Directories", "Image", "ImageLike", "MountRecord",
           "Output", "PathLike", "Removed", "Store", "default_root"]

DEFAULT_MAX_LAYER_SIZE = 64 << 30
PUSH_COMPRESSIONS = ("gzip", "zstd", "estargz", "zstd:chunked")  # convert.FORMATS


def default_max_layer_size() -> int:
    """``STRATA_MAX_LAYER_SIZE`` (``10G``, ``512M``…), else 64 GiB."""
    env = os.environ.get("STRATA_MAX_LAYER_SIZE")
    if not env:
        return DEFAULT_MAX_LAYER_SIZE
    from .compress import parse_size

    try:
        return parse_size(env)
    except ValueError as exc:
        raise InvalidReference(f"STRATA_MAX_LAYER_SIZE: {exc}") from None


class Store(MountMethods):
    """An image store (``root``: a directory, created if missing; default ``$STRATA_ROOT``,
    else ``/var/lib/strata`` for root, else ``$XDG_DATA_HOME/strata``).  Safe to use from
    several threads and processes at once; every method is atomic (a failure leaves the store
    as it was).  ``max_layer_size`` bounds what one layer (or a compressed archive given to
    ``load``) may decompress to, so a decompression bomb stops with ``InvalidImage``."""

    def __init__(self, root: str | None = None, max_layer_size: int | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        os.makedirs(self.root, exist_ok=True)
        self.max_layer_size = max_layer_size or default_max_layer_size()
        self.layers = LayerStore(self.root, self.max_layer_size)
        self.blobs = self.layers.blobs
        self.state = StateFile(self.root)

    # -- images --------------------------------------------------------------------------------

    def images(self, damaged: Callable[[InvalidImage], object] | None = None) -> list[Image]:
        """Every image.  One that is damaged raises ``InvalidImage``, or with ``damaged`` is
        passed there and left out."""
        st = self.state.read()
        out = []
        for image_id in sorted(st.images):
            try:
                image = self._unless_removed(st, image_id)
            except InvalidImage as exc:
                if damaged is None:
                    raise
                damaged(exc)
                continue
            if image is not None:
                out.append(image)
        return out

    def _unless_removed(self, st: Any, image_id: str) -> Image | None:
        return images.image_unless_removed(self.blobs, st, image_id,
                                           lambda i: i in self.state.read().images)

    def image(self, image_id: str) -> Image:
        """The image with the full ID ``image_id``.  Raises ``ImageNotFound``."""
        st = self.state.read()
        image = self._unless_removed(st, image_id) if image_id in st.images else None
        if image is None:
            raise ImageNotFound(f"No such image: {image_id}")
        return image

    def resolve(self, name: str) -> Image:
        """The image ``name`` means: a tag, ``repo@digest``, an ID or a unique ID prefix.
        Raises ``ImageNotFound``, ``Ambiguous``, ``InvalidReference``."""
        st = self.state.read()
        image = self._unless_removed(st, images.resolve_id(st, name))
        if image is None:
            raise ImageNotFound(f"No such image: {name}")
        return image

    def _image_of(self, image: ImageLike) -> Image:
        return self.image(image.id) if isinstance(image, Image) else self.resolve(image)

    def tag(self, src: str | Image, dst: str) -> Reference:
        """Name the image ``src`` also ``dst`` (``repo[:tag]``, default tag ``latest``);
        returns the new reference.  Raises ``ImageNotFound``, ``InvalidReference``,
        ``Ambiguous``."""
        ref = reference.parse_repo_tag(dst)
        with self.state.transaction() as st:
            st.tags[str(ref)] = images.resolve_id(st, src.id if isinstance(src, Image) else src)
        return ref

    def remove(self, name: str | Image, force: bool = False) -> Removed:
        """``docker rmi``: untag ``name``; the image is deleted with its last name.  An
        ``Image`` (or an ID) deletes the image with all its names, which needs ``force`` when
        it has several.  Raises ``ImageNotFound``, ``Conflict`` (a container uses it, or
        ``force`` is needed)."""
        from . import gc

        with self.state.transaction() as st:
            untagged, deleted = images.remove(st, name.id if isinstance(name, Image) else name,
                                              force)
        if deleted is None:
            return Removed(tuple(untagged), (), 0)
        layers, freed = gc.collect(self, wait=False)
        return Removed(tuple(untagged), (deleted, *layers), freed)

    def prune(self, all_images: bool = False) -> Removed:
        """``docker image prune``: delete dangling images (every image no container uses with
        ``all_images``) and collect what no image needs."""
        from . import gc

        with self.state.transaction() as st:
            untagged, deleted = images.prune(st, all_images)
        layers, freed = gc.collect(self, wait=True)
        return Removed(tuple(untagged), (*deleted, *layers), freed)

    def history(self, image: ImageLike) -> list[dict[str, Any]]:
        """``docker history``: rows newest first, with ``created``, ``created_by``,
        ``comment``, ``author``, ``empty_layer``, ``size`` (what the layer adds) and
        ``layer`` (its diff_id or None)."""
        img = self._image_of(image)
        return images.history(img, lambda d: self.layers.info(d).content
                              if self.layers.has(d) else 0)

    def inspect(self, image: ImageLike) -> dict[str, Any]:
        """docker's ``image inspect`` document (``Id``, ``RepoTags``, ``Config``...)."""
        return images.inspect(self._image_of(image))

    def lazy_layers(self, image: ImageLike) -> list[str]:
        """Blob digests of the image's layers pulled with ``pull(lazy=True)`` whose bytes are
        not all here yet (they arrive as they are read; a ``pull`` without ``lazy`` completes
        them).  Empty for an image that is fully local."""
        img = self._image_of(image)
        lazy = self.layers.lazy
        return [desc.digest for desc, diff_id in zip(img.manifest.layers, img.diff_ids,
                                                     strict=True)
                if not self.layers.has(diff_id) and lazy.layer_for(desc.digest, diff_id)
                and not lazy.is_complete(desc.digest)]

    def _complete_lazy(self, imgs: Sequence[Image]) -> None:
        """Fetch what is missing of the images' lazily pulled layers and make them ordinary
        layers (the caller holds ``reading`` or ``gc.ingesting``).  Raises ``StoreError``
        when bytes cannot be had."""
        digests = [d.digest for img in imgs for d, diff_id in zip(img.manifest.layers,
                                                                   img.diff_ids, strict=True)
                   if not self.layers.has(diff_id) and self.layers.lazy.has(d.digest)]
        if digests:
            from .registry import lazypull

            for digest in dict.fromkeys(digests):
                lazypull.complete_or_fail(self, digest)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while reading stored images' blobs and layers yourself: garbage collection
        waits, and a ``remove`` meanwhile leaves the collection to the next ``prune``, so
        nothing being read is deleted under the reader.  Resolve names inside it.  (Lazily
        pulled layers that a mount completed become ordinary layers on entry.)"""
        with self.state.ingesting():
            promote_complete(self.layers)  # lazy layers a mount daemon completed
            yield

    # -- registries ----------------------------------------------------------------------------

    def pull(self, name: str, *, platform: str | None = None,
             progress: ProgressFn | None = None, lazy: bool = False) -> PullResult:
        """Download ``name`` (``repo[:tag]`` or ``repo@digest``) from its registry, as
        ``strata pull`` does; returns the image with the digest pulled.  Raises
        ``InvalidReference``, ``registry.RegistryError`` (``AuthError``, ``NotFound``),
        ``DigestMismatch``, ``Unsupported`` (no such platform), ``StoreFull``.  ``lazy``:
        layers in a seekable format (eStargz, zstd:chunked) are recorded by their table of
        contents only and fetched as they are read; a pull without it completes them."""
        ref = _pull_ref(name, progress)
        if lazy:  # most often a few small requests: without an event loop when it can
            from .registry.quickpull import pull_quickly

            result = pull_quickly(self, ref, _platform(platform), progress)
            if result is not None:
                return result
        import trio

        from . import registry

        return trio.run(lambda: registry.pull(self, ref, platform=_platform(platform),
                                              events=progress, lazy=lazy))

    async def pull_async(self, name: str, *, platform: str | None = None,
                         progress: ProgressFn | None = None, lazy: bool = False) -> PullResult:
        """``pull`` for trio code (the layers' work runs in worker threads)."""
        from . import registry

        return await registry.pull(self, _pull_ref(name, progress),
                                   platform=_platform(platform), events=progress, lazy=lazy)

    def push(self, image: ImageLike, dest: str | None = None, *,
             progress: ProgressFn | None = None, compression: str | None = None) -> PushResult:
        """Upload ``image`` to ``dest`` (default: the name given, which must be a local tag,
        or an ``Image``'s first tag), with its blobs exactly as stored.  ``compression``
        (``gzip``, ``zstd``, ``estargz``, ``zstd:chunked``) recompresses on the way the layers
        in another form and pushes an OCI manifest of them (the store keeps the image as it
        is, and records no RepoDigest for it).  Raises ``ImageNotFound``,
        ``InvalidReference``, ``Unsupported``, ``registry.RegistryError``,
        ``DigestMismatch``."""
        import trio

        return trio.run(lambda: self.push_async(image, dest, progress=progress,
                                                compression=compression))

    async def push_async(self, image: ImageLike, dest: str | None = None, *,
                         progress: ProgressFn | None = None,
                         compression: str | None = None) -> PushResult:
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
        if progress is not None:
            progress(ProgressEvent("push", "", f"The push refers to repository [{ref.name}]"))
        if compression is not None and compression not in PUSH_COMPRESSIONS:
            raise Unsupported(f"unknown compression {compression!r} "
                              f"({', '.join(PUSH_COMPRESSIONS)})")
        return await registry.push(self, img, ref, events=progress, compression=compression)

    # -- archives ------------------------------------------------------------------------------

    def load(self, source: PathLike | BinaryIO, *, platform: str | None = None,
             progress: ProgressFn | None = None) -> list[archive.Loaded]:
        """``docker load``: every image of a docker-archive or OCI layout (a tar, compressed
        or not, as a path or a binary file object, or a directory), tagged as the archive
        names them.  Raises ``InvalidImage`` (also for a missing or unreadable file),
        ``DigestMismatch``, ``Unsupported``, ``StoreFull``."""
        from . import archive

        path = source if not isinstance(source, str | os.PathLike) else os.fspath(source)
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
            raise _input_error(path if isinstance(path, str) else "-", exc) from None
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
        from . import archive
        from . import commit as _commit

        tag = reference.parse_repo_tag(ref) if ref is not None else None
        plat = _platform(platform)
        with contextlib.ExitStack() as stack:
            name = "-"
            if isinstance(source, str | os.PathLike):
                name = os.fspath(source)
                source = stack.enter_context(archive.open_input(name))
            total = _size_of(source)
            counter = ByteCounter(progress, "import", "", "Importing", total, "Imported") \
                if progress is not None else None
            try:
                image = _commit.import_rootfs(self, source, source=name, tag=tag,
                                              changes=changes, message=message, platform=plat,
                                              progress=counter)
            except OSError as exc:
                raise _input_error(name, exc) from None
        if counter is not None:
            counter.finish(short(image.diff_ids[-1]))
        return image

    def save(self, images: ImageLike | Sequence[ImageLike], dest: Output, *,
             format: str = "docker") -> None:
        """Write ``images`` as one archive to ``dest`` (a path, replaced atomically, or a
        binary file object): ``format="docker"`` is Docker 25+'s docker-archive, ``"oci"``
        an OCI image layout with the stored blobs unchanged.  Names follow ``docker save``:
        ``repo:tag`` saves that tag, a bare ``repo`` every tag of it, an ID the image without
        tags; an ``Image`` is saved with all its tags.  Raises ``ImageNotFound``,
        ``Unsupported`` (format), ``OutputError``."""
        from . import archive

        if format not in ("docker", "oci"):
            raise Unsupported(f"unknown archive format {format!r} (docker or oci)")
        items = [images] if isinstance(images, str | Image) else list(images)
        write = archive.save_oci if format == "oci" else archive.save_docker
        with self.reading():  # an rmi meanwhile cannot collect what is being saved
            targets = archive.save_targets(self, items)
            self._complete_lazy([image for image, _ in targets])  # every byte is needed
            with output_sink(dest, "the archive") as sink:
                write(self, targets, sink)

    def export(self, target: ImageLike | Container, dest: Output) -> None:
        """The flattened rootfs of an image or a container (a container's writable layer
        on top; a mounted container is paused while it is read) as one tar.  A string names
        a container first, then an image, as ``strata export``.  Raises ``ImageNotFound``,
        ``ContainerNotFound``, ``MountFailed`` (pausing failed), ``OutputError``."""
        from . import changeset

        cs = Containers(self)
        with self.reading(), contextlib.ExitStack() as stack:
            c = cs.get(target.id) if isinstance(target, Container) else \
                cs.find(target) if isinstance(target, str) else None
            if c is None:
                assert not isinstance(target, Container)
                image = self._image_of(target)
                layers = stack.enter_context(
                    self.layers.opened(self.layers.stack(image.diff_ids)))
            else:
                stack.enter_context(cs.mounts.paused(c.id))
                layers = stack.enter_context(cs.layers(c, upper=True))
            from unionfs.resolve import UnionView

            with output_sink(dest, "the export") as sink:
                changeset.export_rootfs(UnionView(layers), sink)

    # -- containers ----------------------------------------------------------------------------

    def create_container(self, image: ImageLike, name: str | None = None) -> Container:
        """A container: an empty writable layer over ``image``, named ``name`` (default: a
        random ``adjective_name``).  Raises ``ImageNotFound``, ``InvalidReference`` (a bad
        name), ``Conflict`` (the name is taken)."""
        ref = image.id if isinstance(image, Image) else image
        return Containers(self).create(ref, name)

    def container(self, name: str) -> Container:
        """The container named ``name`` (its name, ID or a unique ID prefix), with its
        ``mount`` as it is now.  Raises ``ContainerNotFound``, ``Ambiguous``."""
        return Containers(self).get(name)

    def containers(self) -> list[Container]:
        """Every container, newest first, each with its ``mount`` as it is now."""
        return Containers(self).all()

    def _container_of(self, container: ContainerLike) -> Container:
        return self.container(container.id if isinstance(container, Container) else container)

    def remove_container(self, container: ContainerLike, *, force: bool = False) -> None:
        """Delete a container and its writable layer.  A mounted container is refused
        (``Conflict``) unless ``force``, which first kills it if ``run`` runs it, then ends
        its mount (here, and a daemon still serving another mount namespace).  Raises
        ``ContainerNotFound``, ``Conflict``, ``MountFailed``."""
        c = self._container_of(container)
        if force and c.last_run is not None:
            from .run import stop

            stop(self, c)  # as docker rm -f
            c = self._container_of(c)
        if c.mount is not None and force:
            from . import unmounting

            unmounting.release(self.root, c.mount)
        Containers(self).remove(c)

    def diff(self, container: ContainerLike) -> list[tuple[str, str]]:
        """The container's changes as ``(kind, path)``, ``kind`` one of ``"A"`` (added),
        ``"C"`` (changed), ``"D"`` (deleted), sorted by path, as ``strata diff``.  Raises
        ``ContainerNotFound``, ``Ambiguous``."""
        from . import changeset

        c = self._container_of(container)
        from unionfs.resolve import UnionView

        with Containers(self).layers(c, upper=False) as layers:
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
        from . import commit as _commit
        from .compress import LAYER_COMPRESSIONS

        if compression not in (*LAYER_COMPRESSIONS, "estargz"):
            raise Unsupported(f"unknown compression {compression!r} "
                              f"({', '.join(LAYER_COMPRESSIONS)}, estargz)")
        if format not in ("oci", "docker"):
            raise Unsupported(f"unknown image format {format!r} (oci or docker)")
        if timestamp is not None and timestamp < 0:
            raise Unsupported("timestamp must be a number of seconds since the epoch")
        tag = reference.parse_repo_tag(ref) if ref is not None else None
        c = self._container_of(container)
        counter = ByteCounter(progress, "commit", "", "Writing layer", None, "Committed") \
            if progress is not None else None
        with Mounts(self.root).paused(c.id, pause):
            image = _commit.commit(self, c, tag=tag, author=author, message=message,
                                   changes=changes, squash=squash, compression=compression,
                                   oci_format=format == "oci", epoch=timestamp,
                                   progress=counter)
        if counter is not None:
            counter.finish(short(image.manifest.layers[-1].digest))
        return image

    # -- build ---------------------------------------------------------------------------------

    def build(self, context: PathLike, dockerfile: PathLike | None = None, *,
              dockerfile_text: str | None = None, tags: Sequence[str] = (),
              build_args: Mapping[str, str] | None = None, target: str | None = None,
              no_cache: bool = False, pull: bool = False,
              labels: Mapping[str, str] | None = None, network: str = "host",
              progress: BuildProgress | None = None) -> Image:
        """``docker build``: the image a Dockerfile makes from the build context directory
        ``context``, tagged with each of ``tags``.  The Dockerfile is ``dockerfile`` (a path;
        default ``CONTEXT/Dockerfile``) or the text ``dockerfile_text``; ``build_args`` set
        ARGs, ``target`` names the last stage to build, ``labels`` are added to the image,
        ``network`` (``host`` or ``none``) is RUN's.  Steps found in the build cache are
        reused unless ``no_cache``; base images are pulled when missing (always with
        ``pull``).  ``progress`` gets ``BuildEvent`` values (each step, CACHED or its time,
        RUN output).  Raises ``BuildFileError`` (the Dockerfile, naming file and line),
        ``CopySourceError`` (a COPY source), ``BuildStepFailed`` (a RUN that failed),
        ``InvalidReference``, ``ImageNotFound``, ``registry.RegistryError``."""
        from .build.builder import build

        refs = [reference.parse_repo_tag(t) for t in tags]
        return build(self, os.fspath(context),
                     dockerfile=os.fspath(dockerfile) if dockerfile is not None else None,
                     dockerfile_text=dockerfile_text, tags=refs, build_args=build_args or {},
                     target=target, no_cache=no_cache, pull=pull, labels=labels or {},
                     network=network, progress=progress)

    # -- running -------------------------------------------------------------------------------

    @overload
    def run(self, target: ImageLike | Container, command: str | Sequence[str] | None = ...,
            *, capture_output: Literal[False] = ..., **options: Any) -> int: ...

    @overload
    def run(self, target: ImageLike | Container, command: str | Sequence[str] | None = ...,
            *, capture_output: Literal[True], **options: Any) -> RunResult: ...

    def run(self, target: ImageLike | Container, command: str | Sequence[str] | None = None,
            *, capture_output: bool = False, input: bytes | None = None,
            interactive: bool = False, tty: bool = False, name: str | None = None,
            remove: bool = False, runtime: str | None = None, engine: str | None = None,
            **options: Any) -> int | RunResult:
        """``strata run``: run ``command`` (a list, or a string split as a shell would;
        default: the image's Entrypoint and Cmd) in a new container of the image ``target``
        (named ``name``; removed at the end with ``remove``) or in the existing container
        ``target``, through the OCI runtime (crun, or ``runtime``), and return its exit status
        (docker's: 128+N when killed by signal N).  With ``capture_output`` the result is a
        ``RunResult`` with ``status``, ``stdout`` and ``stderr`` (bytes); otherwise the
        command writes to this process's stdout and stderr.  ``input`` is fed to its stdin;
        ``interactive`` gives it this process's stdin (``-i``); otherwise stdin is /dev/null.
        ``tty`` gives it a terminal (``-t``) the size of this process's.  ``engine``: the
        container mount's (``fuse``, ``kernel``, ``auto``: ``mount``'s; default ``auto``, or
        ``$STRATA_ENGINE``).  ``options`` are
        ``run.options``'s keywords, docker's flags: ``entrypoint``, ``env`` (a mapping or
        ``K=V`` strings), ``env_file``, ``workdir``, ``user``, ``group_add``, ``hostname``,
        ``network`` (``"none"`` or ``"host"``), ``volumes`` (``"HOST:CTR[:ro]"``), ``tmpfs``,
        ``cap_add``, ``cap_drop``, ``privileged``, ``read_only``, ``security_opt``,
        ``cgroups``.  Needs root.  Raises ``RunError`` (``exit_status`` 125; 126/127 when
        the command cannot be executed or is not found), ``ImageNotFound``,
        ``ContainerNotFound``, ``Conflict`` (the container is mounted or running),
        ``MountFailed``."""
        from . import run as _run
        from .runner import Streams
        from .runtime import RunError
        from .terminal import window_size

        if tty and capture_output:
            raise RunError("a terminal's output cannot be captured (tty with capture_output)")
        if tty and interactive and not os.isatty(0):
            raise RunError("the input device is not a TTY")
        opts = _run.options(command, interactive=interactive or input is not None, tty=tty,
                            console_size=window_size(1, 0) if tty else None, **options)
        streams = Streams(stdin=0 if interactive and input is None else None, input=input,
                          capture=capture_output)
        result = _run.run(self, target, opts, streams, name=name, remove=remove,
                          runtime_path=runtime, engine=engine)
        return result if capture_output else result.status

    # -- the store itself ----------------------------------------------------------------------

    def check(self, repair: bool = False) -> Report:
        """``strata check``: verify every blob, layer, image, tag, container, mount record and
        ``tmp/``; with ``repair`` fix what can be fixed without losing what an image needs."""
        from . import check

        return check.check(self, repair)


def _pull_ref(name: str, progress: ProgressFn | None) -> Reference:
    """The reference to pull, saying so when it takes the default tag."""
    ref = reference.parse(name)
    if progress is not None and ref.digest is None and \
            reference.parse(name, default_tag=False).tag is None:
        progress(ProgressEvent("pull", "", f"Using default tag: {ref.tag}"))
    return ref


def _platform(text: str | None) -> oci.Platform | None:
    return oci.Platform.parse(text) if text is not None else None


def _size_of(f: BinaryIO) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size or None
    except (OSError, ValueError, AttributeError):
        return None


def _input_error(path: str, exc: OSError) -> InvalidImage:
    reason = (exc.strerror or str(exc)).lower()
    return InvalidImage(f"open {path}: {reason}")
