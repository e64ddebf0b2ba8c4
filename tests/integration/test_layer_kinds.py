"""A layer kind from another distribution, served by a real mount: the ``strata.layers``
entry-point group is the seam a lazily fetched layer plugs into (issue 18), so here a tiny
distribution — a ``dist-info`` and a module in a temporary directory on ``PYTHONPATH`` —
declares the kind ``memtest`` (an in-memory layer), and the mount daemon, which knows nothing
of it, opens it through ``importlib.metadata`` and serves it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagestore import MountFailed, Store, mounting
from tests.conftest import REPO, is_mounted, require_fuse

pytestmark = pytest.mark.fuse

MODULE = '''
from tests.memlayer import MemLayer


def open_layer(desc):
    return MemLayer({path: text.encode() for path, text in desc["files"].items()})
'''


@pytest.fixture
def memtest_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    info = site / "strata_memtest-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: strata-memtest\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[strata.layers]\n"
                                           "memtest = strata_memtest:open_layer\n")
    (site / "strata_memtest.py").write_text(MODULE)
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), str(REPO)] + ([old] if old else [])))
    return site


def test_a_kind_from_another_distribution_is_mounted(memtest_distribution: Path,
                                                     tmp_path: Path) -> None:
    require_fuse()
    store = Store(str(tmp_path / "store"))
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/from-dir").write_text("dir\n")
    mp = tmp_path / "mp"
    mp.mkdir()
    p = mounting.plan(store, mounting.Directories((str(lower),)), mp)
    p.spec["layers"].insert(0, {"kind": "memtest", "files": {"etc/from-mem": "mem\n"}})
    with mounting.mounted(p) as root:
        assert (root / "etc/from-mem").read_text() == "mem\n"
        assert (root / "etc/from-dir").read_text() == "dir\n"
        assert sorted(os.listdir(root / "etc")) == ["from-dir", "from-mem"]
    assert not is_mounted(mp)


def test_an_unknown_kind_is_the_daemon_s_one_line_error(tmp_path: Path) -> None:
    require_fuse()
    store = Store(str(tmp_path / "store"))
    (tmp_path / "lower").mkdir()
    mp = tmp_path / "mp"
    mp.mkdir()
    p = mounting.plan(store, mounting.Directories((str(tmp_path / "lower"),)), mp)
    p.spec["layers"].insert(0, {"kind": "nosuchkind"})
    with pytest.raises(MountFailed, match="unknown layer kind 'nosuchkind'"), \
            mounting.mounted(p):
        pass
    log = Path(p.log).read_text()
    assert "Traceback" not in log and log.count("\n") == 1, log
