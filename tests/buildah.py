"""buildah as the oracle of ``strata build``: the same Dockerfile built by ``buildah bud
--layers --isolation chroot`` (overlay storage in a temp dir, base images from the test
registry), both results unpacked by ``umoci`` and compared: rootfs listings (paths, types,
modes, owners, sizes, content hashes, link targets, xattrs; mtimes aside) and config fields.

Where buildah and docker differ, docker is the reference and the comparison says so:

* buildah's chroot isolation leaves the mount targets of a RUN (``/dev``, ``/proc``,
  ``/sys``, ``/run``, ``/etc/hosts``, ``/etc/hostname``, ``/etc/resolv.conf``) in the layer,
  empty; docker's init layer keeps them out, and so does strata's: such stubs are dropped
  from buildah's listing when strata's lacks the path;
* buildah 1.28 adds its own ``io.buildah.version`` label.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from .builders import tree_of_dir

Tree = dict[str, tuple[Any, ...]]

CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal", "Healthcheck", "OnBuild", "Shell")
RUN_STUBS = ("dev", "proc", "sys", "run", "etc/hosts", "etc/hostname", "etc/resolv.conf")


class Buildah:
    """buildah with its storage (overlay driver) in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = ["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
                     "--storage-driver", "overlay"]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def bud(self, context: Path, tag: str, *extra: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        return self("bud", "--layers", "--isolation", "chroot", "--format", "docker",
                    "--tls-verify=false", "-t", tag, *extra, str(context), check=check)

    def layout(self, tag: str, dest: Path) -> Path:
        """The image as an OCI layout at ``dest`` (tag ``t``)."""
        self("push", "--format", "oci", tag, f"oci:{dest}:t")
        return dest

    def config(self, tag: str) -> dict[str, Any]:
        """The image's config as buildah keeps it in docker format (its OCI form, which a
        push writes, drops Healthcheck, OnBuild and Shell)."""
        doc = json.loads(self("inspect", "--type", "image", tag).stdout)
        config: dict[str, Any] = doc["Docker"]
        return config

    def close(self) -> None:
        self("rmi", "--all", "--force", check=False)
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mp = line.split()[4]
            if mp.startswith(str(self.root)):
                subprocess.run(["umount", "-l", mp], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def unpack(layout: Path, work: Path) -> tuple[Tree, dict[str, Any]]:
    """The rootfs (as ``umoci unpack`` makes it) and the image config of ``layout``'s ``t``."""
    bundle = work / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True,
                   capture_output=True, timeout=120)
    tree = tree_of_dir(str(bundle / "rootfs"))
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    shutil.rmtree(bundle)
    return tree, config


def strata_layout(strata: Any, image: str, work: Path) -> Path:
    """``strata save --format oci`` of ``image``, as a layout directory tagged ``t``."""
    archive = work / "strata.tar"
    strata("save", "--format", "oci", "-o", str(archive), image)
    layout = work / "strata-layout"
    layout.mkdir()
    with tarfile.open(archive) as tf:
        tf.extractall(layout, filter="tar")
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = "t"
    index["manifests"] = index["manifests"][:1]
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def drop_run_stubs(theirs: Tree, ours: Tree) -> Tree:
    """buildah's listing less the empty mount targets its chroot RUN left behind."""
    out = dict(theirs)
    for stub in RUN_STUBS:
        if stub in out and stub not in ours:
            below = [p for p in out if p.startswith(stub + "/")]
            if not below and out[stub][4] == 0:
                del out[stub]
    return out


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
    c = config.get("config") or {}
    out = {k: c.get(k) for k in CONFIG_FIELDS}
    labels = dict(out["Labels"] or {})
    labels.pop("io.buildah.version", None)
    out["Labels"] = labels or None
    for k, v in out.items():
        if v in ([], {}, ""):
            out[k] = None
    return out


def tree_diff(ours: Tree, theirs: Tree) -> list[str]:
    """Readable differences (empty when equal)."""
    out = []
    for path in sorted(set(ours) | set(theirs)):
        a, b = ours.get(path), theirs.get(path)
        if a != b:
            out.append(f"{path}: strata {a} buildah {b}")
    return out


def write_context(root: Path, files: dict[str, Any]) -> Path:
    """A build context from ``{"path": bytes | str | ("symlink", target) | ("mode", bytes,
    mode)}``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, spec in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, tuple) and spec[0] == "symlink":
            os.symlink(spec[1], p)
        elif isinstance(spec, tuple) and spec[0] == "mode":
            p.write_bytes(spec[1])
            p.chmod(spec[2])
        elif isinstance(spec, tuple) and spec[0] == "dir":
            p.mkdir(exist_ok=True)
            p.chmod(spec[1])
        else:
            p.write_bytes(spec.encode() if isinstance(spec, str) else spec)
    return root


def small_tar(entries: dict[str, bytes]) -> bytes:
    """A tar of ``entries`` (a name ending in ``/`` is a directory, mode 0750; files 0640,
    owned by 1000:50)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries.items():
            ti = tarfile.TarInfo(name)
            if name.endswith("/"):
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o750
                tf.addfile(ti)
                continue
            ti.size = len(data)
            ti.mode = 0o640
            ti.uid, ti.gid = 1000, 50
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()
