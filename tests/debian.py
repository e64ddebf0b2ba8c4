"""A Debian test image: the root file system of ``bookworm`` (``minbase``: dpkg, apt, passwd
with useradd, bash, coreutils) as one tar, which ``strata import`` turns into an image.

The tar is built by ``scripts/install --test`` (``mmdebstrap`` from Debian's package mirror,
``$STRATA_DEBIAN_MIRROR`` or ``http://deb.debian.org/debian``: the install step is the one
that may reach package registries) into ``.cache/debian-bookworm-minbase.tar`` of this
checkout, once; the tests only read it, so they make no network traffic of their own.
Reused by the run tests' session fixture (``debian_strata`` in tests/conftest.py) and by
whatever else wants a real distribution (the lazy-pull bench).

Caveats:
* Building needs root (``mmdebstrap --mode=root``); the build is not reproducible (package
  versions move with the mirror), so tests assert on behaviour, not on digests.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTFS = REPO / ".cache" / "debian-bookworm-minbase.tar"


def missing() -> str | None:
    """Why the image is not there, None when it is."""
    if not ROOTFS.is_file() or ROOTFS.stat().st_size == 0:
        return (f"the Debian test image {ROOTFS} is missing: scripts/install --test builds it "
                f"(as root, with mmdebstrap)")
    return None


def rootfs_tar() -> Path:
    """The rootfs tar (``missing`` says whether it is there)."""
    return ROOTFS
