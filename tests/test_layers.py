"""The three floors (unet3d <- data_catalog <- flows): the library imports neither layer above it, and
`python -m unet3d` still reaches the command line (through the installed console script)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_neither_data_catalog_nor_flows():
    upward = {str(p.relative_to(REPO)): sorted(_imported_packages(p) & {"flows", "data_catalog"})
              for p in sorted((REPO / "unet3d").rglob("*.py"))}
    assert {k: v for k, v in upward.items() if v} == {}


def test_data_catalog_does_not_import_flows():
    upward = {str(p.relative_to(REPO)): "flows" in _imported_packages(p) for p in (REPO / "data_catalog").rglob("*.py")}
    assert not any(upward.values()), upward


def test_python_dash_m_unet3d_runs_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "unet3d", "--help"], capture_output=True,
                          encoding="utf-8", timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: unet3d") and "predict" in proc.stdout
