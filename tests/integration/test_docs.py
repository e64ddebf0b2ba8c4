"""The documentation's examples run as written: every ```python block of docs/testing.md is a
file of one test project, run by an inner pytest session with the plugin; every ```python
block of docs/api.md is a script.  ``busybox`` comes from a local registry configured as the
Docker Hub mirror (holding a small static busybox image), so the examples pull it exactly as
they would from Docker Hub.  Also: the reference names every public name."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import imagestore
from imagestore import api, pytest_plugin
from tests import registry_helpers as rh
from tests.builders import busybox_entries, oci_layout, tar_bytes
from tests.conftest import require_fuse
from tests.integration.apihelpers import strata_leftovers

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def blocks(name: str) -> list[str]:
    return BLOCK.findall((DOCS / name).read_text())


@pytest.fixture
def docker_hub_mirror(registry: rh.RegistryProcess, registry_env: dict[str, Path],
                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``busybox`` (``docker.io/library/busybox:latest``) served by the local registry as the
    Docker Hub mirror, through ``STRATA_REGISTRIES_CONFIG``."""
    layout = tmp_path / "busybox-layout"
    oci_layout(str(layout), [tar_bytes(busybox_entries())])
    rh.skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.host}/library/busybox:latest")
    config = tmp_path / "registries.json"
    config.write_text(json.dumps({"mirrors": {"docker.io": [f"http://{registry.host}"]}}))
    monkeypatch.setenv("STRATA_REGISTRIES_CONFIG", str(config))
    return registry.host


@pytest.mark.fuse
@pytest.mark.registry
def test_the_testing_guide_runs(pytester: pytest.Pytester, docker_hub_mirror: str) -> None:
    require_fuse()
    files = {}
    for code in blocks("testing.md"):
        first = code.splitlines()[0]
        assert re.fullmatch(r"# [a-z_]+\.py", first), f"a block must name its file: {first}"
        files[first[2:]] = code
    assert {"conftest.py", "test_rootfs.py", "test_container.py"} <= set(files)
    for name, code in files.items():
        (pytester.path / name).write_text(code)
    tests = sum(code.count("\ndef test_") for code in files.values())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    if os.geteuid() == 0:
        result.assert_outcomes(passed=tests)
    else:
        result.assert_outcomes(passed=tests - 1, skipped=1)  # the run example
    assert strata_leftovers(pytester.path) == []


@pytest.mark.fuse
@pytest.mark.registry
def test_the_api_reference_examples_run(tmp_path: Path, docker_hub_mirror: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    require_fuse()
    monkeypatch.setenv("STRATA_ROOT", str(tmp_path / "store"))
    codes = blocks("api.md")
    assert len(codes) >= 4
    for i, code in enumerate(codes):
        script = tmp_path / f"example{i}.py"
        script.write_text(code)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"example {i}:\n{code}\n{proc.stdout}\n{proc.stderr}"
        if i == 0:
            assert "root:x:0:0:root:/root:/bin/sh" in proc.stdout
            assert "[('C', '/etc'), ('A', '/etc/motd')]" in proc.stdout
    assert strata_leftovers(tmp_path) == []


def members(cls: type) -> dict[str, object]:
    """What ``cls`` and the classes it inherits from (``Store``'s mixins) define."""
    out: dict[str, object] = {}
    for base in reversed([c for c in cls.__mro__ if c is not object]):
        out.update(vars(base))
    return out


def test_the_reference_names_every_public_name() -> None:
    text = (DOCS / "api.md").read_text()
    public: list[str] = [n for n in imagestore.__all__ if n != "ProgressFn"]
    public += [f"Store.{name}" for name, member in members(api.Store).items()
               if not name.startswith("_") and callable(member)]
    public += [f"Store.{name}" for name in ("images", "resolve", "prune", "history", "inspect")]
    public += ["strata_store", "image_rootfs", "container_rootfs", "strata_fuse",
               "--strata-root", "--strata-require-fuse", "ContainerRootfs", "require_fuse"]
    missing = [name for name in public if f"`{name}" not in text]
    assert missing == []
    fixtures = {name for name, obj in vars(pytest_plugin).items()
                if hasattr(obj, "_fixture_function_marker") or
                type(obj).__name__ == "FixtureFunctionDefinition"}
    assert fixtures - {"_strata_fuse_marker"} <= set(public)


def test_every_public_method_has_a_docstring() -> None:
    for cls in (api.Store, pytest_plugin.ImageRootfs, pytest_plugin.ContainerRootfs,
                pytest_plugin.ContainerFactory):
        for name, member in members(cls).items():
            if not name.startswith("_") and callable(member):
                assert inspect.getdoc(member), f"{cls.__name__}.{name}"
