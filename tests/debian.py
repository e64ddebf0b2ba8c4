"""A Debian test image, built from Debian's package mirror with mmdebstrap.

``rootfs_tar(dest)`` writes the root file system of ``bookworm`` in the ``minbase`` variant
(essential and required packages: dpkg, apt, passwd with useradd, bash, coreutils) as one tar
(about 170 MB; about 30 s on a good connection to the mirror), which ``strata import`` turns
into an image.  The mirror is ``$STRATA_DEBIAN_MIRROR`` or ``http://deb.debian.org/debian``.
Reused by the run tests' session fixture (``debian_image`` in tests/conftest.py), one build per
session; the lazy-pull and benchmark work can build the same image with it.

Caveats:
* Needs root (``mmdebstrap --mode=root``) and the mirror; the build is not reproducible
  (package versions move with the mirror), so tests assert on behaviour, not on digests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def mirror() -> str:
    return os.environ.get("STRATA_DEBIAN_MIRROR") or DEFAULT_MIRROR


def missing() -> str | None:
    """Why the image cannot be built here, None when it can."""
    if os.geteuid() != 0:
        return "building the Debian test image needs root (mmdebstrap --mode=root)"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (scripts/install --test installs it)"
    return None


def rootfs_tar(dest: Path, suite: str = SUITE) -> tuple[Path, float]:
    """Build the rootfs tar at ``dest``; returns it and the seconds the build took."""
    start = time.monotonic()
    proc = subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--quiet",
         suite, str(dest), mirror()],
        capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dest, time.monotonic() - start
