"""Symlink targets of every kind stay verbatim — absolute, dangling, looping, escaping, long,
odd bytes — in an image mount, in ``export``, through ``save``/``load``, through copy-up
(``chown -h`` of a lower symlink) and ``commit``, and for symlinks created through a container
mount.  Nothing resolves them on the host side: changing the links themselves (chown -h,
utimes, rename, hardlink, unlink) through the mount leaves their targets — the canary
directory among them — untouched (the ``canary`` fixture checks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.builders import d, file, oci_layout, sym, tar_bytes, tree_of_tar
from tests.forkserver import Warm, WarmMount

pytestmark = pytest.mark.fuse


def targets(canary: Path) -> dict[str, str]:
    return {
        "abs": "/etc/passwd",
        "abs-canary": str(canary / "passwd"),
        "abs-canary-dir": str(canary),
        "dangling": "../nowhere/at/all",
        "loop1": "loop2",
        "loop2": "loop1",
        "self": "self",
        "escape": "../" * 20 + "etc/shadow",
        "escape-canary": "../" * 20 + str(canary).lstrip("/") + "/passwd",
        "dot": ".",
        "dotdot": "..",
        "trailing-slash": "dir/",
        "long": "x/" * 2047 + "y",  # 4095 bytes: PATH_MAX less the NUL
        "newline": "a\nb",
        "bytes": "t-\udcff\udcfe",
        "spaces": " lead and trail ",
    }


def readlinks(root: Path, names: list[str]) -> dict[str, str]:
    return {n: os.fsdecode(os.readlink(os.fsencode(str(root / "links" / n)))) for n in names}


def export_links(strata: Warm, name: str) -> dict[str, str]:
    tree = tree_of_tar(strata("export", name).stdout)
    return {k.removeprefix("links/"): v[6] for k, v in tree.items()
            if k.startswith("links/") and v[6]}


def test_symlink_targets_stay_verbatim(warm: Warm, canary: Path, tmp_path: Path) -> None:
    want = targets(canary)
    layer = tar_bytes([d("links"), d("links/dir"), file("links/dir/f", b"f"),
                       *(sym(f"links/{n}", t) for n, t in want.items())])
    oci_layout(str(tmp_path / "layout"), [layer], tag="v1")
    image = warm.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    warm("tag", image, "links:1")
    names = list(want)

    # an image mount and export
    with WarmMount(warm, "links:1", tmp_path / "img") as m:
        assert readlinks(m.mountpoint, names) == want
        for n in names:
            assert (m.mountpoint / "links" / n).is_symlink()
    assert export_links(warm, "links:1") == want

    # save and load into another store
    archive = tmp_path / "saved.tar"
    warm("save", "-o", str(archive), "links:1")
    other = Warm(warm.server, tmp_path / "other")
    other("load", "-i", str(archive))
    assert export_links(other, "links:1") == want

    # copy-up, new links, commit
    warm("create", "--name", "box", "links:1")
    with WarmMount(warm, "box", tmp_path / "box") as m:
        links = m.mountpoint / "links"
        for n in names:
            os.chown(links / n, 1234, 5678, follow_symlinks=False)  # copy-up of the link
            os.utime(links / n, ns=(1, 2), follow_symlinks=False)
        for n, t in want.items():
            os.symlink(os.fsencode(t), os.fsencode(str(links / f"new-{n}")))
        os.rename(links / "abs-canary", links / "abs-canary-moved")
        os.rename(links / "abs-canary-moved", links / "abs-canary")
        os.link(links / "abs-canary-dir", links / "hard-to-link", follow_symlinks=False)
        os.unlink(links / "hard-to-link")
        assert readlinks(m.mountpoint, names) == want
        assert readlinks(m.mountpoint, [f"new-{n}" for n in names]) == {
            f"new-{n}": t for n, t in want.items()}
        assert os.lstat(links / "abs").st_uid == 1234
    upper = warm.root / "containers"
    cid = next(p.name for p in upper.iterdir())
    for n, t in want.items():  # the upper holds real symlinks with the same targets
        assert os.fsdecode(os.readlink(os.fsencode(str(upper / cid / "upper/links" / n)))) == t
    warm("commit", "box", "links:2")
    got = export_links(warm, "links:2")
    assert got == {**want, **{f"new-{n}": t for n, t in want.items()}}
    assert warm("check", check=False).returncode == 0
