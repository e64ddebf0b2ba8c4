"""``strata umount`` imports no image code (its start-up is most of its time), so it finds the
daemon's mount record by rules of its own: they must stay those of ``Store`` and
``Containers``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.mount import _record_path, _store_root
from imagestore.containers import Containers
from imagestore.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mountpoint", ["/mnt/x", "rel/mp", "/a b/ünï", "/x/../y/"])
def test_record_path_is_the_containers_rule(tmp_path: Path, mountpoint: str) -> None:
    store = Store(str(tmp_path / "store"))
    assert _record_path(store.root, mountpoint) == Containers(store)._record_path(mountpoint)


def test_store_root_is_the_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _store_root("rel/store") == Store("rel/store").root
    monkeypatch.setenv("STRATA_ROOT", str(tmp_path / "env-store"))
    assert _store_root(None) == Store(None).root
    monkeypatch.delenv("STRATA_ROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if os.geteuid() == 0:
        assert _store_root(None) == "/var/lib/strata"  # (Store() would create it)
    else:
        assert _store_root(None) == Store(None).root


def test_umount_imports_no_image_code(tmp_path: Path) -> None:
    probe = ("import sys, cli.main\n"
             "code = cli.main.main(sys.argv[1:])\n"
             "heavy = sorted(m for m in ('imagestore.store', 'imagestore.containers', "
             "'imagestore.registry', 'httpx', 'trio', 'pyfuse3', 'logging') if m in sys.modules)\n"
             "print(code, heavy)\n")
    (tmp_path / "mp").mkdir()
    out = subprocess.run([sys.executable, "-c", probe, "--root", str(tmp_path / "store"),
                          "umount", str(tmp_path / "mp")], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "1 []", out.stderr
    assert out.stderr.strip() == f"Error: {tmp_path / 'mp'} is not mounted"
