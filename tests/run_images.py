"""Images for ``strata run`` tests, built by hand from the host's static busybox.

``run/busybox:1``: busybox with every applet as a symlink in ``/bin``, users root, alice (1000,
home ``/home/alice``) and nobody, groups with members (alice is in wheel and users), ``/tmp``
1777; config ``Cmd ["/bin/sh"]``.

``run/configured:1``: the same layer with a config that sets what a run must apply: ``Env``
(a variable and a ``PATH``), ``WorkingDir`` ``/srv/app`` (absent from the rootfs: created by
the run), ``User`` ``alice`` and an ``Entrypoint`` + ``Cmd`` that report them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import builders as b

PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = (b"root:x:0:root\n"
         b"wheel:x:10:root,alice\n"
         b"users:x:100:alice\n"
         b"alice:x:1000:\n"
         b"nogroup:x:65534:\n")
IMAGE_PATH = "/usr/local/bin:/usr/bin:/bin"
CONFIGURED = {
    "Env": [f"PATH={IMAGE_PATH}", "GREETING=hello from the image"],
    "WorkingDir": "/srv/app",
    "User": "alice",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING"; pwd; id'],
}


def applets() -> list[str]:
    out = subprocess.run([b.BUSYBOX, "--list"], capture_output=True, check=True, text=True)
    return sorted(a for a in out.stdout.split() if a and a != "busybox")


def busybox_layer() -> bytes:
    with open(b.BUSYBOX, "rb") as f:
        data = f.read()
    entries = [b.d("bin"), b.file("bin/busybox", data, mode=0o755)]
    entries += [b.sym(f"bin/{a}", "busybox") for a in applets()]
    entries += [b.d("etc"), b.file("etc/passwd", PASSWD), b.file("etc/group", GROUP),
                b.d("tmp", mode=0o1777), b.d("root", mode=0o700), b.d("home"),
                b.d("home/alice", uid=1000, gid=1000), b.d("srv"), b.d("var"),
                b.d("var/empty")]
    return b.tar_bytes(entries)


def layouts(base: Path) -> dict[str, str]:
    """OCI layouts of the run images: reference -> layout directory (tag ``latest``)."""
    layer = busybox_layer()
    out = {}
    for ref, config in (("run/busybox:1", {"Cmd": ["/bin/sh"],
                                           "Env": [f"PATH={IMAGE_PATH}"]}),
                        ("run/configured:1", CONFIGURED)):
        layout = base / ref.replace("/", "-").replace(":", "-")
        b.oci_layout(str(layout), [layer], config={"config": config})
        out[ref] = str(layout)
    return out


def find_child(parent: int, argv0: str) -> int | None:
    """The pid of a process of ``parent`` (strata run: the container's pid 1 is its child)
    whose command line starts with ``argv0``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and cmd and cmd[0].decode(errors="replace") == argv0:
            return int(name)
    return None
