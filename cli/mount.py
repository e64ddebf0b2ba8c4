"""Mount commands: mount, umount, mounts.

Without ``-f`` the command starts the mount daemon (this same command with ``-f``) in its own
session, logging to ``<root>/mounts/<key>.log``, and returns only once the mount answers — or
exits non-zero with the daemon's error.

Caveats:
* Start-up time: the store, the union and the daemon's modules are imported by the functions
  that use them, and ``strata umount`` (cli.main loads only this group for it) imports none of
  them: it finds the daemon's mount record by the store's rules (``_store_root``,
  ``_record_path``; a unit test holds them equal to ``Store`` and ``Containers``) and waits
  for the daemon on a pidfd, so it costs about the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from unionfs.control import unmount
from unionfs.errors import MountError

from .common import UserError, store_of

if TYPE_CHECKING:
    from imagestore.containers import Containers
    from imagestore.store import Store
    from unionfs.layers import LowerLayer
    from unionfs.mount import MountOptions
    from unionfs.union import Union

READY_TIMEOUT = 60.0
_KNOWN_OPTS = ("allow_other", "ro", "rw", "suid", "nosuid", "dev", "nodev")


def register(sub: Any, image_sub: Any) -> None:
    p = sub.add_parser("mount", help="mount an image (read-only), a container, or directories",
                       description="strata mount IMAGE|CONTAINER MOUNTPOINT, or "
                                   "strata mount --lower DIR[:DIR...] [--upper DIR --work DIR] "
                                   "MOUNTPOINT")
    p.add_argument("args", nargs="+", metavar="[IMAGE|CONTAINER] MOUNTPOINT")
    p.add_argument("--lower", help="lower directories, leftmost on top (as mount -t overlay)")
    p.add_argument("--upper", help="upper directory (writable layer) for --lower")
    p.add_argument("--work", help="work directory for --upper (same file system)")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="allow_other, ro, suid, dev (comma-separated)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)
    for name in ("umount", "unmount"):
        p = sub.add_parser(name, help="unmount a strata mount")
        p.add_argument("mountpoints", nargs="+", metavar="MOUNTPOINT")
        p.add_argument("-l", "--lazy", action="store_true", help="detach even if busy")
        p.set_defaults(func=cmd_umount)
    p = sub.add_parser("mounts", help="list active strata mounts")
    p.add_argument("-q", "--quiet", action="store_true", help="only print mountpoints")
    p.set_defaults(func=cmd_mounts)


def _options(args: argparse.Namespace) -> MountOptions:
    from unionfs.mount import MountOptions

    opts: set[str] = set()
    for raw in args.options:
        for o in raw.split(","):
            if o and o not in _KNOWN_OPTS:
                raise UserError(f"unknown mount option {o!r} (known: {', '.join(_KNOWN_OPTS)})")
            opts.add(o)
    return MountOptions(allow_other="allow_other" in opts, read_only="ro" in opts,
                        suid="suid" in opts, dev="dev" in opts, debug=args.debug)


def cmd_mount(args: argparse.Namespace) -> int:
    if len(args.args) > 2 or (args.lower and len(args.args) != 1) or (
            not args.lower and len(args.args) != 2):
        raise UserError("usage: strata mount IMAGE|CONTAINER MOUNTPOINT, or "
                        "strata mount --lower DIRS [--upper DIR --work DIR] MOUNTPOINT")
    if bool(args.upper) != bool(args.work):
        raise UserError("--upper and --work go together")
    if args.upper and not args.lower:
        raise UserError("--upper needs --lower")
    from unionfs.mount import check_mountpoint

    options = _options(args)
    store = store_of(args)
    try:
        mountpoint = check_mountpoint(args.args[-1])
    except MountError as exc:
        raise UserError(str(exc)) from None
    if not args.foreground:
        return _spawn(args, store, mountpoint)
    return _serve(args, store, mountpoint, options)


def _spawn(args: argparse.Namespace, store: Store, mountpoint: str) -> int:
    from imagestore.containers import Containers

    cs = Containers(store)
    log_path = cs.log_path(mountpoint)
    read_end, write_end = os.pipe()
    args.ready_fd, args.foreground = write_end, True
    for name in ("lower", "upper", "work"):
        value = getattr(args, name)
        if value:
            setattr(args, name, ":".join(os.path.abspath(d) for d in value.split(":")))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the intermediate child and the daemon
        os.close(read_end)
        _daemonize(log_path)
        code = 1
        try:
            code = _serve(args, store, mountpoint, _options(args))
        except BaseException:
            import logging

            logging.getLogger("strata").exception("the mount daemon failed")
        finally:
            os._exit(code)
    os.close(write_end)
    os.waitpid(pid, 0)  # the intermediate child exits at once; the daemon is re-parented
    message = _wait_ready(read_end)
    if message != "ready":
        raise UserError(message or f"the mount daemon exited before the mount was ready; "
                                   f"see {log_path}")
    return 0


def _daemonize(log_path: str) -> None:
    """Detach (new session, double fork so nobody has to reap us), log to ``log_path``.  The
    daemon reuses this process's imports: no second interpreter start-up."""
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.chdir("/")


@contextlib.contextmanager
def _profiled(path: str | None) -> Iterator[None]:
    """Run the block under cProfile and write its statistics to ``path`` (if given)."""
    if not path:
        yield
        return
    import cProfile

    with cProfile.Profile() as prof:
        yield
    prof.dump_stats(path)


def _wait_ready(fd: int) -> str:
    """The daemon's first line: ``ready`` or its error (EOF: it died)."""
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                if buf.endswith(b"\n"):
                    break
        else:
            return f"the mount did not become ready within {READY_TIMEOUT:.0f}s"
    finally:
        os.close(fd)
    return buf.decode(errors="replace").strip()


@contextlib.contextmanager
def _closing(layers: list[LowerLayer]) -> Iterator[list[LowerLayer]]:
    try:
        yield layers
    finally:
        for layer in layers:
            layer.close()


def _serve(args: argparse.Namespace, store: Store, mountpoint: str,
           options: MountOptions) -> int:
    import logging

    from imagestore import timefmt
    from imagestore.containers import Containers, MountRecord
    from unionfs.mount import serve

    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO)
    cs = Containers(store)
    try:
        with contextlib.ExitStack() as stack:
            union, kind, target, name, options = _build(args, store, cs, options, stack)

            control = cs.control_path(mountpoint) if union.writable else None

            def ready() -> None:
                cs.record(MountRecord(mountpoint, os.getpid(), kind, target, name,
                                      cs.log_path(mountpoint), timefmt.now(), options.read_only,
                                      control or ""))
                _tell(args.ready_fd, "ready")

            stack.callback(cs.unrecord, mountpoint)
            with _profiled(os.environ.get("STRATA_PROFILE")):  # scripts/bench --profile
                errors = serve(union, mountpoint, options, on_ready=ready, control=control,
                               lifeline=args.lifeline_fd)
            if errors:
                logging.getLogger("strata").warning("%d handler errors (see above)", errors)
    except Exception as exc:
        _tell(args.ready_fd, f"{exc}")
        raise
    return 0


def _tell(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")
        os.close(fd)


def _build(args: argparse.Namespace, store: Store, cs: Containers, options: MountOptions,
           stack: contextlib.ExitStack) -> tuple[Union, str, str, str, MountOptions]:
    from unionfs.layers import DirLayer
    from unionfs.union import Union
    from unionfs.upper import UpperLayer

    if args.lower:
        lowers: list[LowerLayer] = []
        for d in args.lower.split(":"):
            if not os.path.isdir(d):
                raise UserError(f"lower directory {d} does not exist")
            lowers.append(DirLayer(os.path.abspath(d)))
        if args.upper and options.read_only:  # the upper, read-only: just the top layer
            return (Union([DirLayer(args.upper), *lowers]), "dirs", args.lower, args.lower,
                    options)
        upper = UpperLayer(args.upper, args.work) if args.upper else None
        return (Union(lowers, upper), "dirs", args.lower, args.lower,
                _with_ro(options, upper is None))
    target = args.args[0]
    container = cs.find(target)
    if container is not None:
        stack.enter_context(cs.mount_lock(container))
        layers = stack.enter_context(_closing(cs.open_layers(container)))
        if options.read_only:
            union = Union([DirLayer(container.upper), *layers])
        else:
            union = Union(layers, UpperLayer(container.upper, container.work))
        return union, "container", container.id, container.name, options
    image = store.resolve(target)
    layers = stack.enter_context(_closing(store.open_layers(image)))
    name = image.tags[0].familiar if image.tags else image.short_id
    return Union(layers), "image", image.id, name, _with_ro(options, True)


def _with_ro(options: MountOptions, ro: bool) -> MountOptions:
    from unionfs.mount import MountOptions

    return MountOptions(options.allow_other, ro, options.suid, options.dev, options.debug)


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until the daemon ``pid`` has exited (it is not our child: a double fork): on a
    pidfd, which turns readable the moment it exits, else by polling."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already (ESRCH), or a kernel without pidfds
        fd = -1
    if fd >= 0:
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        return
    from imagestore.containers import process_alive

    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _store_root(root: str | None) -> str:
    """The store directory ``Store(root)`` opens (``imagestore.store.default_root``)."""
    if not root:
        root = os.environ.get("STRATA_ROOT")
    if not root and os.geteuid() == 0:
        root = "/var/lib/strata"
    if not root:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".local", "share")
        root = os.path.join(data, "strata")
    return os.path.abspath(root)


def _record_path(root: str, mountpoint: str) -> str:
    """Where the daemon of ``mountpoint`` keeps its mount record (``Containers``' rule)."""
    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:20]
    return os.path.join(root, "mounts", key + ".json")


def cmd_umount(args: argparse.Namespace) -> int:
    root = _store_root(args.root)
    status = 0
    for mp in args.mountpoints:
        record = _record_path(root, mp)
        pid = None
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError), open(record) as f:
            pid = int(json.load(f)["pid"])
        try:
            unmount(mp, lazy=args.lazy)
        except MountError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            status = 1
            continue
        if pid is not None:
            wait_gone(pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record)
    return status


def cmd_mounts(args: argparse.Namespace) -> int:
    from imagestore.containers import Containers

    from .output import since, table

    recs = Containers(store_of(args)).mounts()
    if args.quiet:
        for r in recs:
            print(r.mountpoint)
        return 0
    table([["MOUNTPOINT", "TYPE", "NAME", "PID", "MODE", "MOUNTED"]] + [
        [r.mountpoint, r.kind, r.name, str(r.pid), "ro" if r.read_only else "rw",
         since(r.started)] for r in recs])
    return 0
