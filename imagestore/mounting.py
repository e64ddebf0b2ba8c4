"""Starting and stopping mount daemons: the only code that spawns ``python -m unionfs.mount``.

``plan`` turns what to mount (an image, a container, or ``Directories``) into a *mount spec*
(the JSON the daemon reads; ``unionfs.mount`` documents it): the layers as the layer store
describes them, the container's upper and work dirs, options, the control socket, the record
the daemon writes into ``mounts/``.  It checks FUSE, the target and the mountpoint, and takes a
container's mount lock, which goes to the daemon with the spec.  A plan then runs one of four
ways, all through the same three steps (``_Daemon``: spawn, wait for ``ready``, stop):

* ``mounted`` — for a ``with`` block (``Store.mount``, the pytest plugin): the daemon holds a
  lifeline pipe to this process, and the mount is taken down when the block ends;
* ``open_mounted`` — the same for trio code: the steps run in worker threads;
* ``start`` — a mount that outlives this process (``strata mount``): returns once ready;
* ``exec_foreground`` — this process becomes the daemon (``strata mount -f``).

The daemon writes ``ready`` (or its one-line error) to a pipe once the mount answers; only then
is the mountpoint handed over.  It runs in a session of its own, logging to
``<root>/mounts/<key>.log``.  ``unmount`` and ``release`` take mounts down (``strata umount``,
``rm -f``) and follow what is true in this mount namespace (``mounts``).

Caveats:
* A second SIGINT while a mount is being taken down is held until the teardown is over (in
  the main thread; trio code gets trio's KeyboardInterrupt protection instead).
* The daemon lives in its own session, so a terminal's Ctrl-C reaches only the caller, which
  unmounts.  If the caller is killed, the lifeline ends the mount, but nothing removes a
  temporary mountpoint directory (empty) or, in the plugin, the test's container.
* A child made with a bare ``fork()`` (multiprocessing's fork start method) inherits the
  lifeline: the mount then lives until that child exits too.
* A mount that is still busy after the retries is detached lazily: the kernel keeps it alive
  for the files still open in it, and the daemon is then stopped with SIGTERM.
* A mount another mount namespace holds outlives ``strata umount`` here (its daemon serves
  that namespace); ``release(stop=True)`` (``rm -f``) and a second ``umount`` end the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from unionfs.control import holders, is_mounted
from unionfs.control import unmount as _unmount
from unionfs.errors import MountError

from . import timefmt
from .containers import Container, Containers
from .errors import FuseUnavailable, ImageNotFound, MountFailed, StoreError
from .images import Image
from .mounts import MountRecord, Mounts, process_alive

if TYPE_CHECKING:
    from .api import Store

READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0
SETTLE = 0.5  # a daemon whose mount nobody else holds ends well within this after an unmount
BUSY_RETRIES = 10
BUSY_DELAY = 0.1
# in a line of the daemon's error or log that mentions fuse, words saying FUSE itself is
# refused here (lower case); a permission error of anything else is no reason to skip tests
_NO_FUSE = ("permission denied", "operation not permitted", "device not found",
            "no such device", "no such file")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Directories:
    """A union of plain directories in overlayfs format (``strata mount --lower``): ``lower``
    top first; with ``upper`` and ``work`` a writable one, as ``mount -t overlay``."""

    lower: tuple[str, ...]
    upper: str | None = None
    work: str | None = None


@dataclass(frozen=True)
class Layers:
    """Stored layers (their descriptions, top first) under a writable ``upper``: the mount of a
    build's stage.  ``cleanup``: a directory the daemon removes once the mount has ended (the
    stage's uppers), even when whoever started it was killed."""

    layers: tuple[dict[str, Any], ...]
    upper: str
    work: str
    cleanup: str | None = None


Target = str | Image | Container | Directories | Layers


def fuse_missing() -> str | None:
    """Why FUSE mounts cannot work on this machine, without trying one: ``/dev/fuse`` missing,
    ``fusermount3`` not installed; None when both are there.  ``probe`` also tries a mount."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package fuse3)")
    return "; ".join(problems) or None


@dataclass
class Plan:
    """Everything decided before the daemon starts.  ``lock``: a container's mount lock,
    held until the daemon has its own copy of the descriptor (``close`` drops ours)."""

    spec: dict[str, Any]
    mountpoint: str
    created: bool  # the mountpoint is ours to remove
    log: str
    what: str  # for messages
    lock: int | None = None

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def spec_fd(self, **fds: Any) -> int:
        """The spec (plus the descriptors ``fds`` name) in a memfd, for ``/dev/fd/N``."""
        doc = {**self.spec, **fds, "hold_fds": [self.lock] if self.lock is not None else []}
        fd = os.memfd_create("strata-mount-spec")
        os.write(fd, json.dumps(doc).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def command(self, spec_fd: int) -> list[str]:
        return [sys.executable, "-m", "unionfs.mount", f"/dev/fd/{spec_fd}", self.mountpoint]

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def failure(self, message: str | None, status: int | None, log_from: int) -> StoreError:
        """The typed error for a daemon that did not become ready: ``FuseUnavailable`` when
        its error or log says FUSE itself is refused, else ``MountFailed``."""
        try:
            with open(self.log, "rb") as f:
                f.seek(log_from)
                tail = f.read(1 << 16).decode(errors="replace")
        except OSError:
            tail = ""
        if not message:
            lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
            message = lines[-1] if lines else f"the mount daemon exited with status {status}"
        for line in [message, *tail.splitlines()]:
            low = line.lower()
            if "fuse" in low and any(word in low for word in _NO_FUSE):
                return FuseUnavailable(f"FUSE is not usable here: {line.strip()}")
        return MountFailed(f"cannot mount {self.what} at {self.mountpoint}: {message} "
                           f"(daemon log: {self.log})")


def _env() -> dict[str, str]:
    """The daemon's environment: ours, with this source tree importable."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + old if old else "")
    return env


def plan(store: Store, target: Target, mountpoint: str | os.PathLike[str] | None, *,
         read_only: bool = False, allow_other: bool = False, suid: bool = False,
         dev: bool = False, debug: bool = False, make_mountpoint: bool = True) -> Plan:
    """Check FUSE, the target and the mountpoint (a new temp dir when None; one that is
    missing is made when ``make_mountpoint``) and write the spec.  Raises ``FuseUnavailable``,
    ``ImageNotFound``, ``ContainerNotFound``, ``Conflict`` (the container is mounted),
    ``MountFailed`` (the mountpoint)."""
    missing = fuse_missing()
    if missing:
        raise FuseUnavailable(missing)
    mounts = Mounts(store.root)
    layers: list[dict[str, Any]] = []
    upper = work = None
    lock: int | None = None
    container = None
    cleanup = None
    if isinstance(target, Layers):
        layers = list(target.layers)
        upper, work, cleanup = target.upper, target.work, target.cleanup
        kind, ident, name, what = "build", cleanup or upper, "build", "a build stage"
    elif isinstance(target, Directories):
        if target.upper and not target.work and not read_only:
            raise MountFailed("a writable upper directory needs a work directory")
        for d in (*target.lower, target.upper, target.work):
            if d is not None and not os.path.isdir(d):
                raise MountFailed(f"directory {d} does not exist")
        dirs = [target.upper] if target.upper and read_only else []  # read-only: on top
        layers = [{"kind": "dir", "path": os.path.abspath(d)} for d in [*dirs, *target.lower]]
        if target.upper and not read_only:
            upper, work = os.path.abspath(target.upper), os.path.abspath(str(target.work))
        kind, ident, name = "dirs", ":".join(target.lower), ":".join(target.lower)
        what = f"directory {name}"
        read_only = read_only or upper is None
    else:
        cs = Containers(store)
        if isinstance(target, Container):
            container = cs.get(target.id)
        elif isinstance(target, str):
            container = cs.find(target)
        if container is not None:
            kind, ident, name = "container", container.id, container.name
            what = f"container {container.name}"
            # read-only: the upper on top; either way with its init layer (strata run's stubs)
            layers = cs.describe(container, upper=read_only, init=True)
            if not read_only:
                upper, work = container.upper, container.work
        else:
            try:
                image = store.image(target.id) if isinstance(target, Image) else \
                    store.resolve(str(target))
            except ImageNotFound:
                if isinstance(target, Image):
                    raise
                raise ImageNotFound(f"No such image or container: {target}") from None
            kind, ident = "image", str(image.id)
            name = image.tags[0].familiar if image.tags else image.short_id
            what = f"image {target if isinstance(target, str) else image.short_id}"
            read_only = True
            layers = store.layers.stack(image.diff_ids)
        if container is not None:
            lock = mounts.lock(container.root, container.name)
    try:
        mp, created = _mountpoint(mountpoint, make_mountpoint)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    writable = upper is not None and not read_only
    control = mounts.control_path(mp) if writable else None
    log = mounts.log_path(mp)
    spec = {
        "mountpoint": mp,
        "options": {"allow_other": allow_other, "ro": read_only, "suid": suid, "dev": dev,
                    "debug": debug},
        "layers": store.layers.for_mount(layers), "upper": upper, "work": work,
        "control": control,
        "record": {"path": mounts.record_path(mp), "data": {
            "mountpoint": mp, "kind": kind, "target": ident, "name": name, "log": log,
            "started": timefmt.now(), "read_only": read_only, "control": control or ""}},
    }
    if cleanup is not None:
        spec["cleanup"] = cleanup
    return Plan(spec, mp, created, log, what, lock)


def _mountpoint(mountpoint: str | os.PathLike[str] | None, make: bool) -> tuple[str, bool]:
    if mountpoint is None:
        return tempfile.mkdtemp(prefix="strata-mnt-"), True
    mp = os.path.abspath(os.fspath(mountpoint))
    if not os.path.isdir(mp):
        if not make or os.path.lexists(mp):
            raise MountFailed(f"mountpoint {mountpoint} is not a directory")
        try:
            os.makedirs(mp)
        except OSError as exc:
            raise MountFailed(f"cannot create the mountpoint {mp}: {exc.strerror}") from None
        return mp, True
    if is_mounted(mp):
        raise MountFailed(f"{mountpoint} is already a mount point")
    return mp, False


# -- the three steps -------------------------------------------------------------------------------


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT while the block runs (main thread only); deliver it afterwards."""
    old = signal.getsignal(signal.SIGINT)
    if old is None or threading.current_thread() is not threading.main_thread():
        yield  # a handler installed from C, or a thread that cannot set handlers
        return
    got: list[int] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            signal.raise_signal(signal.SIGINT)


class _Cancelled(Exception):
    """The wait for ``ready`` was cancelled (trio code)."""


def _read_ready(fd: int, timeout: float, cancel: int | None = None) -> str | None:
    """The daemon's first line on the ready pipe ("" if it closed the pipe without one), or
    None after ``timeout`` seconds; raises ``_Cancelled`` once ``cancel`` is readable.
    (``poll``, not ``select``: a test process may well hold more than 1024 descriptors.)"""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if cancel is not None:
        poller.register(cancel, select.POLLIN)
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        events = poller.poll(min(left, 1.0) * 1000)
        if any(f == cancel for f, _ in events):
            raise _Cancelled
        if not events:
            continue
        chunk = os.read(fd, 4096)
        buf += chunk
        if not chunk or buf.endswith(b"\n"):
            return buf.decode(errors="replace").strip()


def _unmount_busy(mountpoint: str) -> bool:
    """Unmount, retrying briefly while busy, then lazily.  True when it had to be lazy."""
    for _ in range(BUSY_RETRIES):
        if not is_mounted(mountpoint):
            return False
        try:
            _unmount(mountpoint)
            return False
        except MountError:
            time.sleep(BUSY_DELAY)
    if is_mounted(mountpoint):
        with contextlib.suppress(MountError):
            _unmount(mountpoint, lazy=True)
    return True


@dataclass
class _Daemon:
    """One daemon for one plan: ``spawn``, ``wait_ready``, ``stop``, each blocking, each run
    once whatever the caller (sync, trio, detached).  ``lifeline``: the daemon ends when this
    process does."""

    p: Plan
    timeout: float
    lifeline: bool = True
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    fds: dict[str, int] = field(default_factory=dict)  # our ends of the pipes, still open
    _lock: threading.Lock = field(default_factory=threading.Lock)
    log_from: int = 0

    def _close(self, *names: str) -> None:
        with self._lock:
            for name in names:
                fd = self.fds.pop(name, None)
                if fd is not None:
                    os.close(fd)

    def spawn(self) -> None:
        self.log_from = self.p.log_size()
        child: dict[str, int] = {}
        try:
            self.fds["ready_r"], child["ready_fd"] = os.pipe()
            if self.lifeline:
                child["lifeline_fd"], self.fds["life_w"] = os.pipe()
            spec_fd = self.p.spec_fd(**child)
            child["spec"] = spec_fd
            passed = [*child.values(), *([self.p.lock] if self.p.lock is not None else [])]
            with open(self.p.log, "ab") as log:
                self.proc = subprocess.Popen(
                    self.p.command(spec_fd), pass_fds=passed, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True, env=_env())
        finally:
            for fd in child.values():
                os.close(fd)
            self.p.close()  # the daemon holds the container's lock now (or nobody does)

    def take_ready_fd(self) -> int:
        """Our end of the ready pipe, now the caller's to close (``wait_ready`` does)."""
        with self._lock:
            return self.fds.pop("ready_r")

    def wait_ready(self, fd: int | None = None, cancel: int | None = None) -> None:
        """Until the daemon says ``ready`` on ``fd`` (default: take it now); raises its error
        (typed) otherwise.  Closes ``fd`` and ``cancel``, whatever happens."""
        assert self.proc is not None
        fd = self.take_ready_fd() if fd is None else fd
        try:
            message = _read_ready(fd, self.timeout, cancel)
        finally:
            os.close(fd)
            if cancel is not None:
                os.close(cancel)
        if message == "ready":
            self.ready = True
            return
        if message is None:
            raise MountFailed(f"the mount of {self.p.what} at {self.p.mountpoint} did not "
                              f"become ready within {self.timeout:.0f}s (daemon log: "
                              f"{self.p.log})")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(EXIT_TIMEOUT)
        raise self.p.failure(message, self.proc.returncode, self.log_from)

    def stop(self) -> None:
        """Take the mount down and reap the daemon, whatever state it is in."""
        p, proc = self.p, self.proc
        try:
            if proc is not None and not self.ready and proc.poll() is None:
                proc.terminate()  # the daemon unmounts cleanly on SIGTERM
            lazy = _unmount_busy(p.mountpoint) if self.ready else False
            if proc is not None:
                for sig, wait in ((None, 1.0 if lazy else EXIT_TIMEOUT), (signal.SIGTERM, 5.0),
                                  (signal.SIGKILL, None)):
                    if sig is not None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(sig)
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            if is_mounted(p.mountpoint):  # a daemon that died without unmounting
                with contextlib.suppress(MountError):
                    _unmount(p.mountpoint, lazy=True)
        finally:
            p.close()
            self._close("ready_r", "life_w")  # the lifeline last: the daemon is gone now
            _remove_mountpoint(p, proc.returncode if proc is not None else None)


def _remove_mountpoint(p: Plan, status: int | None) -> None:
    """Remove a mountpoint this module made, and the log of its mount when the daemon ended
    cleanly and logged nothing above INFO (so temp mounts do not pile logs up in the store)."""
    if not p.created or is_mounted(p.mountpoint):
        return
    with contextlib.suppress(OSError):
        os.rmdir(p.mountpoint)
    if status == 0:
        quiet = False
        with contextlib.suppress(OSError), open(p.log, "rb") as f:
            quiet = all(line.startswith(b"INFO ") for line in f if line.strip())
        if quiet:
            with contextlib.suppress(OSError):
                os.unlink(p.log)


# -- four ways to run a plan -----------------------------------------------------------------------


@contextlib.contextmanager
def mounted(p: Plan, timeout: float = READY_TIMEOUT) -> Iterator[Path]:
    """Start the daemon for ``p``, yield the mountpoint once it answers, take it down after."""
    d = _Daemon(p, timeout)
    try:
        with _interrupts_held():
            d.spawn()
        d.wait_ready()
        yield Path(p.mountpoint)
    finally:
        with _interrupts_held():
            d.stop()


@contextlib.asynccontextmanager
async def open_mounted(p: Plan, timeout: float = READY_TIMEOUT) -> AsyncIterator[Path]:
    """``mounted`` for trio code: the same steps in worker threads, so the event loop never
    blocks on the daemon; the wait is cancellable, the teardown shielded from cancellation."""
    import trio

    d = _Daemon(p, timeout)

    @trio.lowlevel.enable_ki_protection
    async def stop() -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(d.stop)

    try:
        await trio.to_thread.run_sync(d.spawn)
        fd = d.take_ready_fd()
        cancel_r, cancel_w = os.pipe()
        try:
            await trio.to_thread.run_sync(d.wait_ready, fd, cancel_r, abandon_on_cancel=True)
        finally:
            with contextlib.suppress(OSError):  # EPIPE: the waiter is done already
                os.write(cancel_w, b"x")  # an abandoned waiter returns (and closes its fds)
            os.close(cancel_w)
        yield Path(p.mountpoint)
    finally:
        await stop()


def start(p: Plan, timeout: float = READY_TIMEOUT) -> None:
    """Start the daemon for ``p`` and return once its mount answers; the mount outlives this
    process (``strata umount`` ends it).  On failure nothing is left mounted."""
    d = _Daemon(p, timeout, lifeline=False)
    try:
        d.spawn()
        d.wait_ready()
    except BaseException:
        d.stop()
        raise
    d.proc = None  # not ours to reap: it serves on after we exit


def exec_foreground(p: Plan) -> NoReturn:
    """Become the daemon for ``p`` (``strata mount -f``): it logs to this process's stderr
    and serves until unmounted or signalled; its exit status is this process's."""
    fd = p.spec_fd()
    os.set_inheritable(fd, True)
    if p.lock is not None:
        os.set_inheritable(p.lock, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, p.command(fd), _env())


def probe(store: Store) -> None:
    """Mount an empty directory and unmount it: raises ``FuseUnavailable`` (with the reason)
    when FUSE cannot be used here, ``MountFailed`` for any other failure."""
    with tempfile.TemporaryDirectory(prefix="strata-probe-") as tmp:
        lower, mp = os.path.join(tmp, "lower"), os.path.join(tmp, "mnt")
        os.mkdir(lower)
        os.mkdir(mp)
        with mounted(plan(store, Directories((lower,)), mp)):
            pass


# -- taking mounts down ----------------------------------------------------------------------------


def unmount(root: str, mountpoint: str, lazy: bool = False) -> None:
    """``strata umount``: unmount here and wait for the daemon (a dead daemon's mount,
    ``ENOTCONN``, is detached and its record dropped).  A mount another mount namespace
    still holds stays served there; asked again for such a mount (no longer here), the daemon
    is stopped.  Raises ``MountFailed`` (busy, not mounted)."""
    mounts = Mounts(root)
    full = os.path.abspath(mountpoint)
    rec = mounts.record_for(full)
    if is_mounted(full):
        try:
            _unmount(full, lazy=lazy)
        except MountError as exc:
            raise MountFailed(str(exc)) from None
        if rec is None:
            mounts.unrecord(full)
        else:
            _settle(mounts, rec, stop=False)
        return
    if rec is not None and rec.elsewhere:
        _terminate(rec)
        return
    raise MountFailed(f"{mountpoint} is not mounted")


def release(root: str, rec: MountRecord) -> None:
    """End the mount of ``rec`` everywhere (``rm -f``): unmount here, and stop its daemon if
    another mount namespace holds it, so the container's lock is free afterwards.  Raises
    ``MountFailed`` when the mount is busy."""
    if not rec.elsewhere and is_mounted(rec.mountpoint, rec.dev or None):
        try:
            _unmount(rec.mountpoint)
        except MountError as exc:
            if is_mounted(rec.mountpoint):
                raise MountFailed(str(exc)) from None
    _settle(Mounts(root), rec, stop=True)


def _settle(mounts: Mounts, rec: MountRecord, stop: bool) -> None:
    """After an unmount here: wait for the daemon to end, unless another mount namespace
    holds the mount (then it serves on, or with ``stop`` is stopped).  Other namespaces are
    looked for only when the daemon does not end at once (reading every process's
    ``mountinfo`` costs more than the usual wait)."""
    wait_gone(rec.pid, SETTLE)
    if not process_alive(rec.pid):
        return
    if rec.dev and holders(rec.dev):
        if stop:
            _terminate(rec)
        return
    wait_gone(rec.pid, EXIT_TIMEOUT)


def _terminate(rec: MountRecord) -> None:
    """Stop the daemon of ``rec`` (its mount lives only in another mount namespace, which
    then sees ENOTCONN) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    wait_gone(rec.pid, EXIT_TIMEOUT)
    if process_alive(rec.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
        wait_gone(rec.pid, EXIT_TIMEOUT)


def wait_gone(pid: int, timeout: float = EXIT_TIMEOUT) -> None:
    """Wait (up to ``timeout`` s) until the daemon ``pid`` has exited (not our child, or not
    reaped by us: ``process_alive``)."""
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


__all__: Sequence[str] = ["Directories", "Layers", "Plan", "exec_foreground", "fuse_missing",
                          "mounted", "open_mounted", "plan", "probe", "release", "start", "unmount",
                          "wait_gone"]
