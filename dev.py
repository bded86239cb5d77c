#!/usr/bin/env python3
"""Bootstrap and run: `python3 dev.py demo [ARGS]` or `python3 dev.py test [PYTEST ARGS]`.

Creates ./.venv on first use and installs the project into it (again whenever pyproject.toml changes), then
runs `unet3d demo` or the test suite inside it. Needs only Python 3.10+ with venv and pip.

PyTorch: TORCH_SPEC (default "torch==2.13.0") is installed first, so that pip does not pick a newer multi-GB
build; set TORCH_SPEC="torch" for the newest, or pre-install the build you want (e.g. a CUDA wheel) into .venv.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".unet3d-installed"
PACKAGES = ("unet3d", "data_catalog", "flows")


def ensure_environment() -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"dev.py: Python 3.10+ is needed, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    has_torch = subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        print(f"installing {torch_spec}", flush=True)
        subprocess.run([*pip, torch_spec], check=True)
    print("installing the project and its test dependencies", flush=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def compile_project(root: Path = ROOT, python: Path = PYTHON) -> None:
    """Byte-compile the project's packages, as pip does for an installed (not editable) package. Where
    PYTHONDONTWRITEBYTECODE is set (many CI and container images) an editable install is otherwise compiled
    again by every process that imports it: 0.15 s per command, and again in each worker process. Only files
    changed since their last compile are compiled."""
    folders = [str(root / p) for p in PACKAGES if (root / p).is_dir()]
    subprocess.run([str(python), "-m", "compileall", "-q", *folders], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    ensure_environment()
    compile_project()
    # UTF-8 mode: the CLI prints non-ASCII (progress bars, arrows) and tests decode it, whatever the locale
    env = dict(os.environ, PYTHONUTF8="1")
    if argv[0] == "demo":
        cmd = [str(BIN / "unet3d"), "demo", *argv[1:]]
    else:
        cmd = [str(PYTHON), "-m", "pytest", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
