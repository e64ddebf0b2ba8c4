"""Names from images are bytes: commands print them back byte for byte whatever the locale's
codec (a strict UTF-8 stdout, as under en_US.UTF-8, raised UnicodeEncodeError)."""

from __future__ import annotations

from pathlib import Path

from tests.builders import file, tar_bytes
from tests.conftest import Strata


def test_undecodable_and_multiline_names_print_as_bytes(strata: Strata, tmp_path: Path) -> None:
    src = tmp_path / "rootfs.tar"
    src.write_bytes(tar_bytes([file("lower-\udcff", b"x")]))
    strata("import", str(src), "names:1")
    cid = strata.out("create", "names:1").strip()
    upper = strata.root / "containers" / cid / "upper"
    (upper / b"bad\xff".decode("utf-8", "surrogateescape")).write_bytes(b"")
    (upper / "new\nline").write_bytes(b"")
    strict = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    out = strata("diff", cid, env=strict).stdout
    assert out == b"A /bad\xff\nA /new\nline\n"
    export = strata("export", "names:1", env=strict).stdout
    assert b"lower-\xff" in export
