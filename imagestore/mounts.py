"""Mount records, container mount locks, and the freeze client: what the store knows of mounts.

A mount's daemon (``unionfs.mount``) writes ``mounts/<key>.json`` once its mount answers
(pid, mountpoint, what is mounted, its log, its control socket, the mount's device) and
removes it when the mount ends; ``<key>`` is a hash of the mountpoint, and ``<key>.log`` and
``<key>.sock`` are the daemon's log and control socket.  ``Mounts.records`` reads them back
as ``MountRecord`` values and tells the truth of *this* mount namespace:

* a record whose daemon is gone is not listed (``strata check`` reports the file);
* a record whose mount is gone from here while its daemon lives on, because another mount
  namespace still holds the mount (an ``unshare -m`` started while it was mounted), is listed
  with ``elsewhere`` set: not mounted here, but the container is still in use;
* a daemon that is just ending (unmounted here, nobody else holds it) is not listed.

A container being mounted has ``containers/<id>/mount.lock`` locked exclusively: the spawner
takes the lock and hands the descriptor to the daemon, which holds it for as long as it
serves, so a container is never mounted twice nor removed under its mount.

``paused`` is the client of the daemon's control socket: it holds every change through a
writable mount while a commit or export reads the upper (``unionfs.control.frozen``), after
freezing the container's cgroup when it runs in one (``freezer``).

A container mounted with the kernel engine has its image served by the daemon at
``containers/<id>/lower`` only while the overlay is being mounted (``clear_lower`` removes
what a daemon killed at that moment leaves); its record names the overlay (its device) and
``engine: kernel``.
``rotate`` is its other client: it turns a writable mount's upper into a read-only layer and
starts a fresh one, in the same mount (a build's step is done; ``unionfs.controlserver``);
``guard`` has the daemon kill a process (a build's RUN) if this process dies first.

Caveats:
* Telling "held by another namespace" from "ending" reads ``/proc/*/mountinfo``
  (``unionfs.control.holders``): only for records whose mount is not here, which is rare.
* Records live in the store: a mount made by another store (``--root``) is not listed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import NamedTuple

from unionfs.control import _libc_syncfs, frozen, holders, is_mounted, short_address, unmount
from unionfs.errors import MountError

from .errors import Conflict, MountFailed


class MountRecord(NamedTuple):
    """A live mount of the store (``strata mounts``).  (A named tuple, not a dataclass: the
    record is all ``strata umount`` loads, and ``dataclasses`` costs it milliseconds.)"""

    mountpoint: str
    pid: int  # the daemon
    kind: str  # image, container or dirs
    target: str  # image ID, container ID, or the lower dirs
    name: str
    log: str
    started: str
    read_only: bool
    control: str = ""  # the daemon's control socket (freeze for commit)
    dev: str = ""  # the mount's device, major:minor as /proc/self/mountinfo shows it
    engine: str = "fuse"  # fuse, or kernel: overlayfs over the daemon's FUSE mount
    elsewhere: bool = False  # gone from this mount namespace, held by another one


class Mounts:
    """The mount records and locks of the store at ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dir = os.path.join(root, "mounts")
        os.makedirs(self.dir, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------------

    def key(self, mountpoint: str) -> str:
        import hashlib  # OpenSSL's, milliseconds: strata umount of a live mount needs no key

        return hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:20]

    def record_path(self, mountpoint: str) -> str:
        return os.path.join(self.dir, self.key(mountpoint) + ".json")

    def log_path(self, mountpoint: str) -> str:
        return os.path.join(self.dir, self.key(mountpoint) + ".log")

    def control_path(self, mountpoint: str) -> str:
        return os.path.join(self.dir, self.key(mountpoint) + ".sock")

    # -- records -------------------------------------------------------------------------------

    def read(self, path: str) -> MountRecord:
        """The record in file ``path`` as written (``ValueError``/``TypeError`` if damaged)."""
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        fields = set(MountRecord._fields) - {"elsewhere"}
        return MountRecord(**{k: v for k, v in doc.items() if k in fields})

    def files(self) -> list[str]:
        return [os.path.join(self.dir, n) for n in sorted(os.listdir(self.dir))
                if n.endswith(".json")]

    def records(self) -> list[MountRecord]:
        """The live mounts: daemon alive, and mounted here or held by another mount namespace
        (``elsewhere``)."""
        out = []
        for path in self.files():
            try:
                rec = self.read(path)
            except (OSError, ValueError, TypeError):
                continue
            state = self.state(rec)
            if state == "here":
                out.append(rec)
            elif state == "elsewhere":
                out.append(rec._replace(elsewhere=True))
        return out

    def state(self, rec: MountRecord) -> str:
        """``here``, ``elsewhere`` (only another mount namespace holds it), or ``gone``
        (the daemon is dead, or ending)."""
        if not process_alive(rec.pid):
            return "gone"
        if not rec.dev or is_mounted(rec.mountpoint, rec.dev):
            return "here"
        return "elsewhere" if holders(rec.dev) else "gone"

    def record_for(self, mountpoint: str) -> MountRecord | None:
        full = os.path.abspath(mountpoint)
        return next((r for r in self.records() if r.mountpoint == full), None)

    def recorded(self, mountpoint: str) -> MountRecord | None:
        """The record of ``mountpoint`` as written, live or not (None if missing or
        damaged)."""
        try:
            return self.read(self.record_path(mountpoint))
        except (OSError, ValueError, TypeError):
            return None

    def of_container(self, container_id: str) -> MountRecord | None:
        return next((r for r in self.records()
                     if r.kind == "container" and r.target == container_id), None)

    def unrecord(self, mountpoint: str) -> None:
        """Forget a mount whose daemon is gone (its record and control socket)."""
        for path in (self.record_path(mountpoint), self.control_path(mountpoint)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- the kernel engine's FUSE lower ----------------------------------------------------------

    @staticmethod
    def lower_path(container_root: str) -> str:
        """Where the kernel engine's daemon mounts a container's image (``containers/<id>/
        lower``, mode 0700) until the overlay above holds it and it is detached."""
        return os.path.join(container_root, "lower")

    def clear_lower(self, container_root: str) -> bool:
        """Detach and remove the lower a daemon left behind (it died while it started); to
        be called holding the container's mount lock, or knowing its daemon is gone.  True
        if there was one."""
        return clear_mount_dir(self.lower_path(container_root))

    # -- container locks -----------------------------------------------------------------------

    def lock(self, container_root: str, name: str) -> int:
        """Lock ``containers/<id>/mount.lock`` for a mount of the container; returns the
        descriptor that holds the lock (to be handed to the daemon).  Raises ``Conflict``
        when the container is mounted already."""
        fd = os.open(os.path.join(container_root, "mount.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            where = self.where(os.path.basename(container_root), container_root)
            raise Conflict(f"container {name} is already mounted {where}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def where(self, container_id: str, container_root: str) -> str:
        """Where a container is mounted, in words (``at /mnt``, ``in another mount
        namespace (unmounted from /mnt)``), or "" when it is not."""
        rec = self.of_container(container_id)
        if rec is not None:
            return describe(rec)
        path = os.path.join(container_root, "mount.lock")
        if not os.path.exists(path):
            return ""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "by a daemon without a record (strata check tells more)"
        finally:
            os.close(fd)
        return ""

    # -- freeze --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def paused(self, container_id: str, pause: bool = True) -> Iterator[None]:
        """Hold every write through the container's mount while the block runs, if it is
        mounted writable (``docker commit --pause``); a no-op otherwise or when ``pause`` is
        false.  The container's processes are frozen first if it runs in a cgroup of its own
        (``freezer``); then the mount is synced and its daemon asked to freeze: the FUSE
        engine holds every change, the kernel engine every open of a lower file (so no
        copy-up starts) — its other writes go straight to the upper, and only the cgroup
        holds them.  Raises ``MountFailed`` when the mount does not pause."""
        rec = self.of_container(container_id) if pause else None
        with contextlib.ExitStack() as stack:
            if rec is not None and rec.control:
                from . import freezer

                stack.enter_context(freezer.frozen(container_id))
                try:
                    stack.enter_context(frozen(rec.mountpoint, rec.control,
                                               sync=not rec.elsewhere))
                except MountError as exc:
                    raise MountFailed(str(exc)) from None
            yield


def clear_mount_dir(path: str) -> bool:
    """Detach whatever is mounted at ``path`` and remove the directory if empty; True if
    there was anything to clear."""
    found = False
    while is_mounted(path):
        found = True
        try:
            unmount(path, lazy=True)
        except MountError:
            break
    try:
        os.rmdir(path)
        found = True
    except OSError:  # none (ENOENT), or not ours to remove (not empty)
        pass
    return found


def describe(rec: MountRecord) -> str:
    """Where ``rec`` is mounted, in words."""
    if rec.elsewhere:
        return f"in another mount namespace only (unmounted from {rec.mountpoint} here)"
    return f"at {rec.mountpoint}"


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs: a zombie waiting to be reaped counts as gone, but not a
    thread-group leader that has exited while other threads of it still run (the daemon's
    worker threads hold its descriptors, and with them a container's mount lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().split(") ")[-1][:1] not in ("Z", "X"):
                    return True
        except OSError:
            continue
    return False


# -- rotate ----------------------------------------------------------------------------------------


def rotate(mountpoint: str, control: str, upper: str, work: str, timeout: float = 60.0) -> str:
    """Make the upper of the writable mount at ``mountpoint`` its top read-only layer and the
    empty directory ``upper`` (work dir ``work``, on the same file system) its new upper; the
    mount stays, inode numbers and all.  The kernel's dirty pages are flushed first, and the
    mount is frozen while it turns.  Returns the old upper's directory, read still from now
    on.  Raises ``MountFailed`` (refused: a file is open for writing, the mount is gone)."""
    import socket

    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc_syncfs(fd)
    finally:
        os.close(fd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with short_address(control) as short:
                s.connect(short)
            f = s.makefile("rwb")
            f.write(b"freeze\n")
            f.flush()
            if f.readline().strip() != b"frozen":
                raise MountFailed(f"the mount at {mountpoint} did not pause")
            f.write(f"rotate {json.dumps(upper)} {json.dumps(work)}\n".encode())
            f.flush()
            answer = f.readline().decode(errors="replace").strip()
            f.close()
        except OSError as exc:
            raise MountFailed(f"cannot rotate the upper of the mount at {mountpoint}: "
                              f"{exc}") from None
    word, _, rest = answer.partition(" ")
    if word != "rotated":
        raise MountFailed(f"cannot rotate the upper of the mount at {mountpoint}: "
                          f"{rest or 'no answer'}")
    old = json.loads(rest)
    assert isinstance(old, str)
    return old


def guard(control: str, pid: int, on: bool = True, timeout: float = 10.0) -> None:
    """Ask the daemon of a mount made with a lifeline (``mounting.mounted``) to kill ``pid``
    should this process die before it unguards it (``on=False``): a build's RUN must not
    outlive the build.  Raises ``MountFailed``."""
    import socket

    word = "guard" if on else "unguard"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with short_address(control) as short:
                s.connect(short)
            s.sendall(f"{word} {pid}\n".encode())
            answer = s.recv(256).decode(errors="replace").strip()
        except OSError as exc:
            raise MountFailed(f"cannot {word} process {pid}: {exc}") from None
    if answer != word + "ed":
        raise MountFailed(f"cannot {word} process {pid}: {answer.removeprefix('error ')}")
