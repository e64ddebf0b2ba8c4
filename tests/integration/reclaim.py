"""Make the kernel forget the dentries and inodes a test looked up, as memory pressure does, so
FUSE ``FORGET`` and the next ``LOOKUP`` are exercised between two steps.

``Reclaimer`` is a context manager: on entry this process moves into a private memory cgroup
(cgroup v2 where the memory controller is enabled for a child, else cgroup v1's memory
hierarchy), so what it looks up afterwards is charged there; ``reclaim()`` then empties that
cgroup (``memory.reclaim`` on v2, ``memory.force_empty`` on v1): nothing outside the test is
evicted.  Where no child can be made, a cgroup v2 process that is not in the root cgroup asks
its own cgroup to reclaim (``memory.reclaim``: the test's job or session, not the machine);
the last resort is ``echo 2 > /proc/sys/vm/drop_caches`` (every file system's dentries and
inodes).  ``method`` says which is in use.

Caveats:
* Enter it *after* the mounts are made: processes started inside (a strata daemon) would keep
  the cgroup busy and it could not be removed at the end.
* Needs root; a failed removal of the cgroup at exit is retried for a few seconds, then left
  (it is empty and harmless).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from types import TracebackType


def _mounts(fstype: str) -> list[tuple[str, str]]:
    """(mount point, super options) of every mount of ``fstype``."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = right.split()
            if parts and parts[0] == fstype:
                out.append((left.split()[4], parts[2] if len(parts) > 2 else ""))
    return out


def _own_cgroup(match: str) -> str | None:
    """This process's cgroup path in the hierarchy whose controller field is ``match``."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if ctrl == match or match in ctrl.split(","):
                return path
    return None


class Reclaimer:
    def __init__(self) -> None:
        self.method = "drop_caches"
        self._home: Path | None = None
        self._child: Path | None = None
        self._knob = ""
        self._value = ""
        self._own: Path | None = None

    def __enter__(self) -> Reclaimer:
        for setup in (self._v2, self._v1, self._v2_own):
            with contextlib.suppress(OSError):
                if setup():
                    return self
        return self

    def _v2_own(self) -> bool:
        path = _own_cgroup("")
        mnt = next((m for m, _ in _mounts("cgroup2")), None)
        if not path or path == "/" or mnt is None:
            return False
        knob = Path(mnt + path) / "memory.reclaim"
        if not knob.exists():
            return False
        self._own, self._knob, self._value = knob, "memory.reclaim", "1G"
        self.method = f"cgroup v2, own cgroup {knob.parent}"
        return True

    def _v1(self) -> bool:
        path = _own_cgroup("memory")
        mnt = next((m for m, opts in _mounts("cgroup") if "memory" in opts.split(",")), None)
        if path is None or mnt is None:
            return False
        return self._enter(Path(mnt + path), "memory.force_empty", "0", "cgroup v1")

    def _v2(self) -> bool:
        path = _own_cgroup("")
        mnt = next((m for m, _ in _mounts("cgroup2")), None)
        if path is None or mnt is None:
            return False
        home = Path(mnt + path)
        if "memory" not in (home / "cgroup.subtree_control").read_text().split():
            return False  # a child would have no memory controller (and no memory.reclaim)
        return self._enter(home, "memory.reclaim", "1G", "cgroup v2")

    def _enter(self, home: Path, knob: str, value: str, tag: str) -> bool:
        child = home / f"strata-test-{os.getpid()}"
        child.mkdir(exist_ok=True)
        if not (child / knob).exists():
            child.rmdir()
            return False
        try:
            (child / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            child.rmdir()
            raise
        self._home, self._child, self._knob, self._value = home, child, knob, value
        self.method = f"{tag} {child}"
        return True

    def reclaim(self) -> None:
        knob = self._own or (self._child / self._knob if self._child is not None else None)
        if knob is None:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            return
        # memory.reclaim answers EAGAIN when it found less than asked: everything is gone
        with contextlib.suppress(BlockingIOError), open(knob, "w") as f:
            f.write(self._value)

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._home is None or self._child is None:
            return
        (self._home / "cgroup.procs").write_text(str(os.getpid()))
        deadline = time.monotonic() + 5
        while True:
            try:
                self._child.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
