"""Test images and oracles for the registry tests: a multi-platform OCI layout with an
attestation, an independent plain-HTTP uploader, the rootfs of ``strata export`` and of
``skopeo copy`` + ``umoci unpack``, and a real credential helper program."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from .registry_helpers import skopeo_copy

PLATFORMS = (("amd64", ""), ("arm64", ""), ("arm", "v7"))


def multi_platform_layout(layout: str, tag: str = "multi") -> dict[str, Any]:
    """An OCI layout whose ``tag`` is an index of linux/amd64, linux/arm64 and linux/arm/v7
    images (each with an ``etc/arch`` file naming its platform) plus a BuildKit-style
    attestation manifest (``unknown/unknown``).  Returns the manifest digests by platform."""
    from . import builders as b

    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    base = b.tar_bytes([b.d("etc"), b.file("etc/os-release", b"ID=strata-test\n")])
    base_blob = b.compress(base, "gzip")
    base_digest = b.write_blob(layout, base_blob)
    entries = []
    out: dict[str, Any] = {}
    for arch, variant in PLATFORMS:
        name = arch + (f"/{variant}" if variant else "")
        top = b.tar_bytes([b.d("etc"), b.file("etc/arch", f"{name}\n".encode())])
        top_blob = b.compress(top, "gzip")
        cfg: dict[str, Any] = {"created": "2024-01-02T03:04:05Z", "architecture": arch,
                               "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                               "rootfs": {"type": "layers",
                                          "diff_ids": [b.sha256(base), b.sha256(top)]}}
        if variant:
            cfg["variant"] = variant
        cfg_raw = json.dumps(cfg).encode()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": b.write_blob(layout, cfg_raw), "size": len(cfg_raw)},
                    "layers": [
                        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                         "digest": base_digest, "size": len(base_blob)},
                        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                         "digest": b.write_blob(layout, top_blob), "size": len(top_blob)}]}
        raw = json.dumps(manifest).encode()
        digest = b.write_blob(layout, raw)
        platform = {"architecture": arch, "os": "linux"}
        if variant:
            platform["variant"] = variant
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digest, "size": len(raw), "platform": platform})
        out["linux/" + name] = digest
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                            "predicateType": "https://spdx.dev/Document"}).encode()
    att_cfg = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                          "rootfs": {"type": "layers",
                                     "diff_ids": [b.sha256(statement)]}}).encode()
    att = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": b.write_blob(layout, att_cfg), "size": len(att_cfg)},
           "layers": [{"mediaType": "application/vnd.in-toto+json",
                       "digest": b.write_blob(layout, statement), "size": len(statement),
                       "annotations": {"in-toto.io/predicate-type":
                                       "https://spdx.dev/Document"}}]}
    att_raw = json.dumps(att).encode()
    entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": b.write_blob(layout, att_raw), "size": len(att_raw),
                    "platform": {"architecture": "unknown", "os": "unknown"},
                    "annotations": {"vnd.docker.reference.digest": entries[0]["digest"],
                                    "vnd.docker.reference.type": "attestation-manifest"}})
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    index_digest = b.write_blob(layout, index)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest,
             "size": len(index), "annotations": {"org.opencontainers.image.ref.name": tag}}]},
            f)
    out["index"] = index_digest
    return out


def upload_layout(host: str, layout: str, repo: str, tag: str = "latest",
                  auth: str | None = None) -> str:
    """Push an OCI layout's image to ``host`` with plain HTTP (monolithic uploads, blobs as
    they are): an independent uploader, because skopeo compresses uncompressed layers.
    Returns the manifest digest."""
    index = json.loads(Path(layout, "index.json").read_text())
    desc = index["manifests"][0]
    blob = Path(layout, "blobs", "sha256")
    manifest_raw = (blob / desc["digest"].partition(":")[2]).read_bytes()
    manifest = json.loads(manifest_raw)
    headers = {"Authorization": auth} if auth else {}
    for d in [manifest["config"], *manifest["layers"]]:
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"", headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202, resp.status
        loc = urllib.parse.urlsplit(resp.getheader("Location"))
        target = f"{loc.path}?{loc.query}&digest={d['digest']}"
        data = (blob / d["digest"].partition(":")[2]).read_bytes()
        conn.request("PUT", target, body=data,
                     headers={**headers, "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201, resp.status
        conn.close()
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest_raw,
                 headers={**headers, "Content-Type": desc["mediaType"]})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 201, resp.status
    conn.close()
    return str(desc["digest"])


def exported_tree(store: Any, image: Any) -> dict[str, tuple[Any, ...]]:
    """The tree of ``strata export`` of ``image`` (the same code path, in process)."""
    import io

    from imagestore import changeset
    from unionfs.resolve import UnionView

    from .builders import tree_of_tar

    buf = io.BytesIO()
    with store.layers.opened(store.layers.stack(image.diff_ids)) as layers:
        changeset.export_rootfs(UnionView(layers), buf.write)
    return tree_of_tar(buf.getvalue())


def umoci_tree(ref: str, work: Path, *skopeo_args: str,
               creds: str | None = None) -> dict[str, tuple[Any, ...]]:
    """The rootfs of ``ref`` as skopeo pulls it into an OCI layout and ``umoci unpack``
    extracts it: the independent oracle for pulls."""
    from .builders import tree_of_dir

    layout = work / "skopeo-layout"
    bundle = work / "umoci-bundle"
    skopeo_copy(f"docker://{ref}", f"oci:{layout}:t", *skopeo_args, creds=creds)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True,
                   capture_output=True, timeout=120)
    return tree_of_dir(str(bundle / "rootfs"))


def write_credential_helper(directory: Path, name: str, secrets: dict[str, tuple[str, str]]
                            ) -> Path:
    """A real ``docker-credential-NAME`` program (a Python script) that knows ``secrets``
    (server -> (user, secret)) and logs every call next to itself."""
    directory.mkdir(parents=True, exist_ok=True)
    store = directory / f"{name}.json"
    store.write_text(json.dumps({k: list(v) for k, v in secrets.items()}))
    prog = directory / f"docker-credential-{name}"
    prog.write_text(f"""#!{shutil.which('python3') or '/usr/bin/python3'}
import json, sys
store = {str(store)!r}
action = sys.argv[1]
data = sys.stdin.read()
with open(store + ".log", "a") as f:
    f.write(action + " " + data.strip().splitlines()[0] if data.strip() else action)
    f.write("\\n")
secrets = json.load(open(store))
if action == "get":
    if data.strip() not in secrets:
        print("credentials not found in native keychain")
        sys.exit(1)
    user, secret = secrets[data.strip()]
    print(json.dumps({{"ServerURL": data.strip(), "Username": user, "Secret": secret}}))
elif action == "store":
    doc = json.loads(data)
    secrets[doc["ServerURL"]] = [doc["Username"], doc["Secret"]]
    json.dump(secrets, open(store, "w"))
elif action == "erase":
    secrets.pop(data.strip(), None)
    json.dump(secrets, open(store, "w"))
""")
    prog.chmod(0o755)
    return prog
