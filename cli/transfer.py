"""Commands that move images in and out of the store as files: import, export, save, load."""

from __future__ import annotations

import argparse
from typing import Any

from imagestore import archive, oci, reference
from imagestore.containers import Containers
from imagestore.errors import InvalidReference, StoreError
from imagestore.store import open_input
from unionfs.layers import DirLayer
from unionfs.resolve import UnionView

from .common import UserError, output_sink, store_of


def register(sub: Any, image_sub: Any) -> None:
    for parent in (sub, image_sub):
        p = parent.add_parser("import", help="import a rootfs tarball as an image")
        p.add_argument("file", metavar="FILE|-")
        p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]")
        p.add_argument("-c", "--change", action="append", default=[],
                       help="apply a Dockerfile instruction (CMD, ENV, ...) to the image")
        p.add_argument("-m", "--message", help="commit message for the imported image")
        p.add_argument("--platform", help="OS/ARCH[/VARIANT] of the image (default: host)")
        p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="export a container's (or an image's) rootfs as a tar")
    p.add_argument("name", metavar="CONTAINER|IMAGE")
    p.add_argument("-o", "--output", help="write to a file instead of stdout")
    p.set_defaults(func=cmd_export)
    for parent in (sub, image_sub):
        p = parent.add_parser("save", help="save images to a tar archive")
        p.add_argument("images", nargs="+", metavar="IMAGE")
        p.add_argument("-o", "--output", help="write to a file instead of stdout")
        p.add_argument("--format", choices=["docker", "oci"], default="docker",
                       help="docker-archive (default) or an OCI image layout archive")
        p.set_defaults(func=cmd_save)
    for parent in (sub, image_sub):
        p = parent.add_parser("load", help="load images from a tar archive or OCI layout")
        p.add_argument("-i", "--input", default="-", help="read from a file instead of stdin")
        p.add_argument("-q", "--quiet", action="store_true", help="suppress progress output")
        p.add_argument("--platform", help="platform to load from a multi-platform archive")
        p.set_defaults(func=cmd_load)


def _platform(text: str | None) -> oci.Platform | None:
    if text is None:
        return None
    try:
        return oci.Platform.parse(text)
    except InvalidReference as exc:
        raise UserError(str(exc)) from None


def cmd_import(args: argparse.Namespace) -> int:
    store = store_of(args)
    tag = reference.parse_repo_tag(args.repository) if args.repository else None
    src = open_input(args.file)
    try:
        image = store.import_tar(src, source=args.file, tag=tag, changes=args.change,
                                 message=args.message, platform=_platform(args.platform))
    finally:
        if args.file != "-":
            src.close()
    print(image.id)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A container's merged rootfs (held still while it is read), or an image's."""
    from .commit import paused

    store = store_of(args)
    cs = Containers(store)
    container = cs.find(args.name)
    with store.reading():
        if container is None:
            image = store.resolve(args.name)
            with output_sink(args.output, "the export") as sink, \
                    store.layers_of(image) as layers:
                archive.export_rootfs(UnionView(layers), sink)
            return 0
        with output_sink(args.output, "the export") as sink, paused(cs, container, True), \
                store.layers_of(store.image(container.image)) as layers:  # type: ignore[arg-type]
            archive.export_rootfs(UnionView([DirLayer(container.upper), *layers]), sink)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from imagestore.api import save_targets  # the API (and trio) only when saving

    store = store_of(args)
    with store.reading():  # an rmi meanwhile cannot collect what is being saved
        targets = save_targets(store, args.images)
        write = archive.save_oci if args.format == "oci" else archive.save_docker
        with output_sink(args.output, "the archive") as sink:
            write(store, targets, sink)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    store = store_of(args)
    try:
        loaded = archive.load(store, args.input, platform=_platform(args.platform))
    except FileNotFoundError as exc:
        raise UserError(f"open {args.input}: no such file or directory") from exc
    except StoreError:
        raise
    if not loaded:
        raise UserError("the archive holds no images")
    for item in loaded:
        if item.tags:
            for t in item.tags:
                print(f"Loaded image: {t.familiar}")
        else:
            print(f"Loaded image ID: {item.image.id}")
    return 0
