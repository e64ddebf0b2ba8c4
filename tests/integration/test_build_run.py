"""``strata build``'s RUN through the OCI runtime (needs root and crun): a failing RUN named
with its step, exit status and output; build arguments and the cache of RUN steps; RUN's
network; Ctrl-C, SIGTERM and SIGKILL while a RUN runs leave no mount, no process, no half
image and ``strata check`` clean."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagestore import Store
from tests.buildah import write_context
from tests.conftest import REPO, Strata
from tests.integration.test_build import build, steps


def test_failing_run_names_step_status_and_output(strata: Strata, build_base: str,
                                                  tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM base\nRUN echo before\n\nRUN echo visible output && exit 3\n"})
    before = strata.out("images", "-a", "-q", "--no-trunc")
    proc = strata("build", str(ctx), check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "#3 [3/3] RUN echo visible output && exit 3" in err
    assert "visible output" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: Dockerfile:4: the command") and "non-zero code: 3" in last
    # the step that ran before it is kept (the cache), the failed one left nothing
    after = strata.out("images", "-a", "-q", "--no-trunc").split()
    assert len(after) == len(before.split()) + 1
    assert strata.out("mounts") == "" or "build" not in strata.out("mounts")
    assert b"no problems" in strata("check").stderr
    # -q still shows what the command printed
    quiet = strata("build", "-q", str(ctx), check=False)
    assert b"visible output" in quiet.stderr and quiet.stdout == b""


def test_cache_with_run_and_build_args(store: Store, build_base: str, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM base\nRUN echo first > /first\nARG V=1\nRUN echo unrelated\n"
                      "RUN echo $V > /v\n", "a": ""})
    first, ev = build(store, ctx)
    assert set(steps(ev).values()) == {"RAN"}
    again, ev = build(store, ctx)
    assert again == first and "RAN" not in list(steps(ev).values())[1:]
    _, ev = build(store, ctx, build_args={"V": "2"})
    s = steps(ev)
    # docker: the arguments in force are part of every later RUN's command (|1 V=2 ...)
    assert s["RUN echo first > /first"] == "CACHED" and s["ARG V=1"] == "CACHED"
    assert s["RUN echo unrelated"] == "RAN" and s["RUN echo $V > /v"] == "RAN"
    with store.mount(store.build(ctx, build_args={"V": "3"})) as mp:
        assert (mp / "v").read_text() == "3\n" and not (mp / "proc").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_build_interrupted_during_run(strata: Strata, store: Store, build_base: str,
                                      tmp_path: Path, sig: int) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM base\nRUN echo started && sleep 30\n"})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(store.root),
                             "build", str(ctx)], env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for line in proc.stderr:
        if re.match(rb"#\d+ [\d.]+ started$", line.strip()):  # RUN's output: it runs
            break
    assert store.mounts() and os.listdir(os.path.join(store.root, "tmp"))
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode != 0
    proc.stderr.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            store.mounts() or str(store.root) in Path("/proc/self/mounts").read_text()
            or os.listdir(os.path.join(store.root, "tmp"))):
        time.sleep(0.1)
    assert store.mounts() == []
    assert str(store.root) not in Path("/proc/self/mounts").read_text()
    assert b"no problems" in strata("check").stderr


def test_run_network(store: Store, build_base: str, tmp_path: Path) -> None:
    """RUN's network: host by default (as buildah bud), ``network="none"`` (``--network``)
    for every RUN, ``RUN --network=`` for one."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        "FROM base\nRUN ls /sys/class/net > /default\n"
        "RUN --network=none ls /sys/class/net > /one-none\n"
        "RUN --network=host ls /sys/class/net > /one-host\n")})
    host_nets = sorted(os.listdir("/sys/class/net"))
    with store.mount(store.build(ctx)) as mp:
        assert (mp / "default").read_text().split() == host_nets
        assert (mp / "one-none").read_text().split() == ["lo"]
        assert (mp / "one-host").read_text().split() == host_nets
    with store.mount(store.build(ctx, network="none")) as mp:
        assert (mp / "default").read_text().split() == ["lo"]
        assert (mp / "one-host").read_text().split() == host_nets
