"""Every fixture of the suite lives here (HOUSE-STYLE: conftest owns fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagestore.store import Store

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


@pytest.fixture
def mounter(strata: Strata, tmp_path: Path) -> Iterator[Mounter]:
    require_fuse()
    m = Mounter(strata, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()
