"""The registry commands as users run them: ``strata pull``/``push``/``login``/``logout``
against real registries, their docker-like output, one-line errors, Ctrl-C and resume, and
``strata export`` of a pulled image against ``umoci unpack`` of the same image."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import registry_helpers as rh
from tests import registry_images as ri
from tests.builders import diff_trees, tree_of_tar
from tests.conftest import REGISTRY_USERS, REPO, Strata, require_root, require_tool

pytestmark = [pytest.mark.registry]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


@pytest.mark.interop
def test_pull_export_push(strata: Strata, registry_images: dict[str, Any],
                          registry: rh.RegistryProcess, registry_env: Any,
                          tmp_path: Path) -> None:
    require_tool("umoci")
    require_root()
    info = registry_images["oci-gzip"]
    ref = info["ref"]
    lines = _lines(strata.out("pull", ref))
    ids = [d[7:19] for d in info["layers"]]
    assert lines[0] == "1: Pulling from test/oci-gzip"
    for sid in ids:
        mine = [x.partition(": ")[2] for x in lines if x.startswith(sid + ": ")]
        assert mine[0] == "Pulling fs layer" and mine[-3:] == [
            "Verifying Checksum", "Download complete", "Pull complete"]
        assert any(m.startswith("Downloading ") and "/" in m for m in mine)
    assert lines[-3:] == [f"Digest: {info['manifest']}",
                          f"Status: Downloaded newer image for {ref}", ref]
    out = tmp_path / "rootfs.tar"
    strata("export", ref, "-o", str(out))
    want = ri.umoci_tree(ref, tmp_path)
    assert not diff_trees(tree_of_tar(out.read_bytes()), want)

    lines = _lines(strata.out("pull", ref))
    assert [x for x in lines if x.endswith("Already exists")] == \
        [f"{sid}: Already exists" for sid in ids]
    assert lines[-2:] == [f"Status: Image is up to date for {ref}", ref]
    assert strata.out("pull", "-q", ref) == ref + "\n"

    dest = f"{registry.host}/e2e/copy:7"
    lines = _lines(strata.out("push", ref, dest))
    assert lines[0] == f"The push refers to repository [{registry.host}/e2e/copy]"
    assert sorted(x for x in lines if "Mounted" in x) == \
        sorted(f"{sid}: Mounted from test/oci-gzip" for sid in ids)
    size = len((Path(info["layout"]) / "blobs/sha256" / info["manifest"][7:]).read_bytes())
    assert lines[-1] == f"7: digest: {info['manifest']} size: {size}"
    assert strata.out("push", "-q", ref, dest) == dest + "\n"
    inspect = json.loads(strata.out("inspect", ref))[0]
    assert f"{registry.host}/e2e/copy@{info['manifest']}" in inspect["RepoDigests"]


def test_pull_without_tag_and_errors(strata: Strata, registry_images: dict[str, Any],
                                     registry: rh.RegistryProcess, registry_env: Any) -> None:
    base = registry_images["oci-gzip"]["ref"].rpartition(":")[0]
    proc = strata("pull", base, check=False)
    assert proc.returncode == 1
    assert proc.stdout.decode().splitlines() == ["Using default tag: latest",
                                                 "latest: Pulling from test/oci-gzip"]
    assert proc.stderr.decode() == \
        f"Error: manifest for {base}:latest not found: manifest unknown\n"
    proc = strata("pull", "Not/A/Valid:ref:x", check=False)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1
    port = rh.free_port()
    proc = strata("pull", f"127.0.0.1:{port}/nothing:1", check=False)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "connect" in proc.stderr.decode().lower()
    proc = strata("push", "nothing-here:1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Error: No such image: nothing-here:1\n"
    assert strata.out("images", "-q") == ""


def test_login_logout(strata: Strata, basic_registry: rh.RegistryProcess,
                      registry_env: dict[str, Path], tmp_path: Path) -> None:
    host = basic_registry.host
    ref = f"{host}/private/img:1"
    proc = strata("pull", ref, check=False)
    assert proc.returncode == 1 and f"strata login {host}" in proc.stderr.decode()
    proc = strata("login", "-u", "alice", "--password-stdin", host, input=b"nope\n",
                  check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == (f"Error: login to {host} failed: unauthorized: incorrect "
                                    "username or password\n")
    assert not (registry_env["DOCKER_CONFIG"] / "config.json").exists()
    password = REGISTRY_USERS["alice"]
    assert strata.out("login", "-u", "alice", "--password-stdin", host,
                      input=f"{password}\n".encode()) == "Login Succeeded\n"
    doc = json.loads((registry_env["DOCKER_CONFIG"] / "config.json").read_text())
    assert doc["auths"][host]["auth"] == base64.b64encode(f"alice:{password}".encode()).decode()
    assert strata.out("pull", "-q", ref) == ref + "\n"
    assert strata.out("logout", host) == f"Removing login credentials for {host}\n"
    assert strata.out("logout", host) == f"Not logged in to {host}\n"
    # $REGISTRY_AUTH_FILE is where login writes when it is set; -p warns
    auth_file = tmp_path / "containers-auth.json"
    proc = strata("login", "-u", "alice", "-p", password, host,
                  env={"REGISTRY_AUTH_FILE": str(auth_file)})
    assert "WARNING! Using --password via the CLI is insecure" in proc.stderr.decode()
    assert host in json.loads(auth_file.read_text())["auths"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_gh13_a_stopped_pull_cleans_up_keeps_its_partial_file_and_resumes(
        strata: Strata, registry_images: dict[str, Any], registry: rh.RegistryProcess,
        fault_proxy: rh.FaultProxy, registry_env: Any, sig: int) -> None:
    """Ctrl-C, and SIGTERM or SIGHUP as ``timeout``, CI runners and closed terminals send
    them, stop a pull the same way: no ``tmp/layer-*`` left, ``strata check`` clean, the
    partial download kept, exit status 128 + the signal's number; the next pull asks only for
    the rest."""
    info = registry_images["oci-gzip"]
    big = str(info["layers"][0])
    size = registry.blob_path(big).stat().st_size
    release = threading.Event()
    fault_proxy.add("GET", f"/blobs/{big}", "cut", after=250_000)
    fault_proxy.add("GET", f"/blobs/{big}", "hang", event=release)
    ref = f"{fault_proxy.host}/test/oci-gzip:1"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(strata.root),
                             "pull", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    tmp = strata.root / "tmp"
    try:
        deadline = time.monotonic() + 30
        while len(fault_proxy.requests("GET", f"/blobs/{big}")) < 2 or \
                not any(n.startswith("layer-") for n in os.listdir(tmp)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err.decode()
    named = "" if sig == signal.SIGINT else f" ({signal.Signals(sig).name})"
    assert err.decode() == f"interrupted{named}\n"
    left = os.listdir(tmp)  # resumable downloads only (other layers may have begun too)
    assert f"partial-{big[7:]}" in left and all(n.startswith("partial-") for n in left), left
    assert (tmp / f"partial-{big[7:]}").stat().st_size == 250_000
    assert strata.out("images", "-q") == ""
    strata("check")
    before = len(fault_proxy.requests("GET", f"/blobs/{big}"))
    assert strata.out("pull", "-q", ref) == ref + "\n"
    again = fault_proxy.requests("GET", f"/blobs/{big}")[before:]
    assert [(r.headers.get("range"), r.sent) for r in again] == \
        [("bytes=250000-", size - 250_000)]
    assert not (tmp / f"partial-{big[7:]}").exists()
