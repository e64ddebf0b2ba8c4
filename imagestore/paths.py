"""Where the store lives by default: ``$STRATA_ROOT``, else ``/var/lib/strata`` for root, else
``$XDG_DATA_HOME/strata``.  A module of its own so that ``strata umount`` and ``strata mounts``
find the store without importing the rest of it."""

from __future__ import annotations

import os


def default_root() -> str:
    env = os.environ.get("STRATA_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/strata"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(data, "strata")


def root_of(root: str | None) -> str:
    """The store's root directory for ``--root`` (None: the default), absolute."""
    return os.path.abspath(root or default_root())
