"""Mount daemons forked from the command's own process (``strata mount``, ``strata run``):
``fork_daemon``, and ``preload``, which forks the daemon before the command has planned its
mount (``from_preloaded`` hands it the plan).

The CLI sets ``enabled`` for ``strata mount``: its daemon is then a fork of the command's
process (single-threaded, about to exit), which skips a second interpreter start and the
imports the command has made.  ``preload`` goes further (``strata mount``, and ``strata
run``, whose daemon holds a lifeline and so could not be a late fork of a process that lives
on): it forks as soon as the command is known, before the store is opened, so the fork
imports pyfuse3, trio and the union (and the lazy layer's modules and what its first request
needs when the store holds lazy layers) on one core while the command plans the mount on the
other; the plan's argv and descriptors then go to the fork over a socket (``SCM_RIGHTS``), at
the numbers the argv names.  Before the plan, the command may send ``hint``: the registries
the mount's lazy layers come from, whose scheme and challenge the fork finds while the command
plans (and builds the lazy layers' indexes, ``LazyStore.ready``).  ``mounting`` decides when
to fork; this module imports nothing heavy, so that the fork starts early.

Caveats:
* A preloaded fork whose command exits without mounting (an error, ``--help``) reads
  end-of-file and exits; the command's exit reaps nothing, init does.
* Both forks happen only while the process is single-threaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

enabled = False  # the CLI sets it: its daemons are forks of it (start-up time)
PREPARE_TIMEOUT = 1.0  # seconds the preloaded daemon may spend on a hint, all sources together


class Forked:
    """A daemon forked from this process, with the ``Popen`` methods ``mounting`` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


_log = logging.getLogger(__name__)
_preloaded: tuple[int, socket.socket] | None = None  # (pid, our end) of ``preload``'s fork


def preload(store_root: str) -> None:
    """Fork the daemon of the mount this command is about to make now, before it plans it
    (``strata mount``, ``strata run``): the fork imports the FUSE and union modules (the lazy
    layer's and the network client's too when the store holds lazy layers) while this process
    plans, on the other core, then waits for ``from_preloaded`` to send it its argv and
    descriptors.  If this process exits first, the fork reads end-of-file and exits.  The fork
    holds none of this process's standard streams (a caller waiting for their end is not held
    up by it).  Call it while this process is single-threaded."""
    global _preloaded
    if _preloaded is not None or threading.active_count() != 1:
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        theirs.close()
        _preloaded = (pid, ours)
        return
    ours.close()
    _as_child(lambda: _preloaded_daemon(theirs, store_root))


def _preloaded_daemon(sock: socket.socket, store_root: str) -> int:
    """``preload``'s fork: import, wait for the request, take its descriptors, serve."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    from unionfs import mount

    mount.preload()
    lazy = False
    with contextlib.suppress(OSError):
        lazy = bool(os.listdir(os.path.join(store_root, "lazy", "sha256")))
    if lazy:
        import imagestore.lazylayer  # noqa: F401
        from imagestore.registry import rangefetch

        rangefetch.preload()
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 64)
        if not msg:
            return 0  # the command ended without a mount
        request = json.loads(msg)
        if "prepare" not in request:
            break
        _prepare(request["prepare"])
    keep = [int(fd) for fd in request["keep"]]
    out = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)  # from here on, what goes wrong is in the mount's log
    os.dup2(out, 2)
    os.close(out)
    # out of the way of the numbers the argv names (above all of them: still within the
    # open-file limit, which the command that chose them shares), then onto them
    above = max([*keep, *fds, sock.fileno()]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
    for fd in fds:
        os.close(fd)
    sock.close()
    for src, dst in zip(moved, keep, strict=True):
        os.dup2(src, dst, inheritable=False)
        os.close(src)
    return _serve_as_daemon(request["argv"], keep, request["log"])


def hint(sources: list[dict[str, str]]) -> None:
    """Tell ``preload``'s fork, before the plan, where the mount's lazy layers are fetched
    from (``rangefetch.Source`` in JSON form): it finds each registry's scheme and challenge
    while this process plans (``_prepare``), so that the first read is one request."""
    if _preloaded is None or not sources:
        return
    with contextlib.suppress(OSError):  # gone: from_preloaded finds out
        _preloaded[1].send(json.dumps({"prepare": sources}).encode())


def _prepare(sources: list[dict[str, str]]) -> None:
    """In the preloaded fork, before the plan: ``Fetcher.prepare`` each source with the
    process's fetcher — the scheme and challenge only: a token may need a credential helper,
    which no deadline bounds, and is left to the daemon's warm-up thread — then close its
    connections (the descriptors the plan brings may take their numbers), keeping what it
    learnt."""
    from imagestore.registry.rangefetch import shared
    from imagestore.registry.runtime import deadline

    fetcher = shared()
    try:
        # while the command plans: what takes longer is left to the first read
        with deadline(PREPARE_TIMEOUT):
            for source in sources:
                fetcher.prepare(source, token=False)
    finally:
        fetcher.close()


def from_preloaded(argv: list[str], keep: list[int], log: str) -> Forked | None:
    """Hand the daemon's argv and descriptors to ``preload``'s fork (None: there is none, or
    it is gone; ``fork_daemon`` forks instead)."""
    global _preloaded
    if _preloaded is None:
        return None
    pid, sock = _preloaded
    _preloaded = None
    try:
        request = json.dumps({"argv": argv, "keep": keep, "log": log}).encode()
        socket.send_fds(sock, [request], keep)
        return Forked(pid)
    except OSError as exc:
        _log.debug("the preloaded daemon is gone (%s): forking another", exc)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return None
    finally:
        sock.close()


def fork_daemon(argv: list[str], keep: list[int], log: str) -> Forked:
    """The daemon as a fork of this process (``python -m unionfs.mount`` ``argv`` without the
    interpreter's start and the imports this process has made already): in a session of its
    own, logging to ``log``, with only ``keep`` of our descriptors, its signals at their
    defaults; it runs ``unionfs.mount.main`` and exits without this process's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    _as_child(lambda: _serve_as_daemon(argv, keep, log))


def _as_child(body: Callable[[], int]) -> NoReturn:
    """In a fork: a session of its own, default signals, then ``body``; exit with its status
    (70 and the traceback on stderr if it raised), without this process's teardown."""
    status = 70
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        status = body()
    except BaseException:
        with contextlib.suppress(BaseException):
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(status)


def _serve_as_daemon(argv: list[str], keep: list[int], log: str) -> int:
    """In a daemon's fork: standard streams to ``log``, every descriptor but ``keep``
    closed, then ``unionfs.mount.main(argv)``; returns its exit status."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2 and int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))
    from unionfs import mount

    status = mount.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    return status
