"""Imports flow one way (docs/architecture.md): cli -> imagestore (the API and its values and
errors); imagestore -> the unionfs core, and the mount daemon only by spawning it
(``python -m unionfs.mount``, from ``imagestore/mounting.py`` alone); only fuse_ops and mount
import pyfuse3; unionfs never imports imagestore or cli, and nothing starts cli."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = {"layers", "layerkinds", "tarlayer", "tarscan", "tarheaders", "layerindex", "whiteout",
        "upper", "resolve", "union", "inodes", "control", "errors", "overlay"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    pkg = ".".join(path.relative_to(REPO).parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            elif node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def started(path: Path) -> set[str]:
    """The modules a file starts as programs: ``"-m", "MODULE"`` in a list or tuple of strings
    (an argv), and any string naming ``cli.main`` or ``-m cli`` (a command line in one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.List | ast.Tuple):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            out.update(m for flag, m in zip(items, items[1:], strict=False)
                       if flag == "-m" and isinstance(m, str))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if "cli.main" in text or "-m cli" in text:
                out.add("cli")
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
    """...and the daemon's module once: ``daemonfork`` runs it in a daemon forked from the
    CLI's process (``fork_daemon``, ``preload``), which imports it after the fork; the store's
    process itself never does (``test_cli_startup`` checks a mount command's modules)."""
    for path in modules("imagestore"):
        for m in imports(path):
            parts = m.split(".")
            if parts[0] == "unionfs" and len(parts) > 1 and parts[1][:1].islower():
                if path.name == "daemonfork.py" and parts[1] == "mount":
                    continue
                assert parts[1] in CORE, f"{path.name} imports unionfs.{parts[1]}"
            assert parts[0] != "cli", f"{path.name} imports cli"


def test_the_cli_uses_the_api_and_no_unionfs() -> None:
    for path in modules("cli"):
        bad = {m for m in imports(path) if m.split(".")[0] == "unionfs"}
        assert not bad, f"{path.name} imports {bad}"


def test_nothing_starts_cli() -> None:
    """The store once ran its mounts as ``python -m cli.main mount -f``: an arrow from the
    store up to the CLI that no import shows."""
    for pkg in ("imagestore", "unionfs"):
        for path in modules(pkg):
            bad = {m for m in started(path) if m.split(".")[0] == "cli"}
            assert not bad, f"{path.relative_to(REPO)} starts {bad}"


def test_the_daemon_is_spawned_by_mounting_alone() -> None:
    """The spawn arrow imagestore -> unionfs.mount exists once: in imagestore/mounting.py."""
    spawners = {str(path.relative_to(REPO)) for pkg in ("imagestore", "unionfs", "cli")
                for path in modules(pkg) if "unionfs.mount" in started(path)}
    assert spawners == {"imagestore/mounting.py"}


def test_started_sees_argv_and_command_lines(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import sys\nA = [sys.executable, "-m", "cli.main", "mount"]\n'
                      'B = ("python", "-m", "unionfs.mount", "/dev/fd/3")\n'
                      'C = "python3 -m cli mount"\n')
    assert started(sample) == {"cli.main", "unionfs.mount", "cli"}
