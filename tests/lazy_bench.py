"""Lazy pull measurement (for scripts/bench to call; not a test): ``python -m tests.lazy_bench``.

On a generated image of about 80 MB with 6000 files (``LAZY_BENCH_FILES``), in eStargz
(strata's writer) and zstd:chunked (strata's ``push --compression``, and skopeo's) form in a
local registry behind a counting proxy, each in a fresh store: the time from ``strata pull
--lazy`` to the first ``cat /etc/os-release`` in the mount and the registry bytes that took,
then to every file read through that mount; beside a full ``strata pull`` + mount + the same
reads, and ``skopeo copy`` + ``umoci unpack`` of the gzip form, in the same run.  Run it with
``PYTHONDONTWRITEBYTECODE`` unset: every strata process otherwise compiles its modules again.
``LAZY_BENCH_REPS`` rounds (default 1) of every form, interleaved.

What it cannot see: a slow network (loopback answers in microseconds, so round trips cost
nothing here), and the page cache (the registry's blobs are in it after the first form).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import lazy_helpers as lh
from tests import registry_helpers as rh

REPO = Path(__file__).resolve().parent.parent


def _strata(root: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "cli.main", "--root", str(root), *args], check=True,
                   capture_output=True, env=env, timeout=600)


def _sent(proxy: rh.FaultProxy) -> int:
    return sum(s.sent for s in proxy.requests("GET", "/blobs/"))


def _read_all(root: Path) -> int:
    """Read every regular file under ``root`` (as a container that reads its whole image)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        total += len(chunk)
    return total


def _first_read(root: Path, ref: str, proxy: rh.FaultProxy, lazy: bool) -> dict[str, Any]:
    """From ``strata pull`` to the first ``cat /etc/os-release`` in a mount, then to every
    file read through that mount."""
    mp = root.parent / f"mnt-{root.name}"
    mp.mkdir()
    before = _sent(proxy)
    t0 = time.monotonic()
    _strata(root, "pull", *(["--lazy"] if lazy else []), ref)
    t_pull = time.monotonic() - t0
    _strata(root, "mount", ref, str(mp))
    try:
        data = (mp / "etc" / "os-release").read_bytes()
        t_first = time.monotonic() - t0
        assert data.startswith(b"PRETTY_NAME")
        fetched = _sent(proxy) - before
        read = _read_all(mp)
        t_all = time.monotonic() - t0
    finally:
        _strata(root, "umount", str(mp))
    return {"pull_s": round(t_pull, 3), "first_read_s": round(t_first, 3),
            "bytes_fetched": fetched, "read_all_s": round(t_all, 3), "bytes_read": read,
            "bytes_fetched_all": _sent(proxy) - before}


def measure(work: Path, files: int = int(os.environ.get("LAZY_BENCH_FILES", 6000)),
            big: int = 48 << 20, rootfs: Path | None = None, reps: int = 1) -> dict[str, Any]:
    """The measurements, ``reps`` rounds of every form (interleaved, each in fresh stores):
    ``{"image_tar_bytes": N, "reps": [{form: {"blob_bytes", "lazy", "full"}, ...,
    "skopeo_umoci_s": S}, ...]}``; with ``rootfs`` (a rootfs tar: the Debian test image,
    tests/debian.py) that one layer instead of the generated image."""
    if rootfs is not None:
        layers = [lh.tight(rootfs.read_bytes())]
    else:
        layers = lh.generated_layers(files=files, big=big)
    reg = rh.RegistryProcess(work / "registry")
    proxy = rh.FaultProxy(reg)
    try:
        refs = lh.push_images(reg.host, work, layers, "bench", None)
        pusher = work / "pusher"  # strata's own zstd:chunked, by push --compression
        _strata(pusher, "pull", refs["gzip"])
        refs["zstdchunked-strata"] = f"{reg.host}/lazy/bench-zc-strata:1"
        _strata(pusher, "push", "--compression", "zstd:chunked", refs["gzip"],
                refs["zstdchunked-strata"])
        out: dict[str, Any] = {"image_tar_bytes": sum(len(t) for t in layers), "reps": []}
        for rep in range(reps):
            got: dict[str, Any] = {}
            for form in ("estargz-strata", "zstdchunked-strata", "zstdchunked-skopeo", "gzip"):
                ref = refs[form].replace(reg.host, proxy.host, 1)
                raw = json.loads(subprocess.run(
                    ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                    check=True, capture_output=True).stdout)
                size = sum(x["size"] for x in raw["layers"])
                row: dict[str, Any] = {"blob_bytes": size}
                if form != "gzip":
                    row["lazy"] = _first_read(work / f"{form}-lazy-{rep}", ref, proxy, True)
                    row["lazy"]["fraction"] = round(row["lazy"]["bytes_fetched"] / size, 4)
                row["full"] = _first_read(work / f"{form}-full-{rep}", ref, proxy, False)
                got[form] = row
                for d in (f"{form}-lazy-{rep}", f"{form}-full-{rep}"):
                    shutil.rmtree(work / d, ignore_errors=True)
            t0 = time.monotonic()
            layout = work / f"skopeo-layout-{rep}"
            rh.skopeo_copy(f"docker://{refs['gzip']}", f"oci:{layout}:t")
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:t",
                            str(work / f"bundle-{rep}")],
                           check=True, capture_output=True, timeout=600)
            got["skopeo_umoci_s"] = round(time.monotonic() - t0, 3)
            shutil.rmtree(layout, ignore_errors=True)
            shutil.rmtree(work / f"bundle-{rep}", ignore_errors=True)
            out["reps"].append(got)
        return out
    finally:
        proxy.close()
        reg.stop()


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lazy-bench-"))
    rootfs = os.environ.get("LAZY_BENCH_ROOTFS")
    try:
        print(json.dumps(measure(d, rootfs=Path(rootfs) if rootfs else None,
                                 reps=int(os.environ.get("LAZY_BENCH_REPS", 1))), indent=1))
    finally:
        shutil.rmtree(d, ignore_errors=True)
