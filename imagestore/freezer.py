"""Pausing a container's processes through its cgroup's freezer, as ``docker commit --pause``
does: the one way to hold writes that go straight to the upper's file system (the kernel
engine), and for the FUSE engine a stop of the writers on top of the daemon's freeze.

A container run by ``strata run`` lives in the cgroup ``/strata/<container id>`` (the runtime
spec's ``cgroupsPath``, ``CGROUP_PARENT`` here): ``frozen`` freezes it where it exists — cgroup
v2 (``cgroup.freeze``, waiting for ``frozen 1`` in ``cgroup.events``) or the v1 freezer
controller (``freezer.state``) — and thaws it afterwards, whatever happens.  Nothing is frozen
for a container without such a cgroup (mounted, not run), nor when the caller itself is in it.

Caveats:
* A freeze that does not complete within the timeout (a process stuck in the kernel) is
  undone and reported; the commit then does not go ahead.
* A process that leaves the cgroup meanwhile is not held.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from .errors import MountFailed

CGROUP_PARENT = "strata"
TIMEOUT = 10.0


def _cgroup_mounts() -> list[tuple[str, str]]:
    """(version, mountpoint) of the cgroup2 mounts and the v1 freezer hierarchies."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if " - " not in line:
                continue
            left, right = line.split(" - ", 1)
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3:
                continue
            if rfields[0] == "cgroup2":
                out.append(("v2", fields[4]))
            elif rfields[0] == "cgroup" and "freezer" in rfields[2].split(","):
                out.append(("v1", fields[4]))
    return out


def cgroups(container_id: str) -> list[tuple[str, str]]:
    """The container's freezable cgroups: (``v1``|``v2``, directory)."""
    found = []
    for version, mnt in _cgroup_mounts():
        path = os.path.join(mnt, CGROUP_PARENT, container_id)
        control = "cgroup.freeze" if version == "v2" else "freezer.state"
        if os.path.exists(os.path.join(path, control)):
            found.append((version, path))
    return found


def _member(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return str(os.getpid()) in f.read().split()
    except OSError:
        return False


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _freeze(version: str, path: str, deadline: float) -> None:
    if version == "v2":
        _write(os.path.join(path, "cgroup.freeze"), "1")
        while "frozen 1" not in _read(os.path.join(path, "cgroup.events")).splitlines():
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.002)
        return
    state = os.path.join(path, "freezer.state")
    while True:
        _write(state, "FROZEN")  # again until it holds: FREEZING means some task still runs
        if _read(state).strip() == "FROZEN":
            return
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.002)


def _thaw(version: str, path: str) -> None:
    with contextlib.suppress(OSError):  # a cgroup removed meanwhile holds nobody
        if version == "v2":
            _write(os.path.join(path, "cgroup.freeze"), "0")
        else:
            _write(os.path.join(path, "freezer.state"), "THAWED")


@contextlib.contextmanager
def frozen(container_id: str, timeout: float = TIMEOUT) -> Iterator[bool]:
    """Freeze the container's cgroup(s) for the block; yields whether anything was frozen.
    Raises ``MountFailed`` when the processes do not freeze in time (thawed again)."""
    found = [(v, p) for v, p in cgroups(container_id) if not _member(p)]
    done: list[tuple[str, str]] = []
    try:
        deadline = time.monotonic() + timeout
        for version, path in found:
            done.append((version, path))
            try:
                _freeze(version, path, deadline)
            except TimeoutError:
                raise MountFailed(f"cannot pause container {container_id[:12]}: its processes "
                                  f"did not freeze within {timeout:.0f}s ({path})") from None
            except OSError as exc:
                raise MountFailed(f"cannot pause container {container_id[:12]}: {path}: "
                                  f"{exc.strerror}") from None
        yield bool(found)
    finally:
        for version, path in reversed(done):
            _thaw(version, path)
