"""The command line as a new user meets it (issue 13 item 9): options where the README says
they go, ``--version``, help for a bare ``strata`` and for every subcommand, errors that say
what happened, and docker's short IDs in ``ps``."""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

from tests.builders import busybox_entries, tar_bytes
from tests.conftest import Strata


def test_gh13_global_options_after_the_subcommand(strata: Strata, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (tmp_path / "rootfs.tar").write_bytes(tar_bytes(busybox_entries()))
    strata("import", str(tmp_path / "rootfs.tar"), "demo:1", "--root", str(other))
    assert strata.out("images", "--format", "{{.Repository}}", "--root", str(other)) == "demo\n"
    assert strata.out("images", "-q") == ""  # the --root given first is not used
    strata("image", "ls", "--root", str(other), "--log-level", "debug")


def test_gh13_version_and_bare_help(strata: Strata) -> None:
    proc = strata("--version")
    assert re.fullmatch(r"strata \S+.*\n", proc.stdout.decode())
    bare = strata()
    assert bare.returncode == 0 and bare.stderr == b""
    assert bare.stdout.decode().startswith("usage: strata")
    assert "Turn container images into mountable root filesystems." in bare.stdout.decode()


def _commands(parser: argparse.ArgumentParser, prefix: str = ""
              ) -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((f"{prefix}{name}", sub))
                out += _commands(sub, f"{prefix}{name} ")
    return out


def test_gh13_every_subcommand_has_a_description(strata: Strata) -> None:
    from cli.main import build_parser

    commands = _commands(build_parser())
    assert len(commands) > 40
    missing = [name for name, p in commands if not p.description]
    assert missing == []
    text = strata.out("pull", "--help")
    assert re.search(r"\n\nDownload an image from a registry", text), text


def test_gh13_nothing_listening_says_connection_refused(strata: Strata) -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = strata("pull", f"127.0.0.1:{port}/x/y:1", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "connection refused" in err.lower(), err


def test_gh13_ps_shows_the_short_id_of_an_image_named_by_id(strata: Strata,
                                                            tmp_path: Path) -> None:
    (tmp_path / "rootfs.tar").write_bytes(tar_bytes(busybox_entries()))
    image_id = strata.out("import", str(tmp_path / "rootfs.tar")).strip()
    strata("create", "--name", "by-id", image_id)
    strata("create", "--name", "by-prefix", image_id[7:15])
    rows = {line.split()[-1]: line.split()[1] for line in strata.out("ps").splitlines()[1:]}
    assert rows == {"by-id": image_id[7:19], "by-prefix": image_id[7:19]}
    assert image_id[7:] in strata.out("ps", "--no-trunc")
