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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", cwd=ROOT, check=True)
    assert done.stdout.strip() == ""


def test_the_work_sent_to_a_dask_cluster_unpickles_without_torch(tmp_path):
    """Dask's scheduler unpickles the arguments of every task it is sent. The inference jobs and model references
    were classes of unet3d.inference, so the scheduler of an existing cluster imported torch to read them: 2.3 s
    before the first case of the first run could start (and torch's memory in a process that never computes)."""
    import pickle

    import cloudpickle

    from unet3d.evaluation import EvaluatedCase, EvaluatedStage
    from unet3d.inference import ModelRef, PredictionJob

    (tmp_path / "checkpoint_best.pt").write_bytes(b"weights")
    work = [PredictionJob("c1", {"full": tmp_path / "c1.nii.gz"}, case_dirs=[tmp_path / "c1"]),
            ModelRef.of(tmp_path, device="cpu"),
            EvaluatedCase("c1", "test", str(tmp_path / "l.nii.gz"), {"full": tmp_path / "c1.nii.gz"}),
            EvaluatedStage("full", {1: "organ"}, {0: 0, 1: 1})]
    blob = tmp_path / "work.pkl"
    blob.write_bytes(cloudpickle.dumps(work))
    code = (f"import pickle, sys\n"
            f"pickle.loads(open({str(blob)!r}, 'rb').read())\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", cwd=ROOT, check=True)
    assert done.stdout.strip() == ""
