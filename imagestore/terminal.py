"""The container's terminal for ``runner``: the size of ours, raw mode while the container
has it, and the pty master the runtime sends over the console socket (``SCM_RIGHTS``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
import time
import tty
from collections.abc import Iterator

from .runtime import RunError

__all__ = ["raw_mode", "receive_master", "window_size"]


def _window(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None


def window_size(*fds: int) -> tuple[int, int] | None:
    """(rows, columns) of the first terminal among ``fds``."""
    for fd in fds:
        raw = _window(fd) if os.isatty(fd) else None
        if raw is not None:
            rows, cols = struct.unpack("HHHH", raw)[:2]
            if rows and cols:
                return rows, cols
    return None


def receive_master(server: socket.socket, deadline: float) -> int:
    """Accept the runtime's connection on the console socket and take the pty master."""
    server.settimeout(max(0.1, deadline - time.monotonic()))
    conn, _ = server.accept()
    with conn:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise RunError("the runtime did not send the terminal")
    return fds[0]


@contextlib.contextmanager
def raw_mode(fd: int | None) -> Iterator[None]:
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
