"""Container commands: create, ps / container ls, rm."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from imagestore.containers import Container, Containers
from imagestore.errors import StoreError

from .common import store_of
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
        p.add_argument("-f", "--force", action="store_true", help="unmount first if mounted")
        p.set_defaults(func=cmd_rm)
    p = csub.add_parser("create", help="create a container")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name")
    p.set_defaults(func=cmd_create)


def cmd_create(args: argparse.Namespace) -> int:
    c = Containers(store_of(args)).create(args.image, args.name)
    print(c.id)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    cs = Containers(store_of(args))
    mounts = {m.target: m.mountpoint for m in cs.mounts() if m.kind == "container"}
    rows = []
    for c in cs.all():
        rows.append({
            "ID": c.id if args.no_trunc else c.short_id,
            "Names": c.name,
            "Image": c.image_name or c.image[7:19],
            "ImageID": c.image,
            "CreatedAt": c.created,
            "RunningFor": since(c.created),
            "Mounts": mounts.get(c.id, ""),
            "Status": _status(c, mounts.get(c.id)),
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


def _status(c: Container, mountpoint: str | None) -> str:
    """Up (running), Mounted at, Exited (after a run), Created."""
    from imagestore.run import status_line

    ran = status_line(c, since)
    if ran is not None and (ran.startswith("Up ") or mountpoint is None):
        return ran
    return f"Mounted at {mountpoint}" if mountpoint else "Created"


def cmd_rm(args: argparse.Namespace) -> int:
    from unionfs.mount import MountError, unmount

    cs = Containers(store_of(args))
    status = 0
    for name in args.containers:
        try:
            c = cs.get(name)
            if args.force:
                from imagestore.run import stop

                stop(c)  # a running container is killed first, as docker rm -f
            where = cs.mounted_at(c)
            if where is not None and args.force:
                rec = next((m for m in cs.mounts() if m.target == c.id), None)
                if rec is not None:
                    unmount(rec.mountpoint)
                    from .mount import wait_gone

                    wait_gone(rec.pid)
            cs.remove(c)
            print(name)
        except (StoreError, MountError) as exc:
            print(f"Error: {exc}", file=sys.stderr)
            status = 1
    return status
