"""Pull/push progress as docker prints it.

On a terminal every id (a layer's short digest) owns one line, rewritten in place with a bar
(``Downloading [=====>      ]  1.23MB/4.56MB``); elsewhere each status change is a plain line
``ID: STATUS`` and byte counts appear at most once a second per id (plus the last one).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from .output import human_size

if TYPE_CHECKING:
    from imagestore import ProgressEvent

BAR_WIDTH = 50
PLAIN_INTERVAL = 1.0


def bar(current: int, total: int) -> str:
    """docker's ``[====>    ]  1.2MB/3.4MB``."""
    if total <= 0:
        return human_size(current)
    filled = min(BAR_WIDTH, current * BAR_WIDTH // total)
    arrow = ">" if filled < BAR_WIDTH else ""
    body = "=" * filled + arrow + " " * (BAR_WIDTH - filled - len(arrow))
    return f"[{body}]  {human_size(current)}/{human_size(total)}"


class ProgressPrinter:
    """A ``ProgressFn`` writing progress to ``out`` (a terminal or not), one line per layer
    (``ProgressEvent.layer``); events about the whole image are lines of their own."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.lines: list[str] = []
        self.last: dict[str, tuple[str, float]] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        if self.tty:
            self._terminal(ev)
        else:
            self._plain(ev)

    def _terminal(self, ev: ProgressEvent) -> None:
        text = ev.status
        if ev.done_bytes is not None and ev.total_bytes is not None:
            text = f"{ev.status} {bar(ev.done_bytes, ev.total_bytes)}"
        line = f"{ev.layer}: {text}" if ev.layer else text
        if not ev.layer or ev.layer not in self.lines:
            if ev.layer:
                self.lines.append(ev.layer)
            self.out.write(line + "\n")
        else:
            up = len(self.lines) - self.lines.index(ev.layer)
            self.out.write(f"\x1b[{up}A\r\x1b[2K{line}\x1b[{up}B\r")
        self.out.flush()

    def _plain(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        text = ev.status
        if ev.done_bytes is not None and ev.total_bytes is not None:
            prev = self.last.get(ev.layer)
            done = ev.done_bytes >= ev.total_bytes
            if prev is not None and prev[0] == ev.status and not done and \
                    now - prev[1] < PLAIN_INTERVAL:
                return
            text = f"{ev.status} {human_size(ev.done_bytes)}/{human_size(ev.total_bytes)}"
        self.last[ev.layer] = (ev.status, now)
        self.out.write(f"{ev.layer}: {text}\n" if ev.layer else text + "\n")
        self.out.flush()
