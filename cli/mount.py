"""Mount commands: mount, umount, mounts.

``strata mount`` asks the store to start the mount daemon (``Store.start_mount``: it returns
once the mount answers, and the daemon logs to ``<root>/mounts/<key>.log``); with ``-f`` this
process becomes the daemon (``Store.serve_mount``).  ``strata umount`` and ``strata mounts``
use the mount records (``imagestore.unmounting``, ``imagestore.mounts``) without opening the
store: their start-up is most of their time.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .common import UserError, each, root_of, store_of

if TYPE_CHECKING:
    from imagestore import Directories, MountRecord

_KNOWN_OPTS = ("allow_other", "ro", "rw", "suid", "nosuid", "dev", "nodev")


def register(sub: Any, image_sub: Any) -> None:
    p = sub.add_parser("mount", help="mount an image (read-only), a container, or directories",
                       description="strata mount IMAGE|CONTAINER MOUNTPOINT, or "
                                   "strata mount --lower DIR[:DIR...] [--upper DIR --work DIR] "
                                   "MOUNTPOINT.  Returns once the mount answers; the daemon "
                                   "serves it until strata umount (or fusermount3 -u).")
    p.add_argument("args", nargs="+", metavar="[IMAGE|CONTAINER] MOUNTPOINT")
    p.add_argument("--lower", help="lower directories, leftmost on top (as mount -t overlay)")
    p.add_argument("--upper", help="upper directory (writable layer) for --lower")
    p.add_argument("--work", help="work directory for --upper (same file system)")
    p.add_argument("--engine", choices=("fuse", "kernel", "auto"), default=None,
                   help="for a writable container: fuse (strata's union, the default unless "
                        "$STRATA_ENGINE says otherwise), kernel (kernel overlayfs over a FUSE "
                        "mount of the image; root), auto (kernel where overlayfs may be "
                        "mounted, else fuse)")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="allow_other, ro, suid, dev (comma-separated)")
    p.set_defaults(func=cmd_mount)
    for name in ("umount", "unmount"):
        p = sub.add_parser(name, help="unmount a strata mount",
                           description="Unmount strata mounts; also clears a mount whose "
                                       "daemon died.  A mount another mount namespace still "
                                       "holds is unmounted here; unmounting it again ends "
                                       "its daemon.")
        p.add_argument("mountpoints", nargs="+", metavar="MOUNTPOINT")
        p.add_argument("-l", "--lazy", action="store_true", help="detach even if busy")
        p.set_defaults(func=cmd_umount)
    p = sub.add_parser("mounts", help="list active strata mounts")
    p.add_argument("-q", "--quiet", action="store_true", help="only print mountpoints")
    p.set_defaults(func=cmd_mounts)


def _options(raw: list[str]) -> set[str]:
    opts: set[str] = set()
    for text in raw:
        for o in text.split(","):
            if o and o not in _KNOWN_OPTS:
                raise UserError(f"unknown mount option {o!r} (known: {', '.join(_KNOWN_OPTS)})")
            opts.add(o)
    return opts


def cmd_mount(args: argparse.Namespace) -> int:
    if len(args.args) > 2 or (args.lower and len(args.args) != 1) or (
            not args.lower and len(args.args) != 2):
        raise UserError("usage: strata mount IMAGE|CONTAINER MOUNTPOINT, or "
                        "strata mount --lower DIRS [--upper DIR --work DIR] MOUNTPOINT")
    if bool(args.upper) != bool(args.work):
        raise UserError("--upper and --work go together")
    if args.upper and not args.lower:
        raise UserError("--upper needs --lower")
    from imagestore import Directories, daemonfork

    daemonfork.enabled = True  # this process is about to exit: its daemon may be its fork
    opts = _options(args.options)
    target: str | Directories = args.args[0] if not args.lower else Directories(
        tuple(args.lower.split(":")), args.upper, args.work)
    kw = {"read_only": "ro" in opts, "allow_other": "allow_other" in opts,
          "suid": "suid" in opts, "dev": "dev" in opts, "debug": args.debug,
          "engine": args.engine}
    store = store_of(args)
    if args.foreground:
        store.serve_mount(target, args.args[-1], **kw)
    store.start_mount(target, args.args[-1], **kw)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from imagestore.unmounting import unmount

    root = root_of(args)
    return each(args.mountpoints, lambda mp: unmount(root, mp, lazy=args.lazy))


def _state(r: MountRecord) -> str:
    return "another mount namespace only" if r.elsewhere else "mounted"


def cmd_mounts(args: argparse.Namespace) -> int:
    from imagestore.mounts import Mounts

    from .output import since, table

    recs = Mounts(root_of(args)).records()
    if args.quiet:
        for r in recs:
            print(r.mountpoint)
        return 0
    table([["MOUNTPOINT", "TYPE", "NAME", "PID", "MODE", "ENGINE", "MOUNTED", "STATE"]] + [
        [r.mountpoint, r.kind, r.name, str(r.pid), "ro" if r.read_only else "rw", r.engine,
         since(r.started), _state(r)] for r in recs])
    return 0
