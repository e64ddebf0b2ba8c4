"""Kernel overlayfs for the kernel engine: its options, mount(2) and umount2(2) without a
helper, and whether this process may mount it at all.

The kernel engine serves a writable container as kernel overlayfs whose one lower directory is
strata's read-only FUSE mount of the image (the daemon, ``unionfs.mount``) and whose upper and
work directories are the container's own.  Once the overlay is mounted the daemon detaches its
FUSE mount from the tree: overlayfs keeps a private clone of every layer, so the FUSE file
system lives exactly as long as the overlay does (in every mount namespace), nobody can reach
it but the overlay, and the daemon's session ends when the last overlay mount goes, as a FUSE
engine mount's does at its unmount.

``OPTIONS`` keeps an upper that either engine reads the same way (architecture.md, decision 12):

* ``redirect_dir=nofollow`` — no ``overlay.redirect`` xattrs written or followed: renaming a
  directory that has lower content answers EXDEV (``mv`` then copies), and the FUSE engine,
  which copies such a directory up and makes it opaque, never meets a redirect;
* ``index=off`` — no ``index/`` directory (the FUSE engine does not read it; it also needs a
  lower that decodes file handles, which FUSE does not): a copy-up of one name of a lower
  hardlink group breaks the link, as overlayfs does without the index;
* ``metacopy=off`` — every copy-up copies the data, so the upper holds every byte it claims
  (commit refuses metacopy uppers);
* ``xino=on`` — one ``st_dev`` for the whole mount and inode numbers made of the layer's
  number and the object's own (the lower's get a high bit), as long as they fit (see below);
* ``userxattr`` in a user namespace (``user.overlay.*`` xattrs; root writes ``trusted.*``):
  both spellings are read by the FUSE engine, ``diff``, ``commit`` and ``export``.

Caveats:
* The kernel writes ``overlay.origin`` and ``overlay.impure`` xattrs on what it copies up,
  and keeps a whiteout template (a char 0/0 device named ``#N``) in ``work/work``; both are
  overlay-private: never shown through a mount, dropped by commit, and the daemon empties
  ``work/work`` when its overlay has gone.
* ``xino`` needs the lower's inode numbers to fit in 62 bits; strata's do for images of up to
  255 layers.  An inode whose number does not fit shows the FUSE mount's ``st_dev``.
* ``permitted`` tells whether mount(2) of overlayfs can succeed as far as credentials go
  (``CAP_SYS_ADMIN`` over this mount namespace); the upper's file system can still refuse
  (an upper on overlayfs, NFS or FUSE), which only the mount tells.
"""

from __future__ import annotations

import functools
import os
from typing import Any

OPTIONS = ("redirect_dir=nofollow", "index=off", "metacopy=off", "xino=on")
REFUSED = "overlayfs would not mount: "  # how the daemon's error starts when mount(2) fails
MAX_DATA = 4000  # mount(2) takes one page of options

MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 0x2
_CAP_SYS_ADMIN = 21
_PROC_USER_INIT_INO = 0xEFFFFFFD  # the initial user namespace's inode number (a kernel ABI)
_NS_GET_USERNS = 0xB701



@functools.cache
def _libc() -> Any:
    import ctypes  # a few milliseconds: only when a mount is made or taken down

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, path: str) -> None:
    if result != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def escape(path: str) -> str:
    """``path`` as one value of the overlay's mount options (``\\``, ``,`` and ``:`` escaped)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def options(lower: str, upper: str, work: str, userxattr: bool = False) -> str:
    """The mount data for one lower directory, an upper and a work directory."""
    opts = [f"lowerdir={escape(lower)}", f"upperdir={escape(upper)}",
            f"workdir={escape(work)}", *OPTIONS]
    if userxattr:
        opts.append("userxattr")
    return ",".join(opts)


def mount(target: str, lower: str, upper: str, work: str, *, userxattr: bool = False,
          suid: bool = False, dev: bool = False) -> None:
    """Mount overlayfs at ``target`` (``nosuid``/``nodev`` unless asked).  Paths too long for
    one page of options go as ``/proc/self/fd/N`` of directories opened for the call.  Raises
    ``OSError`` with the kernel's errno (the kernel log says more)."""
    flags = (0 if suid else MS_NOSUID) | (0 if dev else MS_NODEV)
    data = options(lower, upper, work, userxattr)
    fds: list[int] = []
    try:
        if len(data) > MAX_DATA:
            fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in (lower, upper, work)]
            lower, upper, work = (f"/proc/self/fd/{fd}" for fd in fds)
            data = options(lower, upper, work, userxattr)
        _check(_libc().mount(b"overlay", os.fsencode(target), b"overlay", flags,
                           data.encode()), target)
    finally:
        for fd in fds:
            os.close(fd)


def umount(target: str, detach: bool = False) -> None:
    """umount2(2) of ``target`` (``MNT_DETACH`` with ``detach``).  Raises ``OSError``: EBUSY
    for a mount in use, EINVAL for what is not a mount point, EPERM without the right."""
    _check(_libc().umount2(os.fsencode(target), MNT_DETACH if detach else 0), target)


def in_initial_userns() -> bool:
    try:
        return os.stat("/proc/self/ns/user").st_ino == _PROC_USER_INIT_INO
    except OSError:
        return True  # no namespaces in this kernel


def permitted() -> str | None:
    """Why this process cannot mount overlayfs, or None when it may: it needs
    ``CAP_SYS_ADMIN`` in the user namespace that owns its mount namespace (root; or root of a
    user namespace made with its own mount namespace, ``unshare -Urm``, where the kernel
    allows overlayfs since 5.11), and overlayfs in the kernel."""
    try:
        with open("/proc/self/status") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")),
                        0)
    except OSError:
        caps = 0
    if not caps >> _CAP_SYS_ADMIN & 1:
        return "mounting overlayfs needs root (CAP_SYS_ADMIN)"
    if not in_initial_userns() and not _owns_mount_namespace():
        return ("this user namespace does not own the mount namespace (unshare -U without -m): "
                "overlayfs cannot be mounted here")
    try:
        with open("/proc/filesystems") as f:
            known = any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        known = True
    if not known and not in_initial_userns():
        return "overlayfs is not available in this kernel"  # root could load the module
    return None


def _owns_mount_namespace() -> bool:
    """Whether the mount namespace belongs to this process's user namespace."""
    import fcntl

    try:
        mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        owner = fcntl.ioctl(mnt, _NS_GET_USERNS)
    except OSError:
        return False
    finally:
        os.close(mnt)
    try:
        return os.fstat(owner).st_ino == os.stat("/proc/self/ns/user").st_ino
    finally:
        os.close(owner)


def refused(message: str) -> bool:
    """Whether a daemon's error says overlayfs itself was refused (``auto`` then uses FUSE)."""
    return message.startswith(REFUSED)

