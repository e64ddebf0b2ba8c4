""".dockerignore: which files of the build context a build may not see, by docker's rules.

``read_patterns`` reads the file as ``moby/patternmatcher/ignorefile`` does (a line starting
with ``#`` is a comment, blank lines are skipped, white space is trimmed, ``!`` makes an
exception, each pattern is cleaned as a path and loses a leading ``/``); ``Matcher.excluded``
decides as ``MatchesOrParentMatches``: the patterns apply in order, the last one that matches a
path — or one of its parent directories — wins, so ``!keep`` brings back what an earlier
pattern excluded.  Pattern syntax is Go's ``filepath.Match`` (``*``, ``?``, ``[a-z]``, ``\\``
escapes, none of them crossing ``/``) plus ``**``, which matches any number of directories
(zero included).

The Dockerfile and ``.dockerignore`` are always read by the builder, but a COPY sees them only
when no pattern excludes them (docker sends them, then removes them from the context if the
patterns say so).

Seams: pure; ``context.BuildContext`` asks ``excluded`` of every path it offers a COPY.

Caveats:
* A pattern that starts with ``**`` and has no ``/`` after it (``**foo``) matches as the
  regular expression docker used before its prefix/suffix shortcuts (``(.*/)?foo``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import StoreError

__all__ = ["IgnoreError", "Matcher", "read_patterns"]

_ESCAPE = set(".+()|{}$^")


class IgnoreError(StoreError):
    """A .dockerignore pattern that cannot be used (``!`` alone, a bad character class)."""


def read_patterns(text: str) -> list[str]:
    """The patterns of a .dockerignore file's ``text``, cleaned, exceptions with a ``!``."""
    out: list[str] = []
    for n, raw in enumerate(text.splitlines()):
        line = raw.lstrip("\ufeff") if n == 0 else raw
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = posixpath.normpath(line)
            if len(line) > 1 and line.startswith("/"):
                line = line.lstrip("/") or "/"
        out.append(("!" if invert else "") + line)
    return out


def _regex(pattern: str) -> re.Pattern[str]:
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i + 1 < n:
                i += 1
                out.append(re.escape(pattern[i]))
            else:
                out.append(r"\\")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise IgnoreError(f".dockerignore: bad pattern {pattern!r}: unterminated "
                                  "character class")
            body = pattern[i + 1:end]
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:].replace("\\", "\\\\")
            else:
                body = body.replace("\\", "\\\\")
            out.append(f"[{body}]")
            i = end
        elif ch in _ESCAPE:
            out.append("\\" + ch)
        else:
            out.append(re.escape(ch) if ch in "]" else ch)
        i += 1
    out.append("$")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise IgnoreError(f".dockerignore: bad pattern {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class _Pattern:
    text: str
    exclusion: bool  # an exception (``!``): it brings files back
    rx: re.Pattern[str]


class Matcher:
    """The patterns of one .dockerignore, compiled."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: list[_Pattern] = []
        for p in patterns:
            exclusion = p.startswith("!")
            body = p[1:] if exclusion else p
            if not body:
                raise IgnoreError('.dockerignore: illegal exclusion pattern: "!"')
            body = posixpath.normpath(body)
            if len(body) > 1:
                body = body.lstrip("/") or "/"
            self.patterns.append(_Pattern(p, exclusion, _regex(body)))

    @property
    def has_exceptions(self) -> bool:
        return any(p.exclusion for p in self.patterns)

    def excluded(self, path: str) -> bool:
        """Is ``path`` (relative to the context, ``/``-separated) left out of the build?"""
        if not self.patterns:
            return False
        parent = posixpath.dirname(path)
        parents = parent.split("/") if parent else []
        matched = False
        for p in self.patterns:
            if p.exclusion != matched:
                continue
            hit = p.rx.match(path) is not None
            if not hit and parents:
                hit = any(p.rx.match("/".join(parents[:i + 1])) is not None
                          for i in range(len(parents)))
            if hit:
                matched = not p.exclusion
        return matched

    def may_hold_exceptions(self, directory: str) -> bool:
        """Could an exception bring back something under the excluded ``directory``?  (The
        walk of the context goes into an excluded directory only then.)"""
        return self.has_exceptions
