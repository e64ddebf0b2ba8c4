"""The hostile corpus end to end: ``import`` (one-layer cases), ``load`` (an OCI layout) and
``pull`` (pushed into a real registry by raw HTTP) of every case, and a mount of every image
that is accepted.

A refused case gives one ``Error:`` line naming the problem, exit status 1, no traceback, no
image and no tag; import and load leave the store exactly as it was.  An accepted case gives
the documented tree, the same through the mount and through ``export``.  After every case
``strata check`` is clean, the canary directory is untouched and no hostile name exists
outside the store (the ``canary`` fixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.builders import diff_trees, listing, oci_layout, sha256, tree_of_dir, tree_of_tar
from tests.forkserver import Warm, WarmMount
from tests.hostile.corpus import Case, bomb, layer_cases
from tests.registry_images import upload_layout

CASES = {c.name: c for c in layer_cases("/CANARY")}


def cases_for(canary: Path) -> dict[str, Case]:
    return {c.name: c for c in layer_cases(str(canary))}


def write_layout(case: Case, path: Path) -> None:
    if case.compression != "bomb":
        oci_layout(str(path), list(case.layers), tag="v1", compression=case.compression)
        return
    blob, diff_id = bomb(200 << 20)
    oci_layout(str(path), [], tag="v1", config={"rootfs": {"type": "layers",
                                                           "diff_ids": [diff_id]}})
    # put the bomb in as the only layer
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (path / "blobs/sha256" / digest[7:]).write_bytes(blob)
    index = json.loads((path / "index.json").read_text())
    mpath = path / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(mpath.read_bytes())
    manifest["layers"] = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": digest, "size": len(blob)}]
    raw = json.dumps(manifest).encode()
    mpath.unlink()
    (path / "blobs/sha256" / sha256(raw)[7:]).write_bytes(raw)
    index["manifests"][0].update(digest=sha256(raw), size=len(raw))
    (path / "index.json").write_text(json.dumps(index))


def single_layer_file(case: Case, path: Path) -> Path | None:
    """What ``import`` gets for a one-layer case (None for cross-layer cases)."""
    if case.compression == "bomb":
        path.write_bytes(bomb(200 << 20)[0])
        return path
    if len(case.layers) != 1:
        return None
    path.write_bytes(case.layers[0])
    return path


def assert_refused(strata: Warm, args: list[str], case: Case, before: dict[str, Any] | None,
                   input: bytes | None = None) -> None:
    proc = strata(*args, input=input, check=False, env=case.env)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, f"{case.name}: strata {args[0]} gave {proc.returncode}: {err}"
    assert len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
    assert "Traceback" not in err
    assert case.error is not None and re.search(case.error, err), (case.name, err)
    assert strata.out("images", "-q", "-a") == ""
    if before is not None:
        assert listing(str(strata.root)) == before, f"{case.name}: the store changed"
        assert os.listdir(strata.root / "tmp") == []


def assert_clean(strata: Warm) -> None:
    proc = strata("check", check=False)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")


def accepted_tree(strata: Warm, case: Case, image: str, tmp_path: Path,
                  mount: bool) -> None:
    exported = tree_of_tar(strata("export", image).stdout)
    assert case.expect is not None
    case.expect(exported)
    if not mount:
        return
    with WarmMount(strata, image, tmp_path / "mp") as m:
        mounted = tree_of_dir(str(m.mountpoint))
    assert not diff_trees(mounted, exported), diff_trees(mounted, exported)
    case.expect(mounted)


@pytest.mark.fuse
@pytest.mark.parametrize("name", sorted(CASES))
def test_import_load_and_mount(warm: Warm, canary: Path, tmp_path: Path, name: str) -> None:
    case = cases_for(canary)[name]
    warm("check")  # the store exists, with its lock files
    layout = tmp_path / "layout"
    write_layout(case, layout)
    one = single_layer_file(case, tmp_path / "layer.tar")
    if case.refused:
        before = listing(str(warm.root))
        if one is not None:
            assert_refused(warm, ["import", str(one), "bad:1"], case, before)
            assert_refused(warm, ["import", "-", "bad:1"], case, before, one.read_bytes())
        assert_refused(warm, ["load", "-i", str(layout)], case, before)
        assert_clean(warm)
        return
    image = warm.out("load", "-i", str(layout)).split()[-1]
    accepted_tree(warm, case, image, tmp_path, mount=True)
    if one is not None:
        imported = warm.out("import", str(one), "imported:1").strip()
        accepted_tree(warm, case, imported, tmp_path, mount=False)
    assert_clean(warm)


@pytest.mark.registry
@pytest.mark.parametrize("name", sorted(CASES))
def test_pull(warm: Warm, canary: Path, tmp_path: Path, registry: Any, name: str) -> None:
    case = cases_for(canary)[name]
    layout = tmp_path / "layout"
    write_layout(case, layout)
    repo = f"hostile/{name}"
    upload_layout(registry.host, str(layout), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    if case.refused:
        assert_refused(warm, ["pull", "-q", ref], case, None)
        assert_clean(warm)  # layers that did pass stay stored, verified, for a retry
        return
    assert warm.out("pull", "-q", ref).strip() == ref
    accepted_tree(warm, case, ref, tmp_path, mount=False)
    assert_clean(warm)
