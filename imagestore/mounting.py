"""Starting and stopping mount daemons: the only code that spawns ``python -m unionfs.mount``.

``plan`` (``mountplan``) turns what to mount (an image, a container, or ``Directories``) into a
*mount spec* (the JSON the daemon reads; ``unionfs.mount`` documents it): the layers as the
layer store describes them, the engine, the container's upper and work dirs, options, the
control socket, the record the daemon writes into ``mounts/``.  A plan then runs one of four
ways, all through the same three steps (``_Daemon``: spawn, wait for ``ready``, stop):

* ``mounted`` — for a ``with`` block (``Store.mount``, the pytest plugin): the daemon holds a
  lifeline pipe to this process, and the mount is taken down when the block ends;
* ``open_mounted`` — the same for trio code: the steps run in worker threads;
* ``start`` — a mount that outlives this process (``strata mount``): returns once ready.  The
  CLI sets ``daemonfork.enabled``: its daemon is then a fork of the command's own process,
  made (``daemonfork.preload``) before the command plans, so that it imports pyfuse3 and trio
  on the other core meanwhile; the command never imports them, and the fork never uses the
  store;
* ``exec_foreground`` — this process becomes the daemon (``strata mount -f``).

The daemon writes ``ready`` (or its one-line error) to a pipe once the mount answers; only then
is the mountpoint handed over.  It runs in a session of its own, logging to
``<root>/mounts/<key>.log``.  With ``auto``, a daemon whose overlay the kernel refused is
followed by one of the FUSE engine.  ``unmount`` and ``release`` (``unmounting``) take mounts
down (``strata umount``, ``rm -f``) and follow what is true in this mount namespace.

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
* ``exec_foreground`` (``-f``) cannot fall back from the kernel engine: it is the daemon.
* A forked daemon shows the command's argv in ``ps`` (``strata mount C MP``), not
  ``python -m unionfs.mount SPEC MP``; the mountpoint is in both.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from unionfs import overlay
from unionfs.control import is_mounted
from unionfs.control import unmount as _unmount
from unionfs.errors import MountError

from . import daemonfork
from .errors import MountFailed
from .mountplan import DEFAULT_ENGINES, ENGINES, Plan, engine_for, fuse_missing, plan
from .mounts import clear_mount_dir
from .targets import READY_TIMEOUT, Directories, Layers
from .unmounting import EXIT_TIMEOUT, release, unmount, wait_gone

if TYPE_CHECKING:
    from .api import Store

BUSY_RETRIES = 10
BUSY_DELAY = 0.1
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def daemon_command(spec: str, mountpoint: str) -> list[str]:
    """The daemon's argv: ``spec`` (``/dev/fd/N``) and the mountpoint where
    the union appears (the overlay's for the kernel engine), so ``ps`` shows what each daemon
    serves."""
    return [sys.executable, "-m", "unionfs.mount", spec, mountpoint]


def _env() -> dict[str, str]:
    """The daemon's environment: ours, with this source tree importable."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + old if old else "")
    return env


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
    proc: subprocess.Popen[bytes] | daemonfork.Forked | None = None
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
            argv = self.p.command(spec_fd)[-2:]
            # the daemon forked when the command began (strata mount, strata run), if any; a
            # fork of this process now only where nothing of it is to outlive it (no lifeline:
            # the fork would hold the lifeline's write end)
            self.proc = daemonfork.from_preloaded(argv, passed, self.p.log)
            if self.proc is not None:
                return
            if daemonfork.enabled and not self.lifeline and threading.active_count() == 1:
                self.proc = daemonfork.fork_daemon(argv, passed, self.p.log)
                return
            with open(self.p.log, "ab") as log:
                self.proc = subprocess.Popen(
                    self.p.command(spec_fd), pass_fds=passed, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True, env=_env())
        finally:
            for fd in child.values():
                os.close(fd)
            if self.p.fallback is None:  # kept for a fallback until the daemon is ready
                self.p.close()  # the daemon holds the container's lock now (or nobody does)

    def take_ready_fd(self) -> int:
        """Our end of the ready pipe, now the caller's to close (``wait_ready`` does)."""
        with self._lock:
            return self.fds.pop("ready_r")

    def wait_ready(self, fd: int | None = None, cancel: int | None = None) -> None:
        """Until the daemon says ``ready`` on ``fd`` (default: take it now); raises its error
        (typed) otherwise.  With ``auto``, a daemon whose overlay the kernel refused is
        followed by one of the FUSE engine.  Closes ``fd`` and ``cancel``, whatever
        happens."""
        fd = self.take_ready_fd() if fd is None else fd
        try:
            while True:
                assert self.proc is not None
                try:
                    message = _read_ready(fd, self.timeout, cancel)
                finally:
                    os.close(fd)
                if message == "ready":
                    self.ready = True
                    return
                if message is None:
                    raise MountFailed(f"the mount of {self.p.what} at {self.p.mountpoint} did "
                                      f"not become ready within {self.timeout:.0f}s (daemon "
                                      f"log: {self.p.log})")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(EXIT_TIMEOUT)
                if self.p.fallback is None or not overlay.refused(message):
                    raise self.p.failure(message, self.proc.returncode, self.log_from)
                lower = self.p.lower
                self.p.use_fallback()
                if lower is not None:
                    with contextlib.suppress(OSError):
                        os.rmdir(lower)
                self._close("life_w")
                self.spawn()
                fd = self.take_ready_fd()
        finally:
            if cancel is not None:
                os.close(cancel)
            self.p.close()

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
            if p.lower is not None:  # a kernel engine daemon that died as it started
                clear_mount_dir(p.lower)
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


__all__: Sequence[str] = ["DEFAULT_ENGINES", "ENGINES", "Directories", "Layers", "Plan",
                          "daemon_command",
                          "engine_for", "exec_foreground", "fuse_missing", "mounted",
                          "open_mounted", "plan", "probe", "release", "start",
                          "unmount", "wait_gone"]
