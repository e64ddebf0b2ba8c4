"""Who runs the command: the user of ``-u`` (or the image's ``User``) resolved through the
container's own ``/etc/passwd`` and ``/etc/group``, read from its layers.

``RootView`` reads paths of a container's rootfs as the container will see them, over a
``UnionView`` of its layers (the writable one on top): symlinks are resolved inside the rootfs
(an absolute target starts again at its root, ``..`` stops at it), as runc's securejoin does,
so a hostile image cannot point a read at the host, and nothing needs mounting.
``resolve_user`` is runc's GetExecUser.

Caveats:
* A user that is a number absent from ``/etc/passwd`` runs with that uid, gid 0 and
  ``HOME=/`` (runc's defaults); a name that is absent is an error.
* Only the files are read (no NSS modules): users from LDAP and the like are unknown, as they
  are to runc.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass

from unionfs.resolve import Node, UnionView

from .runtime import MAX_ID, RunError


@dataclass(frozen=True)
class ExecUser:
    """The process's uid, gid, supplementary gids, home directory and name ("" if unknown)."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str
    name: str


@dataclass(frozen=True)
class _Passwd:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def _number(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise RunError(f"user or group id {text} is out of range (at most {MAX_ID})")
    return value


def _passwd(data: bytes | None) -> list[_Passwd]:
    out = []
    for line in (data or b"").decode(errors="replace").splitlines():
        f = line.split(":")
        if len(f) < 4 or line.startswith("#") or not f[2].isdigit() or not f[3].isdigit():
            continue
        out.append(_Passwd(f[0], int(f[2]), int(f[3]), f[5] if len(f) > 5 else ""))
    return out


def _groups(data: bytes | None) -> list[_Group]:
    out = []
    for line in (data or b"").decode(errors="replace").splitlines():
        f = line.split(":")
        if len(f) < 3 or line.startswith("#") or not f[2].isdigit():
            continue
        members = tuple(m.strip() for m in f[3].split(",") if m.strip()) if len(f) > 3 else ()
        out.append(_Group(f[0], int(f[2]), members))
    return out


def resolve_user(spec: str, passwd: bytes | None, group: bytes | None,
                 group_add: Sequence[str] = ()) -> ExecUser:
    """runc's GetExecUser: ``spec`` is ``user[:group]``, each a name or a number ("" is
    root).  A user found by name or number takes its uid, gid and home; its supplementary
    groups are the groups listing its name, unless a group was given.  An unknown name is an
    error, an unknown number is used as is (gid 0, home ``/``).  ``group_add`` adds groups
    (``--group-add``)."""
    user_arg, _, group_arg = spec.partition(":")
    uid_arg = _number(user_arg) if user_arg else 0
    entry = next((p for p in _passwd(passwd)
                  if (user_arg and p.name == user_arg) or (uid_arg is not None and
                                                           p.uid == uid_arg)), None)
    if entry is None and uid_arg is None:
        raise RunError(f"unable to find user {user_arg}: no matching entries in passwd file")
    uid = entry.uid if entry else uid_arg or 0
    gid = entry.gid if entry else 0
    home = entry.home if entry and entry.home else "/"
    name = entry.name if entry else ""
    groups = _groups(group)
    sgids: list[int] = []
    if group_arg:
        gid_arg = _number(group_arg)
        found = next((g for g in groups if g.name == group_arg or
                      (gid_arg is not None and g.gid == gid_arg)), None)
        if found is None and gid_arg is None:
            raise RunError(f"unable to find group {group_arg}: no matching entries in group "
                           "file")
        gid = found.gid if found else gid_arg or 0
    elif name:
        sgids = [g.gid for g in groups if name in g.members]
    for extra in group_add:
        number = _number(extra)
        found = next((g for g in groups if g.name == extra), None)
        if found is None and number is None:
            raise RunError(f"unable to find group {extra}: no matching entries in group file")
        sgids.append(found.gid if found else number or 0)
    return ExecUser(uid, gid, tuple(dict.fromkeys(sgids)), home, name)


# -- reading the rootfs ----------------------------------------------------------------------------


class RootView:
    """Paths of a container's rootfs as the container will see them: symlinks resolved inside
    the rootfs (an absolute target starts again at its root, ``..`` stops at it), over a
    ``UnionView`` of its layers (nothing here touches the host's file system)."""

    MAX_LINKS = 40

    def __init__(self, view: UnionView) -> None:
        self.view = view

    def resolve(self, path: str) -> tuple[str, Node | None]:
        """``(resolved, node)``: the path with every symlink resolved (relative, no leading
        slash) and its node, None when it does not exist; components below a missing one are
        kept as given."""
        todo = [p for p in path.split("/") if p not in ("", ".")]
        todo.reverse()
        done: list[str] = []
        nodes: list[Node] = [self.view.root()]
        links = 0
        missing = False
        while todo:
            part = todo.pop()
            if part == "..":
                if done:
                    done.pop()
                    if not missing:
                        nodes.pop()
                    missing = len(nodes) <= len(done)
                continue
            if missing:
                done.append(part)
                continue
            parent = nodes[-1]
            child = self.view.lookup(parent, part) if parent.is_dir else None
            if child is None:
                done.append(part)
                missing = True
                continue
            if stat.S_ISLNK(child.entry.mode):
                links += 1
                if links > self.MAX_LINKS:
                    raise RunError(f"too many levels of symbolic links in {path}")
                target = child.entry.target
                if target.startswith("/"):
                    done, nodes = [], [nodes[0]]
                todo.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            done.append(part)
            nodes.append(child)
        return "/".join(done), (None if missing else nodes[-1])

    def read(self, path: str, limit: int = 16 << 20) -> bytes | None:
        """The content of the regular file at ``path``, None if there is none."""
        _, node = self.resolve(path)
        if node is None or not stat.S_ISREG(node.entry.mode):
            return None
        return self.view.read(node, 0, min(node.entry.size, limit))

    def parents(self, resolved: str) -> list[tuple[str, Node | None]]:
        """Each ancestor of the resolved path ``resolved`` (outermost first) with its node."""
        out: list[tuple[str, Node | None]] = []
        node: Node | None = self.view.root()
        parts = resolved.split("/")[:-1] if resolved else []
        path = ""
        for part in parts:
            path = f"{path}/{part}" if path else part
            node = self.view.lookup(node, part) if node is not None and node.is_dir else None
            out.append((path, node))
        return out
