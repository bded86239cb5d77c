"""dev.py, the bootstrap behind the README's two commands."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _dev():
    spec = importlib.util.spec_from_file_location("dev_bootstrap", REPO / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_project_is_byte_compiled_even_where_writing_bytecode_is_off(tmp_path, monkeypatch):
    """With PYTHONDONTWRITEBYTECODE (set in many CI and container images) an editable install was compiled
    again by every process that imported it; dev.py compiles it once, as pip does an installed package."""
    for package in ("unet3d", "data_catalog", "flows"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "module.py").write_text("VALUE = 1\n")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    _dev().compile_project(tmp_path, Path(sys.executable))
    for package in ("unet3d", "data_catalog", "flows"):
        assert Path(importlib.util.cache_from_source(str(tmp_path / package / "module.py"))).is_file(), package
