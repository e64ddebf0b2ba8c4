"""The mount daemon: ``python -m unionfs.mount SPEC`` serves one union at one mountpoint.

This is the only entry point of a strata mount; ``imagestore.mounting`` is the only code that
starts it (``strata mount`` goes through there too).  It never opens an image store: all it
needs is in ``SPEC``, the path of a JSON *mount spec* (the spawner writes it to a memfd and
passes ``/dev/fd/N``; a plain file works as well, for debugging).  The spawner adds the
mountpoint as a second argument, checked against the spec, so ``ps`` shows what a daemon
serves::

    {"mountpoint": "/abs/path",
     "options": {"allow_other": false, "ro": false, "suid": false, "dev": false,
                 "debug": false, "fsname": "strata"},
     "layers": [DESCRIPTION, ...],      lower layers, top first (``unionfs.layerkinds``)
     "upper": PATH, "work": PATH,       the writable layer and its work dir, or null
     "overlay": {"mountpoint": PATH, "upper": PATH, "work": PATH, "userxattr": false,
                 "suid": false, "dev": false},
                                        the kernel engine (``unionfs.overlay``): the layers
                                        are served read-only at "mountpoint" above, a private
                                        directory, and kernel overlayfs over that mount with
                                        this upper and work dir is mounted here; or null
     "control": PATH,                   Unix socket answering ``freeze`` and ``rotate`` (writable
                                        mounts; ``unionfs.controlserver`` says how), or null
     "ready_fd": N,                     gets ``ready`` or the one-line error, then is closed
     "lifeline_fd": N,                  read end of a pipe only the parent holds: EOF unmounts
     "hold_fds": [N, ...],              kept open while serving (a container's mount lock)
     "record": {"path": PATH, "data": {...}}}   written with "pid" and "dev" once the mount
                                        answers, removed when it ends (the store's mounts/)
     "cleanup": PATH,                   a directory removed once the mount has ended (a
                                        build's uppers: gone even if the builder was killed)

Every key but ``mountpoint`` and ``layers`` may be left out.  The daemon mounts, answers
``ready`` once a ``stat`` of the mountpoint (from a worker thread) has been answered, and
serves until the file system is unmounted (``fusermount3 -u``, ``umount``, ``strata umount``)
or it gets SIGTERM, SIGINT or SIGHUP, which unmount cleanly.  It logs to stderr (the spawner
points it at ``<root>/mounts/<key>.log``); a mount it cannot make is one ``ERROR`` line there
and on the ready pipe, exit status 1; only a bug writes a traceback.  docs/architecture.md
tells the life of a mount from spawn to unmount.

The kernel engine (``"overlay"``, ``unionfs.kernelengine``): once its FUSE mount answers, the
daemon mounts overlayfs (from a worker thread: the kernel looks the lower up through the
mount) and detaches its own mount from the tree, which overlayfs keeps a private clone of; the
overlay's device goes into the record.  The FUSE session, and the daemon, then end when the
overlay is unmounted everywhere (``umount``, ``strata umount``); SIGTERM, SIGINT, SIGHUP and
the lifeline detach the overlay first.  A ``freeze`` also holds every open of a lower file
(and with it every copy-up not yet started), which is all a FUSE lower can hold: writes go to
the upper's file system directly.  After an end of its own it empties ``work/work`` (the
kernel leaves its whiteout template there).

Caveats:
* Mount options: ``default_permissions`` always (the kernel checks modes against the image's
  owners), ``nosuid``/``nodev`` unless asked for, ``ro`` for image mounts.
* When another mount namespace holds the mount (an ``unshare -m`` made while it was mounted),
  an unmount here does not end the file system: the daemon serves the other namespace until
  it lets go too.  The record then names a mount that is not here (``imagestore.mounts``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import kernelengine
from .errors import MountError
from .kernelengine import OverlaySpec
from .layerkinds import open_layer
from .layers import LowerLayer
from .tarheaders import LayerError

if TYPE_CHECKING:  # pyfuse3 and trio load only in the process that serves (start-up time)
    from .fuse_ops import Operations
    from .union import Union

log = logging.getLogger("unionfs.mount")  # also when run as __main__


__all__ = ["MountOptions", "MountSpec", "main", "serve", "user_allow_other"]


@dataclass(frozen=True)
class MountOptions:
    allow_other: bool = False
    read_only: bool = False
    suid: bool = False
    dev: bool = False
    debug: bool = False
    fsname: str = "strata"
    timeout: float = 86400.0

    def fuse_options(self) -> set[str]:
        opts = {f"fsname={self.fsname}", "subtype=strata", "default_permissions"}
        opts.add("suid" if self.suid else "nosuid")
        opts.add("dev" if self.dev else "nodev")
        if self.allow_other:
            opts.add("allow_other")
        if self.read_only:
            opts.add("ro")
        if self.debug:
            opts.add("debug")
        return opts


@dataclass(frozen=True)
class MountSpec:
    """A parsed mount spec (see the module docstring)."""

    mountpoint: str
    layers: Sequence[dict[str, Any]]
    options: MountOptions = MountOptions()
    upper: str | None = None
    work: str | None = None
    control: str | None = None
    ready_fd: int | None = None
    lifeline_fd: int | None = None
    hold_fds: Sequence[int] = ()
    record: dict[str, Any] | None = None
    overlay: OverlaySpec | None = None
    cleanup: str | None = None

    @property
    def target(self) -> str:
        """Where the union appears: the overlay's mountpoint, else the FUSE mount's."""
        return self.overlay.mountpoint if self.overlay is not None else self.mountpoint

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> MountSpec:
        o = doc.get("options") or {}
        options = MountOptions(allow_other=bool(o.get("allow_other")), read_only=bool(o.get("ro")),
                               suid=bool(o.get("suid")), dev=bool(o.get("dev")),
                               debug=bool(o.get("debug")), fsname=str(o.get("fsname") or "strata"))
        if not isinstance(doc.get("mountpoint"), str) or not isinstance(doc.get("layers"), list):
            raise MountError("a mount spec needs 'mountpoint' and 'layers'")
        if bool(doc.get("upper")) != bool(doc.get("work")):
            raise MountError("a mount spec's 'upper' and 'work' go together")
        ov = kernelengine.OverlaySpec.parse(doc.get("overlay"))
        if ov is not None and (doc.get("upper") or not options.read_only):
            raise MountError("the kernel engine's FUSE mount is read-only, without an upper")
        return cls(doc["mountpoint"], doc["layers"], options, doc.get("upper"), doc.get("work"),
                   doc.get("control"), doc.get("ready_fd"), doc.get("lifeline_fd"),
                   tuple(doc.get("hold_fds") or ()), doc.get("record"), ov,
                   doc.get("cleanup"))

    @classmethod
    def load(cls, path: str) -> MountSpec:
        with open(path, "rb") as f:
            return cls.parse(json.loads(f.read()))


def serve(union: Union, mountpoint: str, options: MountOptions,
          on_ready: Callable[[int], None] | None = None, control: str | None = None,
          lifeline: int | None = None, overlay: OverlaySpec | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns the number of handler errors.
    ``on_ready(dev)`` runs once the mount answers (``dev``: its device number).
    ``control``: a Unix socket path where ``freeze`` requests are answered.
    ``lifeline``: the read end of a pipe whose write end only the parent process holds; when
    it closes (the parent exited, even by SIGKILL) the mount ends as on SIGTERM.
    ``overlay``: the kernel engine (see the module docstring); ``dev`` is then the overlay's."""
    import pyfuse3
    import trio

    if options.allow_other and os.geteuid() != 0 and not user_allow_other():
        raise MountError("-o allow_other needs 'user_allow_other' in /etc/fuse.conf for users "
                         "other than root")
    ops = kernelengine.operations(union, options.timeout, lower=overlay is not None)
    try:
        pyfuse3.init(ops, mountpoint, options.fuse_options())
    except RuntimeError as exc:
        raise MountError(f"cannot mount {mountpoint}: {exc}") from None
    ops.notify = True  # a session exists: the kernel's caches may be told of changes
    state = kernelengine.State(overlay)
    try:
        trio.run(_run, ops, mountpoint, on_ready, control, lifeline, state)
    except BaseExceptionGroup as group:  # a readiness step failed: its one error line
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], MountError | OSError):
            raise group.exceptions[0] from None
        raise
    finally:
        ops.close_all()
        if state.overlaid and not state.detached:  # a failure between mount and ready
            kernelengine.end_overlay(state)
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=not state.detached)  # a detached lower is not in the tree
        if control is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
    if overlay is not None and state.detached and not state.ending:
        kernelengine.empty_work(overlay.work)  # gone everywhere: its session ended with it
    return ops.errors


def user_allow_other(conf: str = "/etc/fuse.conf") -> bool:
    """Whether fusermount3 lets users other than root mount with ``allow_other``."""
    try:
        with open(conf) as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


async def _watch(fd: int) -> None:
    """Return when the write end of the pipe ``fd`` is closed everywhere."""
    import trio

    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 64):
            return


async def _run(ops: Operations, mountpoint: str, on_ready: Callable[[int], None] | None,
               control: str | None, lifeline: int | None = None,
               state: kernelengine.State | None = None) -> None:
    import pyfuse3
    import trio

    from . import controlserver

    state = state or kernelengine.State(None)
    settled = trio.Event()  # the overlay's mount is done with (mounted, failed or not tried)

    ended = trio.Event()  # the session ended by itself (unmounted; the overlay gone)

    async def end() -> None:
        """Unmount (as on SIGTERM): the kernel engine detaches its overlay first, once an
        overlay mount under way is done (this loop serves it meanwhile), and lets its session
        end with it; a session still held (a busy overlay, detached) is ended here."""
        if state.mounting:
            await settled.wait()
        if state.overlaid:
            await trio.to_thread.run_sync(kernelengine.end_overlay, state)
            with trio.move_on_after(OVERLAY_SETTLE):
                await ended.wait()
        if not ended.is_set():
            state.ending = True
            pyfuse3.terminate()

    guards: dict[int, int] = {}  # pid: pidfd of processes to kill if the parent goes
    async with trio.open_nursery() as nursery:
        if control is not None:
            await nursery.start(controlserver.serve, ops, control, guards)
        if lifeline is not None:

            async def orphaned() -> None:
                await _watch(lifeline)
                log.info("the parent process is gone: unmounting")
                controlserver.kill_guarded(guards)
                await end()

            nursery.start_soon(orphaned)

        async def main() -> None:
            await pyfuse3.main()
            if not state.ending:
                ended.set()
            nursery.cancel_scope.cancel()

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: unmounting", signum)
                    await end()
                    return

        nursery.start_soon(main)
        nursery.start_soon(signals)
        # abandoned if the mount ends first (a signal, the parent gone): the stat would wait
        # forever for an answer nobody is left to give, and the daemon with it
        # Nothing on this thread may touch the mount: a request another process sends the
        # moment the mount appears waits for this very thread (the stat that tells the
        # mount answers runs in a worker, and its result names the device for read-ahead)
        st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        _readahead(st.st_dev, READAHEAD_KB_LOWER if state.overlay else READAHEAD_KB)
        dev = st.st_dev
        if state.overlay is not None:
            state.mounting = True
            try:  # not abandoned: an overlay mounted after this daemon ended would stay
                dev = await trio.to_thread.run_sync(kernelengine.mount_overlay, mountpoint,
                                                    state)
            finally:
                state.mounting = False
                settled.set()
            log.info("mounted overlayfs at %s over %s", state.overlay.mountpoint, mountpoint)
        else:
            log.info("mounted %s", mountpoint)
        if on_ready is not None:
            on_ready(dev)


READAHEAD_KB = 1024
READAHEAD_KB_LOWER = 8192  # the kernel engine: copy-up reads whole files (fewer, larger READs)
OVERLAY_SETTLE = 1.0  # an overlay nobody uses ends its FUSE session well within this


def _readahead(dev: int, kb: int) -> None:
    """Let the kernel read ahead ``kb`` KiB at a time (its default for FUSE is 128) on the
    mount of device ``dev``: sequential reads then come in 1 MiB requests, an eighth of the
    round trips.  Root only; best effort."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("read-ahead left at the default: %s", exc)


# -- the daemon ------------------------------------------------------------------------------------


def build(spec: MountSpec, stack: contextlib.ExitStack) -> Union:
    """The union the spec describes; its layers are closed when ``stack`` ends.  (A read-only
    view of an upper is one more layer, ``{"kind": "dir"}``, on top: the spawner's choice.)"""
    from .union import Union
    from .upper import UpperLayer

    layers: list[LowerLayer] = []

    def close() -> None:
        for layer in layers:
            layer.close()

    stack.callback(close)
    for desc in spec.layers:
        layers.append(open_layer(desc))
    if spec.upper is None or spec.work is None:
        return Union(layers)
    return Union(layers, UpperLayer(spec.upper, spec.work))


def _tell(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def _write_record(record: dict[str, Any], dev: int) -> None:
    """The mount record, atomically (temp file in its directory, rename)."""
    data = {**record["data"], "pid": os.getpid(), "dev": f"{os.major(dev)}:{os.minor(dev)}"}
    path = record["path"]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".record-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _drop_record(record: dict[str, Any] | None) -> None:
    """Remove the record if it is still this daemon's (a later mount may have replaced it)."""
    if record is None:
        return
    with contextlib.suppress(OSError, ValueError), open(record["path"]) as f:
        if json.load(f).get("pid") != os.getpid():
            return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record["path"])


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


def _spec_fd(path: str) -> int | None:
    """The inherited descriptor ``path`` names (``/dev/fd/N``, ``/proc/self/fd/N``), if any."""
    for prefix in ("/dev/fd/", "/proc/self/fd/"):
        if path.startswith(prefix) and path[len(prefix):].isdigit():
            return int(path[len(prefix):])
    return None


def run(spec: MountSpec) -> int:
    """Serve ``spec`` until the mount ends; the exit status (0, or 1 with one error line)."""
    logging.getLogger().setLevel(logging.DEBUG if spec.options.debug else logging.INFO)
    for fd in spec.hold_fds:
        os.set_inheritable(fd, False)  # held here only, not by fusermount3 and friends
    mounted = False

    def ready(dev: int) -> None:
        nonlocal mounted
        if spec.record is not None:
            _write_record(spec.record, dev)
        mounted = True
        _tell(spec.ready_fd, "ready")

    try:
        with contextlib.ExitStack() as stack:
            union = build(spec, stack)
            gc.freeze()  # what start-up made lives as long as the mount: out of every collection
            stack.callback(_drop_record, spec.record)
            writable = union.writable or spec.overlay is not None
            control = spec.control if writable else None
            with _profiled(os.environ.get("STRATA_PROFILE")):  # scripts/bench --profile
                errors = serve(union, spec.mountpoint, spec.options, on_ready=ready,
                               control=control, lifeline=spec.lifeline_fd,
                               overlay=spec.overlay)
            if errors:
                log.warning("%d handler errors (see above)", errors)
    except (MountError, LayerError, OSError) as exc:
        message = str(exc) if isinstance(exc, MountError) else \
            f"cannot mount {spec.target}: {_reason(exc)}"
        log.error("%s", message)
        if not mounted:
            _tell(spec.ready_fd, message)
        return 1
    finally:
        if spec.cleanup is not None:
            import shutil

            shutil.rmtree(spec.cleanup, ignore_errors=True)
    return 0


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc)


def preload() -> None:
    """Import now what serving a mount imports on its way (pyfuse3 and trio most of all):
    for a daemon forked ahead of its spec (``imagestore.mounting.preload``)."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from . import controlserver, fuse_ops, tarlayer, union, upper  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(args) not in (1, 2) or args[0].startswith("-"):
        print("usage: python -m unionfs.mount SPEC [MOUNTPOINT]  (SPEC: a JSON mount spec, "
              "see the module docstring; MOUNTPOINT, if given, must be the spec's, its "
              "overlay's for the kernel engine)",
              file=sys.stderr)
        return 2
    try:
        spec = MountSpec.load(args[0])
    except (OSError, ValueError, KeyError, TypeError, MountError) as exc:
        log.error("cannot read the mount spec %s: %s", args[0], exc)
        return 2
    finally:
        fd = _spec_fd(args[0])
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    if len(args) == 2 and os.path.abspath(args[1]) != os.path.abspath(spec.target):
        log.error("the mount spec is for %s, not %s", spec.target, args[1])
        return 2
    return run(spec)


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: the mount is gone and the record dropped, and whoever waits
    # for this process (strata umount, a container's lock) should not wait for a GC pass
    os._exit(status)
