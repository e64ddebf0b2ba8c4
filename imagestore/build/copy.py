"""COPY and ADD: files from a source tree written into a stage's rootfs, by docker's rules.

The destination is the stage's mount (a writable union mount; the writes land in its upper,
which becomes the step's layer), reached through host paths under ``DestRoot``, whose
``locate`` follows symlinks inside the rootfs as a chroot would.  The rules, as docker's
builder and ``buildah bud`` apply them:

* a relative destination is relative to the WORKDIR; a destination ending in ``/`` (or that
  is an existing directory) receives a file under the file's own name, otherwise the file *is*
  the destination; several sources need a destination ending in ``/``;
* a directory source copies its *contents* (not the directory itself) into the destination,
  which is created; symlinks inside it are copied as symlinks, hardlinks stay hardlinks;
* owners: ``--chown`` (names looked up in the rootfs' /etc/passwd and /etc/group), else root
  for the build context, else the owners the source image has; directories the destination
  needs are made ``0755`` with the same owner; ``--chmod`` sets the mode of everything copied;
  mtimes are kept;
* ADD extracts a local tar archive (plain, gzip, bzip2, xz or zstd, recognised by content, not
  name) into the destination, keeping the archive's owners; a URL is downloaded (``url.py``).

Seams: pure file system work on a host directory; the builder decides what is copied where.

Caveats:
* An existing object that is in the way of a copied one (a file where a directory goes, or
  the other way round) is replaced, as docker's extraction replaces it.
* Extraction refuses members that would land outside the destination (``..``, absolute
  links are kept as links but never followed while writing).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from ..compress import DecompressReader
from ..errors import StoreError
from .sources import HostTree, Source, SrcEntry, Tree, join, walk

__all__ = ["CopyError", "CopyOptions", "DestRoot", "copy_sources", "extract_archive",
           "is_archive", "lookup_owner"]

MAX_LINKS = 255


class CopyError(StoreError):
    """A COPY or ADD that cannot be done as asked (several sources into a file, a bad
    --chown or --chmod, an archive that would escape its destination)."""


@dataclass(frozen=True)
class CopyOptions:
    owner: tuple[int, int] | None = None  # --chown, resolved
    chmod: int | None = None
    keep_owner: bool = False  # sources from an image keep their owners


class DestRoot:
    """A rootfs on the host (the stage's mountpoint) written as a chroot would."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def host(self, rel: str) -> str:
        rel = rel.lstrip("/")  # always inside the root
        return os.path.join(self.root, rel) if rel else self.root

    def locate(self, path: str, follow_last: bool = True) -> str:
        """``path`` (absolute in the rootfs) with the symlinks of the components that exist
        followed inside the root; the missing rest appended as it is.  Relative result."""
        todo = [c for c in path.split("/") if c and c != "."]
        done: list[str] = []
        links = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            cur = "/".join([*done, name])
            try:
                st = os.lstat(self.host(cur))
            except (FileNotFoundError, NotADirectoryError):
                return "/".join([*done, name, *[c for c in todo if c != "."]])
            if stat.S_ISLNK(st.st_mode) and (todo or follow_last):
                links += 1
                if links > MAX_LINKS:
                    raise CopyError(f"too many levels of symbolic links at /{cur}")
                target = os.readlink(self.host(cur))
                if target.startswith("/"):
                    done = []
                todo = [c for c in target.split("/") if c and c != "."] + todo
                continue
            done.append(name)
        return "/".join(done)

    def read(self, path: str, limit: int = 16 << 20) -> bytes | None:
        """The content of the regular file at ``path`` (absolute in the rootfs, symlinks
        followed inside it), None if there is none: a FIFO or a device there is not opened
        for reading (a FIFO's open would wait for a writer for ever)."""
        try:  # (a symlink loop is CopyError's "too many levels of symbolic links")
            fd = os.open(self.host(self.locate(path)),
                         os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            os.set_blocking(fd, True)
            out = bytearray()
            while len(out) < limit and (chunk := os.read(fd, min(1 << 20, limit - len(out)))):
                out += chunk
            return bytes(out)
        except OSError:
            return None
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.host(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def mkdirs(self, rel: str, owner: tuple[int, int]) -> None:
        """Make the directory ``rel`` and its missing parents (``0755``, ``owner``)."""
        parts = [c for c in rel.split("/") if c]
        for i in range(1, len(parts) + 1):
            cur = "/".join(parts[:i])
            st = self.lstat(cur)
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue
            if st is not None:
                raise CopyError(f"cannot copy to /{rel}: /{cur} is not a directory")
            os.mkdir(self.host(cur), 0o755)
            os.chown(self.host(cur), *owner, follow_symlinks=False)
            os.chmod(self.host(cur), 0o755)

    def clear(self, rel: str, st: os.stat_result) -> None:
        """Remove what is at ``rel`` so that another kind of object can go there."""
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.host(rel))
        else:
            os.unlink(self.host(rel))


def lookup_owner(root: DestRoot, spec: str) -> tuple[int, int]:
    """``--chown`` (``user``, ``user:group``, names or numbers) against the rootfs' /etc/passwd
    and /etc/group; a user without a group takes the user's primary group (root's is 0)."""
    user, _, group = spec.partition(":")
    if not user:
        raise CopyError(f"--chown={spec}: no user")

    def table(name: str) -> list[list[str]]:
        text = (root.read(f"/etc/{name}") or b"").decode("utf-8", "replace")
        return [line.split(":") for line in text.splitlines() if line.strip()
                and not line.startswith("#")]

    uid = gid = None
    if user.isdigit():
        uid = int(user)
        if not group:
            for row in table("passwd"):
                if len(row) > 3 and row[2] == user and row[3].isdigit():
                    gid = int(row[3])
                    break
            else:
                gid = uid if uid == 0 else 0
                gid = 0 if uid == 0 else uid
    else:
        for row in table("passwd"):
            if len(row) > 3 and row[0] == user:
                uid = int(row[2])
                gid = int(row[3]) if row[3].isdigit() else 0
                break
        else:
            raise CopyError(f"unable to convert uid/gid chown string to host mapping: can't "
                            f"find uid for user {user}: no such user: {user}")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for row in table("group"):
                if len(row) > 2 and row[0] == group:
                    gid = int(row[2])
                    break
            else:
                raise CopyError(f"unable to convert uid/gid chown string to host mapping: "
                                f"can't find gid for group {group}: no such group: {group}")
    assert uid is not None and gid is not None
    return uid, gid


def parse_chmod(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise CopyError(f"invalid --chmod={text}: an octal mode like 0755") from None
    if mode > 0o7777 or mode < 0:
        raise CopyError(f"invalid --chmod={text}: an octal mode like 0755")
    return mode


# -- copying -----------------------------------------------------------------------------------


def _owner(e: SrcEntry, opts: CopyOptions) -> tuple[int, int]:
    if opts.owner is not None:
        return opts.owner
    if opts.keep_owner:
        return e.uid, e.gid
    return 0, 0


def _mode(e: SrcEntry, opts: CopyOptions) -> int:
    return opts.chmod if opts.chmod is not None else stat.S_IMODE(e.mode)


def _write_data(tree: Tree, src: str, host: str, size: int) -> None:
    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        source = tree.host_path(src)
        if source is not None:
            with open(source, "rb") as f:
                offset = 0
                while offset < size:
                    n = os.sendfile(fd, f.fileno(), offset, min(size - offset, 1 << 30))
                    if n == 0:
                        break
                    offset += n
        else:
            for chunk in tree.chunks(src):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class _Writer:
    """Writes source entries at destination paths, keeping hardlinks and setting directory
    times last (a child written later would change them)."""

    def __init__(self, tree: Tree, root: DestRoot, opts: CopyOptions) -> None:
        self.tree, self.root, self.opts = tree, root, opts
        self.links: dict[tuple[int, int], str] = {}
        self.dir_times: list[tuple[str, int]] = []

    def put(self, src: str, e: SrcEntry, rel: str) -> None:
        root = self.root
        host = root.host(rel)
        existing = root.lstat(rel)
        if existing is not None and not (e.is_dir and stat.S_ISDIR(existing.st_mode)):
            root.clear(rel, existing)
            existing = None
        uid, gid = _owner(e, self.opts)
        mode = _mode(e, self.opts)
        if e.is_dir:
            if existing is None:
                os.mkdir(host, 0o700)
            os.chown(host, uid, gid)
            os.chmod(host, mode)
            self.dir_times.append((host, e.mtime_ns))
            self._xattrs(src, host)
            return
        if e.nlink > 1 and not e.is_dir and e.ino in self.links:
            os.link(root.host(self.links[e.ino]), host)
            return
        if e.is_link:
            os.symlink(e.target, host)
            os.chown(host, uid, gid, follow_symlinks=False)
            os.utime(host, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
            return
        if e.is_file:
            _write_data(self.tree, src, host, e.size)
        elif stat.S_ISFIFO(e.mode):
            os.mkfifo(host, 0o600)
        elif stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode):
            if isinstance(self.tree, HostTree):
                return  # devices of the build context are not sent (docker skips them)
            os.mknod(host, stat.S_IFMT(e.mode) | 0o600, e.rdev)
        else:
            return  # sockets
        os.chown(host, uid, gid)
        os.chmod(host, mode)
        self._xattrs(src, host)
        os.utime(host, ns=(e.mtime_ns, e.mtime_ns))
        if e.nlink > 1:
            self.links[e.ino] = rel

    def _xattrs(self, src: str, host: str) -> None:
        for k, v in self.tree.xattrs(src).items():
            with contextlib.suppress(OSError):
                os.setxattr(host, k, v)

    def finish(self) -> None:
        for host, mtime in reversed(self.dir_times):
            os.utime(host, ns=(mtime, mtime))


def copy_sources(tree: Tree, sources: list[Source], root: DestRoot, dest: str,
                 opts: CopyOptions, *, add: bool = False, what: str = "COPY") -> None:
    """Copy ``sources`` of ``tree`` to ``dest`` (absolute in the rootfs; a trailing ``/``
    means a directory) as COPY (``add``: as ADD, local archives extracted)."""
    to_dir = dest.endswith("/") or dest.endswith("/.") or dest in ("", ".")
    if len(sources) > 1 and not to_dir:
        raise CopyError(f"{what} failed: when using {what} with more than one source file, "
                        "the destination must be a directory and end with a /")
    parent_owner = opts.owner or (0, 0)
    w = _Writer(tree, root, opts)
    for src in sources:
        e = src.entry
        if e.is_dir:
            base = root.locate(dest)
            root.mkdirs(posixpath.dirname(base), parent_owner)
            st = root.lstat(base)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise CopyError(f"{what} failed: cannot copy directory {src.given} to {dest}: "
                                "not a directory")
            if st is None:  # made like the directories it needs (buildah, BuildKit)
                root.mkdirs(base, parent_owner)
            for rel, child in walk(tree, src.path):
                if rel == "":
                    continue  # the destination keeps its own attributes
                w.put(join(src.path, rel), child, join(base, rel))
            continue
        if add and e.is_file and is_archive(tree, src.path):
            base = root.locate(dest)
            root.mkdirs(base, parent_owner)
            with _opened(tree, src.path) as f:
                extract_archive(f, root, base, src.given)
            continue
        base = root.locate(dest)
        st = root.lstat(base)
        if to_dir or (st is not None and stat.S_ISDIR(st.st_mode)):
            root.mkdirs(base, parent_owner)
            target = f"{base}/{posixpath.basename(src.given.rstrip('/')) or 'file'}"
            target = root.locate("/" + target, follow_last=False)
        else:
            root.mkdirs(posixpath.dirname(base), parent_owner)
            target = root.locate("/" + base, follow_last=False)
        w.put(src.path, e, target)
    w.finish()


# -- archives ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _opened(tree: Tree, path: str) -> Iterator[IO[bytes]]:
    host = tree.host_path(path)
    if host is not None:
        with open(host, "rb") as f:
            yield f
        return
    yield io.BytesIO(b"".join(tree.chunks(path)))


_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def is_archive(tree: Tree, path: str) -> bool:
    """Is the file a tar archive, plain or compressed (by its first bytes, as docker
    decides)?"""
    with _opened(tree, path) as f:
        head = f.read(512)
        if any(head.startswith(m) for m in _MAGIC):
            f.seek(0)
            try:
                head = io.BufferedReader(DecompressReader(f)).read(512)  # type: ignore[arg-type]
            except (StoreError, OSError, EOFError, ValueError):
                return False
        return len(head) >= 512 and head[257:262] == b"ustar" or _v7_tar(head)


def _v7_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    try:
        stored = int(head[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(head[:148]) + 256 + sum(head[156:512])


def extract_archive(f: IO[bytes], root: DestRoot, base: str, name: str) -> None:
    """Unpack the tar (any compression) ``f`` into ``base`` (relative in the rootfs), owners
    and modes as the archive has them."""
    reader = io.BufferedReader(DecompressReader(f))  # type: ignore[arg-type]
    dir_times: list[tuple[str, int]] = []
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for m in tar:
                parts = [c for c in m.name.split("/") if c and c != "."]
                if not parts:
                    continue
                if ".." in parts:
                    raise CopyError(f"ADD failed: {name}: member {m.name!r} leaves the "
                                    "destination")
                rel = root.locate("/" + "/".join([base, *parts]) if base else
                                  "/" + "/".join(parts), follow_last=False)
                root.mkdirs(posixpath.dirname(rel), (0, 0))
                host = root.host(rel)
                existing = root.lstat(rel)
                if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
                    root.clear(rel, existing)
                    existing = None
                if m.isdir():
                    if existing is None:
                        os.mkdir(host, 0o700)
                    dir_times.append((host, int(m.mtime)))
                elif m.issym():
                    os.symlink(m.linkname, host)
                    os.chown(host, m.uid, m.gid, follow_symlinks=False)
                    continue
                elif m.islnk():
                    lparts = [c for c in m.linkname.split("/") if c and c != "."]
                    if ".." in lparts:
                        raise CopyError(f"ADD failed: {name}: link {m.name!r} leaves the "
                                        "destination")
                    os.link(root.host("/".join([base, *lparts]) if base else
                                      "/".join(lparts)), host)
                    continue
                elif m.isfile():
                    src = tar.extractfile(m)
                    assert src is not None
                    with open(host, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                elif m.isfifo():
                    os.mkfifo(host, 0o600)
                elif m.ischr() or m.isblk():
                    kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                    os.mknod(host, kind | 0o600, os.makedev(m.devmajor, m.devminor))
                else:
                    continue
                os.chown(host, m.uid, m.gid)
                os.chmod(host, m.mode & 0o7777)
                for k, v in (m.pax_headers or {}).items():
                    if k.startswith("SCHILY.xattr."):
                        with contextlib.suppress(OSError):
                            os.setxattr(host, k[len("SCHILY.xattr."):], v.encode(
                                "utf-8", "surrogateescape"))
                if not m.isdir():
                    os.utime(host, (m.mtime, m.mtime))
    except tarfile.TarError as exc:
        raise CopyError(f"ADD failed: {name}: {exc}") from None
    for host, mtime in reversed(dir_times):
        os.utime(host, (mtime, mtime))
