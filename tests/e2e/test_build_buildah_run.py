"""``strata build``'s RUN against ``buildah bud --layers --isolation chroot`` (needs root,
crun and buildah): what commands leave in the rootfs — new files, deletions (whiteouts),
opaque directories, owners of USER's files, modes, hardlinks, fifos — must list the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import buildah as bh
from tests.conftest import Strata
from tests.e2e.test_build_buildah import CONTEXT, build_both

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.registry, pytest.mark.interop]


def test_run(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
             build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']}
RUN mkdir -p /data/sub && echo one > /data/one && ln -s one /data/link && \\
    ln /data/one /data/hard && mkfifo /data/fifo && chmod 4755 /data/one
RUN rm /etc/secret && rm -rf /home/app && mkdir /home/app && echo new > /home/app/new
RUN chmod 600 /etc/group && chown 1000:50 /etc/passwd && touch /usr/local/bin/x
USER app
RUN echo mine > /tmp/mine && mkdir /tmp/appdir && id -u > /tmp/uid
USER root:staff
RUN echo group > /tmp/group-owned
USER root
WORKDIR /w
RUN echo $PWD > here && echo "$HOME" > home
SHELL ["/bin/sh", "-ec"]
RUN echo shell-form-with-new-shell > /shellfile
RUN ["/bin/sh", "-c", "echo exec > /execfile"]
ARG GREETING=hi
RUN echo "$GREETING" > /greeting
ENV FROMENV=env
RUN echo "$FROMENV" > /fromenv && true
RUN true
"""
    tree, _ = build_both(strata, buildah, tmp_path, df, CONTEXT)
    assert "etc/secret" not in tree and "home/app/new" in tree
    assert tree["tmp/mine"][2:4] == (1000, 1000)


def test_run_after_copy_sees_the_files(strata: Strata, buildah: bh.Buildah, tmp_path: Path,
                                       build_bases: dict[str, str]) -> None:
    df = f"""FROM {build_bases['base']}
COPY dir /src/
RUN cat /src/top /src/sub/f > /joined && rm /src/link && mv /src/sub /moved
COPY --chown=app a.txt /src/
RUN chown -R 1000:1000 /src && chmod -R go-rwx /moved
"""
    build_both(strata, buildah, tmp_path, df, CONTEXT)
