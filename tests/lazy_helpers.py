"""Seekable test images for the lazy-pull tests, made by independent producers.

* ``Containerd``: a containerd daemon confined to a temp dir (its own root, state and socket),
  for ``ctr-remote`` (stargz-snapshotter 0.12, Debian) to convert images to eStargz and
  zstd:chunked and push them.
* skopeo 1.9.3 writes zstd:chunked (``--dest-compress-format zstd:chunked``) with the older
  ``io.containers.zstd-chunked.*`` annotations; it drops tar padding past the end-of-archive
  blocks without changing the diff_id, so the source layers here end right after them.
* strata's own eStargz writer (``imagestore.estargz_write``), for images uploaded as they are.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from . import builders as b
from .registry_helpers import skopeo_copy
from .registry_images import upload_layout


def tight(tar: bytes) -> bytes:
    """``tar`` ending right after its two end-of-archive blocks (no record padding)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for _ in tf:
            pass
        end = tf.offset
    return tar[:end] + b"\0" * 1024


def generated_layers(files: int = 400, big: int = 2 << 20, seed: int = 7) -> list[bytes]:
    """A rootfs-like two-layer image: ``files`` small files in nested directories (partly
    incompressible), an ``etc/os-release``, a ``big`` file, symlinks, hardlinks; the second
    layer changes, adds and whites out a few."""
    import random

    rnd = random.Random(seed)
    base = [b.d("etc"), b.file("etc/os-release", b'PRETTY_NAME="strata test"\nID=strata\n'),
            b.d("usr"), b.d("usr/lib"), b.d("usr/share")]
    for i in range(files):
        d = f"usr/share/pkg{i % 20}"
        if i < 20:
            base.append(b.d(d))
        body = rnd.randbytes(rnd.randint(200, 12000)) if i % 3 else \
            (f"line {i}\n" * rnd.randint(10, 400)).encode()
        base.append(b.file(f"{d}/file{i}", body, mode=0o644 if i % 7 else 0o755))
    base += [b.file("usr/lib/big.so", rnd.randbytes(big)), b.sym("usr/lib/link.so", "big.so"),
             b.link("usr/lib/hard.so", "usr/lib/big.so"), b.file("empty", b"")]
    top = [b.d("etc"), b.file("etc/motd", b"hello\n"), b.whiteout("usr/share/pkg3"),
           b.file("usr/share/pkg4/file4", b"changed\n")]
    return [tight(b.tar_bytes(base)), tight(b.tar_bytes(top))]


class Containerd:
    """containerd in a temp dir of its own, for ctr-remote."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))  # short socket paths
        self.sock = self.dir / "sock"
        cfg = self.dir / "config.toml"
        cfg.write_text(
            'version = 2\n'
            f'root = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri", '
            '"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", '
            '"io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.dir}/ttrpc.sock"\n')
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("containerd did not start: "
                                   + (self.dir / "log").read_text()[-1000:])
            time.sleep(0.05)

    def ctr(self, *args: str) -> str:
        proc = subprocess.run(["ctr-remote", "-a", str(self.sock), "-n", "strata", *args],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"ctr-remote {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def convert_push(self, layout: str, tag: str, dest: str, *flags: str) -> None:
        """Import the OCI layout ``layout`` (tag ``tag``), convert it with ``flags``, push it
        to ``dest`` (plain HTTP)."""
        archive = self.dir / f"{os.path.basename(layout)}.tar"
        with tarfile.open(archive, "w") as tf:
            tf.add(layout, arcname=".")
        self.ctr("images", "import", "--no-unpack", "--base-name",
                 "src/" + os.path.basename(layout), str(archive))
        self.ctr("images", "convert", "--oci", *flags,
                 f"src/{os.path.basename(layout)}:{tag}", dest)
        self.ctr("images", "push", "--plain-http", dest)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def estargz_layout(layout: str, layers: list[bytes], tag: str = "latest") -> dict[str, Any]:
    """An OCI layout whose layers strata's own writer made eStargz (annotations included)."""
    from imagestore.estargz_write import convert

    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    descs, diff_ids = [], []
    for tar in layers:
        blob, out = bytearray(), bytearray()
        w = convert(io.BytesIO(tar), blob.extend, out.extend, chunk_size=256 << 10)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": b.write_blob(layout, bytes(blob)), "size": len(blob),
                      "annotations": {"containerd.io/snapshot/stargz/toc.digest": w.toc_digest,
                                      "io.containers.estargz.uncompressed-size":
                                          str(w.tar_size)}})
        diff_ids.append(b.sha256(bytes(out)))
    created = "2024-01-02T03:04:05Z"
    cfg = json.dumps({"created": created, "architecture": "amd64", "os": "linux",
                      "config": {"Cmd": ["/bin/sh"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids},
                      "history": [{"created": created, "created_by": f"layer {i}"}
                                  for i in range(len(layers))]}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": b.write_blob(layout, cfg), "size": len(cfg)},
        "layers": descs}).encode()
    mdigest = b.write_blob(layout, manifest)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
             "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]},
            f)
    return {"manifest": mdigest, "diff_ids": diff_ids}


def push_images(host: str, base: Path, layers: list[bytes], name: str,
                containerd: Containerd | None) -> dict[str, str]:
    """The test image ``layers`` in every form, pushed to the registry at ``host``:
    form -> reference.  ctr-remote's forms only with ``containerd``."""
    refs: dict[str, str] = {}
    src = str(base / f"{name}-src")
    b.oci_layout(src, layers, tag="latest", compression="gzip")
    refs["gzip"] = f"{host}/lazy/{name}-gzip:1"
    # not skopeo: its blob-info cache (1.9) may hand this push the zstd:chunked blob of the
    # same content, or the zstd:chunked push this gzip blob, annotations lost
    upload_layout(host, src, f"lazy/{name}-gzip", "1")
    refs["zstdchunked-skopeo"] = f"{host}/lazy/{name}-zc-skopeo:1"
    skopeo_copy(f"oci:{src}:latest", f"docker://{refs['zstdchunked-skopeo']}",
                "--dest-compress-format", "zstd:chunked")
    own = str(base / f"{name}-own")
    estargz_layout(own, layers)
    refs["estargz-strata"] = f"{host}/lazy/{name}-esgz-strata:1"
    upload_layout(host, own, f"lazy/{name}-esgz-strata", "1")
    if containerd is not None:
        refs["estargz-ctr"] = f"{host}/lazy/{name}-esgz-ctr:1"
        containerd.convert_push(src, "latest", refs["estargz-ctr"], "--estargz",
                                "--estargz-chunk-size", "65536")
        refs["zstdchunked-ctr"] = f"{host}/lazy/{name}-zc-ctr:1"
        containerd.convert_push(src, "latest", refs["zstdchunked-ctr"], "--zstdchunked")
    return refs
