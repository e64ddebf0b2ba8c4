"""What the kernel caches for a mount: directory listings (``opendir`` with ``keep_cache`` on a
pyfuse3 built with ``patches/pyfuse3-cache-readdir.patch``) and misses (a lookup of a missing
name answers "no entry" with a timeout).  Every change made through the mount shows at once;
what was read once is answered by the kernel."""

from __future__ import annotations

import os
import pstats
import shutil
from pathlib import Path

import pytest

from tests.conftest import Mounter, Strata
from unionfs.fuse_ops import CACHE_READDIR

pytestmark = pytest.mark.fuse


def ls(p: Path) -> list[str]:
    return sorted(os.listdir(p))


def test_every_change_shows_in_the_next_listing(strata: Strata, mounter: Mounter,
                                                sample_image: str) -> None:
    strata("create", "--name", "c", sample_image)
    mp = mounter.mount("c", at=mounter.mountpoint("m"))
    app, data, usr = mp / "etc/app", mp / "var/lib/data", mp / "usr"
    assert (ls(app), ls(data), ls(usr)) == (["conf"], ["c"], ["local"])

    (app / "new").write_bytes(b"n")
    assert ls(app) == ["conf", "new"]
    os.unlink(app / "conf")  # a lower file: a whiteout in the upper
    assert ls(app) == ["new"]
    os.rename(data / "c", usr / "c")  # both parents change
    assert (ls(data), ls(usr)) == ([], ["c", "local"])
    os.symlink("new", app / "sym")
    os.link(app / "new", app / "hard")
    os.mkfifo(app / "fifo")
    os.mkdir(app / "sub")
    assert ls(app) == ["fifo", "hard", "new", "sub", "sym"]

    # a merged directory removed and made again is empty (opaque), though the kernel may still
    # hold the inode and the listing of the old one
    assert ls(usr / "local") == ["new"]
    shutil.rmtree(usr / "local")
    assert ls(usr) == ["c"]
    os.mkdir(usr / "local")
    assert ls(usr / "local") == []
    (usr / "local/again").write_bytes(b"a")
    assert ls(usr / "local") == ["again"]

    # a directory renamed over an empty one brings its listing; the old name is gone
    (mp / "from").mkdir()
    (mp / "from/x").write_bytes(b"x")
    (mp / "to").mkdir()
    assert (ls(mp / "from"), ls(mp / "to")) == (["x"], [])
    os.rename(mp / "from", mp / "to")
    assert ls(mp / "to") == ["x"] and not (mp / "from").exists()

    # an open directory stream sees the listing it started with, and rewinds to a new one
    fd = os.open(app, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = sorted(os.listdir(fd))
        os.rmdir(app / "sub")
        assert sorted(os.listdir(fd)) == [n for n in first if n != "sub"]  # listdir rewinds
    finally:
        os.close(fd)

    mounter.umount(mp)
    mp2 = mounter.mount("c", at=mounter.mountpoint("m2"))
    assert ls(mp2 / "etc/app") == ["fifo", "hard", "new", "sym"]
    assert (ls(mp2 / "usr"), ls(mp2 / "usr/local")) == (["c", "local"], ["again"])


@pytest.mark.skipif(not CACHE_READDIR, reason="stock pyfuse3: listings are not cached")
def test_a_listing_read_once_is_answered_by_the_kernel(strata: Strata, mounter: Mounter,
                                                       sample_image: str) -> None:
    """A file put into the upper behind the mount's back (which strata does not support) is
    not listed: the second listing never reached strata.  (Before it uses a listing, the
    kernel compares the directory's mtime, if it has fetched the attributes again since; the
    old mtime is put back so that the listing is used whatever it fetched.)"""
    cid = strata.out("create", sample_image).strip()
    mp = mounter.mount(cid, at=mounter.mountpoint("m"))
    (mp / "etc/app/mine").write_bytes(b"m")
    assert ls(mp / "etc/app") == ["conf", "mine"]
    upper = strata.root / "containers" / cid / "upper/etc/app"
    before = os.stat(upper)
    (upper / "behind").write_bytes(b"b")
    os.utime(upper, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert ls(mp / "etc/app") == ["conf", "mine"]
    (mp / "etc/app/through").write_bytes(b"t")
    assert ls(mp / "etc/app") == ["behind", "conf", "mine", "through"]


def _calls(profile: Path, function: str) -> int:
    """How many times the mount daemon ran ``function`` of ``unionfs/fuse_ops.py``."""
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    return sum(v[1] for (file, _, name), v in stats.items()
               if name == function and file.endswith("fuse_ops.py"))


def test_a_miss_is_remembered_until_the_name_is_made_through_the_mount(
        strata: Strata, mounter: Mounter, sample_image: str, tmp_path: Path) -> None:
    """Shells searching $PATH and Python importing probe many missing names: the kernel keeps
    each miss, so probing again never reaches strata (counted by the daemon's profile).  Names
    made through the mount are seen at once."""
    cid = strata.out("create", sample_image).strip()
    mp = mounter.mountpoint("m")
    profile = tmp_path / "daemon.prof"
    strata("mount", cid, str(mp), env={"STRATA_PROFILE": str(profile)})
    mounter.active.append(mp)
    for _ in range(50):
        for name in ("probe", "etc/app/probe", "etc/app/made"):
            assert not (mp / name).exists()
    (mp / "etc/app/made").write_bytes(b"m")
    assert (mp / "etc/app/made").read_bytes() == b"m"
    os.mkdir(mp / "etc/app/probe")
    assert (mp / "etc/app/probe").is_dir()
    os.rmdir(mp / "etc/app/probe")
    assert not (mp / "etc/app/probe").exists()
    os.rename(mp / "etc/app/made", mp / "etc/app/probe")
    assert (mp / "etc/app/probe").read_bytes() == b"m" and not (mp / "etc/app/made").exists()
    mounter.umount(mp)
    # etc, app and the three missing names, each asked once (not 150 misses)
    assert _calls(profile, "lookup") <= 10


def test_a_reader_in_the_middle_of_a_big_directory_misses_nothing(
        strata: Strata, mounter: Mounter, sample_image: str) -> None:
    """One cached listing serves every open of a directory, and a reader resumes at the
    offset it reached, in whatever listing the kernel has by then: after an earlier name is
    removed and someone lists the directory again, the reader must still see every other
    name once.  (With offsets that were positions, it skipped one.)"""
    cid = strata.out("create", sample_image).strip()
    mp = mounter.mount(cid, at=mounter.mountpoint("m"))
    big = mp / "big"
    big.mkdir()
    names = {f"f{i:05d}" for i in range(3000)}
    for n in names:
        (big / n).touch()
    assert set(os.listdir(big)) == names  # the listing is cached now
    with os.scandir(big) as it:
        seen = [next(it).name for _ in range(1500)]  # more than one getdents
        gone = seen[0]
        os.unlink(big / gone)
        assert set(os.listdir(big)) == names - {gone}  # a new listing replaces the cached one
        seen += [e.name for e in it]
    assert len(seen) == len(set(seen)), "a name was listed twice"
    assert names - {gone} <= set(seen), f"missed: {sorted(names - {gone} - set(seen))[:5]}"
