"""A user without root, end to end (issue 13, item 10): their own store, an image loaded into
it, image and container mounts through fusermount3, writes and copy-ups whose image owners
are kept in ``user.containers.override_stat``, a commit, the unmounts (``--engine auto``
chooses FUSE, ``--engine kernel`` is refused in one line); ``-o allow_other``
refused with one line unless /etc/fuse.conf allows it.

The user exists only inside a private mount namespace (``unshare -m``) where a copy of
/etc/passwd that names them is bind-mounted (fusermount3 needs a name), and /dev/fuse has its
usual mode 0666: nothing on the host changes.  The session runs with the system's Python 3
over this checkout and the virtualenv's packages, both bind-mounted where the user may read
them."""

from __future__ import annotations

import json
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.builders import busybox_entries, d, file, oci_layout, tar_bytes
from tests.conftest import REPO, require_root, require_tool

pytestmark = [pytest.mark.fuse, pytest.mark.root]
UID = 4242


def system_python() -> str:
    """A Python of this version every user may run (the virtualenv's may live below /root)."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{want}", f"/usr/local/bin/{want}"):
        if os.access(cand, os.X_OK):
            return cand
    msg = f"no {want} outside /root for another user to run"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def base() -> Iterator[Path]:
    require_root()
    require_tool("unshare")
    require_tool("setpriv")
    path = Path(tempfile.mkdtemp(prefix="strata-nonroot-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(UID)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def prepare(base: Path, allow_other: bool) -> list[str]:
    layer = tar_bytes([
        *busybox_entries(),
        file("etc/shadow", b"root:secret\n", mode=0o600),
        file("etc/motd", b"hello\n", mode=0o644),
        d("tmp", mode=0o1777),
        d("home/user", mode=0o755, uid=UID, gid=UID),
        file("home/user/notes", b"from the image\n", mode=0o644, uid=UID, gid=UID),
    ])
    oci_layout(str(base / "layout"), [layer], tag="v1")
    for sub in ("home", "home/other", "code", "site"):
        (base / sub).mkdir(exist_ok=True)
    os.chown(base / "home", UID, UID)
    os.chown(base / "home/other", UID, UID)
    passwd = Path("/etc/passwd").read_text() + f"strata-user:x:{UID}:{UID}::{base}/home:/bin/sh\n"
    group = Path("/etc/group").read_text() + f"strata-user:x:{UID}:\n"
    (base / "passwd").write_text(passwd)
    (base / "group").write_text(group)
    (base / "fuse.conf").write_text("user_allow_other\n" if allow_other else "# nothing\n")
    shutil.copy(Path(__file__).with_name("nonroot_driver.py"), base / "driver.py")
    # /dev/fuse is 0666 on a Debian system (udev); this VM's is root's alone: the namespace
    # gets a node with the usual mode (the host's stays as it is)
    os.mknod(base / "fuse", 0o666 | stat.S_IFCHR, os.stat("/dev/fuse").st_rdev)
    os.chmod(base / "fuse", 0o666)
    packages = sysconfig.get_paths()["purelib"]
    assert packages in site.getsitepackages()
    script = "\n".join([
        "set -e",
        f"mount --bind {base}/fuse /dev/fuse",
        f"mount --bind {base}/passwd /etc/passwd",
        f"mount --bind {base}/group /etc/group",
        f"mount --bind {base}/fuse.conf /etc/fuse.conf",
        f"mount --bind {REPO} {base}/code",
        f"mount --bind {packages} {base}/site",
        f"exec setpriv --reuid={UID} --regid={UID} --clear-groups env -i HOME={base}/home "
        f"PATH=/usr/bin:/bin PYTHONPATH={base}/code:{base}/site PYTHONDONTWRITEBYTECODE=1 "
        f"{system_python()} {base}/driver.py {base}",
    ])
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]


def session(base: Path, allow_other: bool) -> dict[str, object]:
    proc = subprocess.run(prepare(base, allow_other), capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"the user's session failed:\n{proc.stdout}\n" \
                                           f"{proc.stderr}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def test_a_user_without_root_pulls_mounts_changes_and_commits(base: Path) -> None:
    seen = session(base, allow_other=False)
    assert seen["uid"] == UID
    assert seen["image_shadow"] == [0, 0, 0o600]  # the image's owner, not the user
    assert seen["image_shadow_read"] == 13  # EACCES: the kernel checks the image's modes
    assert seen["image_motd"] == "hello\n"
    assert seen["new"] == [UID, UID, 0o644]
    assert seen["tmp_in_mount"] == [0, 0, 0o1777]  # copied up, shown as the image has it
    assert seen["tmp_on_disk"][:2] == [UID, UID]  # type: ignore[index]
    assert seen["tmp_override"] == "0:0:01777"
    assert seen["notes"] == "from the image\nappended\n"
    assert seen["motd_write"] == 13
    code, message = seen["allow_other"]  # type: ignore[misc]
    assert code != 0 and "user_allow_other" in message and "\n" not in message
    assert "Traceback" not in message
    assert seen["committed_tmp"] == [0, 0, 0o1777]
    assert seen["committed_new"] == [UID, UID, 0o644]
    assert seen["committed_notes"] == "from the image\nappended\n"
    assert seen["auto_engine"] == "fuse"  # overlayfs needs root: auto chose FUSE
    assert seen["kernel_engine"] == [1, "Error: cannot use the kernel engine: mounting "
                                        "overlayfs needs root (CAP_SYS_ADMIN)"]
    assert seen["mounts_left"] == []


def test_allow_other_works_where_fuse_conf_allows_it(base: Path) -> None:
    seen = session(base, allow_other=True)
    assert seen["allow_other"] == [0, ""]
