"""Mounting from Python: an image (read-only) or a container (writable) for the length of a
``with`` block, synchronous (``mount``) or for trio code (``open_mount``).

The file system is served by the very daemon ``strata mount`` starts: ``python -m cli.main
mount -f --ready-fd N`` in a child process of its own session, logging to
``<root>/mounts/<key>.log``.  The daemon writes ``ready`` (or its one-line error) to the pipe
``N`` once the mount answers; only then is the mountpoint handed to the caller.  On the way out
— normal exit, exception, cancellation, KeyboardInterrupt — the mount is unmounted
(``fusermount3 -u``, retried briefly while busy, then lazily as a last resort), the daemon is
waited for (SIGTERM, then SIGKILL if it hangs), and a mountpoint this module created is removed.

Seams: the daemon is reached only through its command line and two pipes (so the
``imagestore -> unionfs`` core import rule holds: no ``unionfs.mount``, no pyfuse3 here):
``--ready-fd`` (it writes ``ready`` or its error) and ``--lifeline-fd`` (this process holds the
write end; when it dies — SIGKILL, SIGTERM, a crash — the daemon reads EOF and unmounts).
Unmounting and mountpoint checks come from ``unionfs.control``.

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
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from unionfs.control import is_mounted, unmount
from unionfs.errors import MountError

from .containers import Container, Containers, MountRecord, process_alive
from .errors import Conflict, FuseUnavailable, ImageNotFound, MountFailed, StoreError
from .store import Image, Store

READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0
BUSY_RETRIES = 10
BUSY_DELAY = 0.1
# in a line of the daemon's error or log that mentions fuse, words saying FUSE itself is
# refused here (lower case); a permission error of anything else is no reason to skip tests
_NO_FUSE = ("permission denied", "operation not permitted", "device not found",
            "no such device", "no such file")

Target = str | Image | Container
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fuse_missing() -> str | None:
    """Why FUSE mounts cannot work on this machine, without trying one: ``/dev/fuse`` missing,
    ``fusermount3`` not installed; None when both are there.  ``probe`` also tries a mount."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package fuse3)")
    return "; ".join(problems) or None


@dataclass(frozen=True)
class _Plan:
    """Everything decided before the daemon starts."""

    root: str
    args: tuple[str, ...]  # after ``mount -f --ready-fd N``
    mountpoint: str
    created: bool  # the mountpoint is ours to remove
    log: str
    what: str  # for messages

    def command(self, pipes: _Pipes) -> list[str]:
        return [sys.executable, "-m", "cli.main", "--root", self.root, "--log-level", "info",
                "mount", "-f", "--ready-fd", str(pipes.ready_w), "--lifeline-fd",
                str(pipes.life_r), *self.args, self.mountpoint]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + old if old else "")
        return env

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def failure(self, message: str | None, status: int | None, log_from: int) -> StoreError:
        """The typed error for a daemon that did not become ready: ``FuseUnavailable`` when
        its error or log says FUSE itself is refused, ``Conflict`` for a container mounted
        elsewhere meanwhile, else ``MountFailed``."""
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
        if "is already mounted at" in message:
            return Conflict(message)
        return MountFailed(f"cannot mount {self.what} at {self.mountpoint}: {message} "
                           f"(daemon log: {self.log})")


def plan(store: Store, target: Target, mountpoint: str | os.PathLike[str] | None, *,
         read_only: bool = False, allow_other: bool = False, suid: bool = False,
         dev: bool = False) -> _Plan:
    """Check FUSE and the target, make the mountpoint (a temp dir when None)."""
    missing = fuse_missing()
    if missing:
        raise FuseUnavailable(missing)
    cs = Containers(store)
    args: list[str] = []
    if isinstance(target, Image):
        name, what = str(target.id), f"image {target.short_id}"
        store.image(target.id)  # still there
    else:
        container = cs.get(target.id) if isinstance(target, Container) else cs.find(target)
        if container is not None:
            where = cs.mounted_at(container)
            if where is not None:
                raise Conflict(f"container {container.name} is already mounted at {where}")
            name, what = container.id, f"container {container.name}"
        else:
            assert isinstance(target, str)
            try:
                image = store.resolve(target)
            except ImageNotFound:
                raise ImageNotFound(f"No such image or container: {target}") from None
            name, what = image.id, f"image {target}"
    options = [o for o, on in (("ro", read_only), ("allow_other", allow_other),
                               ("suid", suid), ("dev", dev)) if on]
    if options:
        args += ["-o", ",".join(options)]
    created = mountpoint is None
    if mountpoint is None:
        mp = tempfile.mkdtemp(prefix="strata-mnt-")
    else:
        mp = os.path.abspath(os.fspath(mountpoint))
        if not os.path.isdir(mp):
            try:
                os.makedirs(mp)
            except OSError as exc:
                raise MountFailed(f"cannot create the mountpoint {mp}: {exc.strerror}") from None
            created = True
        elif is_mounted(mp):
            raise MountFailed(f"{mp} is already a mount point")
    return _Plan(store.root, (*args, name), mp, created, cs.log_path(mp), what)


def _dirs_plan(store: Store, lower: str, mountpoint: str) -> _Plan:
    return _Plan(store.root, ("--lower", lower), mountpoint, False,
                 Containers(store).log_path(mountpoint), f"directory {lower}")


# -- synchronous ---------------------------------------------------------------------------------


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


class _Pipes:
    """The daemon's two pipes.  ``ready``: it writes one line, ``ready`` or its error, once
    the mount answers.  ``lifeline``: this process holds the write end for as long as the
    mount should live; should it die (even by SIGKILL), the daemon reads EOF and unmounts."""

    def __init__(self) -> None:
        self.ready_r, self.ready_w = os.pipe()
        try:
            self.life_r, self.life_w = os.pipe()
        except BaseException:
            os.close(self.ready_r)
            os.close(self.ready_w)
            raise
        self._open = {self.ready_r, self.ready_w, self.life_r, self.life_w}

    @property
    def child_fds(self) -> tuple[int, int]:
        return self.ready_w, self.life_r

    def _close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def spawned(self) -> None:
        """The daemon has its ends (or never will): close ours."""
        self._close(*self.child_fds)

    def read_done(self) -> None:
        self._close(self.ready_r)

    def close(self) -> None:
        """Drop everything, the lifeline last: call only once the daemon is gone."""
        self._close(self.ready_r, self.ready_w, self.life_r, self.life_w)


def _spawn(p: _Plan, pipes: _Pipes) -> subprocess.Popen[bytes]:
    with open(p.log, "ab") as log:
        return subprocess.Popen(p.command(pipes), pass_fds=pipes.child_fds,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=p.env())


def _read_ready(fd: int, timeout: float) -> str | None:
    """The daemon's first line on the ready pipe ("" if it closed the pipe without one), or
    None after ``timeout`` seconds.  (``poll``, not ``select``: a test process may well hold
    more than 1024 descriptors.)"""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if not poller.poll(min(left, 1.0) * 1000):
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
            unmount(mountpoint)
            return False
        except MountError:
            time.sleep(BUSY_DELAY)
    if is_mounted(mountpoint):
        with contextlib.suppress(MountError):
            unmount(mountpoint, lazy=True)
    return True


def _remove_mountpoint(p: _Plan, status: int | None) -> None:
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


def _stop(proc: subprocess.Popen[bytes] | None, p: _Plan, ready: bool) -> None:
    """Take the mount down and reap the daemon, whatever state it is in."""
    try:
        if proc is not None and not ready and proc.poll() is None:
            proc.terminate()  # the daemon unmounts cleanly on SIGTERM
        lazy = _unmount_busy(p.mountpoint) if ready else False
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
                unmount(p.mountpoint, lazy=True)
    finally:
        _remove_mountpoint(p, proc.returncode if proc is not None else None)


@contextlib.contextmanager
def mount_plan(p: _Plan, timeout: float = READY_TIMEOUT) -> Iterator[Path]:
    """Start the daemon for ``p``, yield the mountpoint once it answers, take it down after."""
    proc: subprocess.Popen[bytes] | None = None
    ready = False
    pipes = _Pipes()
    try:
        log_from = p.log_size()
        with _interrupts_held():
            try:
                proc = _spawn(p, pipes)
            finally:
                pipes.spawned()
        try:
            message = _read_ready(pipes.ready_r, timeout)
        finally:
            pipes.read_done()
        if message != "ready":
            if message is None:
                raise MountFailed(f"the mount of {p.what} at {p.mountpoint} did not become "
                                  f"ready within {timeout:.0f}s (daemon log: {p.log})")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(EXIT_TIMEOUT)
            raise p.failure(message, proc.returncode, log_from)
        ready = True
        yield Path(p.mountpoint)
    finally:
        with _interrupts_held():
            try:
                _stop(proc, p, ready)
            finally:
                pipes.close()


def unmount_record(rec: MountRecord, timeout: float = EXIT_TIMEOUT) -> None:
    """Unmount a live mount of the store by its record (whoever started it) and wait for its
    daemon to exit, so a container's mount lock is free afterwards.  Raises ``MountFailed``
    when the mount is busy."""
    try:
        unmount(rec.mountpoint)
    except MountError as exc:
        if is_mounted(rec.mountpoint):
            raise MountFailed(str(exc)) from None
    deadline = time.monotonic() + timeout
    while process_alive(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def probe(store: Store) -> None:
    """Mount an empty directory and unmount it: raises ``FuseUnavailable`` (with the reason)
    when FUSE cannot be used here, ``MountFailed`` for any other failure."""
    missing = fuse_missing()
    if missing:
        raise FuseUnavailable(missing)
    with tempfile.TemporaryDirectory(prefix="strata-probe-") as tmp:
        lower, mp = os.path.join(tmp, "lower"), os.path.join(tmp, "mnt")
        os.mkdir(lower)
        os.mkdir(mp)
        with mount_plan(_dirs_plan(store, lower, mp)):
            pass


# -- trio ----------------------------------------------------------------------------------------


async def _read_ready_async(fd: int, timeout: float) -> str | None:
    buf = b""
    with trio.move_on_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(fd)
            chunk = os.read(fd, 4096)
            buf += chunk
            if not chunk or buf.endswith(b"\n"):
                return buf.decode(errors="replace").strip()
    return None


async def _wait_async(proc: trio.Process, timeout: float | None) -> bool:
    if timeout is None:
        await proc.wait()
        return True
    with trio.move_on_after(timeout):
        await proc.wait()
        return True
    return False


@trio.lowlevel.enable_ki_protection
async def _stop_async(proc: trio.Process | None, p: _Plan, ready: bool) -> None:
    with trio.CancelScope(shield=True):
        try:
            if proc is not None and not ready and proc.returncode is None:
                proc.terminate()
            lazy = await trio.to_thread.run_sync(_unmount_busy, p.mountpoint) if ready \
                else False
            if proc is not None:
                steps: tuple[tuple[Callable[[], None] | None, float | None], ...] = (
                    (None, 1.0 if lazy else EXIT_TIMEOUT), (proc.terminate, 5.0),
                    (proc.kill, None))
                for send, wait in steps:
                    if send is not None:
                        with contextlib.suppress(ProcessLookupError):
                            send()
                    if await _wait_async(proc, wait):
                        break
            if is_mounted(p.mountpoint):
                with contextlib.suppress(MountError):
                    await trio.to_thread.run_sync(lambda: unmount(p.mountpoint, lazy=True))
        finally:
            _remove_mountpoint(p, proc.returncode if proc is not None else None)


@contextlib.asynccontextmanager
async def open_mount_plan(p: _Plan, timeout: float = READY_TIMEOUT) -> AsyncIterator[Path]:
    """``mount_plan`` for trio code: the daemon is started and reaped without blocking the
    event loop; the teardown is shielded from cancellation."""
    proc: trio.Process | None = None
    ready = False
    pipes = _Pipes()
    try:
        log_from = p.log_size()
        try:
            with open(p.log, "ab") as log:
                proc = await trio.lowlevel.open_process(
                    p.command(pipes), pass_fds=pipes.child_fds, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True, env=p.env())
        finally:
            pipes.spawned()
        try:
            message = await _read_ready_async(pipes.ready_r, timeout)
        finally:
            pipes.read_done()
        if message != "ready":
            if message is None:
                raise MountFailed(f"the mount of {p.what} at {p.mountpoint} did not become "
                                  f"ready within {timeout:.0f}s (daemon log: {p.log})")
            await _wait_async(proc, EXIT_TIMEOUT)
            raise p.failure(message, proc.returncode, log_from)
        ready = True
        yield Path(p.mountpoint)
    finally:
        try:
            await _stop_async(proc, p, ready)
        finally:
            pipes.close()
