"""Security defaults of mounts, checked with another user (``nobody``, via ``setpriv``):

* a mount is private to the user who made it: without ``-o allow_other`` nobody else, root's
  mount or not, gets in;
* ``default_permissions``: the kernel checks modes and owners as the image records them
  (the daemon runs as root and would read anything for anyone otherwise);
* ``nosuid``: a setuid-root binary in an image gives no privilege unless ``-o suid``;
* ``nodev``: device nodes in an image are listed but cannot be opened unless ``-o dev``.

(Non-root users cannot mount here at all: /dev/fuse is root's.  fusermount3 forces
``nosuid,nodev`` on every mount a non-root user makes.)
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.builders import busybox_entries, chardev, d, file, oci_layout, tar_bytes
from tests.conftest import Mounter, Strata, force_unmount, require_root

pytestmark = pytest.mark.fuse
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, timeout=30)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """Mountpoints another user can reach (pytest's tmp dirs are 0700)."""
    require_root()
    path = Path(tempfile.mkdtemp(prefix="strata-security-"))
    path.chmod(0o755)
    for name in ("private", "shared", "img", "ctr", "nosuid", "suid", "nodev", "dev"):
        (path / name).mkdir()
    yield path
    for name in os.listdir(path):  # the mounter unmounts them too; never rmtree a mount
        force_unmount(path / name)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(strata: Strata, tmp_path: Path) -> str:
    with open("/usr/bin/id", "rb") as f:
        id_binary = f.read()
    layer = tar_bytes([
        *busybox_entries(),
        file("bin/suid-id", id_binary, mode=0o4755, uid=0, gid=0),
        file("etc/shadow", b"root:secret\n", mode=0o600),
        file("etc/motd", b"hello\n", mode=0o644),
        d("root", mode=0o700), file("root/private", b"p", mode=0o600),
        d("dev"), chardev("dev/zero", 1, 5, mode=0o666), chardev("dev/mem", 1, 1, mode=0o640),
        d("home/user", mode=0o755, uid=1000, gid=1000),
    ])
    oci_layout(str(tmp_path / "layout"), [layer], tag="v1")
    image_id = strata.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    strata("tag", image_id, "sec:1")
    return "sec:1"


def mount_options(mp: Path) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the mount at ``mp``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mp):
                sep = fields.index("-")
                return set(fields[5].split(",")), set(fields[sep + 3].split(","))
    raise AssertionError(f"{mp} is not mounted")


def test_a_mount_is_private_unless_allow_other(strata: Strata, mounter: Mounter, image: str,
                                               public_dir: Path) -> None:
    mp = mounter.mount(image, at=public_dir / "private")
    opts, sb = mount_options(mp)
    assert {"nosuid", "nodev", "ro"} <= opts
    assert "default_permissions" in sb and "allow_other" not in sb
    assert (mp / "etc/motd").read_bytes() == b"hello\n"  # the mounting user gets in
    other = as_nobody("cat", str(mp / "etc/motd"))
    assert other.returncode != 0 and "Permission denied" in other.stderr
    assert as_nobody("ls", str(mp)).returncode != 0
    mounter.umount(mp)
    mp = mounter.mount("-o", "allow_other", image, at=public_dir / "shared")
    assert "allow_other" in mount_options(mp)[1]
    assert as_nobody("cat", str(mp / "etc/motd")).stdout == "hello\n"


def test_the_kernel_enforces_the_image_modes(strata: Strata, mounter: Mounter, image: str,
                                             public_dir: Path) -> None:
    mp = mounter.mount("-o", "allow_other", image, at=public_dir / "img")
    for path in ("etc/shadow", "root/private"):
        got = as_nobody("cat", str(mp / path))
        assert got.returncode != 0 and "Permission denied" in got.stderr, path
    assert as_nobody("ls", str(mp / "root")).returncode != 0
    assert as_nobody("cat", str(mp / "etc/motd")).returncode == 0
    assert (mp / "etc/shadow").read_bytes() == b"root:secret\n"  # root may
    mounter.umount(mp)
    cid = strata.out("create", "--name", "perm", image).strip()
    mp = mounter.mount("-o", "allow_other", "perm", at=public_dir / "ctr")
    denied = as_nobody("sh", "-c", f"echo x > {mp}/etc/new")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert as_nobody("sh", "-c", f"echo x > {mp}/tmp/mine").returncode == 0
    upper = strata.root / "containers" / cid / "upper"
    assert os.lstat(upper / "tmp/mine").st_uid == 65534  # owned by who wrote it
    assert not (upper / "etc/new").exists()


def test_setuid_binaries_gain_nothing_unless_suid(strata: Strata, mounter: Mounter, image: str,
                                                  public_dir: Path) -> None:
    mp = mounter.mount("-o", "allow_other", image, at=public_dir / "nosuid")
    st = os.stat(mp / "bin/suid-id")
    assert st.st_mode & stat.S_ISUID and st.st_uid == 0  # shown as the image has it
    assert as_nobody(str(mp / "bin/suid-id"), "-u").stdout.strip() == "65534"
    mounter.umount(mp)
    mp = mounter.mount("-o", "allow_other,suid", image, at=public_dir / "suid")
    assert "nosuid" not in mount_options(mp)[0]
    assert as_nobody(str(mp / "bin/suid-id"), "-u").stdout.strip() == "0"  # the control


def test_device_nodes_cannot_be_opened_unless_dev(strata: Strata, mounter: Mounter,
                                                  image: str, public_dir: Path) -> None:
    mp = mounter.mount("-o", "allow_other", image, at=public_dir / "nodev")
    st = os.stat(mp / "dev/mem")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 1)
    for path in ("dev/zero", "dev/mem"):
        with pytest.raises(PermissionError):
            open(mp / path, "rb").close()
    got = as_nobody("head", "-c", "4", str(mp / "dev/zero"))
    assert got.returncode != 0 and "Permission denied" in got.stderr
    mounter.umount(mp)
    mp = mounter.mount("-o", "dev", image, at=public_dir / "dev")
    with open(mp / "dev/zero", "rb") as f:  # the control: with -o dev it is the device
        assert f.read(4) == b"\0\0\0\0"
