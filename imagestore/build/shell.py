"""Variable substitution and word splitting in a Dockerfile, as BuildKit's shell lexer does it.

``expand(word, env)`` is one word with its variables replaced and its quotes removed (ENV, ARG,
LABEL values, WORKDIR, USER, COPY sources); ``expand_words(word, env)`` splits the result into
words on unquoted white space, *after* substitution (EXPOSE, VOLUME's shell form).  What is
understood, as in ``moby/buildkit`` ``frontend/dockerfile/shell/lex.go``:

* ``$V`` and ``${V}``; an unset variable is empty; ``$`` before anything that is not a name
  stays ``$``; ``$1``, ``$@`` and the other special parameters are looked up like names;
* ``${V:-word}`` / ``${V-word}`` (the default when unset, or also when empty with ``:``),
  ``${V:+word}`` / ``${V+word}`` (the alternative when set), ``${V:?msg}`` / ``${V?msg}``
  (an error), ``${V#pat}`` ``${V##pat}`` ``${V%pat}`` ``${V%%pat}`` (remove the shortest or
  longest prefix or suffix), ``${V/pat/rep}`` and ``${V//pat/rep}``; patterns know ``*``, ``?``
  and escapes;
* single quotes keep everything literal; double quotes keep everything but ``$`` and the escape
  character, which escapes only ``"``, ``$`` and itself there; outside quotes the escape
  character (``\\`` or, with ``# escape=`````, a backquote) makes the next character literal.

Seams: pure functions of their arguments; errors are ``ShellError`` with BuildKit's words, which
the front end prefixes with the Dockerfile's name and line.

Caveats:
* No command substitution, arithmetic or tilde expansion: a Dockerfile has none (RUN's text is
  left to the shell in the container).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ShellError", "expand", "expand_words"]

_SPECIAL = set("@*#?-$!0")


class ShellError(ValueError):
    """A word that cannot be expanded (an unterminated quote, a bad substitution)."""


@dataclass
class _Words:
    """Words being split: characters that came from a variable split on white space,
    quoted or escaped ones never do."""

    words: list[str] = field(default_factory=list)
    word: str = ""
    in_word: bool = False

    def char(self, ch: str) -> None:
        if ch.isspace():
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        else:
            self.raw(ch)

    def raw(self, text: str) -> None:
        self.word += text
        self.in_word = True

    def text(self, text: str) -> None:
        for ch in text:
            self.char(ch)

    def done(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
            self.in_word = False
        return self.words


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.s = text
        self.i = 0
        self.env = env
        self.escape = escape
        self.used: set[str] = set()

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        ch = self.peek()
        if ch:
            self.i += 1
        return ch

    def run(self, stop: str = "", raw_escapes: bool = False) -> tuple[str, list[str]]:
        """Up to ``stop`` (consumed) or the end: (the result, its words)."""
        out: list[str] = []
        words = _Words()
        while self.peek():
            ch = self.peek()
            if stop and ch == stop:
                self.next()
                return "".join(out), words.done()
            if ch == "$":
                value = self.dollar()
                out.append(value)
                words.text(value)
            elif ch == "'":
                value = self.single_quoted()
                out.append(value)
                words.raw(value)
            elif ch == '"':
                value = self.double_quoted()
                out.append(value)
                words.raw(value)
            else:
                ch = self.next()
                if ch == self.escape:
                    if raw_escapes:
                        words.raw(ch)
                        out.append(ch)
                    ch = self.next()
                    if not ch:
                        break
                    words.raw(ch)
                else:
                    words.char(ch)
                out.append(ch)
        if stop:
            raise ShellError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out), words.done()

    def single_quoted(self) -> str:
        self.next()
        start = self.i
        end = self.s.find("'", start)
        if end < 0:
            raise ShellError("unexpected end of statement while looking for matching "
                             "single-quote")
        self.i = end + 1
        return self.s[start:end]

    def double_quoted(self) -> str:
        self.next()
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise ShellError("unexpected end of statement while looking for matching "
                                 "double-quote")
            if ch == '"':
                self.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = self.next()
            if ch == self.escape:
                nxt = self.peek()
                if not nxt:
                    continue
                if nxt in ('"', "$", self.escape):
                    ch = self.next()
            out.append(ch)

    def name(self) -> str:
        start = self.i
        ch = self.peek()
        if ch.isdigit():
            while self.peek().isdigit():
                self.next()
            return self.s[start:self.i]
        if ch and ch in _SPECIAL:
            self.next()
            return ch
        while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
            self.next()
        return self.s[start:self.i]

    def lookup(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is not None:
            self.used.add(name)
        return value

    def dollar(self) -> str:
        self.next()
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            return self.lookup(name) or ""
        self.next()
        if not self.peek():
            raise ShellError("syntax error: missing '}'")
        if self.peek() in "{}:":
            raise ShellError("syntax error: bad substitution")
        name = self.name()
        op = self.next()
        if not op:
            raise ShellError("syntax error: missing '}'")
        if op == "}":
            return self.lookup(name) or ""
        null_is_unset = False
        if op == ":":
            null_is_unset = True
            op = self.next()
            if op not in ("+", "-", "?"):
                raise ShellError(f"unsupported modifier (:{op}) in substitution")
        if op in ("+", "-", "?", "#", "%"):
            try:
                word, _ = self.run("}", raw_escapes=op in "#%")
            except ShellError:
                if not self.peek():
                    raise ShellError("syntax error: missing '}'") from None
                raise
            value = self.lookup(name)
            unset = value is None or (null_is_unset and value == "")
            if op == "-":
                return word if unset else str(value)
            if op == "+":
                return "" if unset else word
            if op == "?":
                if value is None:
                    raise ShellError(f"{name}: {word or 'is not allowed to be unset'}")
                if null_is_unset and value == "":
                    raise ShellError(f"{name}: {word or 'is not allowed to be empty'}")
                return value
            greedy = word.startswith(op)
            if greedy:
                word = word[1:]
            return _trim(value or "", word, prefix=op == "#", greedy=greedy)
        if op == "/":
            replace_all = self.peek() == "/"
            if replace_all:
                self.next()
            try:
                pattern, _ = self.run("/", raw_escapes=True)
                replacement, _ = self.run("}", raw_escapes=True)
            except ShellError:
                if not self.peek():
                    raise ShellError("syntax error: missing '}'") from None
                raise
            value = self.lookup(name) or ""
            rx = _pattern(pattern, greedy=True)
            return rx.sub(lambda m: replacement, value, count=0 if replace_all else 1)
        raise ShellError(f"unsupported modifier ({op}) in substitution")


def _pattern(pattern: str, greedy: bool) -> re.Pattern[str]:
    """A shell pattern (``*``, ``?``, escapes; no bracket expressions) as a regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*" if greedy else ".*?")
        elif ch == "?":
            out.append(".")
        elif ch == "\\":
            nxt = pattern[i + 1] if i + 1 < len(pattern) else ""
            if nxt in ("}", "/"):
                i += 1
                continue
            if nxt not in ("*", "?", "\\"):
                raise ShellError(f"invalid pattern ({pattern}) in substitution: invalid escape "
                                 f"'\\{nxt}'")
            out.append(re.escape(nxt))
            i += 1
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _trim(value: str, pattern: str, *, prefix: bool, greedy: bool) -> str:
    rx = _pattern(pattern, greedy=True)
    cuts = range(len(value) + 1)
    if prefix:
        order = reversed(cuts) if greedy else iter(cuts)
        for i in order:
            if rx.fullmatch(value[:i]):
                return value[i:]
        return value
    order = iter(cuts) if greedy else reversed(cuts)
    for i in order:
        if rx.fullmatch(value[i:]):
            return value[:i]
    return value


def expand(word: str, env: Mapping[str, str], escape: str = "\\",
           used: set[str] | None = None) -> str:
    """``word`` with its variables substituted and quotes removed; ``used`` collects the names
    of the variables it found set.  Raises ``ShellError``."""
    lx = _Lexer(word, env, escape)
    try:
        result, _ = lx.run()
    except ShellError as exc:
        raise ShellError(f"failed to process {word!r}: {exc}") from None
    if used is not None:
        used |= lx.used
    return result


def expand_words(word: str, env: Mapping[str, str], escape: str = "\\",
                 used: set[str] | None = None) -> list[str]:
    """``word`` substituted, then split into words on white space that no quote or escape
    protects.  Raises ``ShellError``."""
    lx = _Lexer(word, env, escape)
    try:
        _, words = lx.run()
    except ShellError as exc:
        raise ShellError(f"failed to process {word!r}: {exc}") from None
    if used is not None:
        used |= lx.used
    return words
