"""A local Dask cluster must not change the environment of the process that started it.

distributed's Nanny writes its `pre-spawn-environ` (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...) into the
parent's os.environ before spawning each worker and never restores it. torch sizes its thread pool from
OMP_NUM_THREADS when it first runs an operator, so a pipeline that preprocesses on a LocalCluster and then
trains in the same process trained on one core instead of all of them (the demo's epochs took 1.7x longer).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from data_catalog.parallel import dask_client

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED")


def test_local_cluster_leaves_parent_environment_unchanged(monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # a value the user set is kept, not overwritten
    before = {k: os.environ.get(k) for k in KEYS}
    with dask_client(1, None, "auto") as client:
        assert client.submit(_worker_variable, "OMP_NUM_THREADS").result() == "1"  # the workers still get it
        inside = {k: os.environ.get(k) for k in KEYS}
    after = {k: os.environ.get(k) for k in KEYS}
    assert inside == before
    assert after == before


def test_torch_after_local_cluster_uses_every_core():
    """torch first used after the cluster ran (as the CLI does: it imports torch only to train) keeps its
    default thread count."""
    code = ("import os\n"
            "from data_catalog.parallel import dask_client\n"
            "with dask_client(1, None, 'auto'):\n"
            "    pass\n"
            "import torch\n"
            "print(torch.get_num_threads())\n")
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=_clean_env()).stdout.strip().splitlines()[-1]
    assert got == default


def _worker_variable(key: str) -> str | None:
    import os as worker_os  # the worker's own environment (os.environ.get would pickle this process's mapping)

    return worker_os.environ.get(key)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env["PYTHONPATH"] = str(ROOT)
    return env
