"""Start-up is most of what ``strata umount`` and ``strata mounts`` cost (issue 14 part 4): they
read the mount records and unmount without loading the store's image code, the registry
client, logging or ``importlib.metadata``.  Run in a fresh interpreter, as the command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("imagestore.api", "imagestore.images", "imagestore.layerstore", "imagestore.archive",
         "imagestore.containers", "imagestore.mounting", "imagestore.registry",
         "imagestore.oci", "unionfs.tarlayer", "unionfs.union", "unionfs.resolve", "pyfuse3",
         "trio", "logging", "importlib.metadata", "dataclasses", "hashlib")

PROGRAM = """
import json, sys
from cli.main import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def modules_of(*argv: str) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    out = json.loads(proc.stdout.splitlines()[-1])
    return out["status"], set(out["modules"])


@pytest.mark.parametrize("argv", [["umount", "/nonexistent/mountpoint"],
                                  ["umount", "-l", "/nonexistent/a", "/nonexistent/b"],
                                  ["mounts"], ["mounts", "-q"]])
def test_umount_and_mounts_load_no_image_code(tmp_path: Path, argv: list[str]) -> None:
    status, loaded = modules_of("--root", str(tmp_path / "store"), *argv)
    assert status == (1 if argv[0] == "umount" else 0)
    assert "imagestore.unmounting" in loaded or "imagestore.mounts" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_other_commands_load_their_groups(tmp_path: Path) -> None:
    status, loaded = modules_of("--root", str(tmp_path / "store"), "images", "-q")
    assert status == 0 and {"cli.images", "imagestore.api"} <= loaded
    assert not loaded & {"cli.mount", "cli.registry", "cli.build"}  # their own group only
    status, loaded = modules_of("--root", str(tmp_path / "store"), "image", "ls", "-q")
    assert status == 0 and {"cli.images", "cli.mount", "cli.build"} <= loaded
