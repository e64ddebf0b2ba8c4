"""Every fixture of the suite lives here (HOUSE-STYLE: conftest owns fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagestore import Store
from tests.forkserver import ForkServer, Warm

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """The path of a tool the test needs.  Missing: a skip with the reason on a developer
    machine, a failure under CI (where .ci/run installs everything)."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (the README's test command installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        msg = "needs root (CI runs as root)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_root: Path) -> Iterator[Store]:
    yield Store(str(store_root))


class Strata:
    """Runs the real ``strata`` command (a subprocess) against one store root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, input: bytes | None = None, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-m", "cli.main", "--root", str(self.root), *args],
            input=input, capture_output=True, env=full_env, timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"strata {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stderr.decode(errors='replace')}")
        return proc

    def out(self, *args: str, **kw: object) -> str:
        return self(*args, **kw).stdout.decode()  # type: ignore[arg-type]


@pytest.fixture
def strata(store_root: Path) -> Strata:
    return Strata(store_root)


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """One warm strata process for the session (tests/forkserver.py)."""
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


def tmpfs(path: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` at ``path`` (root only)."""
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(path)], check=True, capture_output=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_fs("24m")``: a fresh tmpfs of that size (a file system to fill up), unmounted
    at teardown with whatever is mounted inside it."""
    made: list[Path] = []

    def make(size: str) -> Path:
        path = tmp_path / f"small{len(made)}"
        tmpfs(path, size)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        with open("/proc/self/mountinfo") as f:
            inside = [line.split()[4] for line in f if line.split()[4].startswith(f"{path}/")]
        for mp in reversed(inside):
            force_unmount(mp)
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path, leave: int) -> Path:
    """Fill the file system at ``fs`` until ``leave`` bytes are free; returns the filler."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        size = max(0, st.f_bavail * st.f_frsize - leave)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            n = f.write(chunk[: min(size, len(chunk))])
            size -= n
    return filler


@pytest.fixture
def ram_warm(fork_server: ForkServer, tmp_path: Path) -> Iterator[Warm]:
    """``warm`` on a store in a 1 GiB tmpfs: kill -9 loops run hundreds of writing commands
    and a process kill needs no fsync to be survived (the page cache outlives the process);
    on a disk the fsyncs alone would take most of the CI budget."""
    ram = tmp_path / "ram"
    tmpfs(ram, "1g")
    try:
        yield Warm(fork_server, ram / "store")
    finally:
        with open("/proc/self/mountinfo") as f:
            inside = [line.split()[4] for line in f if line.split()[4].startswith(f"{ram}/")]
        for mp in reversed(inside):
            force_unmount(mp)
        subprocess.run(["umount", "-l", str(ram)], capture_output=True)


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A directory hostile images aim their symlinks at; after the test it must be exactly as
    it was, and no file named with the corpus' token may exist where an escape would land
    (the roots the CLI and the daemon write near: /, /etc, /tmp, /var/tmp, the repository,
    this test's tmp_path)."""
    from tests.builders import tree_of_dir
    from tests.hostile.corpus import TOKEN

    c = tmp_path / "canary"
    c.mkdir()
    (c / "passwd").write_bytes(b"canary\n")
    (c / "sub").mkdir()
    before = tree_of_dir(str(c))
    yield c
    assert tree_of_dir(str(c)) == before, "something was written through a symlink"
    places = [Path(p) for p in ("/", "/etc", "/tmp", "/var/tmp", "/root")] + [REPO, tmp_path,
                                                                             c.parent.parent]
    leaks = [str(p / n) for p in places if p.is_dir() for n in os.listdir(p) if TOKEN in n]
    for dirpath, dirs, files in os.walk(tmp_path):
        dirs[:] = [x for x in dirs if not os.path.ismount(os.path.join(dirpath, x))]
        leaks += [os.path.join(dirpath, n) for n in dirs + files if TOKEN in n]
    assert not leaks, f"hostile names landed outside the store: {leaks}"


@pytest.fixture
def warm(fork_server: ForkServer, store_root: Path) -> Warm:
    """``strata`` on the test's store through the fork server: the same CLI code, no
    interpreter start-up per command (for tests that run hundreds of commands)."""
    return Warm(fork_server, store_root)


@pytest.fixture
def skopeo() -> str:
    return require_tool("skopeo")


@pytest.fixture
def umoci() -> str:
    return require_tool("umoci")


@pytest.fixture
def run() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    def _run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(list(cmd), capture_output=True, timeout=300, **kw)  # type: ignore[call-overload]
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
        return proc  # type: ignore[no-any-return]

    return _run


# -- mounts ---------------------------------------------------------------------------------------


def require_fuse() -> None:
    """Real mounts need /dev/fuse and fusermount3; skipped with the exact reason otherwise
    (a failure under CI)."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package fuse3)")
    if problems:
        msg = "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def is_mounted(path: str | Path) -> bool:
    full = os.path.realpath(str(path))
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == full for line in f)


def mounted_under(top: str | Path) -> list[str]:
    """Mount points below ``top``, deepest first."""
    with open("/proc/self/mountinfo") as f:
        found = [line.split()[4] for line in f if line.split()[4].startswith(f"{top}/")]
    return sorted(found, key=len, reverse=True)


def force_unmount(path: str | Path) -> None:
    """Last-resort cleanup: lazy unmount whatever is mounted at ``path``."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True)


class Mounter:
    """Mounts made by a test (strata and kernel overlayfs), always unmounted at teardown."""

    def __init__(self, strata: Strata, tmp: Path) -> None:
        self.strata = strata
        self.tmp = tmp
        self.active: list[Path] = []

    def mountpoint(self, name: str) -> Path:
        mp = self.tmp / name
        mp.mkdir(parents=True, exist_ok=True)
        return mp

    def mount(self, *args: str, at: Path) -> Path:
        self.strata("mount", *args, str(at))
        self.active.append(at)
        return at

    def overlay(self, lowers: list[Path], at: Path, upper: Path | None = None,
                work: Path | None = None, extra: str = "") -> Path:
        opts = "lowerdir=" + ":".join(str(x) for x in lowers)
        if upper is not None and work is not None:
            opts += f",upperdir={upper},workdir={work}"
        if extra:
            opts += "," + extra
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(at)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"mount -t overlay failed: {proc.stderr}")
        self.active.append(at)
        return at

    def umount(self, at: Path) -> None:
        if at in self.active:
            self.active.remove(at)
        proc = subprocess.run(["umount", str(at)], capture_output=True, text=True)
        if proc.returncode != 0 and is_mounted(at):
            force_unmount(at)
        self._wait_daemons(at)

    def _wait_daemons(self, at: Path) -> None:
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recs = self.strata.out("mounts", "-q").split()
            if str(at) not in recs:
                return
            time.sleep(0.05)

    def cleanup(self) -> None:
        for at in reversed(self.active):
            force_unmount(at)
        self.active.clear()
        for left in mounted_under(self.strata.root):  # a kernel engine's lower, left behind
            force_unmount(left)
        # kill any daemon of this store that outlived its mount
        mounts = self.strata.root / "mounts"
        if mounts.is_dir():
            import json
            import signal

            for rec in mounts.glob("*.json"):
                try:
                    pid = json.loads(rec.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass


@pytest.fixture
def sample_image(strata: Strata, tmp_path: Path) -> str:
    """``test/image:v1`` in the store, loaded from an OCI layout (``tmp_path/layout``, tag v1)
    built from ``builders.sample_layers``."""
    from tests.builders import oci_layout, sample_layers

    require_root()  # device nodes and owners in the layers
    oci_layout(str(tmp_path / "layout"), sample_layers(), tag="v1", compression="gzip",
               config={"config": {"Cmd": ["/bin/sh"]}})
    out = strata.out("load", "-i", str(tmp_path / "layout"))
    strata("tag", out.split()[-1], "test/image:v1")
    return "test/image:v1"


@pytest.fixture(params=["fuse", "kernel"])
def engine(request: pytest.FixtureRequest) -> str:
    """A writable container's mount engine (``strata mount --engine``), for the tests that run
    under both: strata's FUSE union, and kernel overlayfs over a FUSE mount of the image."""
    if request.param == "kernel":
        require_root()
    return str(request.param)


@pytest.fixture
def mounter(strata: Strata, tmp_path: Path) -> Iterator[Mounter]:
    require_fuse()
    m = Mounter(strata, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


# =================================================================================================
# registry: a real docker-registry process (CNCF distribution) on 127.0.0.1, its auth variants,
# the test images pushed into it with skopeo, and a fault proxy.  Helpers: tests/registry_helpers.py
# (processes and servers) and tests/registry_images.py (test images, oracles).
# =================================================================================================

from tests import builders as _b  # noqa: E402
from tests import registry_helpers as _rh  # noqa: E402
from tests import registry_images as _ri  # noqa: E402

REGISTRY_USERS = {"alice": "wonderland", "bob": "builder"}


@pytest.fixture(scope="session")
def registry_tools() -> None:
    require_tool("docker-registry")
    require_tool("skopeo")


@pytest.fixture(scope="session")
def registry(registry_tools: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[_rh.RegistryProcess]:
    """An open registry (no auth) for the whole session; tests use their own repositories."""
    reg = _rh.RegistryProcess(tmp_path_factory.mktemp("registry-open"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry_images(registry: _rh.RegistryProcess,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Test images in ``registry``: name -> {"ref", "layout" (the OCI source), digests}.

    oci-gzip (OCI types), docker-gzip (Docker v2s2 via skopeo --format v2s2), zstd,
    plain (uncompressed layers, uploaded over plain HTTP since skopeo would compress them),
    multi (an index: linux/amd64, linux/arm64, linux/arm/v7 and an attestation)."""
    base = tmp_path_factory.mktemp("registry-images")
    layers = [_b.tar_bytes(_b.busybox_entries()),
              _b.tar_bytes([_b.d("etc"), _b.file("etc/motd", b"hello from strata\n"),
                            _b.sym("etc/link", "motd"), _b.d("var/empty", mode=0o700),
                            _b.file("etc/secret", b"s", mode=0o600, uid=1000, gid=100)]),
              _b.tar_bytes([_b.whiteout("etc/group"), _b.file("etc/new", b"third\n")])]
    out: dict[str, dict[str, object]] = {}
    for name, compression, extra in (("oci-gzip", "gzip", ()),
                                     ("docker-gzip", "gzip", ("--format", "v2s2")),
                                     ("zstd", "zstd", ())):
        layout = str(base / name)
        info = _b.oci_layout(layout, layers, compression=compression)
        ref = f"{registry.host}/test/{name}:1"
        _rh.skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}", *extra)
        out[name] = {"ref": ref, "layout": layout, **info}
    layout = str(base / "plain")
    info = _b.oci_layout(layout, layers, compression="none")
    digest = _ri.upload_layout(registry.host, layout, "test/plain", "1")
    out["plain"] = {"ref": f"{registry.host}/test/plain:1", "layout": layout, **info,
                    "manifest": digest}
    layout = str(base / "multi")
    info = _ri.multi_platform_layout(layout, "multi")
    ref = f"{registry.host}/test/multi:1"
    _rh.skopeo_copy(f"oci:{layout}:multi", f"docker://{ref}", "--all")
    out["multi"] = {"ref": ref, "layout": layout, **info}
    return out


@pytest.fixture
def registry_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Credentials and registries configuration confined to the test: ``DOCKER_CONFIG``,
    ``XDG_CONFIG_HOME`` and ``XDG_RUNTIME_DIR`` in tmp_path, ``REGISTRY_AUTH_FILE`` unset."""
    env = {"DOCKER_CONFIG": tmp_path / "docker", "XDG_CONFIG_HOME": tmp_path / "xdg-config",
           "XDG_RUNTIME_DIR": tmp_path / "xdg-run"}
    for key, path in env.items():
        path.mkdir(exist_ok=True)
        monkeypatch.setenv(key, str(path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("STRATA_REGISTRIES_CONFIG", raising=False)
    return env


@pytest.fixture(scope="module")
def basic_registry(registry_tools: None, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[_rh.RegistryProcess]:
    """A registry with htpasswd Basic auth (users: REGISTRY_USERS) holding ``private/img:1``."""
    require_tool("htpasswd")
    d = tmp_path_factory.mktemp("registry-basic")
    htpasswd = _rh.htpasswd_file(d / "htpasswd", REGISTRY_USERS)
    reg = _rh.RegistryProcess(d / "reg", auth=("htpasswd", htpasswd))
    try:
        _seed(reg, d, ("private/img:1",))
        yield reg
    finally:
        reg.stop()


def _seed(reg: _rh.RegistryProcess, work: Path, names: tuple[str, ...]) -> None:
    """Push a small busybox image as each of ``names`` (with alice's credentials)."""
    layout = str(work / "seed-layout")
    _b.oci_layout(layout, [_b.tar_bytes(_b.busybox_entries())])
    for name in names:
        _rh.skopeo_copy(f"oci:{layout}:latest", f"docker://{reg.host}/{name}",
                        creds=f"alice:{REGISTRY_USERS['alice']}")


@pytest.fixture(scope="module")
def tls_registry(registry_tools: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[_rh.RegistryProcess, Path]]:
    """An open registry serving HTTPS only, with a self-signed certificate for 127.0.0.1;
    yields it and the certificate.  It holds ``private/img:1``."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("registry-tls")
    cert, key = _rh.tls_certificate(d)
    reg = _rh.RegistryProcess(d / "reg", tls=(cert, key))
    try:
        _seed(reg, d, ("private/img:1",))
        yield reg, cert
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_key(tmp_path_factory: pytest.TempPathFactory) -> _rh.RsaKey:
    require_tool("openssl")
    return _rh.RsaKey(tmp_path_factory.mktemp("token-key"))


@pytest.fixture(scope="module")
def token_server(token_key: _rh.RsaKey) -> Iterator[_rh.TokenServer]:
    server = _rh.TokenServer(token_key, REGISTRY_USERS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_registry(registry_tools: None, token_server: _rh.TokenServer,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[_rh.RegistryProcess]:
    """A registry with Bearer token auth trusting ``token_server``: anonymous users may pull
    ``public/*``, REGISTRY_USERS may pull everything, alice may push.  It holds
    ``private/img:1`` and ``public/img:1``."""
    d = tmp_path_factory.mktemp("registry-token")
    reg = _rh.RegistryProcess(d / "reg", auth=("token", token_server))
    try:
        _seed(reg, d, ("private/img:1", "public/img:1"))
        yield reg
    finally:
        reg.stop()


@pytest.fixture(params=["basic", "token"])
def auth_registry(request: pytest.FixtureRequest) -> _rh.RegistryProcess:
    """Each registry that wants credentials (both hold ``private/img:1``, alice may push)."""
    reg: _rh.RegistryProcess = request.getfixturevalue(f"{request.param}_registry")
    return reg


@pytest.fixture
def fault_proxy(registry: _rh.RegistryProcess) -> Iterator[_rh.FaultProxy]:
    """A recording proxy with fault rules in front of the open registry."""
    proxy = _rh.FaultProxy(registry)
    yield proxy
    proxy.close()


# =================================================================================================
# strata run: a real OCI runtime (crun), the run test images (tests/run_images.py) and a Debian
# image (tests/debian.py: built by scripts/install, imported once per session).
# =================================================================================================


def require_runtime() -> None:
    """``strata run`` needs root, FUSE and crun: skipped with the reason (failed under CI)."""
    require_root()
    require_fuse()
    require_tool("crun")


@pytest.fixture(scope="session")
def run_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """OCI layouts of ``run/busybox:1`` and ``run/configured:1`` (built once)."""
    from tests import run_images

    require_runtime()
    return run_images.layouts(tmp_path_factory.mktemp("run-images"))


@pytest.fixture
def run_strata(strata: Strata, run_layouts: dict[str, str]) -> Strata:
    """``strata`` on the test's store, with the run images in it."""
    from imagestore import Store as ApiStore

    store = ApiStore(str(strata.root))
    for ref, layout in run_layouts.items():
        [loaded] = store.load(layout)
        store.tag(loaded.image, ref)
    return strata


@pytest.fixture(scope="session")
def debian_strata(tmp_path_factory: pytest.TempPathFactory) -> tuple[Strata, str]:
    """A session store holding ``debian:bookworm`` (minbase, the rootfs tar scripts/install
    built with mmdebstrap, imported once per session), and the image's reference.  Tests make
    their own containers in it and remove them."""
    from tests import debian

    require_runtime()
    why = debian.missing()
    if why is not None:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    base = tmp_path_factory.mktemp("debian")
    strata = Strata(base / "store")
    strata("import", str(debian.rootfs_tar()), "debian:bookworm")
    return strata, "debian:bookworm"


# build: base images in the test registry, and buildah as the oracle (tests/buildah.py)
# =================================================================================================

from tests import buildah as _bh  # noqa: E402


def build_base_entries() -> list[_b.E]:
    """busybox with users (app 1000:1000, staff group 50), /usr/local/bin, a symlinked
    directory (/lnk -> usr/local) and a file only root may read."""
    entries = [e for e in _b.busybox_entries() if e.name not in ("etc/passwd", "etc/group")]
    return entries + [
        _b.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                              b"app:x:1000:1000:app:/home/app:/bin/sh\n"
                              b"nobody:x:65534:65534:nobody:/:/bin/false\n"),
        _b.file("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n"
                             b"nogroup:x:65534:\n"),
        _b.d("usr"), _b.d("usr/local"), _b.d("usr/local/bin"),
        _b.sym("lnk", "usr/local"),
        _b.d("home"), _b.d("home/app", uid=1000, gid=1000, mode=0o750),
        _b.file("etc/secret", b"s\n", mode=0o600),
        _b.d("opt", mode=0o711),
    ]


@pytest.fixture(scope="session")
def build_bases(registry: _rh.RegistryProcess,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Base images for build tests, in ``registry``: ``base`` (``build_base_entries``,
    Env PATH, Cmd /bin/sh) and ``onbuild`` (base with ONBUILD triggers)."""
    work = tmp_path_factory.mktemp("build-bases")
    out = {}
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for name, cfg in (
            ("base", {"Cmd": ["/bin/sh"], "Env": [path]}),
            ("onbuild", {"Cmd": ["/bin/sh"], "Env": [path],
                         "OnBuild": ["COPY a.txt /from-onbuild/", "ENV ONBUILT=yes"]})):
        layout = str(work / name)
        _b.oci_layout(layout, [_b.tar_bytes(build_base_entries())], config={"config": cfg})
        ref = f"{registry.host}/test/build-{name}:1"
        _rh.skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}")
        out[name] = ref
    return out


@pytest.fixture
def build_base(strata: Strata, tmp_path: Path) -> str:
    """``base`` in the store: the build tests' base image (``build_base_entries``), loaded
    from an OCI layout, not pulled."""
    require_root()
    require_fuse()
    layout = str(tmp_path / "base-layout")
    _b.oci_layout(layout, [_b.tar_bytes(build_base_entries())],
                  config={"config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}})
    image_id = strata.out("load", "-q", "-i", layout).split()[-1]
    strata("tag", image_id, "base")
    return "base"


@pytest.fixture
def buildah(tmp_path: Path) -> Iterator[_bh.Buildah]:
    require_root()
    require_tool("buildah")
    require_tool("umoci")
    b = _bh.Buildah(tmp_path / "buildah")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[str]:
    """A web server on 127.0.0.1 serving ``tmp_path/www`` (``file.txt``, ``archive.tar``),
    with ``Last-Modified`` headers from the files' mtimes."""
    import http.server
    import threading
    from typing import Any

    www = tmp_path / "www"
    www.mkdir()
    (www / "file.txt").write_bytes(b"downloaded\n")
    (www / "archive.tar").write_bytes(_bh.small_tar({"x": b"x\n"}))
    os.utime(www / "file.txt", (1_600_000_000, 1_600_000_000))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
