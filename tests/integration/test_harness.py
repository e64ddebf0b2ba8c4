"""The instruments checked against themselves: kernel overlayfs in strata's place must show no
difference at all, or a difference the step tests report could be the harness's own (a clock
tick, an inode number reused, a listing order) rather than strata's.

The same random sequences (with and without cache reclaims), the open(2) flag matrix and the
POSIX pass run with ``engine="kernel"``: two kernel overlay mounts of the same layers.  Kernel
mounts cost milliseconds, so this adds little to the suite.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Mounter, require_root
from tests.integration import posix_cases as pc
from tests.integration.test_differential_steps import EXAMPLES, ops, run
from tests.integration.test_open_flags import open_matrix
from tests.integration.test_posix import posix_pass

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture(scope="module")
def lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.integration.pair import build_lowers

    require_root()
    return build_lowers(tmp_path_factory.mktemp("lowers"))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seq=st.lists(ops, min_size=1, max_size=12), reclaim=st.booleans())
def test_kernel_against_itself_step_by_step(lowers: list[Path], mounter: Mounter,
                                            seq: list[object], reclaim: bool) -> None:
    run(mounter, lowers, seq, reclaim, engine="kernel")  # type: ignore[arg-type]


def test_kernel_against_itself_open_matrix(tmp_path: Path, mounter: Mounter) -> None:
    require_root()
    for access in ("RDONLY", "WRONLY", "RDWR"):
        (tmp_path / access).mkdir()
        problems = open_matrix(tmp_path / access, mounter, access, engine="kernel")
        assert not problems, "\n".join(problems[:40])


def test_kernel_against_itself_posix(tmp_path: Path, mounter: Mounter) -> None:
    require_root()
    lowers = pc.build_lowers(tmp_path / "lowers")
    for who in ("root", "user"):
        base = Path(tempfile.mkdtemp(prefix="strata-posix-"))
        try:
            os.chmod(base, 0o755)
            problems = posix_pass(lowers, mounter, base, who, engine="kernel")
        finally:
            shutil.rmtree(base, ignore_errors=True)
        assert not problems, f"as {who}:\n" + "\n".join(problems[:40])
