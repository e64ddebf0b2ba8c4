"""The CLI as a user runs it: the image commands' output, flags and exit codes, compared with
what docker prints for the same commands."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from imagestore import Store, images, oci
from tests.builders import (
    busybox_entries,
    d,
    file,
    oci_layout,
    sha256,
    tar_bytes,
    tree_of_tar,
    whiteout,
)
from tests.conftest import Strata

ROOTFS = tar_bytes(busybox_entries() + [file("etc/motd", b"hello\n")])
HEX12 = r"[0-9a-f]{12}"
LONG_CMD = "/bin/sh -c #(nop) COPY file:0123456789abcdef0123456789abcdef in /usr/share/x"


def columns(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def starts(header: str, names: list[str]) -> list[int]:
    return [header.index(n) for n in names]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs.tar"
    path.write_bytes(ROOTFS)
    return path


@pytest.fixture
def layered(strata: Strata, tmp_path: Path) -> str:
    """A three-layer image with history (empty_layer entries too), loaded from an OCI layout;
    returns its ID."""
    layers = [tar_bytes(busybox_entries()),
              tar_bytes([d("srv"), file("srv/a", b"a" * 3000)]),
              tar_bytes([whiteout("etc/group"), file("srv/b", b"b" * 500)])]
    history = [
        {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD busybox /"},
        {"created": "2024-01-01T00:00:01Z", "created_by": "/bin/sh -c #(nop)  ENV A=1",
         "empty_layer": True},
        {"created": "2024-01-01T00:00:02Z", "created_by": LONG_CMD, "comment": "srv"},
        {"created": "2024-01-01T00:00:03Z", "created_by": "/bin/sh -c\tprintf b > /srv/b"},
        {"created": "2024-01-01T00:00:04Z", "created_by": '/bin/sh -c #(nop)  CMD ["sh"]',
         "empty_layer": True},
    ]
    layout = tmp_path / "layout"
    oci_layout(str(layout), layers, tag="v1", config={
        "created": "2024-01-01T00:00:04Z", "author": "tester", "history": history,
        "config": {"Cmd": ["sh"], "Env": ["A=1"], "Labels": {"tier": "web", "team": "x"}}})
    out = strata.out("load", "-i", str(layout))
    m = re.fullmatch(r"Loaded image ID: (sha256:[0-9a-f]{64})\n", out)
    assert m, out
    return m.group(1)


# -- images ---------------------------------------------------------------------------------------


def test_images_table_is_docker_s(strata: Strata, rootfs: Path, layered: str) -> None:
    new_id = strata.out("import", str(rootfs), "localhost:5000/some/long-repository-name:v1.2.3")
    strata("tag", layered, "web:1")
    strata("tag", layered, "web:latest")
    lines = strata.out("images").splitlines()
    header = lines[0]
    assert columns(header) == ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]
    # tabwriter: each column as wide as its widest cell plus 3 (at least 10)
    assert header.startswith("REPOSITORY" + " " * (len("localhost:5000/some/long-repository-name")
                                                   - len("REPOSITORY") + 3) + "TAG")
    pos = starts(header, ["TAG", "IMAGE ID", "CREATED", "SIZE"])
    rows = [columns(x) for x in lines[1:]]
    for line in lines[1:]:
        assert [line[p - 3:p] for p in pos] == ["   "] * 4 and all(line[p] != " " for p in pos)
    # newest first; one row per tag
    assert rows[0][:3] == ["localhost:5000/some/long-repository-name", "v1.2.3",
                           new_id.strip()[7:19]]
    assert re.fullmatch(r"(Less than a second|\d+ seconds?) ago", rows[0][3])
    assert re.fullmatch(r"\d(\.\d+)?MB", rows[0][4])
    assert [r[:2] for r in rows[1:]] == [["web", "1"], ["web", "latest"]]
    assert rows[1][2] == layered[7:19] and re.fullmatch(r"\d+ (months|years) ago", rows[1][3])
    assert re.fullmatch(r"\d(\.\d+)?MB", rows[1][4])  # busybox + 3500 bytes, 3 digits


def test_images_quiet_no_trunc_digests_and_positional(strata: Strata, store: Store,
                                                      rootfs: Path, layered: str) -> None:
    imported = strata.out("import", str(rootfs), "app:1").strip()
    strata("tag", "app:1", "app:2")
    strata("tag", layered, "other:1")
    assert strata.out("images", "-q").split() == [imported[7:19], layered[7:19]]
    assert strata.out("images", "-q", "--no-trunc").split() == [imported, layered]
    table = strata.out("images", "--no-trunc").splitlines()
    assert columns(table[1])[2] == imported
    assert strata.out("images", "app").count("\n") == 3
    assert [columns(x)[:2] for x in strata.out("images", "app:2").splitlines()[1:]] == [
        ["app", "2"]]
    assert strata.out("images", "nosuch").splitlines()[1:] == []
    # as docker, the argument is one more reference filter: a pattern, ORed with the others
    assert [columns(x)[:2] for x in strata.out("images", "a*").splitlines()[1:]] == [
        ["app", "1"], ["app", "2"]]
    assert [columns(x)[:2] for x in strata.out("images", "app:1", "--filter",
                                                "reference=other").splitlines()[1:]] == [
        ["app", "1"], ["other", "1"]]
    # a digest recorded for the image (as a pull records it) shows under --digests
    image = store.resolve("other:1")
    images.record(store, image.manifest.raw, image.manifest.media_type,
                    repo_digest=f"docker.io/library/other@{image.manifest_desc.digest}")
    lines = strata.out("images", "--digests").splitlines()
    assert columns(lines[0]) == ["REPOSITORY", "TAG", "DIGEST", "IMAGE ID", "CREATED", "SIZE"]
    got = {tuple(columns(x)[:3]) for x in lines[1:]}
    assert got == {("app", "1", "<none>"), ("app", "2", "<none>"),
                   ("other", "1", image.manifest_desc.digest)}


def test_images_filters(strata: Strata, rootfs: Path, layered: str) -> None:
    tagged = strata.out("import", "-c", "LABEL tier=db", str(rootfs), "demo/db:1").strip()
    dangling = strata.out("import", "-m", "no name", str(rootfs)).strip()
    strata("tag", layered, "demo:2")
    strata("tag", layered, "web:1")

    def ids(*flt: str) -> list[str]:
        args = [x for f in flt for x in ("--filter", f)]
        return strata.out("images", "-q", "--no-trunc", *args).split()

    def refs(*flt: str) -> list[str]:
        args = [x for f in flt for x in ("--filter", f)]
        return strata.out("images", "--format", "{{.Repository}}:{{.Tag}}", *args).split()

    assert ids("dangling=true") == [dangling]
    rows = [columns(x) for x in strata.out("images", "--filter", "dangling=true").splitlines()]
    assert rows[1][:3] == ["<none>", "<none>", dangling[7:19]]
    assert set(ids("dangling=false")) == {tagged, layered}
    assert set(ids()) == {tagged, dangling, layered}
    assert ids("label=tier") == [tagged, layered]
    assert ids("label=tier=web") == [layered]
    assert ids("label=tier=web", "label=team") == [layered]
    assert ids("label=tier=web", "label=team=y") == []
    assert ids("label=nosuch") == []
    assert refs("reference=demo*") == ["demo:2"]  # * does not match '/', as path.Match
    assert refs("reference=demo/*") == ["demo/db:1"]
    assert refs("reference=*/db:1") == ["demo/db:1"]
    assert sorted(refs("reference=demo*", "reference=web")) == ["demo:2", "web:1"]
    assert refs("reference=web:[0-9]") == ["web:1"]
    assert refs("dangling=false", "label=tier=db") == ["demo/db:1"]
    for bad in ("dangling=maybe", "nosuch=1", "label"):
        proc = strata("images", "--filter", bad, check=False)
        assert proc.returncode == 1 and proc.stderr.decode().startswith("Error: invalid filter")


def test_images_format_json_and_templates(strata: Strata, rootfs: Path, layered: str) -> None:
    imported = strata.out("import", str(rootfs), "app:1").strip()
    strata("tag", layered, "web:1")
    lines = strata.out("images", "--format", "json").splitlines()
    docs = [json.loads(x) for x in lines]
    assert [x["Repository"] for x in docs] == ["app", "web"]
    assert list(docs[0]) == sorted(docs[0])  # Go marshals a map: sorted keys
    assert set(docs[0]) >= {"Containers", "CreatedAt", "CreatedSince", "Digest", "ID",
                            "Repository", "SharedSize", "Size", "Tag", "UniqueSize",
                            "VirtualSize"}
    assert docs[0]["ID"] == imported[7:19] and docs[0]["Tag"] == "1"
    assert docs[0]["Digest"] == "<none>" and "\\u003cnone\\u003e" in lines[0]
    assert re.fullmatch(r"2024-01-01 \d\d:00:04 [+-]\d{4} \w+", docs[1]["CreatedAt"])
    assert strata.out("images", "--format", "{{.Repository}}:{{.Tag}}") == "app:1\nweb:1\n"
    assert strata.out("images", "--format", "{{.ID}} {{json .Tag}}").splitlines() == [
        f'{imported[7:19]} "1"', f'{layered[7:19]} "1"']
    table = strata.out("images", "--format", "table {{.Repository}}\\t{{.ID}}").splitlines()
    assert columns(table[0]) == ["REPOSITORY", "IMAGE ID"]
    assert columns(table[2]) == ["web", layered[7:19]]
    assert strata.out("image", "ls", "-q") == strata.out("images", "-q")


# -- history --------------------------------------------------------------------------------------


def test_history_rows_sizes_and_truncation(strata: Strata, layered: str) -> None:
    lines = strata.out("history", layered).splitlines()
    assert columns(lines[0]) == ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
    pos = starts(lines[0], ["CREATED", "CREATED BY", "SIZE", "COMMENT"])
    rows = [[line[a:b].strip() for a, b in zip([0, *pos], [*pos, None], strict=True)]
            for line in lines[1:]]
    assert [r[0] for r in rows] == [layered[7:19]] + ["<missing>"] * 4
    assert [r[2] for r in rows] == [
        '/bin/sh -c #(nop)  CMD ["sh"]', "/bin/sh -c printf b > /srv/b",
        LONG_CMD[:44] + "…", "/bin/sh -c #(nop)  ENV A=1", "/bin/sh -c #(nop) ADD busybox /"]
    assert [r[3] for r in rows][:4] == ["0B", "500B", "3kB", "0B"]
    assert rows[4][3].endswith("MB")
    assert [r[4] for r in rows] == ["", "", "srv", "", ""]
    assert all(re.fullmatch(r"\d+ (months|years) ago", r[1]) for r in rows)


def test_history_no_trunc_quiet_and_not_human(strata: Strata, layered: str) -> None:
    full = strata.out("history", "--no-trunc", layered)
    assert LONG_CMD in full and layered in full
    assert strata.out("history", "-q", layered).split() == [layered[7:19]] + ["<missing>"] * 4
    assert strata.out("history", "-q", "--no-trunc", layered).split()[0] == layered
    lines = strata.out("history", "-H=false", layered).splitlines()
    assert columns(lines[0]) == ["IMAGE", "CREATED AT", "CREATED BY", "SIZE", "COMMENT"]
    created = [re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)", x) for x in
               lines[1:]]
    assert all(created), lines
    size_at = lines[0].index("SIZE")
    sizes = [x[size_at:].split()[0] for x in lines[1:]]
    assert sizes[:4] == ["0", "500", "3000", "0"] and int(sizes[4]) > 1_000_000
    assert strata.out("history", "-H", "false", layered) == "\n".join(lines) + "\n"
    jl = [json.loads(x) for x in strata.out("history", "--format", "json", layered).splitlines()]
    assert [x["Size"] for x in jl][:4] == ["0B", "500B", "3kB", "0B"]
    assert list(jl[0]) == ["Comment", "CreatedAt", "CreatedBy", "CreatedSince", "ID", "Size"]


def test_history_of_an_import(strata: Strata, rootfs: Path) -> None:
    image_id = strata.out("import", "-m", "first cut", str(rootfs), "app:1").strip()
    lines = strata.out("history", "app:1").splitlines()
    assert len(lines) == 2
    row = columns(lines[1])
    assert row[0] == image_id[7:19] and row[-1] == "first cut" and row[-2].endswith("MB")


# -- inspect, tag ---------------------------------------------------------------------------------


def test_inspect_fields(strata: Strata, rootfs: Path, layered: str) -> None:
    image_id = strata.out("import", "--platform", "linux/arm64", "-c", "ENV A=b", "-c",
                          'ENTRYPOINT ["/bin/sh"]', str(rootfs), "app:1").strip()
    strata("tag", "app:1", "busybox")
    (doc,) = json.loads(strata.out("inspect", "app:1"))
    assert doc["Id"] == image_id
    assert doc["RepoTags"] == ["app:1", "busybox:latest"]
    assert doc["RepoDigests"] == []
    assert doc["Architecture"] == "arm64" and doc["Os"] == "linux"
    assert doc["Config"] == {"Env": ["A=b"], "Entrypoint": ["/bin/sh"]}
    assert doc["RootFS"] == {"Type": "layers", "Layers": [sha256(ROOTFS)]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", doc["Created"])
    assert doc["Size"] == sum(len(e.data) for e in busybox_entries()) + len(b"hello\n")
    assert doc["Author"] == ""
    two = json.loads(strata.out("inspect", layered, "busybox"))
    assert [x["Id"] for x in two] == [layered, image_id]
    assert two[0]["Author"] == "tester" and two[0]["Created"] == "2024-01-01T00:00:04Z"
    assert two[0]["Config"]["Labels"] == {"team": "x", "tier": "web"}
    assert len(two[0]["RootFS"]["Layers"]) == 3
    assert strata.out("inspect", "-f", "{{.Os}}/{{.Architecture}} {{json .RepoTags}}",
                      "app:1") == 'linux/arm64 ["app:1","busybox:latest"]\n'
    proc = strata("inspect", "app:1", "nosuch", check=False)
    assert proc.returncode == 1
    assert [x["Id"] for x in json.loads(proc.stdout)] == [image_id]
    assert proc.stderr.decode() == "Error: No such image: nosuch:latest\n"


def test_tag(strata: Strata, rootfs: Path) -> None:
    image_id = strata.out("import", str(rootfs), "app:1").strip()
    assert strata("tag", "app:1", "localhost:5000/x/y:z").stdout == b""
    strata("tag", image_id[7:15], "again")
    assert strata.out("images", "--format", "{{.Repository}}:{{.Tag}}").splitlines() == [
        "again:latest", "app:1", "localhost:5000/x/y:z"]
    proc = strata("tag", "nosuch", "x:1", check=False)
    assert (proc.returncode, proc.stderr) == (1, b"Error: No such image: nosuch:latest\n")
    proc = strata("tag", "app:1", "Bad:Tag:x", check=False)
    assert proc.returncode == 1 and b"invalid reference format" in proc.stderr


# -- rmi and prune --------------------------------------------------------------------------------


def test_rmi_output_and_exit_codes(strata: Strata, rootfs: Path, layered: str) -> None:
    image_id = strata.out("import", str(rootfs), "app:1").strip()
    strata("tag", "app:1", "app:2")
    strata("tag", "app:1", "other:1")
    assert strata.out("rmi", "app:1") == "Untagged: app:1\n"
    proc = strata("rmi", image_id[7:19], check=False)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode() == (f"Error: conflict: unable to delete {image_id[7:19]} (must "
                                    "be forced) - image is referenced in multiple repositories\n")
    proc = strata("rmi", "nosuch", "app:2", "alsonot:1", check=False)
    assert proc.returncode == 1
    assert proc.stdout.decode() == "Untagged: app:2\n"
    assert proc.stderr.decode() == ("Error: No such image: nosuch:latest\n"
                                    "Error: No such image: alsonot:1\n")
    out = strata.out("rmi", "other:1")
    assert out == (f"Untagged: other:1\nDeleted: {image_id}\nDeleted: {sha256(ROOTFS)}\n")
    strata("tag", layered, "web:1")
    strata("tag", layered, "web2:1")
    out = strata.out("image", "rm", "-f", layered[7:13])
    assert out.splitlines()[:3] == ["Untagged: web2:1", "Untagged: web:1",
                                    f"Deleted: {layered}"]
    assert len(out.splitlines()) == 3 + 3  # and its three layers
    assert strata.out("images", "-q") == ""


def test_image_prune(strata: Strata, rootfs: Path, layered: str) -> None:
    kept = strata.out("import", str(rootfs), "app:1").strip()
    dangling = strata.out("import", "-m", "x", str(rootfs)).strip()
    # without -f a closed stdin answers no
    proc = strata("image", "prune", input=b"")
    assert b"Are you sure you want to continue? [y/N]" in proc.stdout
    assert set(strata.out("images", "-q", "--no-trunc").split()) == {kept, dangling, layered}
    out = strata.out("image", "prune", "-f")
    head, _, tail = out.partition("\n\n")
    lines = head.splitlines()
    assert lines[0] == "Deleted Images:"
    # both images, then the layers no image needs any more: the layered image's three (the
    # dangling import shares its layer with app:1)
    assert set(lines[1:3]) == {f"deleted: {layered}", f"deleted: {dangling}"}
    assert len(lines) == 1 + 2 + 3 and all(x.startswith("deleted: sha256:") for x in lines[1:])
    assert re.fullmatch(r"Total reclaimed space: \d+(\.\d+)?[kM]?B\n", tail)
    assert strata.out("images", "-q", "--no-trunc").split() == [kept]
    assert strata.out("image", "prune", "-f") == "Total reclaimed space: 0B\n"
    out = strata.out("image", "prune", "-a", "-f")
    assert out.startswith(f"Deleted Images:\nuntagged: app:1\ndeleted: {kept}\n")
    assert re.search(r"\n\nTotal reclaimed space: \d(\.\d+)?MB\n$", out)
    assert strata.out("images") == "REPOSITORY   TAG       IMAGE ID   CREATED   SIZE\n"


# -- import, export, save, load -----------------------------------------------------------------


def test_import_from_stdin_and_export_to_stdout_or_file(strata: Strata, tmp_path: Path) -> None:
    image_id = strata.out("import", "-", "app:1", input=ROOTFS).strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id)
    (doc,) = json.loads(strata.out("inspect", "app:1"))
    assert doc["Id"] == image_id and doc["RootFS"]["Layers"] == [sha256(ROOTFS)]
    to_stdout = strata("export", "app:1").stdout
    assert strata("export", "app:1", "-o", str(tmp_path / "out.tar")).stdout == b""
    assert (tmp_path / "out.tar").read_bytes() == to_stdout
    assert tree_of_tar(to_stdout) == tree_of_tar(ROOTFS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar", "store"]  # no temp file
    proc = strata("export", "nosuch", "-o", str(tmp_path / "x.tar"), check=False)
    assert proc.returncode == 1 and not (tmp_path / "x.tar").exists()


def test_save_load_round_trip(strata: Strata, tmp_path: Path, rootfs: Path,
                              layered: str) -> None:
    imported = strata.out("import", "-c", "CMD [\"sh\"]", str(rootfs), "app:1").strip()
    strata("tag", "app:1", "app:2")
    strata("tag", layered, "web:1")
    exports = {i: strata("export", i).stdout for i in (imported, layered)}
    descriptor = strata.out("inspect", "-f", "{{json .Descriptor}}", imported)
    archive = strata("save", "app", "web:1").stdout
    strata("save", "-o", str(tmp_path / "s.tar"), "app", "web:1")
    assert (tmp_path / "s.tar").read_bytes() == archive  # deterministic
    strata("rmi", "-f", imported, layered)
    assert strata.out("images", "-q") == ""
    out = strata.out("load", input=archive)
    assert sorted(out.splitlines()) == ["Loaded image: app:1", "Loaded image: app:2",
                                        "Loaded image: web:1"]
    assert set(strata.out("images", "-q", "--no-trunc").split()) == {imported, layered}
    for image_id, data in exports.items():
        assert strata("export", image_id).stdout == data
    # the OCI layout inside the archive gives the stored manifest back, byte for byte
    assert strata.out("inspect", "-f", "{{json .Descriptor}}", imported) == descriptor
    # an image saved by ID has no name
    strata("save", "-o", str(tmp_path / "id.tar"), imported[7:19])
    strata("rmi", "app:1", "app:2")
    assert strata.out("load", "-i", str(tmp_path / "id.tar")) == f"Loaded image ID: {imported}\n"
    # --format oci keeps the stored manifest
    strata("save", "--format", "oci", "-o", str(tmp_path / "oci.tar"), "web:1")
    strata("rmi", "web:1")
    assert strata.out("load", "-i", str(tmp_path / "oci.tar")) == "Loaded image: web:1\n"
    assert strata("export", "web:1").stdout == exports[layered]


def test_load_platform_from_a_multi_platform_layout(strata: Strata, tmp_path: Path) -> None:
    amd = tmp_path / "amd"
    arm = tmp_path / "arm"
    a = oci_layout(str(amd), [tar_bytes([file("arch", b"amd64")])], arch="amd64")
    b = oci_layout(str(arm), [tar_bytes([file("arch", b"arm64")])], arch="arm64")
    # one layout: both images' blobs and an index choosing by platform
    for blob in (arm / "blobs" / "sha256").iterdir():
        (amd / "blobs" / "sha256" / blob.name).write_bytes(blob.read_bytes())
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []}
    for info, arch in ((a, "amd64"), (b, "arm64")):
        raw = (amd / "blobs" / "sha256" / info["manifest"][7:]).read_bytes()
        index["manifests"].append({"mediaType": oci.OCI_MANIFEST, "digest": info["manifest"],
                                   "size": len(raw),
                                   "platform": {"os": "linux", "architecture": arch}})
    raw = json.dumps(index).encode()
    (amd / "blobs" / "sha256" / sha256(raw)[7:]).write_bytes(raw)
    (amd / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [{
            "mediaType": oci.OCI_INDEX, "digest": sha256(raw), "size": len(raw),
            "annotations": {"org.opencontainers.image.ref.name": "localhost/multi:1"}}]}))
    assert strata.out("load", "--platform", "linux/arm64", "-i", str(amd)) == (
        "Loaded image: localhost/multi:1\n")
    assert tree_of_tar(strata("export", "localhost/multi:1").stdout)["arch"][5] == sha256(
        b"arm64")[7:]
    proc = strata("load", "--platform", "linux/s390x", "-i", str(amd), check=False)
    assert proc.returncode == 1 and b"no image for platform linux/s390x" in proc.stderr


def test_store_root_comes_from_strata_root_when_no_root_flag(tmp_path: Path,
                                                            rootfs: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "STRATA_ROOT": str(tmp_path / "envroot"),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "import", str(rootfs), "x:1"],
                          capture_output=True, env=env, timeout=60, check=True)
    image_id = proc.stdout.decode().strip()
    assert (tmp_path / "envroot" / "state.json").exists()
    assert Store(str(tmp_path / "envroot")).resolve("x:1").id == image_id
