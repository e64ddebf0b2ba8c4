"""The build front end without a store: the shell lexer's substitution, the Dockerfile parser's
checks and their file:line errors, .dockerignore matching, metadata instructions."""

from __future__ import annotations

import pytest

from imagestore.build import dockerfile as df
from imagestore.build import metadata
from imagestore.build.ignore import IgnoreError, Matcher, read_patterns
from imagestore.build.shell import ShellError, expand, expand_words

ENV = {"A": "a", "EMPTY": "", "SP": "x y", "PATHV": "/usr/local/bin/file.tar.gz"}


@pytest.mark.parametrize("word, want", [
    ("$A", "a"), ("${A}", "a"), ("pre${A}post", "preapost"), ("$UNSET", ""),
    ("${UNSET:-def}", "def"), ("${EMPTY:-def}", "def"), ("${EMPTY-def}", ""),
    ("${A:-def}", "a"), ("${A:+alt}", "alt"), ("${UNSET:+alt}", ""), ("${EMPTY+alt}", "alt"),
    ("${EMPTY:+alt}", ""), ("'$A'", "$A"), ('"$A"', "a"), ('"\\$A"', "$A"), ("\\$A", "$A"),
    ("a\\ b", "a b"), ('"a\\b"', "a\\b"), ("$", "$"), ("$1", ""), ("a$", "a$"),
    ("${PATHV#*/}", "usr/local/bin/file.tar.gz"), ("${PATHV##*/}", "file.tar.gz"),
    ("${PATHV%.*}", "/usr/local/bin/file.tar"), ("${PATHV%%.*}", "/usr/local/bin/file"),
    ("${PATHV/local/LOCAL}", "/usr/LOCAL/bin/file.tar.gz"), ("${SP// /_}", "x_y"),
    ("${UNSET:-\"quoted word\"}", "quoted word"), ("${UNSET:-$A}", "a"),
])
def test_expand(word: str, want: str) -> None:
    assert expand(word, ENV) == want


def test_words_split_after_substitution_but_not_inside_quotes() -> None:
    assert expand_words("$SP 'c d' \"$SP\" e\\ f", ENV) == ["x", "y", "c d", "x y", "e f"]


def test_backtick_escape() -> None:
    assert expand("a`$A`\"", ENV, escape="`") == "a$A\""


@pytest.mark.parametrize("word, message", [
    ("${A", "missing '}'"), ("${}", "bad substitution"), ("'open", "single-quote"),
    ('"open', "double-quote"), ("${UNSET?must be set}", "UNSET: must be set"),
    ("${EMPTY:?}", "EMPTY: is not allowed to be empty"), ("${A:=x}", "unsupported modifier"),
])
def test_expand_errors(word: str, message: str) -> None:
    with pytest.raises(ShellError, match=message):
        expand(word, ENV)


def test_parse_stages_and_meta_args() -> None:
    d = df.parse("ARG V=1\n# comment\nFROM base:$V AS Build\nRUN a \\\n  b\n"
                 "from build\ncopy --from=build /x /y\n", "Dockerfile.dev")
    assert [a.args for a in d.meta_args] == [("V=1",)]
    assert [(s.name, s.base, s.line) for s in d.stages] == [("build", "base:$V", 3),
                                                          (None, "build", 6)]
    run = d.stages[0].instructions[0]
    assert run.cmd == "RUN" and run.line == 4 and run.args == ("a   b",)
    copy = d.stages[1].instructions[0]
    assert copy.cmd == "COPY" and copy.flag("from") == "build"
    assert d.stage("BUILD") is d.stages[0] and d.stage("1") is d.stages[1]


def test_json_and_shell_forms_and_heredocs() -> None:
    d = df.parse('FROM x\nCMD ["a", "b"]\nCMD [not json\nRUN <<EOF\necho hi\nEOF\n'
                 'COPY <<"END" /f\n$NOT\nEND\n')
    cmd1, cmd2, run, copy = d.stages[0].instructions
    assert cmd1.json and cmd1.args == ("a", "b")
    assert not cmd2.json and cmd2.args == ("[not json",)
    assert run.heredocs[0].content == "echo hi\n" and run.heredocs[0].expand
    assert copy.heredocs[0].name == "END" and not copy.heredocs[0].expand


def test_onbuild_keeps_its_trigger_with_flags() -> None:
    d = df.parse("FROM x\nONBUILD COPY --from=b --chown=1 a /b\n")
    ob = d.stages[0].instructions[0]
    assert ob.args == ("COPY --from=b --chown=1 a /b",)
    assert ob.sub is not None and ob.sub.flag("chown") == "1"


@pytest.mark.parametrize("text, message", [
    ("FROM a\nFOO bar\n", "Dockerfile:2: unknown instruction: FOO"),
    ("RUN x\n", "Dockerfile:1: no build stage in current context"),
    ("", "Dockerfile: the Dockerfile is empty"),
    ("# only a comment\n", "Dockerfile:1: file with no instructions"),
    ("FROM a\n\nLABEL lonely\n", "Dockerfile:3: LABEL must have two arguments"),
    ("FROM a\nRUN true\nRUN <<EOF\nnever ends\n", "Dockerfile:3: unterminated heredoc"),
    ("FROM a\nCOPY --form=x a b\n", "Dockerfile:2: unknown flag: --form"),
    ("FROM a\nCOPY onlyone\n", "Dockerfile:2: COPY requires at least two arguments"),
    ("FROM a\nRUN --mount=type=cache,target=/c x\n", "Dockerfile:2: RUN --mount is a"),
    ("FROM a\nSHELL /bin/bash -c\n", "Dockerfile:2: SHELL requires the arguments to be in "
                                     "JSON form"),
    ("FROM a\nONBUILD FROM b\n", "Dockerfile:2: FROM isn't allowed as an ONBUILD trigger"),
    ("FROM a\nHEALTHCHECK CMD\n", "Dockerfile:2: missing command after HEALTHCHECK CMD"),
    ("FROM a\nHEALTHCHECK NONE --x\n", "Dockerfile:2: HEALTHCHECK NONE takes no arguments"),
    ("FROM a b c\n", "Dockerfile:1: FROM requires either one or three arguments"),
    ("FROM a AS x\nFROM b AS X\n", "Dockerfile:2: duplicate name"),
    ("FROM a AS 1st\n", "Dockerfile:1: invalid name for build stage"),
    ("# escape=x\nFROM a\n", "invalid escape token"),
])
def test_parse_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(df.BuildFileError) as info:
        df.parse(text)
    assert message in str(info.value)


@pytest.mark.parametrize("patterns, path, excluded", [
    (["*.md"], "README.md", True), (["*.md"], "docs/a.md", False),
    (["**/*.md"], "docs/a.md", True), (["**/*.md"], "a.md", True),
    (["docs"], "docs/deep/file", True), (["docs/**"], "docs/deep/file", True),
    (["docs", "!docs/keep"], "docs/keep", False), (["docs", "!docs/keep"], "docs/other", True),
    (["*", "!src"], "src/a.py", False), (["/abs"], "abs", True), (["a?c"], "abc", True),
    (["a?c"], "a/c", False), (["[a-c]x"], "bx", True), (["[!a-c]x"], "dx", True),
    (["./sub/../x"], "x", True), (["x\\*"], "x*", True), (["x\\*"], "xy", False),
    (["!nothing"], "file", False), (["**"], "any/thing", True),
    (["a/**/b"], "a/b", True), (["a/**/b"], "a/x/y/b", True),
])
def test_dockerignore_patterns(patterns: list[str], path: str, excluded: bool) -> None:
    assert Matcher(patterns).excluded(path) is excluded


def test_dockerignore_file_rules() -> None:
    text = "\ufeff# comment\n  spaced  \n\n! keep\n/lead\nsub/\n #notcomment\n"
    assert read_patterns(text) == ["spaced", "!keep", "lead", "sub", "#notcomment"]
    with pytest.raises(IgnoreError):
        Matcher(["!"])


def _inst(text: str) -> df.Instruction:
    return df.parse("FROM x\n" + text + "\n").stages[0].instructions[0]


def test_metadata_apply() -> None:
    cfg, by = metadata.apply({"Env": ["PATH=/bin", "A=1"]}, _inst("ENV A=2"), [("A", "2"),
                                                                              ("B", "3")],
                             cmd_set=False, where="Dockerfile:2")
    assert cfg["Env"] == ["PATH=/bin", "A=2", "B=3"]
    assert by == "/bin/sh -c #(nop) ENV A=2 B=3"
    cfg, _ = metadata.apply({}, _inst("EXPOSE 80 7000-7002/udp"), ["80", "7000-7002/udp"],
                            cmd_set=False, where="w")
    assert set(cfg["ExposedPorts"]) == {"80/tcp", "7000/udp", "7001/udp", "7002/udp"}
    cfg, _ = metadata.apply({"Shell": ["/bin/bash", "-ec"], "Cmd": ["x"]},
                            _inst("ENTRYPOINT run me"), [], cmd_set=False, where="w")
    assert cfg["Entrypoint"] == ["/bin/bash", "-ec", "run me"] and cfg["Cmd"] is None
    cfg, _ = metadata.apply({"Shell": ["/bin/bash", "-ec"]}, _inst("CMD run me"), [],
                            cmd_set=False, where="w")
    assert cfg["Cmd"] == ["/bin/bash", "-ec", "run me"]  # docker: the SHELL in force
    cfg, _ = metadata.apply({}, _inst("HEALTHCHECK --interval=1m30s --retries=2 CMD [\"t\"]"),
                            [], cmd_set=False, where="w")
    assert cfg["Healthcheck"] == {"Test": ["CMD", "t"], "Interval": 90 * 10**9, "Retries": 2}
    with pytest.raises(df.BuildFileError, match="less than 1ms"):
        metadata.apply({}, _inst("HEALTHCHECK --timeout=1us CMD t"), [], cmd_set=False,
                       where="w")
    assert metadata.workdir("/a/b", "../c") == "/a/c"
    assert metadata.workdir("", "rel") == "/rel"
    with pytest.raises(df.BuildFileError, match="invalid proto"):
        metadata.exposed_ports(["80/xyz"], "w")
