"""``strata run`` and its caller's terminal and signals: ``-t`` driven through a real pty
(the container's terminal, its size and SIGWINCH, raw mode restored after), and SIGTERM or
SIGINT sent to ``strata run`` reaching the command."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, Strata

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.runtime]

BUSYBOX = "run/busybox:1"


def _command(strata: Strata, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "--root", str(strata.root), "run", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


class Pty:
    """A pseudo-terminal whose slave is the controlling terminal of ``strata run``."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        def controlling() -> None:  # pragma: no cover - in the child
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        return subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                start_new_session=True, preexec_fn=controlling, env=_env())

    def expect(self, text: bytes, timeout: float = 60.0) -> bytes:
        """Read until ``text`` has been seen; what was read up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not seen; got {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:
                    raise AssertionError(f"{text!r} not seen; got {self.seen!r}") from None
        head, _, tail = self.seen.partition(text)
        self.seen = tail
        return head + text

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_tty_run_driven_through_a_pty(run_strata: Strata) -> None:
    pty = Pty(33, 101)
    try:
        before = termios.tcgetattr(pty.slave)
        with reaped(pty.spawn(_command(run_strata, "--rm", "-it", BUSYBOX, "sh"))) as proc:
            pty.expect(b"# ")
            # (the terminal echoes what is typed: the markers are computed by the shell)
            pty.send(b"tty; stty size; echo $TERM; [ -t 0 ] && echo tty-$((6*7))\r")
            got = pty.expect(b"tty-42\r\n")
            assert b"/dev/pts/0\r\n33 101\r\nxterm\r\ntty-42\r\n" in got, got
            pty.resize(40, 120)  # SIGWINCH to strata run, passed on to the container
            time.sleep(0.2)
            pty.send(b"stty size\r")
            assert pty.expect(b"40 120\r\n")
            pty.send(b"exit 7\r")
            assert proc.wait(60) == 7
        assert termios.tcgetattr(pty.slave) == before  # raw mode undone
    finally:
        pty.close()
    assert run_strata.out("ps", "-q") == ""


def test_a_tty_without_i_still_shows_output_and_status(run_strata: Strata) -> None:
    pty = Pty(24, 80)
    try:
        with reaped(pty.spawn(_command(run_strata, "--rm", "-t", BUSYBOX, "sh", "-c",
                                       "tty; exit 3"))) as proc:
            assert b"/dev/pts/0" in pty.expect(b"/dev/pts/0")
            assert proc.wait(60) == 3
    finally:
        pty.close()


def test_it_needs_a_terminal_on_stdin(run_strata: Strata) -> None:
    proc = run_strata("run", "--rm", "-it", BUSYBOX, "true", input=b"", check=False)
    assert proc.returncode == 125
    assert proc.stderr == b"Error: the input device is not a TTY\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_strata_run_reaches_the_command(run_strata: Strata,
                                                    sig: signal.Signals) -> None:
    script = (f'trap "echo got {sig.name}; exit 42" {sig.name[3:]}; echo ready; '
              "while :; do sleep 0.05; done")
    proc = subprocess.Popen(_command(run_strata, "--rm", BUSYBOX, "sh", "-c", script),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    with reaped(proc):
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        assert proc.wait(60) == 42
        assert proc.stdout.read() == f"got {sig.name}\n".encode()
    assert run_strata.out("ps", "-q") == ""
