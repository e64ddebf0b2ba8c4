"""Imports flow one way (DESIGN.md): cli -> imagestore, unionfs; imagestore -> unionfs core only;
only fuse_ops and mount import pyfuse3; unionfs never imports imagestore or cli."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = {"layers", "tarlayer", "tarscan", "tarheaders", "layerindex", "whiteout", "upper",
        "resolve", "union", "inodes", "control", "errors"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    pkg = path.parent.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg if node.level == 1 else ""
                mod = f"{base}.{node.module}" if node.module else base
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            elif node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules(pkg: str) -> list[Path]:
    return sorted((REPO / pkg).rglob("*.py"))


def test_unionfs_never_imports_imagestore_or_cli() -> None:
    for path in modules("unionfs"):
        bad = {m for m in imports(path) if m.split(".")[0] in ("imagestore", "cli")}
        assert not bad, f"{path.name} imports {bad}"


def test_only_fuse_ops_and_mount_import_pyfuse3() -> None:
    for pkg in ("unionfs", "imagestore", "cli"):
        for path in modules(pkg):
            if pkg == "unionfs" and path.stem in ("fuse_ops", "mount"):
                continue
            assert not any(m.split(".")[0] == "pyfuse3" for m in imports(path)), path


def test_imagestore_uses_only_the_unionfs_core() -> None:
    for path in modules("imagestore"):
        for m in imports(path):
            parts = m.split(".")
            if parts[0] == "unionfs" and len(parts) > 1 and parts[1][:1].islower():
                assert parts[1] in CORE, f"{path.name} imports unionfs.{parts[1]}"
            assert parts[0] != "cli", f"{path.name} imports cli"
