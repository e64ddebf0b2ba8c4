"""``strata build`` on its own: the build cache (a rebuild runs nothing, a changed file reruns
from its COPY on, a changed build argument from the first step that uses it, ``--no-cache``),
intermediate images (hidden, pruned), the Python API's progress events, the CLI's flags
(``-q``, ``--iidfile``, ``-f -``), docker's WORKDIR, and bad input refused by name."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagestore import BuildEvent, BuildFileError, CopySourceError, Store, StoreError
from tests import builders as b
from tests.buildah import write_context
from tests.conftest import REPO, Strata, require_fuse, require_root

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def build(store: Store, ctx: Path, **kw: object) -> tuple[str, list[BuildEvent]]:
    events: list[BuildEvent] = []
    image = store.build(ctx, progress=events.append, **kw)  # type: ignore[arg-type]
    return image.id, events


def steps(events: list[BuildEvent]) -> dict[str, str]:
    """Each step's title (without its [i/n]) -> "CACHED" or "RAN"."""
    titles = {e.step: e.text.split("] ", 1)[-1] for e in events if e.kind == "step"}
    out = {}
    for e in events:
        if e.kind == "cached":
            out[titles[e.step]] = "CACHED"
        elif e.kind == "done":
            out[titles[e.step]] = "RAN"
    return out


DOCKERFILE = """FROM base
ARG WHERE=/default
ENV GREETING=hello
COPY a.txt /a/
COPY dir /dir/
ENV PLACE=$WHERE
COPY b.txt $WHERE/
LABEL done=yes
"""


def test_cache(store: Store, build_base: str, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": DOCKERFILE, "a.txt": "a\n",
                                           "b.txt": "b\n", "dir/f": "f\n"})
    first, ev = build(store, ctx, tags=["app"])
    assert set(steps(ev).values()) == {"RAN"}
    again, ev = build(store, ctx, tags=["app"])
    assert again == first
    s = steps(ev)
    assert [k for k, v in s.items() if v != "CACHED"] == ["FROM base"]
    assert store.mounts() == [] and not os.listdir(os.path.join(store.root, "mounts"))
    # touching a file is no change (content and metadata, not mtimes)
    os.utime(ctx / "dir" / "f", (1, 1))
    assert build(store, ctx)[0] == first
    # a changed file reruns from its COPY on
    (ctx / "dir" / "f").write_text("changed\n")
    changed, ev = build(store, ctx)
    s = steps(ev)
    assert changed != first
    assert s["COPY a.txt /a/"] == "CACHED" and s["ENV GREETING=hello"] == "CACHED"
    assert s["COPY dir /dir/"] == "RAN" and s["COPY b.txt $WHERE/"] == "RAN"
    # a mode change is a change
    os.chmod(ctx / "a.txt", 0o600)
    s = steps(build(store, ctx)[1])
    assert s["COPY a.txt /a/"] == "RAN"
    # a build argument reruns from the first step that uses it
    _, ev = build(store, ctx, build_args={"WHERE": "/elsewhere"})
    s = steps(ev)
    assert s["ARG WHERE=/default"] == "CACHED" and s["COPY dir /dir/"] == "CACHED"
    assert s["ENV PLACE=$WHERE"] == "RAN" and s["LABEL done=yes"] == "RAN"
    # --no-cache runs everything, and makes another image
    fresh, ev = build(store, ctx, no_cache=True)
    assert "CACHED" not in steps(ev).values()


def test_intermediate_images_hidden_and_pruned(strata: Strata, store: Store, build_base: str,
                                               tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": DOCKERFILE, "a.txt": "a\n",
                                           "b.txt": "b\n", "dir/f": "f\n"})
    image = store.build(ctx, tags=["app:1"])
    shown = strata.out("images", "-q", "--no-trunc").split()
    every = strata.out("images", "-a", "-q", "--no-trunc").split()
    assert image.id in shown and len(shown) == 2  # app:1 and base
    assert len(every) == 1 + 7  # base, and one image per step (the last is app:1)
    assert store.inspect(image)["Parent"] in every
    # the cache survives a prune while the image is tagged (its parents are not dangling)...
    strata("image", "prune", "-f")
    assert sorted(strata.out("images", "-a", "-q", "--no-trunc").split()) == sorted(every)
    _, ev = build(store, ctx)
    assert list(steps(ev).values()).count("CACHED") == 7
    # ... and goes with it
    strata("rmi", "app:1")
    strata("image", "prune", "-f")
    assert strata.out("images", "-a", "-q", "--no-trunc").split() == [
        store.resolve("base").id]
    assert b"no problems" in strata("check").stderr


def test_history_and_layers(store: Store, build_base: str, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM base\nENV A=1\nCOPY a.txt /\nCOPY a.txt /\nWORKDIR /usr\n"
                      "WORKDIR /made/here\nCMD [\"x\"]\n", "a.txt": "a\n"})
    image = store.build(ctx)
    rows = list(reversed(store.history(image)))[1:]
    assert [(re.sub("[0-9a-f]{64}", "H", r["created_by"]), r["empty_layer"])
            for r in rows] == [
        ("/bin/sh -c #(nop) ENV A=1", True),
        ("/bin/sh -c #(nop) COPY file:H in / ", False),
        ("/bin/sh -c #(nop) COPY file:H in / ", False),
        ("/bin/sh -c #(nop) WORKDIR /usr", True),  # exists: no layer
        ("/bin/sh -c #(nop) WORKDIR /made/here", False),  # docker makes it at once
        ('/bin/sh -c #(nop) CMD ["x"]', True),
    ]
    assert len(image.diff_ids) == 1 + 3
    with store.mount(image) as mp:
        assert (mp / "made" / "here").is_dir() and (mp / "a.txt").read_text() == "a\n"


def test_cli_flags(strata: Strata, build_base: str, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"a.txt": "a\n", "other.Dockerfile":
                                           "FROM base\nARG X\nCOPY a.txt /$X\n"})
    out = strata("build", "-q", "-f", str(ctx / "other.Dockerfile"), "--build-arg", "X=y",
                 "--build-arg", "UNUSED=1", "-t", "one", "-t", "two:t", "--iidfile",
                 str(tmp_path / "iid"), str(ctx))
    image_id = out.stdout.decode().strip()
    assert image_id.startswith("sha256:") and out.stderr == b""
    assert (tmp_path / "iid").read_text() == image_id
    assert strata.out("inspect", "-f", "{{.Id}}", "one", "two:t").split() == [image_id] * 2
    # progress: BuildKit's plain lines, the warning about an unused argument
    proc = strata("build", "-f", "-", "--build-arg", "UNUSED=1", str(ctx),
                  input=b"FROM base\nCOPY a.txt /\n")
    err = proc.stderr.decode()
    assert proc.stdout == b""
    assert "#1 [1/2] FROM base" in err and "#2 [2/2] COPY a.txt /" in err
    assert "#2 DONE" in err and "[Warning] One or more build-args [UNUSED] were not consumed" \
        in err
    again = strata("build", "-f", "-", str(ctx), input=b"FROM base\nCOPY a.txt /\n")
    assert "#2 CACHED" in again.stderr.decode()


@pytest.mark.parametrize("files, message", [
    ({"Dockerfile": "FROM base\n\nBOGUS x\n"}, "Dockerfile:3: unknown instruction: BOGUS"),
    ({"Dockerfile": "FROM base\nLABEL x\n"}, "Dockerfile:2: LABEL must have two arguments"),
    ({"Dockerfile": "FROM base\nCOPY ../outside /x\n"},
     "forbidden path outside the build context: ../outside"),
    ({"Dockerfile": "FROM base\nCOPY missing.txt /x\n"},
     "file not found in build context or excluded by .dockerignore: stat missing.txt"),
    ({"Dockerfile": "FROM base\nCOPY secret.txt /x\n", "secret.txt": "s",
      ".dockerignore": "secret.txt\n"}, "stat secret.txt: file does not exist"),
    ({"Dockerfile": "FROM base\nCOPY nomatch* /x/\n"}, "nomatch* matches nothing"),
    ({"Dockerfile": "FROM base\nCOPY a b /x\n", "a": "", "b": ""},
     "the destination must be a directory and end with a /"),
    ({"Dockerfile": "FROM base\nCOPY --chown=nosuch a /x\n", "a": ""}, "no such user: nosuch"),
    ({"Dockerfile": "FROM base\nCOPY --from=nostage /a /x\n"}, "nostage"),
    ({"Dockerfile": "FROM base\nENV X=${Y\n"}, "Dockerfile:2: failed to process"),
])
def test_bad_input(strata: Strata, build_base: str, tmp_path: Path, files: dict[str, str],
                   message: str) -> None:
    ctx = write_context(tmp_path / "ctx", files)
    before = strata.out("images", "-a", "-q", "--no-trunc")
    proc = strata("build", str(ctx), check=False)
    err = proc.stderr.decode()
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("Error: Dockerfile:") and message in last, err
    assert "Traceback" not in err
    assert strata.out("images", "-a", "-q", "--no-trunc") == before
    assert b"no problems" in strata("check").stderr


def test_api_errors_are_typed(store: Store, build_base: str, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM base\nCOPY nope /\n"})
    with pytest.raises(CopySourceError, match="nope"):
        store.build(ctx)
    with pytest.raises(BuildFileError, match="no stage of that name"):
        store.build(ctx, target="elsewhere")
    with pytest.raises(BuildFileError, match="not found"):
        store.build(tmp_path / "missing")


def _slow_server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An HTTP server on 127.0.0.1 whose answer never ends (an interrupted download)."""
    code = (
        "import http.server, sys, time\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('Content-Length', '1000000')\n"
        "        self.end_headers(); self.wfile.write(b'x'); self.wfile.flush()\n"
        "        time.sleep(60)\n"
        "    def log_message(self, *a): pass\n"
        "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)\n"
        "print(s.server_address[1], flush=True)\n"
        "s.serve_forever()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = proc.stdout.readline().decode().strip()
    return proc, f"http://127.0.0.1:{port}/slow"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_build_leaves_nothing(strata: Strata, store: Store, build_base: str,
                                          tmp_path: Path, sig: int) -> None:
    server, url = _slow_server(tmp_path)
    try:
        ctx = write_context(tmp_path / "ctx", {
            "Dockerfile": f"FROM base\nCOPY a.txt /\nADD {url} /slow\n", "a.txt": "a\n"})
        before = strata.out("images", "-a", "-q", "--no-trunc")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(store.root),
                                 "build", str(ctx)], env=env, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        for line in proc.stderr:  # until the step that hangs has begun
            if b"ADD" in line:
                break
        time.sleep(0.3)
        assert store.mounts(), "the stage's mount should be up"
        proc.send_signal(sig)
        proc.wait(30)
        proc.stderr.close()
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
                store.mounts() or str(store.root) in Path("/proc/self/mounts").read_text()):
            time.sleep(0.1)
        assert store.mounts() == []
        assert str(store.root) not in Path("/proc/self/mounts").read_text()
        while time.monotonic() < deadline and os.listdir(os.path.join(store.root, "tmp")):
            time.sleep(0.1)  # the daemon removes the stage's directory once it has unmounted
        assert b"no problems" in strata("check").stderr
        # the steps that finished keep their images (the cache, as docker keeps them); each
        # is whole, untagged, and nothing else was added
        after = strata.out("images", "-a", "-q", "--no-trunc").split()
        assert set(before.split()) <= set(after) and len(after) <= len(before.split()) + 1
        for image_id in set(after) - set(before.split()):
            assert not store.image(image_id).tags  # whole (it reads), and only the cache's
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


def test_pull_flag_and_missing_base(store: Store, tmp_path: Path, registry: object) -> None:
    """A base missing from the store is pulled; one present is used as it is, unless
    ``pull=True`` (``--pull``) fetches the registry's current one."""
    require_root()
    require_fuse()
    from tests.registry_helpers import skopeo_copy

    host = registry.host  # type: ignore[attr-defined]
    ref = f"{host}/test/build-pull:1"
    for version in (b"one\n", b"two\n"):
        layout = str(tmp_path / f"layout-{version.strip().decode()}")
        b.oci_layout(layout, [b.tar_bytes([*b.busybox_entries(),
                                           b.file("version", version)])])
    skopeo_copy(f"oci:{tmp_path / 'layout-one'}:latest", f"docker://{ref}")
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {ref}\nCOPY a /\n", "a": ""})

    def version(image_id: str) -> str:
        with store.mount(image_id) as mp:
            return (mp / "version").read_text()

    first, ev = build(store, ctx)
    assert version(first) == "one\n" and any(e.text == f"pull {ref}" for e in ev)
    skopeo_copy(f"oci:{tmp_path / 'layout-two'}:latest", f"docker://{ref}")
    again, ev = build(store, ctx)
    assert again == first and not any(e.text.startswith("pull ") for e in ev)
    pulled, ev = build(store, ctx, pull=True)
    assert version(pulled) == "two\n" and any(e.text == f"pull {ref}" for e in ev)


def test_dockerfile_and_dockerignore_excluded(strata: Strata, build_base: str,
                                              tmp_path: Path) -> None:
    """.dockerignore may exclude the Dockerfile and itself: the build still reads them, a COPY
    does not see them (docker's rule)."""
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM base\nCOPY . /ctx/\n", "kept": "k",
        ".dockerignore": "Dockerfile\n.dockerignore\n"})
    image = strata.out("build", "-q", str(ctx)).strip()
    with Store(str(strata.root)).mount(image) as mp:
        assert sorted(os.listdir(mp / "ctx")) == ["kept"]


def test_heredoc_copy_and_platform(store: Store, build_base: str, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        "FROM --platform=$BUILDPLATFORM base\nARG WHO=world\n"
        "COPY <<EOF /greeting\nhello $WHO\nEOF\n"
        "COPY <<'RAW' /raw\nkept $WHO\nRAW\n")})
    with store.mount(store.build(ctx)) as mp:
        assert (mp / "greeting").read_text() == "hello world\n"
        assert (mp / "raw").read_text() == "kept $WHO\n"
    with store.mount(store.build(ctx, build_args={"WHO": "you"})) as mp:
        assert (mp / "greeting").read_text() == "hello you\n"  # a new key: not the cache
    (ctx / "Dockerfile").write_text("FROM --platform=linux/s390x base\n")
    with pytest.raises(BuildFileError, match="host's platform"):
        store.build(ctx)


def test_add_url_mtime_and_checksum(store: Store, build_base: str, tmp_path: Path,
                                    http_files: str) -> None:
    import hashlib

    good = "sha256:" + hashlib.sha256(b"downloaded\n").hexdigest()
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        f"FROM base\nADD {http_files}/file.txt /plain/\n"
        f"ADD --checksum={good} {http_files}/file.txt /checked\n")})
    with store.mount(store.build(ctx)) as mp:
        st = os.stat(mp / "plain" / "file.txt")
        assert st.st_mtime == 1_600_000_000 and st.st_mode & 0o7777 == 0o600
        assert (mp / "checked").read_bytes() == b"downloaded\n"
    bad = "sha256:" + "0" * 64
    (ctx / "Dockerfile").write_text(f"FROM base\nADD --checksum={bad} {http_files}/file.txt "
                                    "/x\n")
    with pytest.raises(StoreError, match="digest mismatch"):
        store.build(ctx)
    (ctx / "Dockerfile").write_text(f"FROM base\nADD {http_files}/missing /x\n")
    with pytest.raises(StoreError, match="404"):
        store.build(ctx)
    (ctx / "Dockerfile").write_text(f"FROM base\nCOPY {http_files}/file.txt /x\n")
    with pytest.raises(BuildFileError, match="COPY cannot take a URL"):
        store.build(ctx)


def test_built_image_is_a_normal_image(strata: Strata, build_base: str, tmp_path: Path,
                                       registry: object) -> None:
    """A built image pushes, pulls elsewhere and mounts like any other."""
    host = registry.host  # type: ignore[attr-defined]
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM base\nCOPY a /a\nCMD [\"x\"]\n",
                                           "a": "payload\n"})
    strata("build", "-q", "-t", f"{host}/test/built:1", str(ctx))
    strata("push", "-q", f"{host}/test/built:1")
    other = Strata(tmp_path / "other-store")
    other("pull", "-q", f"{host}/test/built:1")
    with Store(str(other.root)).mount(f"{host}/test/built:1") as mp:
        assert (mp / "a").read_text() == "payload\n"
    assert strata.out("inspect", "-f", "{{.Id}}", f"{host}/test/built:1") == \
        other.out("inspect", "-f", "{{.Id}}", f"{host}/test/built:1")


def test_fifo_in_place_of_passwd_does_not_hang(strata: Strata, tmp_path: Path) -> None:
    """An image whose /etc/passwd and /etc/group are FIFOs: RUN and COPY --chown read them as
    missing (they are no regular files) instead of blocking in open(2) for ever.  (The
    command itself must not read them: busybox's ``id`` would wait for ever, under docker
    too.)"""
    require_root()
    require_fuse()
    from tests.conftest import build_base_entries

    entries = [e for e in build_base_entries() if e.name not in ("etc/passwd", "etc/group")]
    layout = str(tmp_path / "layout")
    b.oci_layout(layout, [b.tar_bytes([*entries, b.fifo("etc/passwd"), b.fifo("etc/group")])],
                 config={"config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}})
    strata("tag", strata.out("load", "-q", "-i", layout).split()[-1], "fifo-base")
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM fifo-base\nCOPY --chown=1000 a.txt /a.txt\nRUN echo ran > /ran\n",
        "a.txt": "a\n"})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run([sys.executable, "-m", "cli.main", "--root", str(strata.root),
                               "build", "-q", str(ctx)], env=env, capture_output=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the build hangs on the image's FIFOs")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"no problems" in strata("check").stderr
