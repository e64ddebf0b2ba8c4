"""The pytest plugin, run as users run it: a test file using its fixtures in an inner pytest
session (``pytester``, a subprocess), then checks from outside that no strata mount and no mount
daemon of that session is left — after a passing session, a failing test, an interrupted
session — and that a session without usable FUSE skips with the exact reason."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from imagestore import Store
from tests.builders import busybox_entries, d, file, oci_layout, tar_bytes
from tests.conftest import require_fuse
from tests.integration.apihelpers import REFUSED, strata_leftovers

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.fuse

# The file a user writes: load an image, read its rootfs, change a container and commit.
USER_TESTS = '''
import os

import pytest


@pytest.fixture(scope="session")
def app(strata_store):
    [loaded] = strata_store.load("image")
    strata_store.tag(loaded.image, "app:1")
    return loaded.image


def test_the_rootfs_has_the_image_files(app, image_rootfs):
    root = image_rootfs("app:1")
    assert (root / "etc/motd").read_text() == "hello from the image\\n"
    assert os.readlink(root / "bin/sh") == "busybox"
    assert image_rootfs(app) == root  # mounted once per session


def test_a_container_changes_and_commits(app, container_rootfs, image_rootfs):
    rootfs = container_rootfs("app:1")
    (rootfs / "etc/motd").write_text("changed\\n")
    (rootfs / "srv").mkdir()
    os.unlink(rootfs / "etc/group")
    image = rootfs.commit("app:2", message="changed by a test")
    assert rootfs.diff() == [("C", "/etc"), ("D", "/etc/group"), ("C", "/etc/motd"),
                             ("A", "/srv")]
    assert (image_rootfs(image) / "etc/motd").read_text() == "changed\\n"


@pytest.mark.strata_fuse
def test_marked():
    pass
'''

FAILING_TESTS = '''
import pytest


@pytest.fixture(scope="session")
def app(strata_store):
    [loaded] = strata_store.load("image")
    return loaded.image


def test_fails_with_mounts(app, image_rootfs, container_rootfs):
    image_rootfs(app)
    (container_rootfs(app) / "etc/new").write_text("x")
    assert False, "a failing test"


def test_after_the_failure(app, container_rootfs):
    assert (container_rootfs(app) / "etc/motd").exists()
'''

HANGING_TESTS = '''
import pathlib
import time


def test_hangs_with_mounts(strata_store, image_rootfs, container_rootfs):
    [loaded] = strata_store.load("image")
    image_rootfs(loaded.image)
    rootfs = container_rootfs(loaded.image)
    (rootfs / "etc/new").write_text("x")
    pathlib.Path("mounted").write_text(str(rootfs.path))
    time.sleep(120)
'''

# SIGINT must reach the inner pytest even when the outer one runs with SIGINT ignored (a
# background job): restore Python's handler before pytest starts.
RUN_PYTEST = ("import signal, sys, pytest; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.exit(pytest.main(sys.argv[1:]))")


@pytest.fixture
def user_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    """``pytester`` with ``image/``: an OCI layout of a small busybox image."""
    layers = [tar_bytes(busybox_entries()),
              tar_bytes([d("etc"), file("etc/motd", b"hello from the image\n")])]
    oci_layout(str(pytester.path / "image"), layers, tag="1")
    return pytester


def test_installing_strata_registers_the_plugin() -> None:
    from importlib.metadata import entry_points

    found = [ep.value for ep in entry_points(group="pytest11") if ep.name == "strata"]
    assert found == ["imagestore.pytest_plugin"], "reinstall strata (scripts/install)"


def test_a_user_session_mounts_changes_commits_and_cleans_up(user_dir: pytest.Pytester,
                                                             engine: str) -> None:
    require_fuse()
    user_dir.makepyfile(test_user=USER_TESTS)
    root = user_dir.path / "kept-store"
    result = user_dir.runpytest_subprocess("--strata-root", str(root), "-p", "no:cacheprovider",
                                           f"--strata-engine={engine}")
    result.assert_outcomes(passed=3)
    assert strata_leftovers(user_dir.path) == []
    store = Store(str(root))  # --strata-root keeps what the session made, and only that
    assert store.resolve("app:2").config.history[-1]["comment"] == "changed by a test"
    assert store.containers() == []
    assert store.mounts() == []


def test_the_default_store_is_a_session_temp_dir(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_where='''
def test_where(strata_store, tmp_path_factory):
    assert strata_store.root.startswith(str(tmp_path_factory.getbasetemp()))
''')
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_failing_test_leaves_no_mount(user_dir: pytest.Pytester, engine: str) -> None:
    require_fuse()
    user_dir.makepyfile(test_failing=FAILING_TESTS)
    result = user_dir.runpytest_subprocess("-p", "no:cacheprovider", f"--strata-engine={engine}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: a failing test*"])
    assert strata_leftovers(user_dir.path) == []


def run_until_mounted(pytester: pytest.Pytester, sig: int, engine: str) -> tuple[int, str]:
    """Run HANGING_TESTS in an inner session, send ``sig`` once its mounts serve; returns the
    exit status and the output."""
    pytester.makepyfile(test_hanging=HANGING_TESTS)
    with subprocess.Popen(
            [sys.executable, "-c", RUN_PYTEST, f"--basetemp={pytester.path / 'basetemp'}",
             "-p", "no:cacheprovider", f"--strata-engine={engine}", "test_hanging.py"],
            cwd=pytester.path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            deadline = time.monotonic() + 60
            while not (pytester.path / "mounted").exists():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.05)
            assert strata_leftovers(pytester.path) != []  # mounted and serving
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, out.decode(errors="replace")


def test_an_interrupted_session_leaves_no_mount(user_dir: pytest.Pytester, engine: str) -> None:
    require_fuse()
    status, out = run_until_mounted(user_dir, signal.SIGINT, engine)  # Ctrl-C
    assert status == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    assert strata_leftovers(user_dir.path) == []
    assert Store(str(user_dir.path / "basetemp" / "strata-store0")).containers() == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_session_leaves_no_mount(user_dir: pytest.Pytester, sig: int,
                                         engine: str) -> None:
    """No finalizer runs: the daemons see their lifeline to pytest close and unmount."""
    require_fuse()
    status, out = run_until_mounted(user_dir, sig, engine)
    assert status == -sig, out
    deadline = time.monotonic() + 10
    while strata_leftovers(user_dir.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert strata_leftovers(user_dir.path) == []


def test_without_fusermount3_tests_are_skipped_with_the_reason(
        user_dir: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    user_dir.makepyfile(test_user=USER_TESTS)
    (user_dir.path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(user_dir.path / "bin"))
    result = user_dir.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=3)
    reason = ": fusermount3 is not installed (Debian package fuse3)"
    skips = [ln for ln in result.outlines if ln.startswith("SKIPPED [1] test_user.py:")]
    assert len(skips) == 3 and all(ln.endswith(reason) for ln in skips), result.outlines
    result = user_dir.runpytest_subprocess("-p", "no:cacheprovider", "--strata-require-fuse")
    result.assert_outcomes(errors=3)
    assert result.outlines.count(reason[2:]) == 3, result.outlines  # each error's whole text


def test_a_refused_mount_skips_with_the_kernel_s_reason(user_dir: pytest.Pytester) -> None:
    require_fuse()
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "-r", "true"]).returncode != 0:
        pytest.skip("user namespaces are not available (unshare -U -r)")
    user_dir.makepyfile(test_user=USER_TESTS)
    proc = subprocess.run(
        [unshare, "-U", "-r", sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
         f"--basetemp={user_dir.path / 'basetemp'}"],
        cwd=user_dir.path, capture_output=True, text=True, timeout=120)
    assert "3 skipped" in proc.stdout, proc.stdout + proc.stderr
    skips = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIPPED [1] test_user.py:")]
    assert len(skips) == 3, proc.stdout
    assert all(re.fullmatch(r"SKIPPED \[1\] test_user\.py:\d+: " + REFUSED, ln) for ln in skips), \
        proc.stdout
    assert strata_leftovers(user_dir.path) == []
