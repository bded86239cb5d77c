"""benchmarks/gpu_check.py runs in CI with --dry-run (CPU, tiny sizes), so the one script that proves the
CUDA path on a lent GPU machine cannot rot between the rare occasions it runs there."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the shared hippocampus cohort at {DATA}")
def test_gpu_check_dry_run_runs_every_step_and_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, encoding="utf-8", timeout=900)
    report = json.loads(out.read_text()) if out.exists() else {"steps": {}}
    # a failed step's own output tail in the message: gpu_check's stdout has only one summary line per step
    failed_tails = "".join(f"\n--- {name} ---\n{step.get('tail', '')}" for name, step in report["steps"].items()
                           if step.get("rc") not in (0, None))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + failed_tails
    assert report["dry_run"] is True and set(report["steps"]) == {"throughput", "inference", "train", "tests"}
    for name in ("throughput", "inference", "train"):
        result = report["steps"][name]["result"]
        assert result and result["ours"] is not None and result["baseline"], (name, report["steps"][name]["tail"])
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["failed_steps"] == [] and final["ratio"] == report["steps"]["throughput"]["result"]["ratio"]
