"""What a cached command imports. A fully cached `unet3d run` only checks keys and reads tables; each heavy
library imported at a module's top is paid on every command (scipy.stats alone took a second of a 5 s cached
run, through unet3d.champion). They are imported where their work is done."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy.stats", "matplotlib", "sklearn", "monai")
PIPELINE_MODULES = ("flows.cli", "flows.pipeline", "flows.stages", "flows.champion", "flows.cache_keys",
                    "flows.results", "data_catalog.splits", "unet3d.champion", "unet3d.report_tables")


def test_the_pipeline_modules_do_not_import_heavy_libraries_at_their_top():
    code = (f"import importlib, sys\n"
            f"for name in {PIPELINE_MODULES!r}:\n"
            f"    importlib.import_module(name)\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == ""
