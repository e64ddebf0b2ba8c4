"""``Store.run`` and the pytest plugin's ``container_rootfs(...).run``: the exit status, the
output when asked, input, options as Python values, and the errors raised."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagestore import Store
from imagestore.runtime import RunError

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.runtime]


@pytest.fixture
def api_store(tmp_path: Path, run_layouts: dict[str, str]) -> Store:
    store = Store(str(tmp_path / "store"))
    for ref, layout in run_layouts.items():
        [loaded] = store.load(layout)
        store.tag(loaded.image, ref)
    return store


def test_run_returns_the_exit_status(api_store: Store,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    assert api_store.run("run/busybox:1", "sh -c 'echo to stdout; echo to stderr >&2; exit 3'",
                         remove=True) == 3
    captured = capfd.readouterr()
    assert captured.out == "to stdout\n" and captured.err == "to stderr\n"
    assert api_store.containers() == []


def test_run_captures_output_and_feeds_input(api_store: Store) -> None:
    result = api_store.run("run/busybox:1", ["sh", "-c", "tr a-z A-Z; echo done >&2"],
                           capture_output=True, input=b"hello\n" * 10000, remove=True)
    assert (result.status, result.stdout, result.stderr) == (0, b"HELLO\n" * 10000, b"done\n")
    result = api_store.run("run/configured:1", capture_output=True, remove=True,
                           env={"GREETING": "from python"}, user="root", workdir="/tmp")
    assert result.stdout == b"from python\n/tmp\nuid=0(root) gid=0(root) groups=0(root),10(wheel)\n"


def test_run_in_a_container_keeps_its_changes(api_store: Store, tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    container = api_store.create_container("run/busybox:1", "kept")
    assert api_store.run(container, ["sh", "-c", "echo 1 > /data; echo v > /v/x"],
                         volumes=[f"{tmp_path / 'vol'}:/v"]) == 0
    assert api_store.run("kept", ["cat", "/data"], capture_output=True).stdout == b"1\n"
    assert api_store.diff(container) == [("A", "/data")]
    assert (tmp_path / "vol/x").read_text() == "v\n"
    api_store.remove_container(container)


def test_run_raises_for_what_cannot_run(api_store: Store) -> None:
    with pytest.raises(RunError) as info:
        api_store.run("run/busybox:1", ["nothere"], remove=True)
    assert info.value.exit_status == 127 and "nothere" in str(info.value)
    with pytest.raises(RunError) as info:
        api_store.run("run/busybox:1", ["id"], user="mallory", remove=True)
    assert info.value.exit_status == 125
    with pytest.raises(RunError, match="unsupported network"):
        api_store.run("run/busybox:1", ["true"], network="bridge")
    assert api_store.containers() == []


def test_the_plugin_container_rootfs_runs_programs(strata_store: Store,
                                                   container_rootfs: object,
                                                   run_layouts: dict[str, str]) -> None:
    from imagestore.pytest_plugin import ContainerFactory

    assert isinstance(container_rootfs, ContainerFactory)
    [loaded] = strata_store.load(run_layouts["run/busybox:1"])
    rootfs = container_rootfs(loaded.image)
    (rootfs / "etc/motd").write_text("written by the test\n")
    result = rootfs.run(["sh", "-c", "cat /etc/motd; echo from the container > /srv/out; id -u"])
    assert (result.status, result.stdout) == (0, b"written by the test\n0\n")
    assert (rootfs / "srv/out").read_text() == "from the container\n"  # mounted again
    assert rootfs.diff() == [("C", "/etc"), ("A", "/etc/motd"), ("C", "/srv"),
                             ("A", "/srv/out")]
    assert rootfs.run("false").status == 1
