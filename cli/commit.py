"""Keeping a container's changes: diff, commit (export of a container lives in transfer)."""

from __future__ import annotations

import argparse
from typing import Any

from imagestore.compress import LAYER_COMPRESSIONS

from .common import UserError, store_of
from .images import _bool


def register(sub: Any, image_sub: Any) -> None:
    p = sub.add_parser("diff", help="list the changes of a container's filesystem (A, C, D)")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("commit", help="create a new image from a container's changes")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]")
    p.add_argument("-a", "--author", default="", help='author (e.g. "Jane <jane@example.com>")')
    p.add_argument("-m", "--message", default="", help="commit message")
    p.add_argument("-c", "--change", action="append", default=[],
                   help="apply a Dockerfile instruction (CMD, ENV, ...) to the image")
    p.add_argument("--squash", action="store_true",
                   help="write the whole merged rootfs as a single layer")
    p.add_argument("--compression", choices=(*LAYER_COMPRESSIONS, "estargz"), default="gzip",
                   help="layer compression (default gzip; estargz: gzip that can be pulled "
                        "lazily)")
    p.add_argument("--format", choices=["oci", "docker"], default="oci",
                   help="manifest and config media types (default oci)")
    p.add_argument("--timestamp", type=int, metavar="SECONDS",
                   help="clamp mtimes and set created (default $SOURCE_DATE_EPOCH)")
    p.add_argument("-p", "--pause", type=_bool, default=True, metavar="BOOL",
                   help="hold writes through a mount while committing (default true)")
    p.set_defaults(func=cmd_commit)


def cmd_diff(args: argparse.Namespace) -> int:
    for kind, path in store_of(args).diff(args.container):
        print(f"{kind} {path}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    if args.timestamp is not None and args.timestamp < 0:
        raise UserError("--timestamp must be a number of seconds since the epoch")
    image = store_of(args).commit(
        args.container, args.repository, author=args.author, message=args.message,
        changes=args.change, squash=args.squash, compression=args.compression,
        format=args.format, timestamp=args.timestamp, pause=args.pause)
    print(image.id)
    return 0
