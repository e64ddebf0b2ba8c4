"""Helpers of the API, plugin and docs tests: what a strata session can leave behind."""

from __future__ import annotations

import os
from pathlib import Path

from imagestore import Store
from imagestore.mounts import process_alive

# the skip reason of a mount the kernel refuses (in a user namespace), in fusermount3's words
REFUSED = r"FUSE is not usable here: fusermount3: .*(Operation not permitted|Permission denied)"


def daemons(store: Store) -> list[int]:
    """Live mount daemons of ``store``: processes logging into the store's ``mounts/``
    (``python -m unionfs.mount``, or a fork of ``strata mount``)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            log = os.readlink(f"/proc/{pid}/fd/2")
        except OSError:
            continue
        if (b"unionfs.mount" in args or b"mount" in args) and \
                log.startswith(os.path.join(store.root, "mounts")) and process_alive(int(pid)):
            out.append(int(pid))
    return out


def strata_leftovers(under: Path) -> list[str]:
    """strata mounts below ``under`` (FUSE, and the kernel engine's overlayfs) and processes
    whose command line mentions it."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if (fstype.startswith("fuse") or fstype == "overlay") and \
                    fields[4].startswith(str(under)):
                out.append(f"mount {fields[4]}")
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split(") ")[-1][:1] == "Z"
        except OSError:
            continue
        if str(under).encode() in cmdline and not zombie:
            args = cmdline.replace(b"\0", b" ").decode(errors="replace")
            out.append(f"process {pid}: {args}")
    return out
