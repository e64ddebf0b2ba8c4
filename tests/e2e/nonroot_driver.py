"""Run by tests/e2e/test_nonroot.py as an unprivileged user in a private mount namespace:
a whole strata session of that user (own store, mounts through fusermount3, copy-up, commit),
printing what it saw as JSON.  Not a test module (no test_ prefix): a plain script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

base = sys.argv[1]
home = os.path.join(base, "home")
strata = [sys.executable, "-m", "cli.main", "--root", os.path.join(home, "store")]
seen: dict[str, object] = {"uid": os.getuid()}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*strata, *args], capture_output=True, text=True, timeout=120)


def must(*args: str) -> str:
    proc = run(*args)
    if proc.returncode != 0:
        print(json.dumps({"failed": list(args), "stderr": proc.stderr}))
        sys.exit(1)
    return proc.stdout


def stat_of(path: str) -> list[int]:
    st = os.lstat(path)
    return [st.st_uid, st.st_gid, st.st_mode & 0o7777]


mp = os.path.join(home, "mnt")
os.makedirs(mp, exist_ok=True)
image = must("load", "-i", os.path.join(base, "layout")).split()[-1]
must("tag", image, "nonroot:1")

# the image, read-only: the owners and modes of the layer, not the user's
must("mount", "nonroot:1", mp)
try:
    seen["image_shadow"] = stat_of(f"{mp}/etc/shadow")
    seen["image_motd"] = Path(f"{mp}/etc/motd").read_text()
    try:
        Path(f"{mp}/etc/shadow").read_text()
        seen["image_shadow_read"] = 0
    except OSError as exc:
        seen["image_shadow_read"] = exc.errno
finally:
    must("umount", mp)

# a container: write, copy up, keep the image's owners in the upper's override xattr
cid = must("create", "--name", "c1", "nonroot:1").strip()
must("mount", "--engine", "auto", "c1", mp)  # no overlayfs for a user: the FUSE engine
try:
    seen["auto_engine"] = must("mounts").splitlines()[1].split()[5]
    with open(f"{mp}/tmp/new", "w") as f:
        f.write("made by the user\n")
    with open(f"{mp}/home/user/notes", "a") as f:
        f.write("appended\n")
    seen["new"] = stat_of(f"{mp}/tmp/new")
    seen["tmp_in_mount"] = stat_of(f"{mp}/tmp")
    seen["notes"] = Path(f"{mp}/home/user/notes").read_text()
    try:
        with open(f"{mp}/etc/motd", "a") as f:
            f.write("no")
        seen["motd_write"] = 0
    except OSError as exc:
        seen["motd_write"] = exc.errno
    upper = os.path.join(home, "store", "containers", cid, "upper")
    seen["tmp_on_disk"] = stat_of(f"{upper}/tmp")
    seen["tmp_override"] = os.getxattr(f"{upper}/tmp", "user.containers.override_stat").decode()
    allowed = run("mount", "-o", "allow_other", "nonroot:1", os.path.join(home, "other"))
    seen["allow_other"] = [allowed.returncode, allowed.stderr.strip()]
    if allowed.returncode == 0:
        must("umount", os.path.join(home, "other"))
finally:
    must("umount", mp)

# commit: the layer records the image's owners for what was copied up, the user's for new
new_image = must("commit", "c1", "nonroot:2").strip()
must("mount", "nonroot:2", mp)
try:
    seen["committed_tmp"] = stat_of(f"{mp}/tmp")
    seen["committed_new"] = stat_of(f"{mp}/tmp/new")
    seen["committed_notes"] = Path(f"{mp}/home/user/notes").read_text()
finally:
    must("umount", mp)
kernel = run("mount", "--engine", "kernel", "c1", mp)
seen["kernel_engine"] = [kernel.returncode, kernel.stderr.strip()]
seen["mounts_left"] = must("mounts", "-q").split()
print(json.dumps(seen))
