"""The mount daemon's control socket (``"control"`` in the mount spec): freeze, rotate,
guard.  Served in the daemon's trio loop beside the FUSE session (``unionfs.mount``); the
clients are ``unionfs.control.frozen`` and ``imagestore.mounts`` (``rotate``, ``guard``).
Imported only by the daemon, which has trio and pyfuse3 loaded already."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from typing import TYPE_CHECKING

import trio

from .control import short_address
from .errors import UnionError
from .upper import UpperLayer

if TYPE_CHECKING:
    from .fuse_ops import Operations

log = logging.getLogger("unionfs.mount")

__all__ = ["kill_guarded", "serve"]


async def serve(ops: Operations, path: str, guards: dict[int, int],
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The control socket: one request per line.

    * ``freeze``: answered ``frozen``; changes are held from then until the client closes the
      connection (or dies), so a commit can never leave the mount frozen.  More requests may
      follow on the same connection, answered while frozen.
    * ``rotate NEW_UPPER NEW_WORK`` (each path a JSON string): the writable layer becomes the
      top read-only layer and ``NEW_UPPER`` (an empty directory; ``NEW_WORK`` its work dir)
      the writable one, in the same mount (``Operations.rotate``: inode numbers unchanged,
      refused while a file is open for writing).  Answered ``rotated OLD_UPPER`` (the
      directory that is now a read-only layer, a JSON string) or ``error MESSAGE``.  A build
      sends it between two steps: the old upper is then the step's layer, read still.
    * ``guard PID`` / ``unguard PID``: answered ``guarded``/``unguarded``.  A guarded process
      (held by a pidfd, so a reused pid is never hit) is killed with SIGKILL if the mount
      ends because its parent is gone (the lifeline): a build's RUN, killed with the build
      that runs it rather than left holding the mount."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with short_address(path) as short:
        await sock.bind(short)
    os.chmod(path, 0o600)
    sock.listen(4)
    task_status.started()  # listening before the mount is said to be ready

    async def handle(stream: trio.SocketStream) -> None:
        lines = _Lines(stream)
        async with stream:
            try:
                first = await lines.next()
                if first == b"freeze":
                    await ops.freeze()
                    try:
                        await stream.send_all(b"frozen\n")
                        while (line := await lines.next()) is not None:
                            await stream.send_all(await _request(ops, line, guards))
                    finally:
                        ops.thaw()
                elif first is not None:
                    await stream.send_all(await _request(ops, first, guards))
            except trio.BrokenResourceError:
                pass

    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


class _Lines:
    """Request lines from a control connection (None at its end)."""

    MAX = 1 << 16

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> bytes | None:
        while b"\n" not in self.buf:
            if len(self.buf) > self.MAX:
                return None
            data = await self.stream.receive_some(4096)
            if not data:  # the client is done: a last request without its newline counts
                last, self.buf = self.buf.strip(), b""
                return last or None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.strip()


def _json_words(text: str) -> list[str]:
    """``"a" "b"``: JSON strings separated by white space."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        value, i = decoder.raw_decode(text, i)
        if not isinstance(value, str):
            raise ValueError("expected a JSON string")
        out.append(value)
    return out


def _guard(guards: dict[int, int], word: str, rest: str) -> bytes:
    if not rest.strip().isdigit():
        return f"error usage: {word} PID\n".encode()
    pid = int(rest)
    if word == "unguard":
        fd = guards.pop(pid, None)
        if fd is not None:
            os.close(fd)
        return b"unguarded\n"
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        return f"error {exc.strerror}\n".encode()
    old = guards.pop(pid, None)
    if old is not None:
        os.close(old)
    guards[pid] = fd
    return b"guarded\n"


def kill_guarded(guards: dict[int, int]) -> None:
    """SIGKILL every guarded process (the mount's parent is gone)."""
    for pid, fd in list(guards.items()):
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        log.info("killed guarded process %d", pid)
        os.close(fd)
        del guards[pid]


async def _request(ops: Operations, line: bytes, guards: dict[int, int]) -> bytes:
    """The answer to one control request other than ``freeze``."""
    word, _, rest = line.decode(errors="replace").partition(" ")
    if word in ("guard", "unguard"):
        return _guard(guards, word, rest)
    if word != "rotate":
        return b"error unknown request\n"
    try:
        upper, work = _json_words(rest)
    except ValueError:
        return b"error usage: rotate NEW_UPPER NEW_WORK (JSON strings)\n"
    try:
        if os.listdir(upper):
            return b"error the new upper is not empty\n"
        old = ops.union.upper.root if ops.union.upper is not None else None
        if old is None:
            return b"error the mount is read-only\n"
        await ops.rotate(UpperLayer(upper, work))
    except UnionError as exc:
        return f"error {os.strerror(exc.code)}\n".encode()
    except OSError as exc:
        return f"error {exc.strerror or exc}: {exc.filename or upper}\n".encode()
    log.debug("rotated: %s is a read-only layer now, %s the upper", old, upper)
    return f"rotated {json.dumps(old)}\n".encode()
