"""The Dockerfile front end: BuildKit's own parser, then docker's rules for what it parsed.

The grammar is BuildKit's: the PyPI package ``dockerfile`` wraps ``moby/buildkit``'s
``frontend/dockerfile/parser`` (Go, built into its wheel), so line continuations, comments,
the ``# escape`` and ``# syntax`` directives, JSON versus shell form (an invalid JSON array
falls back to the shell form, as docker does), heredocs and the legacy ``ENV K V`` form are
read exactly as docker reads them.  ``dockerfile-parse``, the pure-Python alternative, has
its own grammar (no heredocs) and would have to be kept in step by hand.

On top of the parse tree this module checks what BuildKit's ``instructions`` package checks —
known instructions, argument counts, known ``--flags`` per instruction, JSON form where only
JSON is allowed, what ONBUILD may hold — and splits the file into the global ARGs before the
first FROM and its stages.  Every error names the file and the line: ``Dockerfile:7: unknown
instruction: FOO``.  The Go parser's own errors carry no line, so the line is found by parsing
ever longer prefixes of the file.

Seams: ``parse(text, name)`` is pure (no files, no store); variables are substituted later, by
the builder, with ``shell``, because their values depend on the stage being built.

Caveats:
* ``RUN --mount`` and ``RUN --security`` are BuildKit features strata refuses by name;
  ``COPY --link`` is accepted and changes nothing (the layer is the same).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import dockerfile as _parser

from ..errors import StoreError

__all__ = ["BuildFileError", "Dockerfile", "Heredoc", "Instruction", "Stage", "parse"]

INSTRUCTIONS = ("ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM",
                "HEALTHCHECK", "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL",
                "USER", "VOLUME", "WORKDIR")

# the --flags each instruction takes; True: a value is required, False: a boolean flag
FLAGS: dict[str, dict[str, bool]] = {
    "FROM": {"platform": True},
    "RUN": {"network": True, "mount": True, "security": True},
    "COPY": {"from": True, "chown": True, "chmod": True, "link": False, "parents": False,
             "exclude": True},
    "ADD": {"chown": True, "chmod": True, "checksum": True, "link": False,
            "keep-git-dir": False},
    "HEALTHCHECK": {"interval": True, "timeout": True, "start-period": True,
                    "start-interval": True, "retries": True},
}
_UNSUPPORTED_FLAGS = {("RUN", "mount"), ("RUN", "security"), ("COPY", "parents"),
                      ("COPY", "exclude"), ("ADD", "keep-git-dir")}


class BuildFileError(StoreError):
    """A Dockerfile that cannot be built as written: a syntax error, an unknown instruction
    or flag, a wrong number of arguments, a stage that does not exist.  The message names the
    file and the line."""


@dataclass(frozen=True)
class Heredoc:
    name: str
    content: str
    expand: bool  # the name was not quoted: variables in the content are substituted


@dataclass(frozen=True)
class Instruction:
    """One instruction as parsed.  ``args``: its words (the shell form is one string, the
    JSON form one element per array item); ``flags``: ``--name=value`` pairs in order (a
    boolean flag's value is ``None``); ``original``: the instruction's text (continuations
    joined); ``line``: where it starts.  ONBUILD holds the instruction it stores in ``sub``."""

    cmd: str
    args: tuple[str, ...]
    flags: tuple[tuple[str, str | None], ...] = ()
    json: bool = False
    original: str = ""
    line: int = 0
    heredocs: tuple[Heredoc, ...] = ()
    sub: Instruction | None = None

    def flag(self, name: str) -> str | None:
        """The last value given for ``--name`` (None when not given; ``""`` for a boolean)."""
        value = None
        for k, v in self.flags:
            if k == name:
                value = "" if v is None else v
        return value

    @property
    def text(self) -> str:
        """The instruction's text after its keyword (flags included), as docker records it
        for ONBUILD and in history."""
        return re.sub(r"^\s*\S+\s*", "", self.original, count=1).strip()


@dataclass
class Stage:
    """``FROM base [AS name]`` and what follows it up to the next FROM."""

    index: int
    base: str  # unexpanded
    name: str | None  # lower case
    platform: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)
    original: str = ""

    @property
    def ref(self) -> str:
        """How BuildKit's progress names the stage."""
        return self.name or f"stage-{self.index}"


@dataclass
class Dockerfile:
    name: str  # for messages
    escape: str
    meta_args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]

    def stage(self, ref: str) -> Stage | None:
        """The stage named ``ref`` (case-insensitively) or with that index."""
        low = ref.lower()
        for st in self.stages:
            if st.name == low:
                return st
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None

    def error(self, line: int, message: str) -> BuildFileError:
        return BuildFileError(f"{self.name}:{line}: {message}")


def _escape_of(text: str) -> str:
    """The escape character the ``# escape=`` directive sets (the parser applies it; the
    builder needs it for substitution)."""
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$", line)
        if not m:
            break
        if m.group(1).lower() == "escape" and m.group(2) in ("`", "\\"):
            return m.group(2)
    return "\\"


def _heredoc_expands(original: str, name: str) -> bool:
    return re.search(r"<<-?\s*([\"'])" + re.escape(name) + r"\1", original) is None


def _flags(cmd: str, raw: Sequence[str], where: str) -> tuple[tuple[str, str | None], ...]:
    allowed = FLAGS.get(cmd, {})
    out: list[tuple[str, str | None]] = []
    for item in raw:
        body = item[2:] if item.startswith("--") else item
        name, eq, value = body.partition("=")
        if name not in allowed:
            raise BuildFileError(f"{where}: unknown flag: --{name}")
        if (cmd, name) in _UNSUPPORTED_FLAGS:
            raise BuildFileError(f"{where}: {cmd} --{name} is a BuildKit feature strata "
                                 "does not support")
        if allowed[name] and not eq:
            raise BuildFileError(f"{where}: --{name} needs a value (--{name}=VALUE)")
        if not allowed[name] and eq and value.lower() not in ("true", "false", ""):
            raise BuildFileError(f"{where}: --{name} takes no value (or true/false)")
        out.append((name, value if eq else None))
    return tuple(out)


def _instruction(c: _parser.Command, name: str) -> Instruction:
    cmd = c.cmd.upper()
    where = f"{name}:{c.start_line}"
    if cmd not in INSTRUCTIONS:
        raise BuildFileError(f"{where}: unknown instruction: {c.cmd}")
    heredocs = tuple(Heredoc(h.name, h.content, _heredoc_expands(c.original, h.name))
                     for h in c.heredocs)
    sub = None
    if cmd == "ONBUILD":
        inner = (c.sub_cmd or "").upper()
        if not inner:
            raise BuildFileError(f"{where}: ONBUILD needs an instruction")
        if inner in ("ONBUILD", "FROM", "MAINTAINER"):
            raise BuildFileError(f"{where}: {inner} isn't allowed as an ONBUILD trigger")
        text = re.sub(r"^\s*onbuild\s+", "", c.original, count=1, flags=re.IGNORECASE)
        sub = parse_trigger(text, name, c.start_line)  # again: the parser drops its flags
        return Instruction(cmd, (text,), (), False, c.original, c.start_line, heredocs, sub)
    inst = Instruction(cmd, tuple(c.value), _flags(cmd, c.flags, where), bool(c.json),
                       c.original, c.start_line, heredocs)
    _check_args(inst, where)
    return inst


def _check_args(inst: Instruction, where: str) -> None:
    """BuildKit's argument checks (``instructions/parse.go``)."""
    cmd, args = inst.cmd, inst.args
    n = len(args)
    if cmd in ("ENV", "LABEL") and n == 0:
        raise BuildFileError(f"{where}: {cmd} requires at least one argument")
    if cmd == "ENV" and any(not k for k in args[::2]):
        raise BuildFileError(f"{where}: ENV names can not be blank")
    if cmd == "FROM" and n not in (1, 3):
        raise BuildFileError(f"{where}: FROM requires either one or three arguments")
    if cmd == "FROM" and n == 3 and args[1].upper() != "AS":
        raise BuildFileError(f"{where}: FROM requires either one or three arguments "
                             "(FROM image AS name)")
    if cmd in ("COPY", "ADD") and n + len(inst.heredocs) < 2 and not (
            inst.heredocs and n >= 1):
        raise BuildFileError(f"{where}: {cmd} requires at least two arguments, but only "
                             f"{n} provided")
    if cmd in ("WORKDIR", "USER", "STOPSIGNAL", "MAINTAINER") and n != 1:
        raise BuildFileError(f"{where}: {cmd} requires exactly one argument")
    if cmd == "ARG" and n == 0:
        raise BuildFileError(f"{where}: ARG requires at least one argument")
    if cmd in ("EXPOSE", "VOLUME", "RUN") and (n == 0 or (n == 1 and not args[0].strip()
                                                          and not inst.json)):
        raise BuildFileError(f"{where}: {cmd} requires at least one argument")
    if cmd == "SHELL" and not inst.json:
        raise BuildFileError(f"{where}: SHELL requires the arguments to be in JSON form")
    if cmd == "SHELL" and n == 0:
        raise BuildFileError(f"{where}: SHELL requires at least one argument")
    if cmd == "HEALTHCHECK":
        if n == 0:
            raise BuildFileError(f"{where}: HEALTHCHECK requires an argument")
        kind = args[0].upper()
        if kind == "NONE" and (n > 1 or inst.flags):
            raise BuildFileError(f"{where}: HEALTHCHECK NONE takes no arguments")
        if kind not in ("NONE", "CMD"):
            raise BuildFileError(f"{where}: unknown type {args[0]!r} in HEALTHCHECK (try "
                                 "CMD)")
        if kind == "CMD" and n < 2:
            raise BuildFileError(f"{where}: missing command after HEALTHCHECK CMD")
    if cmd in ("CMD", "ENTRYPOINT") and n == 0 and not inst.json:
        raise BuildFileError(f"{where}: {cmd} requires at least one argument")
    if cmd == "ARG":
        for a in args:
            if not re.match(r"^[^=\s]+(=.*)?$", a, re.DOTALL):
                raise BuildFileError(f"{where}: ARG names can not be blank")


def _go_parse(text: str, name: str) -> list[_parser.Command]:
    try:
        return list(_parser.parse_string(text))
    except _parser.GoParseError as exc:
        raise BuildFileError(f"{name}:{_failing_line(text, str(exc))}: {exc}") from None


def _failing_line(text: str, message: str) -> int:
    """The line where the Go parser's error starts: one past the longest prefix of whole
    lines that parses (a prefix that cuts a heredoc fails too, but a longer one parses
    again, so the longest good prefix ends right before the bad instruction)."""
    lines = text.splitlines(keepends=True)
    good = 0
    for k in range(1, len(lines) + 1):
        try:
            _parser.parse_string("".join(lines[:k]))
            good = k
        except _parser.GoParseError as exc:
            if str(exc) == "file with no instructions":
                good = k
    return min(good + 1, max(len(lines), 1))


def parse(text: str, name: str = "Dockerfile") -> Dockerfile:
    """Parse and check a Dockerfile.  Raises ``BuildFileError`` naming ``name`` and a line."""
    if not text.strip():
        raise BuildFileError(f"{name}: the Dockerfile is empty")
    escape = _escape_of(text)
    commands = _go_parse(text, name)
    meta: list[Instruction] = []
    stages: list[Stage] = []
    for c in commands:
        inst = _instruction(c, name)
        if inst.cmd == "FROM":
            stage_name = inst.args[2].lower() if len(inst.args) == 3 else None
            if stage_name is not None:
                if not re.match(r"^[a-z][a-z0-9_.-]*$", stage_name):
                    raise BuildFileError(f"{name}:{inst.line}: invalid name for build stage: "
                                         f"{inst.args[2]!r}, name can't start with a number "
                                         "or contain symbols")
                if any(s.name == stage_name for s in stages):
                    raise BuildFileError(f"{name}:{inst.line}: duplicate name "
                                         f"{inst.args[2]!r} (stage names must be unique)")
            stages.append(Stage(len(stages), inst.args[0], stage_name, inst.flag("platform"),
                                inst.line, original=inst.original))
        elif not stages:
            if inst.cmd != "ARG":
                raise BuildFileError(f"{name}:{inst.line}: no build stage in current context "
                                     f"({inst.cmd} before the first FROM)")
            meta.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise BuildFileError(f"{name}: no build stage (the Dockerfile has no FROM)")
    return Dockerfile(name, escape, meta, stages)


def parse_trigger(text: str, name: str, line: int) -> Instruction:
    """One ONBUILD trigger stored in an image's config (``RUN echo hi``), as an instruction
    of the build that uses the image as its base."""
    try:
        commands = list(_parser.parse_string(text + "\n"))
    except _parser.GoParseError as exc:
        raise BuildFileError(f"{name}:{line}: ONBUILD trigger {text!r}: {exc}") from None
    if len(commands) != 1:
        raise BuildFileError(f"{name}:{line}: ONBUILD trigger {text!r} is not one instruction")
    inst = _instruction(commands[0], name)
    if inst.cmd in ("ONBUILD", "FROM", "MAINTAINER"):
        raise BuildFileError(f"{name}:{line}: {inst.cmd} isn't allowed as an ONBUILD trigger")
    return Instruction(inst.cmd, inst.args, inst.flags, inst.json, inst.original, line,
                       inst.heredocs)
