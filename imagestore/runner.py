"""Running a bundle through an OCI runtime (crun from Debian; runc accepted): create, start,
wait, delete, with the container's terminal, standard streams and signals handled as
``docker run`` handles them.

``OCIRuntime.find`` picks the runtime (``--runtime`` or the first of crun and runc on the
PATH).  ``run_bundle`` runs one container:

1. ``RUNTIME create --bundle B --pid-file P [--console-socket S] ID``.  The container's init
   starts and waits; its stdin and stdout are given as they are (the caller's, /dev/null or a
   pipe), its stderr is a pipe strata reads: everything on it before ``start`` is the
   runtime's own message, never the command's, so an error of the runtime (the command not
   found, not executable, a mount refused) becomes one line and docker's exit status (127,
   126, 125) instead of text mixed into the command's stderr.  With a terminal, the runtime
   sends the pty's master over the unix socket ``S`` (``SCM_RIGHTS``).
2. strata is the init's parent (it sets ``PR_SET_CHILD_SUBREAPER`` before ``create``, so the
   runtime's orphan comes to it, as with conmon) and waits for it on a pidfd.
3. ``RUNTIME start ID``; then copy stderr (and the terminal: raw mode, window size, SIGWINCH),
   forward SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the init, and wait.
4. The exit status: the command's, or 128+N when a signal N killed it; then
   ``RUNTIME delete --force ID``.

Seams: only the runtime's command line, its JSON log (``--log-format json``) and the bundle
directory; nothing here knows about images or mounts.

Caveats:
* crun refuses a host whose cgroup v1 hierarchies sit beside a v2 hierarchy that has
  controllers ("cgroups in hybrid mode not supported").  There, every crun call runs in a
  private mount namespace without ``/sys/fs/cgroup/unified``, where crun sees a plain cgroup v1
  host (``hide_unified``).
* Signals are forwarded only when ``run_bundle`` is called from the main thread (Python
  delivers them there); from another thread the command still runs and its status is returned.
* The init is pid 1 of its pid namespace: a signal it has no handler for (SIGTERM to a plain
  ``sleep``) does nothing, as with docker.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .runtime import RunError
from .terminal import raw_mode, receive_master, window_size

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
CREATE_TIMEOUT = 60.0
DRAIN_TIMEOUT = 5.0  # after the init exits, for the last output of the streams
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_CLONE_NEWNS, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 0x20000, 0x4000, 1 << 18, 2
_EXEC_FAILED = (b'{"msg":"exec container process', b"exec container process")
_libc = ctypes.CDLL(None, use_errno=True)


class RuntimeMissing(RunError):
    """No OCI runtime is installed (or ``--runtime`` names none)."""


@dataclass(frozen=True)
class OCIRuntime:
    """A runtime binary: ``kind`` ``crun`` or ``runc`` (its command-line dialect), its state
    directory, and whether its calls must not see the cgroup v2 hierarchy (see Caveats)."""

    path: str
    kind: str
    state_root: str
    hide_unified: bool = False
    cgroups: bool = True

    @classmethod
    def find(cls, choice: str | None, state_root: str, *, cgroups: bool = True) -> OCIRuntime:
        """``choice`` (a path or a name on the PATH), else crun, else runc.  Raises
        ``RuntimeMissing`` naming the Debian package."""
        if choice:
            path = choice if "/" in choice else shutil.which(choice)
            if path is None or not os.access(path, os.X_OK) or os.path.isdir(path):
                raise RuntimeMissing(f"the OCI runtime {choice} is not installed or not "
                                     "executable")
        else:
            path = next((p for p in map(shutil.which, ("crun", "runc")) if p), None)
            if path is None:
                raise RuntimeMissing("strata run needs an OCI runtime: crun is not installed "
                                     "(Debian package crun)")
        kind = "runc" if "runc" in os.path.basename(path) else "crun"
        if not cgroups and kind != "crun":
            raise RunError("--cgroups=disabled needs crun")
        hide = kind == "crun" and _hybrid_with_controllers()
        return cls(os.path.abspath(path), kind, os.path.join(state_root, kind), hide, cgroups)

    def command(self, log: str, *args: str) -> list[str]:
        base = [self.path, "--root", self.state_root, "--log", log, "--log-format", "json"]
        if self.kind == "crun" and not self.cgroups:
            base.append("--cgroup-manager=disabled")
        return [*base, *args]

    def preexec(self) -> Callable[[], None] | None:
        return _hide_unified if self.hide_unified else None

    def call(self, log: str, *args: str, timeout: float = CREATE_TIMEOUT
             ) -> subprocess.CompletedProcess[bytes]:
        """A runtime command with its own streams (not the container's)."""
        return subprocess.run(self.command(log, *args), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, preexec_fn=self.preexec(),
                              process_group=0)

    def delete(self, log: str, cid: str) -> None:
        """Forget the container ``cid`` (killing what is left of it); quiet if it is gone."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.call(log, "delete", "--force", cid, timeout=30)


def _hybrid_with_controllers() -> bool:
    try:
        if os.statvfs("/sys/fs/cgroup").f_fsid == os.statvfs("/sys/fs/cgroup/unified").f_fsid:
            return False
        with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _hide_unified() -> None:  # pragma: no cover - runs in the forked child
    """In the child, before exec: a private mount namespace without the cgroup v2 hierarchy."""
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if _libc.umount2(b"/sys/fs/cgroup/unified", _MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "umount /sys/fs/cgroup/unified")


@dataclass
class Streams:
    """The container's standard streams.  ``stdin``: a descriptor given to the container as
    is (None: /dev/null), or ``input`` bytes fed through a pipe.  ``stdout``/``stderr``:
    descriptors the output goes to, or, with ``capture``, collected into ``RunResult``."""

    stdin: int | None = None
    input: bytes | None = None
    stdout: int = 1
    stderr: int = 2
    capture: bool = False


@dataclass(frozen=True)
class RunResult:
    status: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class _Run:
    """The descriptors of one run: ``err`` reads the container's stderr (the runtime's
    messages before ``start``), ``out`` its stdout when captured, ``feed`` writes ``input``,
    ``master`` is the terminal's; every one is closed by ``close_all``."""

    fds: list[int] = field(default_factory=list)
    err: int = -1
    out: int = -1
    feed: int = -1
    master: int = -1
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.remove(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self.fds):
            self.close(fd)


def error_status(message: str) -> int:
    """docker's exit status for a runtime's error: 127 the command is not found, 126 it
    cannot be executed, 125 anything else."""
    low = message.lower()
    if ("executable file" in low and "not found" in low) or (
            "exec" in low and "no such file or directory" in low):
        return 127
    if low.startswith("open executable") or ("exec" in low and any(
            w in low for w in ("permission denied", "exec format error", "is a directory",
                               "not a directory", "operation not permitted"))):
        return 126
    return 125


def _log_errors(path: str) -> list[str]:
    out = []
    with contextlib.suppress(OSError), open(path, "rb") as f:
        for raw in f:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                out.append(line)
                continue
            if isinstance(rec, dict) and rec.get("level") == "error" and rec.get("msg"):
                out.append(str(rec["msg"]))
    return out


def _failure(rt: OCIRuntime, log: str, what: str, stderr: bytes) -> RunError:
    lines = _log_errors(log)
    if not lines:
        lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
        for i, ln in enumerate(lines):
            with contextlib.suppress(ValueError):
                rec = json.loads(ln)
                if isinstance(rec, dict) and rec.get("msg"):
                    lines[i] = str(rec["msg"])
    message = lines[-1] if lines else f"{rt.kind} {what} failed"
    return RunError(f"{rt.kind}: {message}", error_status(message))


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    old = ctypes.c_int(0)
    _libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0)
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        yield
    finally:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, old.value, 0, 0, 0)


@contextlib.contextmanager
def _signals_forwarded(wake_w: int, tty: bool) -> Iterator[bool]:
    """Route the forwarded signals (and SIGWINCH with a terminal) to ``wake_w``; True when
    it could (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    sigs = [*FORWARDED, *([signal.SIGWINCH] if tty else [])]
    old = {s: signal.getsignal(s) for s in sigs}
    old_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        for s in sigs:
            signal.signal(s, lambda signum, frame: None)
        yield True
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(old_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            return
        view = view[n:]


def run_bundle(rt: OCIRuntime, bundle: str, cid: str, streams: Streams, *, tty: bool,
               interactive: bool, on_start: Callable[[int], None] | None = None,
               phase: Callable[[str], None] | None = None) -> RunResult:
    """Run the container of ``bundle`` (``config.json`` and the rootfs it names) as ``cid``
    and return its exit status (and output with ``streams.capture``).  Raises ``RunError``
    when the runtime cannot start the command (``exit_status`` 125, 126 or 127); the runtime's
    state of ``cid`` is deleted whatever happens.  ``on_start(pid)``: the command started;
    ``phase(name)``: a step (create, start, command, delete) ended."""
    done = phase or (lambda name: None)
    log = os.path.join(bundle, "runtime.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(log)
    if os.path.exists(os.path.join(rt.state_root, cid)):
        rt.delete(log, cid)  # what a killed strata left behind
    r = _Run()
    pid = -1
    try:
        wake_r, wake_w = _pipe(r)
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        # signals are routed from before create: one that comes before the command starts is
        # passed on once it has (instead of killing strata with the container half made)
        with _signals_forwarded(wake_w, tty), _subreaper():
            pid = _create(rt, bundle, cid, log, streams, r, tty=tty)
            done("create")
            try:
                started = rt.call(log, "start", cid)
                if started.returncode != 0:
                    raise _failure(rt, log, "start", started.stderr)
                if on_start is not None:
                    on_start(pid)
                done("start")
                status = _Relay(pid, streams, r, tty=tty, interactive=interactive).wait(wake_r)
                pid = -1
                done("command")
            finally:
                if pid > 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
        return RunResult(status, bytes(r.stdout), bytes(r.stderr))
    finally:
        r.close_all()
        rt.delete(log, cid)
        done("delete")


def _pipe(r: _Run) -> tuple[int, int]:
    rd, wr = os.pipe2(os.O_CLOEXEC)
    return r.keep(rd), r.keep(wr)


def _create(rt: OCIRuntime, bundle: str, cid: str, log: str, streams: Streams, r: _Run, *,
            tty: bool) -> int:
    """``create``; returns the init's pid (``r`` gets the stream descriptors)."""
    devnull = r.keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    r.err, err_w = _pipe(r)
    stdin, stdout, theirs = devnull, streams.stdout, [err_w]
    if tty:
        stdout = devnull
    else:
        if streams.input is not None:
            stdin, r.feed = _pipe(r)
            theirs.append(stdin)
        elif streams.stdin is not None:
            stdin = streams.stdin
        if streams.capture:
            r.out, stdout = _pipe(r)
            theirs.append(stdout)
    args = ["create", "--bundle", bundle, "--pid-file", os.path.join(bundle, "pid")]
    server = None
    if tty:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(bundle, "console.sock"))
        dfd = os.open(bundle, os.O_PATH | os.O_CLOEXEC)
        try:  # the path can be longer than sun_path allows: bind through the directory's fd
            server.bind(f"/proc/self/fd/{dfd}/console.sock")
        finally:
            os.close(dfd)
        server.listen(1)
        args += ["--console-socket", "console.sock"]
    try:
        # (a process group of its own: a Ctrl-C on the terminal is strata's to pass on)
        proc = subprocess.Popen(rt.command(log, *args, cid), stdin=stdin, stdout=stdout,
                                stderr=err_w, cwd=bundle, preexec_fn=rt.preexec(),
                                process_group=0)
        for fd in theirs:
            r.close(fd)
        said = _collect_until_exit(proc, r.err)
        if proc.returncode != 0:
            raise _failure(rt, log, "create", said)
        if said.strip():  # a warning of the runtime: not the command's output
            _write_all(streams.stderr, said)
        with open(os.path.join(bundle, "pid")) as f:
            pid = int(f.read().strip())
        if server is not None:
            r.master = r.keep(receive_master(server, time.monotonic() + 10))
        return pid
    finally:
        if server is not None:
            server.close()


def _collect_until_exit(proc: subprocess.Popen[bytes], fd: int) -> bytes:
    """What the runtime writes to the stderr pipe until it exits (woken by its pidfd)."""
    out = bytearray()
    deadline = time.monotonic() + CREATE_TIMEOUT
    os.set_blocking(fd, False)
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise RunError("the runtime did not create the container in time")
            for ready, _ in poller.poll(left * 1000):
                if ready == fd:
                    chunk = _read_available(fd)
                    out += chunk
                    if not chunk:  # EOF: the runtime's end is closed, only its exit is left
                        poller.unregister(fd)
        out += _read_available(fd)
    finally:
        os.close(pidfd)
        os.set_blocking(fd, True)
    return bytes(out)


def _read_available(fd: int) -> bytes:
    out = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            out += chunk
    return bytes(out)


class _Relay:
    """Copy the streams and forward signals until the init exits (then drain the streams)."""

    def __init__(self, pid: int, streams: Streams, r: _Run, *, tty: bool,
                 interactive: bool) -> None:
        self.pid, self.streams, self.r, self.tty = pid, streams, r, tty
        self.poller = select.poll()
        self.sinks: dict[int, Callable[[bytes], None]] = {}
        self.held = bytearray()  # the runtime's report of a failed exec, if that is what it is
        self.first_err = True
        self.stdin = streams.stdin if tty and interactive and streams.stdin is not None \
            else None
        self.pending = memoryview(streams.input or b"")

    def _to(self, fd: int, buf: bytearray) -> Callable[[bytes], None]:
        return buf.extend if self.streams.capture else (lambda data: _write_all(fd, data))

    def _stderr(self, data: bytes) -> None:
        if self.first_err and data.startswith(_EXEC_FAILED):
            self.held += data
        else:
            self._to(self.streams.stderr, self.r.stderr)(data)
        self.first_err = False

    def _resize(self) -> None:
        if self.r.master < 0:
            return
        size = window_size(self.streams.stdout, 0 if self.streams.stdin is None
                           else self.streams.stdin)
        if size is not None:
            fcntl.ioctl(self.r.master, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))

    def wait(self, wake_r: int) -> int:
        """Relay until the init exits; ``wake_r`` delivers the numbers of signals to pass on."""
        r = self.r
        pidfd = r.keep(os.pidfd_open(self.pid))
        self.sinks[r.err] = self._stderr
        if r.out >= 0:
            self.sinks[r.out] = self._to(self.streams.stdout, r.stdout)
        if r.master >= 0:
            self._resize()
            self.sinks[r.master] = self._to(self.streams.stdout, r.stdout)
        for fd in self.sinks:
            self.poller.register(fd, select.POLLIN)
        if self.stdin is not None:
            self.poller.register(self.stdin, select.POLLIN)
        if r.feed >= 0:
            os.set_blocking(r.feed, False)
            self.poller.register(r.feed, select.POLLOUT)
        self.poller.register(pidfd, select.POLLIN)
        self.poller.register(wake_r, select.POLLIN)
        status: int | None = None
        deadline = 0.0
        with raw_mode(self.stdin):
            while status is None or self.sinks:
                timeout = None
                if status is not None:
                    timeout = (deadline - time.monotonic()) * 1000
                    if timeout <= 0:
                        break
                for fd, _ in self.poller.poll(timeout):
                    if fd == pidfd:
                        self.poller.unregister(pidfd)
                        status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                        deadline = time.monotonic() + DRAIN_TIMEOUT
                        if r.feed >= 0:
                            self._stop_feeding()
                    elif fd == wake_r:
                        self._signals(wake_r, status is None)
                    elif fd == r.feed:
                        self._feed()
                    elif fd == self.stdin:
                        self._from_stdin()
                    elif fd in self.sinks:
                        self._drain(fd)
        assert status is not None
        if self.held:
            message = self.held.decode(errors="replace").strip()
            with contextlib.suppress(ValueError, AttributeError):
                message = str(json.loads(message.splitlines()[0]).get("msg", message))
            if status != 0:
                code = error_status(message)
                raise RunError(f"crun: {message}", 126 if code == 125 else code)
            self._to(self.streams.stderr, r.stderr)(bytes(self.held))
        return 128 - status if status < 0 else status

    def _drain(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except OSError as exc:  # EIO: the terminal's other side has closed
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if data:
            self.sinks[fd](data)
        else:
            self.poller.unregister(fd)
            del self.sinks[fd]

    def _feed(self) -> None:
        try:
            n = os.write(self.r.feed, self.pending[:65536])
        except BrokenPipeError:
            n = len(self.pending)
        except BlockingIOError:
            return
        self.pending = self.pending[n:]
        if not self.pending:
            self._stop_feeding()

    def _stop_feeding(self) -> None:
        self.poller.unregister(self.r.feed)
        self.r.close(self.r.feed)
        self.r.feed = -1

    def _from_stdin(self) -> None:
        assert self.stdin is not None
        try:
            data = os.read(self.stdin, 65536)
        except OSError:
            data = b""
        if data and self.r.master >= 0:
            _write_all(self.r.master, data)
        else:
            self.poller.unregister(self.stdin)
            self.stdin = None

    def _signals(self, wake_r: int, running: bool) -> None:
        got = _read_available(wake_r)
        for signum in array.array("B", got):
            if signum == signal.SIGWINCH:
                self._resize()
            elif running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signum)
