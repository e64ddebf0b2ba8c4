"""The init layer of a container or a build stage (docker's ``-init`` layer): stubs for the
mount targets the OCI runtime needs (``/proc``, ``/dev``, ``/etc/hosts``, ``-v`` targets…) that
the rootfs lacks, in directories carrying the attributes of the rootfs' own, so that neither
the stubs nor their parents reach the writable layer, ``diff`` or ``commit``.  Used by
``run`` (a container's ``init/``) and ``build.runstep`` (a stage's)."""

from __future__ import annotations

import os
from typing import Any

from .runtime_user import RootView

__all__ = ["write_stubs"]


def write_stubs(root: RootView | None, directory: str, targets: list[tuple[str, bool]]) -> bool:
    """Write into ``directory`` (made when a stub is needed) a stub for each of ``targets``
    (path, is_dir) that ``root`` lacks; with no ``root`` (an empty rootfs) every target is
    missing.  Owners are set as root only.  False when nothing was missing (and nothing
    made)."""
    attrs: dict[str, Any] = {}
    made = False
    for path, is_dir in targets:
        if root is not None:
            resolved, node = root.resolve(path)
            if node is not None or not resolved:
                continue
            parents = root.parents(resolved)
            if any(n is not None and not n.is_dir for _, n in parents):
                continue  # a file where a directory should be: the runtime will say so
        else:
            resolved = path.strip("/")
            parents = [("/".join(resolved.split("/")[:i]), None)
                       for i in range(1, resolved.count("/") + 1)]
        if not made:
            os.makedirs(directory, 0o755, exist_ok=True)
            if root is not None:
                attrs[""] = root.view.root().entry
            made = True
        for rel, n in [*parents, (resolved, None)]:
            full = os.path.join(directory, rel)
            if rel == resolved and not is_dir:
                if not os.path.lexists(full):
                    os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC))
                    os.chmod(full, 0o644)  # whatever the umask
            elif not os.path.isdir(full):
                os.mkdir(full)
                os.chmod(full, 0o755)
            if n is not None:
                attrs[rel] = n.entry
    for rel, e in attrs.items():
        full = os.path.join(directory, rel) if rel else directory
        if os.geteuid() == 0:
            os.chown(full, e.uid, e.gid)
        os.chmod(full, e.mode & 0o7777)
        os.utime(full, ns=(e.mtime_ns, e.mtime_ns))
    return made
