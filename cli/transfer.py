"""Commands that move images in and out of the store as files: import, export, save, load."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import UserError, output, source, store_of


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


def cmd_import(args: argparse.Namespace) -> int:
    image = store_of(args).import_rootfs(source(args.file), args.repository,
                                         changes=args.change, message=args.message,
                                         platform=args.platform)
    print(image.id)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A container's merged rootfs (held still while it is read), or an image's."""
    store_of(args).export(args.name, output(args.output, "the export"))
    sys.stdout.flush()
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    store_of(args).save(args.images, output(args.output, "the archive"), format=args.format)
    sys.stdout.flush()
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    loaded = store_of(args).load(source(args.input), platform=args.platform)
    if not loaded:
        raise UserError("the archive holds no images")
    for item in loaded:
        if item.tags:
            for t in item.tags:
                print(f"Loaded image: {t.familiar}")
        else:
            print(f"Loaded image ID: {item.image.id}")
    return 0
