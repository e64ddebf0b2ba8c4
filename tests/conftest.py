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
