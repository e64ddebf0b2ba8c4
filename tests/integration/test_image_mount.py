"""An image mounted from its layer tars against kernel overlayfs over the same layers unpacked
by GNU tar (issue 13 item 6: a symlink whose tar header says 0644 showed as ``lrw-r--r--``; on
Linux a symlink's mode is always 0777, whatever the header says; item 5: inode numbers after
the kernel forgot its inodes).

Both trees must agree on every name: type and mode, owner, size, content, link target, xattrs,
nlink and which names share an inode number; readdir's ``d_ino`` must equal ``st_ino``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import builders as b
from tests.conftest import Mounter, Strata, require_root
from tests.integration.observe import compare, observe, stable
from tests.integration.reclaim import Reclaimer

pytestmark = [pytest.mark.fuse, pytest.mark.root]

LAYERS = [
    [b.d("etc"), b.file("etc/f", b"file\n"), b.sym("etc/link", "f", mode=0o644),
     b.sym("etc/private", "/etc/f", mode=0o600, uid=1000, gid=1000),
     b.sym("etc/dangling", "nowhere", mode=0o640), b.d("usr/bin", mode=0o755),
     b.sym("bin", "usr/bin", mode=0o700), b.file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
     b.link("usr/bin/tool2", "usr/bin/tool"), b.d("sbin"), b.link("sbin/tool3", "usr/bin/tool")],
    [b.d("etc"), b.sym("etc/link", "private", mode=0o400), b.sym("etc/added", "f", mode=0o444),
     b.file("etc/owned", b"x", mode=0o640, uid=1000, gid=100)],
]


def mounts(tmp_path: Path, strata: Strata, mounter: Mounter) -> tuple[Path, Path]:
    """The image of ``LAYERS`` mounted by strata, and kernel overlayfs over its layers
    unpacked by GNU tar."""
    require_root()
    tars = [b.tar_bytes(layer) for layer in LAYERS]
    b.oci_layout(str(tmp_path / "layout"), tars, tag="v1", compression="gzip")
    image = strata.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    lowers = []
    for i, tar in enumerate(tars):
        d = tmp_path / f"unpacked{i}"
        d.mkdir()
        subprocess.run(["tar", "-x", "-p", "--same-owner", "-C", str(d)], input=tar,
                       check=True, capture_output=True)
        lowers.insert(0, d)  # the last layer is the top one
    km = mounter.overlay(lowers, mounter.mountpoint("kernel"))
    sm = mounter.mount(image, at=mounter.mountpoint("strata"))
    return km, sm


def test_symlink_modes_of_an_image_mount(tmp_path: Path, strata: Strata,
                                         mounter: Mounter) -> None:
    km, sm = mounts(tmp_path, strata, mounter)
    k, s = observe(km), observe(sm)
    problems = compare(k, k, s, s)
    problems += [f"strata {name!r} is {s[name].mode}" for name in sorted(s)
                 if s[name].mode.startswith("l") and s[name].mode != "lrwxrwxrwx"]
    assert not problems, "\n".join(problems)


def test_image_mount_after_a_cache_reclaim(tmp_path: Path, strata: Strata,
                                           mounter: Mounter) -> None:
    """The kernel forgets the inodes (issue 13 item 5): nothing may change, inode numbers
    included, and hardlinks keep sharing theirs; one name of the group stays open."""
    km, sm = mounts(tmp_path, strata, mounter)
    with Reclaimer() as reclaimer:
        k, s = observe(km), observe(sm)
        with open(sm / "usr/bin/tool", "rb"):
            reclaimer.reclaim()
            k2, s2 = observe(km), observe(sm)
    problems = stable(k, k2, f"kernel after a reclaim ({reclaimer.method})")
    problems += stable(s, s2, f"strata after a reclaim ({reclaimer.method})")
    problems += [p for p in compare(k2, k2, s2, s2) if "mode kernel='lrwxrwxrwx'" not in p]
    assert not problems, "\n".join(problems)
