"""One worker of the mount load test (run as a program: ``loadworker.py MOUNT N SEED SECONDS
OUT``): random reads, writes, appends, truncates, renames (files and directories), links,
symlinks, chmods, mkdirs, rmdirs and readdirs in ``MOUNT/wN`` for ``SECONDS``, checking every
read against a model of that subtree it keeps as it goes; plus reads of ``MOUNT/shared``.
Writes the model as JSON to ``OUT``; exits 1 with the first mismatch (or an unexpected
errno) on stderr.

The model knows hardlinks: a name points at a node, and nodes are shared by the names of one
file, so a write through one name is seen through the others (overlayfs ``index=on``
semantics for lower hardlinks, which strata implements)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import sys
import time
from typing import Any


class Node:
    def __init__(self, kind: str, data: bytes = b"", target: str = "", mode: int = 0o644):
        self.kind, self.data, self.target, self.mode = kind, data, target, mode


class Model:
    def __init__(self, root: str) -> None:
        self.root = root
        self.names: dict[str, Node] = {}
        by_ino: dict[int, Node] = {}
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode):
                    self.names[rel] = Node("dir", mode=stat.S_IMODE(st.st_mode))
                elif stat.S_ISLNK(st.st_mode):
                    self.names[rel] = Node("link", target=os.readlink(full))
                else:
                    node = by_ino.get(st.st_ino)
                    if node is None:
                        with open(full, "rb") as f:
                            node = Node("file", f.read(), mode=stat.S_IMODE(st.st_mode))
                        by_ino[st.st_ino] = node
                    self.names[rel] = node

    def of(self, kind: str) -> list[str]:
        return sorted(p for p, n in self.names.items() if n.kind == kind)

    def children(self, path: str) -> list[str]:
        pre = path + "/" if path else ""
        return sorted(p[len(pre):] for p in self.names
                      if p.startswith(pre) and "/" not in p[len(pre):])

    def dump(self) -> dict[str, Any]:
        return {p: {"kind": n.kind, "sha": hashlib.sha256(n.data).hexdigest(),
                    "size": len(n.data), "target": n.target,
                    "mode": n.mode if n.kind == "file" else None}
                for p, n in sorted(self.names.items())}


def fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(1)


def run(mount: str, n: int, seed: int, seconds: float) -> dict[str, Any]:
    rng = random.Random(seed)
    root = os.path.join(mount, f"w{n}")
    model = Model(root)
    shared = {name: open(os.path.join(mount, "shared", name), "rb").read()  # noqa: SIM115
              for name in sorted(os.listdir(os.path.join(mount, "shared")))}
    counter = 0
    deadline = time.monotonic() + seconds

    def full(p: str) -> str:
        return os.path.join(root, p)

    def fresh(parent: str = "") -> str:
        nonlocal counter
        counter += 1
        return (parent + "/" if parent else "") + f"n{counter}"

    def some_dir() -> str:
        return rng.choice([""] + model.of("dir"))

    ops = 0
    while time.monotonic() < deadline:
        ops += 1
        op = rng.choice(["new", "new", "read", "read", "append", "pwrite", "truncate",
                         "rename", "rename_dir", "unlink", "mkdir", "rmdir", "readdir",
                         "readdir", "symlink", "link", "chmod", "shared", "overwrite"])
        files = model.of("file")
        try:
            if op == "new":
                p = fresh(some_dir())
                data = rng.randbytes(rng.choice([0, 10, 4096, 70_000]))
                with open(full(p), "xb") as f:
                    f.write(data)
                model.names[p] = Node("file", data)
            elif op == "read" and files:
                p = rng.choice(files)
                with open(full(p), "rb") as f:
                    got = f.read()
                if got != model.names[p].data:
                    fail(f"read {p}: {len(got)} bytes, the model has "
                         f"{len(model.names[p].data)}")
            elif op == "append" and files:
                p = rng.choice(files)
                data = rng.randbytes(rng.randint(1, 5000))
                with open(full(p), "ab") as f:
                    f.write(data)
                model.names[p].data += data
            elif op == "overwrite" and files:
                p = rng.choice(files)
                data = rng.randbytes(rng.randint(0, 9000))
                with open(full(p), "wb") as f:
                    f.write(data)
                model.names[p].data = data
            elif op == "pwrite" and files:
                p = rng.choice(files)
                node = model.names[p]
                off = rng.randint(0, len(node.data))
                data = rng.randbytes(rng.randint(1, 3000))
                fd = os.open(full(p), os.O_WRONLY)
                try:
                    os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
                node.data = node.data[:off] + data + node.data[off + len(data):]
            elif op == "truncate" and files:
                p = rng.choice(files)
                size = rng.randint(0, len(model.names[p].data) + 100)
                os.truncate(full(p), size)
                d = model.names[p].data
                model.names[p].data = d[:size] + b"\0" * (size - len(d))
            elif op == "rename" and files:
                src = rng.choice(files + model.of("link"))
                dst = rng.choice([fresh(some_dir()), rng.choice(files)])
                if dst == src or model.names.get(dst, Node("x")).kind == "dir":
                    continue
                os.rename(full(src), full(dst))
                if model.names.get(dst) is not model.names[src]:
                    model.names[dst] = model.names.pop(src)
            elif op == "rename_dir" and model.of("dir"):
                src = rng.choice(model.of("dir"))
                parent = rng.choice([x for x in [""] + model.of("dir")
                                     if x != src and not x.startswith(src + "/")])
                dst = fresh(parent)
                os.rename(full(src), full(dst))
                for p in [p for p in model.names if p == src or p.startswith(src + "/")]:
                    model.names[dst + p[len(src):]] = model.names.pop(p)
            elif op == "unlink" and files:
                p = rng.choice(files + model.of("link"))
                os.unlink(full(p))
                del model.names[p]
            elif op == "mkdir":
                p = fresh(some_dir())
                os.mkdir(full(p), 0o755)
                model.names[p] = Node("dir", mode=0o755)
            elif op == "rmdir":
                empty = [p for p in model.of("dir") if not model.children(p)]
                if empty:
                    p = rng.choice(empty)
                    os.rmdir(full(p))
                    del model.names[p]
            elif op == "readdir":
                p = some_dir()
                got = sorted(os.listdir(full(p)))
                if got != model.children(p):
                    fail(f"readdir {p or '.'}: {got} != {model.children(p)}")
            elif op == "symlink":
                p = fresh(some_dir())
                target = rng.choice(["/etc/passwd", "../nowhere", p.rsplit("/", 1)[-1], "x" * 300])
                os.symlink(target, full(p))
                model.names[p] = Node("link", target=target)
            elif op == "link" and files:
                src = rng.choice(files)
                p = fresh(some_dir())
                os.link(full(src), full(p))
                model.names[p] = model.names[src]
            elif op == "chmod" and files:
                p = rng.choice(files)
                mode = rng.choice([0o600, 0o644, 0o755, 0o640])
                os.chmod(full(p), mode)
                model.names[p].mode = mode
            elif op == "shared":
                name = rng.choice(sorted(shared))
                with open(os.path.join(mount, "shared", name), "rb") as f:
                    if f.read() != shared[name]:
                        fail(f"shared/{name} reads wrong")
        except OSError as exc:
            fail(f"{op}: unexpected {exc!r}")
    result = model.dump()
    result["#ops"] = ops  # type: ignore[assignment]
    return result


if __name__ == "__main__":
    mount, n, seed, seconds, out = sys.argv[1:6]
    model = run(mount, int(n), int(seed), float(seconds))
    with open(out, "w") as f:
        json.dump(model, f)
