"""``strata build`` against ``buildah bud --layers --isolation chroot``: the same Dockerfile and
context, base images from the test registry; the rootfs listings (paths, types, modes, owners,
sizes, content hashes, link targets, xattrs; mtimes aside) and the config fields must be equal
(tests/buildah.py says where buildah's own quirks are set aside)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path
from typing import Any

import pytest

from tests import buildah as bh
from tests.conftest import Strata

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.registry, pytest.mark.interop]


def build_both(strata: Strata, buildah: bh.Buildah, tmp_path: Path, dockerfile: str,
               files: dict[str, Any], *args: str) -> tuple[bh.Tree, dict[str, Any]]:
    """Build with both, assert the results equal; returns strata's tree and config."""
    ctx = bh.write_context(tmp_path / "ctx", {**files, "Dockerfile": dockerfile})
    strata("build", "-q", "-t", "ours", *args, str(ctx))
    buildah.bud(ctx, "theirs", *args)
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    w1.mkdir()
    w2.mkdir()
    ours, ours_cfg = bh.unpack(bh.strata_layout(strata, "ours", w1), w1)
    theirs, _ = bh.unpack(buildah.layout("theirs", w2 / "layout"), w2)
    theirs_cfg = buildah.config("theirs")
    theirs = bh.drop_run_stubs(theirs, ours)
    assert bh.tree_diff(ours, theirs) == []
    assert bh.config_fields(ours_cfg) == bh.config_fields(theirs_cfg)
    return ours, ours_cfg


def test_metadata_instructions(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                               build_bases: dict[str, str]) -> None:
    df = f"""# syntax=docker/dockerfile:1
ARG BASE={build_bases['base']}
FROM $BASE
ARG FOO=bar
ARG EMPTY
ENV A=1 B="x y" C=$FOO D=${{EMPTY:-fallback}} E=${{FOO:+set}} \\
    F='single $quoted' G=\\$escaped
ENV LEGACY value with spaces
LABEL l1=v1 "l 2"="v 2" from.arg=$FOO
LABEL multi.line="a \\
b"
WORKDIR /w
WORKDIR x/y
WORKDIR $C
COPY Dockerfile ./
USER app:staff
EXPOSE 80 90/udp 7000/tcp
VOLUME /vol ["/json1", "/json2"]
VOLUME /a /b
STOPSIGNAL SIGKILL
HEALTHCHECK --interval=5s --timeout=3s --retries=4 --start-period=1s CMD true
ONBUILD COPY --from=x a b
ONBUILD RUN echo onbuild
MAINTAINER someone <s@example.com>
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo", "hi"]
"""
    # buildah makes a WORKDIR's directory only when a later step writes files (docker makes
    # it at once: test_build.py): the COPY after the WORKDIRs makes both agree
    _, cfg = build_both(strata, buildah, tmp_path, df, {})
    c = cfg["config"]
    assert "C=bar" in c["Env"] and "D=fallback" in c["Env"] and "E=set" in c["Env"]
    assert "F=single $quoted" in c["Env"] and "G=$escaped" in c["Env"]
    assert "LEGACY=value with spaces" in c["Env"]
    assert c["WorkingDir"] == "/w/x/y/bar"
    assert cfg["author"] == "someone <s@example.com>"


def test_shell_form_and_entrypoint_rules(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                                         build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']}
HEALTHCHECK CMD echo "quoted words" && true
ENTRYPOINT echo entry
"""
    _, cfg = build_both(strata, buildah, tmp_path, df, {})
    # an ENTRYPOINT clears the Cmd the base image had
    assert cfg["config"].get("Cmd") is None
    assert cfg["config"]["Entrypoint"] == ["/bin/sh", "-c", "echo entry"]


CONTEXT = {
    "a.txt": "hello\n",
    "b.txt": "bee\n",
    "c.md": "sea\n",
    "exec.sh": ("mode", b"#!/bin/sh\necho hi\n", 0o755),
    "private": ("mode", b"secret\n", 0o600),
    "dir/sub/f": "f\n",
    "dir/sub/g": "g\n",
    "dir/top": "top\n",
    "dir/link": ("symlink", "top"),
    "dir/abs": ("symlink", "/etc/passwd"),
    "dir/empty": ("dir", 0o700),
    "linked": ("symlink", "a.txt"),
    "spaced name.txt": "spaces\n",
}


def test_copy_rules(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                    build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']}
COPY a.txt /dest/
COPY a.txt /renamed
COPY a.txt b.txt /several/
COPY dir /contents
COPY dir/ /contents-slash/
COPY dir/empty /was-0700
COPY --chown=app dir/empty /was-0700-owned
COPY *.txt /glob/
COPY d?r/sub/[fg] /chars/
COPY exec.sh private /modes/
COPY linked /followed
COPY ["spaced name.txt", "/json form/"]
WORKDIR /work
COPY a.txt relative
COPY dir sub/
COPY a.txt /usr/local/bin/
COPY a.txt /lnk/bin/through-link
COPY dir/top /opt/
COPY a.txt /home/app/
COPY a.txt /a.txt/
"""
    build_both(strata, buildah, tmp_path, df, CONTEXT)


def test_copy_hardlinks_and_xattrs(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                                   build_bases: dict[str, str]) -> None:
    ctx = bh.write_context(tmp_path / "ctx", {"tree/one": "1\n", "tree/deep/x": "x\n"})
    os.link(ctx / "tree" / "one", ctx / "tree" / "deep" / "hard")
    os.setxattr(ctx / "tree" / "one", "user.origin", b"context")
    os.setxattr(ctx / "tree" / "deep", "user.dir", b"yes")
    df = f"""FROM {build_bases['base']}
COPY tree /tree/
"""
    tree, _ = build_both(strata, buildah, tmp_path, df, {})
    assert ("user.origin", b"context") in tree["tree/one"][8]


def test_copy_chown_chmod(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                          build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']}
COPY --chown=app a.txt /by-name/
COPY --chown=app:staff dir /by-names/
COPY --chown=1234:5678 a.txt dir /by-number/
COPY --chown=1000 a.txt /uid-only
COPY --chmod=0640 a.txt exec.sh /chmod/
COPY --chmod=755 dir /chmod-dir/
COPY --chown=app --chmod=600 a.txt /both/deep/
"""
    build_both(strata, buildah, tmp_path, df, CONTEXT)


def _tar(entries: dict[str, bytes]) -> bytes:
    return bh.small_tar(entries)


def test_add_archives(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                      build_bases: dict[str, str]) -> None:
    plain = _tar({"pkg/": b"", "pkg/one": b"1\n", "pkg/two": b"22\n", "top": b"t\n"})
    files = {
        "plain.tar": plain,
        "packed.tgz": gzip.compress(plain),
        "packed.tar.bz2": bz2.compress(plain),
        "packed.xz": lzma.compress(plain),
        "notatar.gz": gzip.compress(b"just text\n"),
        "a.txt": "hello\n",
    }
    df = f"""FROM {build_bases['base']}
ADD plain.tar /plain
ADD packed.tgz /gz/
ADD packed.tar.bz2 /bz2/
ADD packed.xz /xz
ADD notatar.gz /kept/
ADD a.txt /added
ADD --chown=app a.txt /added-owned/
ADD --chown=app plain.tar /owned-tar/
"""
    tree, _ = build_both(strata, buildah, tmp_path, df, files)
    assert "gz/pkg/two" in tree and "kept/notatar.gz" in tree


def test_add_url(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                 build_bases: dict[str, str], http_files: str) -> None:
    df = f"""FROM {build_bases['base']}
ADD {http_files}/file.txt /downloads/
ADD {http_files}/file.txt /renamed-download
ADD {http_files}/archive.tar /not-extracted/
ADD --chown=app {http_files}/file.txt /owned/
"""
    tree, _ = build_both(strata, buildah, tmp_path, df, {})
    assert tree["downloads/file.txt"][1] == 0o600
    assert "not-extracted/archive.tar" in tree


def test_dockerignore(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                      build_bases: dict[str, str]) -> None:
    files = {
        **CONTEXT,
        "logs/one.log": "1\n",
        "logs/keep.log": "keep\n",
        "deep/er/x.tmp": "tmp\n",
        "deep/er/y.txt": "y\n",
        ".dockerignore": "# comment\n*.md\nlogs\n!logs/keep.log\n**/*.tmp\n/private\n"
                         "dir/sub/g\n",
    }
    df = f"""FROM {build_bases['base']}
COPY . /ctx/
"""
    tree, _ = build_both(strata, buildah, tmp_path, df, files)
    assert "ctx/logs/keep.log" in tree and "ctx/logs/one.log" not in tree
    assert "ctx/c.md" not in tree and "ctx/deep/er/x.tmp" not in tree
    assert "ctx/Dockerfile" in tree and "ctx/.dockerignore" in tree


def test_multi_stage(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                     build_bases: dict[str, str]) -> None:
    df = f"""ARG BASE={build_bases['base']}
FROM $BASE AS first
COPY --chown=app dir /made/
COPY a.txt /made/file

FROM first AS second
ENV IN_SECOND=1
COPY b.txt /second.txt

FROM scratch AS files
COPY c.md /only.md

FROM $BASE
COPY --from=second /made /from-second
COPY --from=0 /made/file /from-index
COPY --from=files /only.md /
COPY --from={build_bases['base']} /etc/passwd /from-image-passwd
COPY --from=first /lnk/bin/ /through-source-link/
"""
    tree, cfg = build_both(strata, buildah, tmp_path, df, CONTEXT)
    assert tree["from-second/sub/f"][2] == 1000
    assert not any("IN_SECOND" in e for e in cfg["config"]["Env"])


def test_target_stage(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                      build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']} AS one
COPY a.txt /one
FROM one AS two
COPY b.txt /two
FROM {build_bases['base']}
COPY missing-file /never
"""
    tree, _ = build_both(strata, buildah, tmp_path, df, CONTEXT, "--target", "two")
    assert "one" in tree and "two" in tree


def test_onbuild_triggers(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                          build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['onbuild']}
COPY b.txt /b
"""
    tree, cfg = build_both(strata, buildah, tmp_path, df, CONTEXT)
    assert "from-onbuild/a.txt" in tree
    assert "ONBUILT=yes" in cfg["config"]["Env"]
    assert not cfg["config"].get("OnBuild")


def test_build_args(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                    build_bases: dict[str, str]) -> None:
    df = """ARG WHERE=/default
ARG BASE
FROM ${BASE}
ARG WHERE
ARG OTHER=other
ENV WHERE_ENV=$WHERE OTHER_ENV=$OTHER
COPY a.txt $WHERE/
"""
    tree, cfg = build_both(strata, buildah, tmp_path, df, CONTEXT,
                           "--build-arg", f"BASE={build_bases['base']}",
                           "--build-arg", "WHERE=/given", "--label", "extra=label")
    assert "given/a.txt" in tree
    assert "WHERE_ENV=/given" in cfg["config"]["Env"]
    assert "OTHER_ENV=other" in cfg["config"]["Env"]
    assert cfg["config"]["Labels"]["extra"] == "label"


def test_workdir_as_a_user(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                           build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']}
USER app
WORKDIR /appdir/deeper
COPY a.txt ./
COPY --chown=app b.txt ./
"""
    build_both(strata, buildah, tmp_path, df, CONTEXT)
