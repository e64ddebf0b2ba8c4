"""Container commands: create, ps / container ls, rm."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from imagestore import Container

from .common import each, store_of
from .output import print_formatted, since, table


def register(sub: Any, image_sub: Any) -> None:
    p = sub.add_parser("create", help="create a container (an image plus a writable layer)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name", help="assign a name to the container")
    p.set_defaults(func=cmd_create)
    container = sub.add_parser("container", help="manage containers")
    csub = container.add_subparsers(dest="container_command", metavar="COMMAND")
    csub.required = True
    for parent, name, aliases in ((sub, "ps", []), (csub, "ls", ["list", "ps"])):
        p = parent.add_parser(name, aliases=aliases, help="list containers")
        p.add_argument("-a", "--all", action="store_true",
                       help="show all containers (mounted or not; the default lists all too)")
        p.add_argument("-q", "--quiet", action="store_true", help="only display container IDs")
        p.add_argument("--no-trunc", action="store_true", help="don't truncate output")
        p.add_argument("--format", help="json, table or a Go-style template")
        p.set_defaults(func=cmd_ps)
    for parent, name in ((sub, "rm"), (csub, "rm")):
        p = parent.add_parser(name, help="remove containers")
        p.add_argument("containers", nargs="+", metavar="CONTAINER")
        p.add_argument("-f", "--force", action="store_true",
                       help="kill it first if it runs, unmount it first if mounted")
        p.set_defaults(func=cmd_rm)
    p = csub.add_parser("create", help="create a container")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name")
    p.set_defaults(func=cmd_create)


def cmd_create(args: argparse.Namespace) -> int:
    print(store_of(args).create_container(args.image, args.name).id)
    return 0


def image_column(c: Container, no_trunc: bool) -> str:
    """What ``ps`` shows as the image: the name it was created from, or, for one created by
    ID (or ID prefix), the image's short ID, as docker does."""
    hexid = c.image.partition(":")[2]
    given = c.image_name.removeprefix("sha256:")
    if not given or (re.fullmatch(r"[0-9a-f]{1,64}", given) and hexid.startswith(given)):
        return hexid if no_trunc else hexid[:12]
    return c.image_name


def status(c: Container) -> str:
    """docker's STATUS: ``Up 3 seconds`` while ``strata run`` runs it, else where it is
    mounted, else ``Exited (0) 2 minutes ago`` after a run, else ``Created``."""
    ran = c.last_run
    if ran is not None and ran.status == "running":
        return "Up " + since(ran.started).removesuffix(" ago") + \
            (" (orphaned: its strata run was killed)" if ran.orphaned else "")
    if c.mount is not None and c.mount.elsewhere:
        return (f"Mounted in another mount namespace only (unmounted from "
                f"{c.mount.mountpoint} here)")
    if c.mount is not None:
        return f"Mounted at {c.mount.mountpoint}"
    if ran is not None and ran.status == "exited":
        return f"Exited ({ran.exit_code}) {since(ran.finished)}"
    if ran is not None:
        return "Exited (unknown)"  # its strata run was killed
    return "Created"


def cmd_ps(args: argparse.Namespace) -> int:
    rows = []
    for c in store_of(args).containers():
        rows.append({
            "ID": c.id if args.no_trunc else c.short_id,
            "Names": c.name,
            "Image": image_column(c, args.no_trunc),
            "ImageID": c.image,
            "CreatedAt": c.created,
            "RunningFor": since(c.created),
            "Mounts": c.mount.mountpoint if c.mount is not None else "",
            "Status": status(c),
        })
    if args.quiet:
        for r in rows:
            print(r["ID"])
        return 0
    if args.format:
        if args.format == "json":
            for r in rows:
                print(json.dumps(r, separators=(",", ":")))
            return 0
        print_formatted(args.format, rows, {"ID": "CONTAINER ID", "Image": "IMAGE",
                                            "RunningFor": "CREATED", "Status": "STATUS",
                                            "Names": "NAMES"})
        return 0
    table([["CONTAINER ID", "IMAGE", "CREATED", "STATUS", "NAMES"]] + [
        [r["ID"], r["Image"], r["RunningFor"], r["Status"], r["Names"]] for r in rows])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = store_of(args)

    def remove(name: str) -> None:
        store.remove_container(name, force=args.force)
        print(name)

    return each(args.containers, remove)
