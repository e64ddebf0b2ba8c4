"""The Store facade without FUSE: import, tags, name resolution, rmi, prune, garbage collection
and several processes changing one store at once."""

from __future__ import annotations

import bz2
import io
import json
import lzma
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import pytest

from imagestore import Image, Store, archive, changeset, commit, gc, images, oci, reference
from imagestore.digest import sha256_bytes
from imagestore.errors import Ambiguous, Conflict, ImageNotFound, InvalidImage, InvalidReference
from imagestore.instructions import InvalidChange
from tests.builders import (
    busybox_entries,
    compress,
    d,
    file,
    link,
    listing,
    oci_layout,
    sha256,
    sym,
    tar_bytes,
    tree_of_tar,
    whiteout,
)
from unionfs.resolve import UnionView

ROOTFS = tar_bytes(busybox_entries() + [file("etc/motd", b"welcome\n")])


def small_tar(tag: str) -> bytes:
    """A tiny rootfs whose content depends on ``tag`` (so every call gives a new layer)."""
    return tar_bytes([d("etc"), file("etc/id", tag.encode()), sym("etc/link", "id")])


def do_import(store: Store, data: bytes, tag: str | None = None, **kw: Any) -> Image:
    return commit.import_rootfs(store, io.BytesIO(data), source="test.tar",
                                tag=reference.parse_repo_tag(tag) if tag else None, **kw)


def export(store: Store, image: Image) -> bytes:
    out = io.BytesIO()
    with store.layers.opened(store.layers.stack(image.diff_ids)) as layers:
        changeset.export_rootfs(UnionView(layers), out.write)
    return out.getvalue()


def stored_content(store: Store) -> tuple[set[str], set[str]]:
    """Blob digests and layer diff_ids on disk."""
    return set(store.blobs.digests()), set(store.layers.diff_ids())


def assert_consistent(store: Store) -> None:
    """state.json parses, every tag names a stored image, every image's manifest, config,
    blobs and layers are present and sound."""
    with open(os.path.join(store.root, "state.json"), "rb") as f:
        doc = json.load(f)
    for tag, image_id in doc["tags"].items():
        assert image_id in doc["images"], f"tag {tag} names a missing image"
    for image in store.images():
        assert store.blobs.verify(image.manifest_desc.digest)
        assert store.blobs.verify(image.id)
        for desc in image.manifest.layers:
            assert store.blobs.has(desc.digest), f"{image.id}: blob {desc.digest} is gone"
        for diff_id in image.diff_ids:
            assert store.layers.check(diff_id) == []


# -- import ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd", "bzip2", "xz"])
def test_import_accepts_raw_and_compressed_tars(store: Store, kind: str) -> None:
    packed = {"bzip2": bz2.compress, "xz": lzma.compress}.get(kind, lambda b: compress(b, kind))
    image = do_import(store, packed(ROOTFS), "demo/bb:1")
    # the layer is the uncompressed tar, whatever the input was
    assert image.diff_ids == [sha256(ROOTFS)]
    assert [x.digest for x in image.manifest.layers] == [sha256(ROOTFS)]
    with open(store.layers.tar_path(image.diff_ids[0]), "rb") as f:
        assert f.read() == ROOTFS
    assert tree_of_tar(export(store, image)) == tree_of_tar(ROOTFS)
    assert store.resolve("demo/bb:1").id == image.id
    assert image.size == len(busybox_entries()[1].data) + len(b"welcome\n") + sum(
        len(e.data) for e in busybox_entries()[4:7])
    assert_consistent(store)


def test_import_config_is_canonical_with_changes_history_and_platform(store: Store) -> None:
    image = do_import(store, ROOTFS, "demo/bb:1", changes=[
        'CMD ["/bin/sh", "-c", "echo hi"]',
        "ENTRYPOINT /bin/entry --flag",
        "ENV A=1 B=two",
        "ENV PATH=/usr/bin:$A",
        "EXPOSE 8080 53/udp",
        'LABEL org.example.k="v 1" other=x',
        "USER nobody",
        "VOLUME /data /cache",
        "WORKDIR /srv",
        "WORKDIR app",
        "STOPSIGNAL SIGTERM",
        "ONBUILD RUN make",
        "HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/",
    ], message="my import", platform=oci.Platform.parse("linux/arm/v7"))
    cfg = json.loads(image.config.raw)
    assert cfg["architecture"] == "arm" and cfg["variant"] == "v7" and cfg["os"] == "linux"
    c = cfg["config"]
    assert c["Entrypoint"] == ["/bin/sh", "-c", "/bin/entry --flag"]
    # ENTRYPOINT after CMD clears the inherited CMD only when no CMD change came first
    assert c["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert c["Env"] == ["A=1", "B=two", "PATH=/usr/bin:1"]
    assert c["ExposedPorts"] == {"53/udp": {}, "8080/tcp": {}}
    assert c["Labels"] == {"org.example.k": "v 1", "other": "x"}
    assert c["User"] == "nobody"
    assert c["Volumes"] == {"/cache": {}, "/data": {}}
    assert c["WorkingDir"] == "/srv/app"
    assert c["StopSignal"] == "SIGTERM"
    assert c["OnBuild"] == ["RUN make"]
    assert c["Healthcheck"] == {"Test": ["CMD-SHELL", "curl -f http://localhost/"],
                                "Interval": 5_000_000_000, "Retries": 3}
    assert cfg["history"] == [{"created": cfg["created"], "comment": "my import"}]
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [sha256(ROOTFS)]}
    # the stored bytes are the Go-marshal form, so skopeo's re-marshal keeps the image ID
    assert image.config.raw == oci.canonical_config(cfg)
    assert image.id == sha256_bytes(image.config.raw)
    assert image.config.labels == {"org.example.k": "v 1", "other": "x"}


def test_import_defaults_comment_and_host_platform(store: Store) -> None:
    image = do_import(store, ROOTFS)
    assert image.tags == ()
    assert image.config.history == [{"created": image.created,
                                     "comment": "Imported from test.tar"}]
    host = oci.host_platform()
    assert (image.config.platform.os, image.config.platform.architecture) == (
        host.os, host.architecture)


@pytest.mark.parametrize("change", ["RUN make", "COPY a b", "ADD x y", "FROM busybox",
                                    "BOGUS x", "HEALTHCHECK --interval=5 CMD x"])
def test_import_refuses_bad_changes_and_stores_nothing(store: Store, change: str) -> None:
    do_import(store, small_tar("keep"), "keep:1")
    before = listing(store.root)
    with pytest.raises(InvalidChange):
        do_import(store, ROOTFS, "demo:1", changes=[change])
    assert listing(store.root) == before


def test_reimport_of_the_same_tar_shares_the_layer(store: Store) -> None:
    a = do_import(store, ROOTFS, "a:1", message="one")
    b = do_import(store, ROOTFS, "b:1", message="two")
    assert a.id != b.id and a.diff_ids == b.diff_ids
    assert store.layers.diff_ids() == a.diff_ids


# -- tags and name resolution -------------------------------------------------------------------


def test_tag_and_every_form_of_name_resolves(store: Store) -> None:
    image = do_import(store, ROOTFS, "demo/bb:1.0")
    hexid = image.id.partition(":")[2]
    ref = store.tag(hexid[:12], "localhost:5000/team/bb:v2")
    assert str(ref) == "localhost:5000/team/bb:v2"
    store.tag("demo/bb:1.0", "busybox")
    for name in ("demo/bb:1.0", "docker.io/demo/bb:1.0", "busybox", "busybox:latest",
                 "docker.io/library/busybox:latest", "library/busybox", "localhost:5000/team/bb:v2",
                 image.id, hexid, hexid[:12], hexid[:5], "sha256:" + hexid[:12]):
        assert store.resolve(name).id == image.id, name
    assert [t.familiar for t in store.resolve(image.id).tags] == [
        "busybox:latest", "demo/bb:1.0", "localhost:5000/team/bb:v2"]


def test_tag_moves_a_name_and_leaves_the_old_image_dangling(store: Store) -> None:
    old = do_import(store, small_tar("old"), "app:1")
    new = do_import(store, small_tar("new"))
    store.tag(new.id, "app:1")
    assert store.resolve("app:1").id == new.id
    assert store.image(old.id).tags == ()


@pytest.mark.parametrize("src, dst, error", [
    ("nosuch:1", "x:1", ImageNotFound),
    ("app:1", "x@sha256:" + "a" * 64, InvalidReference),
    ("app:1", "UPPER", InvalidReference),
    ("app:1", "a:b:c", InvalidReference),
])
def test_tag_refuses_bad_names(store: Store, src: str, dst: str, error: type) -> None:
    do_import(store, small_tar("x"), "app:1")
    before = listing(store.root)
    with pytest.raises(error):
        store.tag(src, dst)
    assert listing(store.root) == before


def test_a_unique_prefix_resolves_and_a_shared_one_is_ambiguous(store: Store) -> None:
    by_first: dict[str, list[Image]] = {}
    n = 0
    while not any(len(v) > 1 for v in by_first.values()):
        image = do_import(store, small_tar(f"img{n}"))
        by_first.setdefault(image.id[7], []).append(image)
        n += 1
    first, pair = next((k, v) for k, v in by_first.items() if len(v) > 1)
    with pytest.raises(Ambiguous, match=f"short ID {first} is ambiguous"):
        store.resolve(first)
    for image in pair:
        hexid = image.id[7:]
        unique = next(hexid[:i] for i in range(2, 65)
                      if not any(o.id[7:].startswith(hexid[:i]) for o in store.images()
                                 if o.id != image.id))
        assert store.resolve(unique).id == image.id
    with pytest.raises(ImageNotFound, match="No such image: nosuch:latest"):
        store.resolve("nosuch")
    with pytest.raises(ImageNotFound):
        store.resolve("f" * 64)


def test_name_at_digest_resolves_by_repo_digest_and_manifest_digest(store: Store) -> None:
    image = do_import(store, ROOTFS, "demo/bb:1")
    mdigest = image.manifest_desc.digest
    assert store.resolve(f"demo/bb@{mdigest}").id == image.id
    # a repo digest recorded when the image came from a registry (another manifest, same image)
    other = oci.manifest_bytes(image.manifest.config, image.manifest.layers,
                               annotations={"k": "v"})
    odigest = sha256_bytes(other)
    images.record(store, other, oci.OCI_MANIFEST, repo_digest=f"localhost:5000/bb@{odigest}")
    assert store.resolve(f"localhost:5000/bb@{odigest}").id == image.id
    assert store.image(image.id).repo_digests == (f"localhost:5000/bb@{odigest}",)
    with pytest.raises(ImageNotFound):
        store.resolve("demo/bb@sha256:" + "0" * 64)


# -- rmi ------------------------------------------------------------------------------------------


def test_rmi_untags_while_other_tags_remain_then_deletes(store: Store) -> None:
    image = do_import(store, ROOTFS, "demo/bb:1")
    store.tag("demo/bb:1", "demo/bb:2")
    r = store.remove("demo/bb:1")
    assert (r.untagged, r.deleted) == (("demo/bb:1",), ())
    assert store.resolve("demo/bb:2").id == image.id
    with pytest.raises(ImageNotFound):
        store.resolve("demo/bb:1")
    r = store.remove("demo/bb:2")
    assert r.untagged == ("demo/bb:2",)
    assert r.deleted == (image.id, *image.diff_ids)
    assert store.images() == []
    assert stored_content(store) == (set(), set())


def test_rmi_by_id_with_tags_in_several_repositories_needs_force(store: Store) -> None:
    image = do_import(store, ROOTFS, "a:1")
    store.tag("a:1", "b:1")
    before = listing(store.root)
    with pytest.raises(Conflict, match=f"conflict: unable to delete {image.short_id} "
                                       r"\(must be forced\) - image is referenced in multiple "
                                       "repositories"):
        store.remove(image.short_id)
    assert listing(store.root) == before
    r = store.remove(image.short_id, force=True)
    assert sorted(r.untagged) == ["a:1", "b:1"] and r.deleted[0] == image.id
    assert store.images() == []


def test_rmi_by_id_with_two_tags_of_one_repository_needs_force_as_docker(store: Store) -> None:
    # docker's isSingleReference: at most one tag, so two tags of one repository conflict too
    image = do_import(store, ROOTFS, "a:1")
    store.tag("a:1", "a:2")
    with pytest.raises(Conflict, match="must be forced"):
        store.remove(image.id)
    assert store.remove(image.id, force=True).deleted[0] == image.id


def test_rmi_by_id_with_one_tag_untags_and_deletes(store: Store) -> None:
    image = do_import(store, ROOTFS, "a:1")
    r = store.remove(image.id[7:19])
    assert r.untagged == ("a:1",) and r.deleted[0] == image.id


def test_rmi_of_the_last_tag_drops_repo_digests_of_that_repository(store: Store) -> None:
    image = do_import(store, ROOTFS, "localhost:5000/bb:1")
    images.record(store, image.manifest.raw, oci.OCI_MANIFEST,
                    repo_digest=f"localhost:5000/bb@{image.manifest_desc.digest}")
    r = store.remove("localhost:5000/bb:1")
    assert r.untagged == ("localhost:5000/bb:1",
                          f"localhost:5000/bb@{image.manifest_desc.digest}")
    assert r.deleted[0] == image.id


def test_rmi_keeps_an_image_another_repository_still_references(store: Store) -> None:
    image = do_import(store, ROOTFS, "a:1")
    pinned = f"localhost:5000/b@{image.manifest_desc.digest}"
    images.record(store, image.manifest.raw, oci.OCI_MANIFEST, repo_digest=pinned)
    r = store.remove("a:1")
    assert (r.untagged, r.deleted) == (("a:1",), ())
    assert store.resolve(pinned).id == image.id
    r = store.remove(pinned)  # a digest reference is removed like a tag
    assert r.untagged == (pinned,) and r.deleted[0] == image.id
    assert store.images() == []


def test_rmi_by_a_digest_that_is_no_reference_names_the_image(store: Store) -> None:
    image = do_import(store, ROOTFS, "a:1")
    store.tag("a:1", "a:2")
    with pytest.raises(Conflict):
        store.remove(f"a@{image.manifest_desc.digest}")
    r = store.remove(f"a@{image.manifest_desc.digest}", force=True)
    assert r.untagged == ("a:1", "a:2") and r.deleted[0] == image.id


def test_rmi_of_a_missing_image_changes_nothing(store: Store) -> None:
    do_import(store, ROOTFS, "a:1")
    before = listing(store.root)
    with pytest.raises(ImageNotFound, match="No such image: nosuch:latest"):
        store.remove("nosuch")
    assert listing(store.root) == before


def test_rmi_keeps_layers_another_image_uses(store: Store) -> None:
    base = tar_bytes(busybox_entries())
    top = tar_bytes([whiteout("etc/group"), file("etc/motd", b"x")])
    layout = str(Path(store.root).parent / "layout")
    oci_layout(layout, [base, top], tag="v1")
    (loaded,) = archive.load(store, layout)
    imported = do_import(store, base, "flat:1")
    assert imported.diff_ids == [loaded.image.diff_ids[0]]
    want = tree_of_tar(export(store, loaded.image))
    r = store.remove("flat:1")
    assert r.deleted == (imported.id,)  # the shared layer stays
    assert tree_of_tar(export(store, store.image(loaded.image.id))) == want
    assert_consistent(store)


# -- prune and garbage collection ---------------------------------------------------------------


def _disk_bytes(root: str) -> int:
    """Bytes of content (blobs and layers) on disk, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in [*os.walk(os.path.join(root, "blobs")),
                                  *os.walk(os.path.join(root, "layers"))]:
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _build_mixed_store(store: Store, tmp: Path) -> dict[str, Image]:
    """Images that share layers in every way: a loaded gzip image, an import of its base
    layer (uncompressed blob = layer tar), a dangling re-import, a zstd load of the same base."""
    base = tar_bytes(busybox_entries())
    mid = tar_bytes([d("opt"), file("opt/a", b"a" * 5000), link("opt/b", "opt/a")])
    top = tar_bytes([whiteout("opt/b"), file("etc/motd", b"top")])
    oci_layout(str(tmp / "gz"), [base, mid, top], tag="v1", compression="gzip")
    oci_layout(str(tmp / "zs"), [base, mid], tag="v2", compression="zstd",
               config={"created": "2023-01-01T00:00:00Z"})
    images = {
        "gz": archive.load(store, str(tmp / "gz"))[0].image,
        "zs": archive.load(store, str(tmp / "zs"))[0].image,
        "flat": do_import(store, base, "flat:1"),
        "dangling": do_import(store, base, message="nobody names me"),
        "old": do_import(store, small_tar("old"), "moved:1"),
    }
    store.tag(images["gz"].id, "gz:1")
    store.tag(images["zs"].id, "zs:1")
    store.tag(images["flat"].id, "moved:1")  # "old" becomes dangling
    return images


def test_prune_deletes_dangling_images_only_and_gc_keeps_what_others_need(
        store: Store, tmp_path: Path) -> None:
    images = _build_mixed_store(store, tmp_path)
    exports = {k: tree_of_tar(export(store, v)) for k, v in images.items()}
    disk = _disk_bytes(store.root)
    r = store.prune()
    assert set(r.deleted) >= {images["dangling"].id, images["old"].id}
    assert r.untagged == ()
    assert {i.id for i in store.images()} == {images[k].id for k in ("gz", "zs", "flat")}
    assert r.reclaimed == disk - _disk_bytes(store.root)
    for key in ("gz", "zs", "flat"):
        assert tree_of_tar(export(store, store.image(images[key].id))) == exports[key]
    assert_consistent(store)
    # exactly what the remaining images name is left
    keep_blobs, keep_layers = gc.referenced(store, store.state.read())
    assert stored_content(store) == (keep_blobs, keep_layers)
    assert os.listdir(store.blobs.tmp_dir) == []
    assert store.prune().deleted == ()


def test_prune_all_deletes_every_image_and_all_content(store: Store, tmp_path: Path) -> None:
    images = _build_mixed_store(store, tmp_path)
    disk = _disk_bytes(store.root)
    r = store.prune(all_images=True)
    assert set(images[k].id for k in images) <= set(r.deleted)
    assert sorted(r.untagged) == ["flat:1", "gz:1", "moved:1", "zs:1"]
    assert store.images() == []
    assert stored_content(store) == (set(), set())
    assert r.reclaimed == disk - _disk_bytes(store.root)


def test_rmi_one_by_one_never_breaks_the_remaining_images(store: Store, tmp_path: Path) -> None:
    images = _build_mixed_store(store, tmp_path)
    exports = {k: tree_of_tar(export(store, v)) for k, v in images.items()}
    order = ["zs", "dangling", "gz", "old", "flat"]
    for n, key in enumerate(order):
        store.remove(images[key].id, force=True)
        for rest in order[n + 1:]:
            assert tree_of_tar(export(store, store.image(images[rest].id))) == exports[rest]
        assert_consistent(store)
        assert stored_content(store) == gc.referenced(store, store.state.read())
    assert stored_content(store) == (set(), set())


# -- several processes at once --------------------------------------------------------------------


def _worker(root: str, seed: int, rounds: int, errors: Any) -> None:
    rng = random.Random(seed)
    store = Store(root)
    try:
        for i in range(rounds):
            op = rng.choice(["import", "import", "tag", "rmi", "rmi", "prune", "export"])
            shared = rng.random() < 0.5
            # listing never fails, whatever the other processes are removing meanwhile
            images = store.images()
            if op == "import":
                data = ROOTFS if shared else small_tar(f"w{seed}-{i}")
                do_import(store, data, f"w{seed}:{i}", message=f"{seed}-{i}")
            elif op == "prune":
                store.prune(all_images=rng.random() < 0.2)
            elif images:
                image = rng.choice(images)
                try:
                    if op == "tag":
                        store.tag(image.id, f"t{rng.randrange(4)}:x")
                    elif op == "rmi":
                        store.remove(image.id, force=True)
                    else:
                        export(store, image)
                except ImageNotFound as exc:
                    # another process removed it first: then it must be gone
                    assert image.id not in store.state.read().images, exc
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        errors.put(f"worker {seed}: {exc!r}\n{traceback.format_exc()}")


def test_concurrent_processes_leave_a_consistent_store(store: Store) -> None:
    do_import(store, ROOTFS, "seed:1")
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(store.root, seed, 30, errors))
             for seed in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert_consistent(store)
    st = store.state.read()
    for tag in st.tags:
        assert store.resolve(tag).id == st.tags[tag]
    for image in store.images():
        assert tree_of_tar(export(store, image))
    store.prune()
    assert_consistent(store)
    assert stored_content(store) == gc.referenced(store, store.state.read())
    assert os.listdir(store.blobs.tmp_dir) == []


def test_readers_skip_an_image_removed_after_they_read_the_state(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # the interleaving a concurrent rmi causes: state read, then the image and its blobs go
    gone = do_import(store, small_tar("gone"), "gone:1")
    kept = do_import(store, small_tar("kept"), "kept:1")
    stale = store.state.read()
    Store(store.root).remove("gone:1")
    reads = iter([stale])
    fresh = store.state.read
    monkeypatch.setattr(store.state, "read", lambda: next(reads, None) or fresh())
    assert [i.id for i in store.images()] == [kept.id]
    assert gone.id in stale.images
    reads = iter([stale])
    with pytest.raises(ImageNotFound, match="No such image: gone:1"):
        store.resolve("gone:1")
    # a blob missing from an image still recorded is corruption, not a race
    os.unlink(store.blobs.path(kept.manifest_desc.digest))
    with pytest.raises(InvalidImage, match="is damaged .*is missing from the store"):
        store.images()
    damaged: list[InvalidImage] = []
    assert store.images(damaged=damaged.append) == [] and len(damaged) == 1


def test_state_json_is_replaced_atomically(store: Store) -> None:
    do_import(store, ROOTFS, "a:1")
    path = os.path.join(store.root, "state.json")
    ino = os.stat(path).st_ino
    store.tag("a:1", "b:1")
    assert os.stat(path).st_ino != ino  # a new file renamed over the old one
    assert os.listdir(store.blobs.tmp_dir) == []

