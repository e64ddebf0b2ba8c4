"""A container mount under load: 8 processes (tests/faults/loadworker.py) do random reads,
writes, appends, truncates, renames, links, symlinks, chmods, mkdirs, rmdirs and readdirs
for ``SECONDS`` (60 s; 300 s with ``STRATA_LONG_TESTS=1``), each in its own subtree of lower
content (copy-ups, whiteouts, lower hardlinks) and all reading a shared one, each checking
every read against the model it keeps.  Then the merged tree must equal the models — while
mounted, after a remount, and in the committed image — ``strata check`` run in the middle
of it all finds nothing wrong, the daemon's log
(``<root>/mounts/<key>.log``) must hold no handler error, and ``strata check`` is clean."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.builders import busybox_entries, d, file, link, oci_layout, sym, tar_bytes, tree_of_tar
from tests.conftest import Mounter, Strata

pytestmark = pytest.mark.fuse

SECONDS = 300 if os.environ.get("STRATA_LONG_TESTS") else 60
WORKERS = 8
WORKER = Path(__file__).with_name("loadworker.py")


def image_layers() -> list[bytes]:
    entries = busybox_entries() + [d("shared")] + [
        file(f"shared/s{i}", os.urandom(300_000)) for i in range(4)]
    for w in range(WORKERS):
        entries += [d(f"w{w}"), d(f"w{w}/d1"), file(f"w{w}/d1/a", os.urandom(100_000)),
                    file(f"w{w}/d1/b", b"b" * 10), file(f"w{w}/big", os.urandom(1 << 20)),
                    file(f"w{w}/h1", b"linked"), link(f"w{w}/h2", f"w{w}/h1"),
                    sym(f"w{w}/l", "d1/a"), d(f"w{w}/d2/sub"), file(f"w{w}/d2/sub/x", b"x"),
                    d(f"w{w}/e")]
    # an upper layer with whiteouts and an opaque dir, so the workers meet both
    top = [file("w0/.wh.e", b""), d("w1/d2"), file("w1/d2/.wh..wh..opq", b""),
           file("w1/d2/new", b"n")]
    return [tar_bytes(entries), tar_bytes(top)]


def tree_dump(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            data, target = b"", ""
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(
                st.st_mode) else "file"
            if kind == "file":
                with open(full, "rb") as f:
                    data = f.read()
            elif kind == "link":
                target = os.readlink(full)
            out[os.path.relpath(full, root)] = {
                "kind": kind, "sha": hashlib.sha256(data).hexdigest(), "size": len(data),
                "target": target, "mode": stat.S_IMODE(st.st_mode) if kind == "file" else None}
    return out


def export_dump(tree: dict[str, tuple[Any, ...]], prefix: str) -> dict[str, Any]:
    kinds = {stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFREG: "file"}
    return {p[len(prefix):]: {"kind": kinds[e[0]],
                              "sha": e[5] or hashlib.sha256(b"").hexdigest(), "size": e[4],
                              "target": e[6], "mode": e[1] if e[0] == stat.S_IFREG else None}
            for p, e in tree.items() if p.startswith(prefix)}


def assert_matches(models: list[dict[str, Any]], get: Any) -> None:
    for w, model in enumerate(models):
        got = get(w)
        diff = {k: (got.get(k), model.get(k)) for k in set(got) | set(model)
                if got.get(k) != model.get(k)}
        assert not diff, f"w{w}: {sorted(diff.items())[:5]}"


def test_mount_under_load(strata: Strata, mounter: Mounter, tmp_path: Path) -> None:
    oci_layout(str(tmp_path / "layout"), image_layers(), tag="v1")
    image = strata.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    strata("create", "--name", "busy", image)
    mp = mounter.mount("busy", at=mounter.mountpoint("busy"))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(mp), str(w), str(1000 + w),
                               str(SECONDS), str(tmp_path / f"model{w}.json")],
                              stderr=subprocess.PIPE) for w in range(WORKERS)]
    time.sleep(SECONDS / 2)
    busy = strata("check", check=False)  # a busy mounted container is no problem
    assert busy.returncode == 0, busy.stdout.decode()
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=SECONDS + 120)
        if p.returncode != 0:
            errors.append(err.decode(errors="replace"))
    assert not errors, errors
    models = [json.loads((tmp_path / f"model{w}.json").read_text()) for w in range(WORKERS)]
    ops = sum(m.pop("#ops") for m in models)
    print(f"{ops} operations by {WORKERS} workers in {SECONDS}s")
    assert ops > WORKERS * 100, f"only {ops} operations in {SECONDS}s"
    assert_matches(models, lambda w: tree_dump(mp / f"w{w}"))
    log = next((strata.root / "mounts").glob("*.log")).read_text()
    mounter.umount(mp)
    assert "unexpected error in" not in log, log[-3000:]
    mp = mounter.mount("busy", at=mp)  # what the upper kept
    assert_matches(models, lambda w: tree_dump(mp / f"w{w}"))
    mounter.umount(mp)
    strata("commit", "busy", "loaded:1")
    exported = tree_of_tar(strata("export", "loaded:1").stdout)
    assert_matches(models, lambda w: export_dump(exported, f"w{w}/"))
    check = strata("check", check=False)
    assert check.returncode == 0, check.stdout.decode()
