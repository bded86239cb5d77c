"""A local Dask cluster must not change the environment of the process that started it.

distributed's Nanny writes its `pre-spawn-environ` (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...) into the
parent's os.environ before spawning each worker and never restores it. torch sizes its thread pool from
OMP_NUM_THREADS when it first runs an operator, so a pipeline that preprocesses on a LocalCluster and then
trains in the same process trained on one core instead of all of them (the demo's epochs took 1.7x longer).

The same pre-spawn environment sets MALLOC_TRIM_THRESHOLD_ in every worker, which fixes glibc's mmap threshold
at 128 KiB: every tensor or array above it is mapped fresh from the kernel and zeroed page by page, and a
worker inferred 1.5-2x slower than the same code in the parent process (benchmarks/distributed_infer.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
                             capture_output=True, encoding="utf-8", check=True, env=_clean_env()).stdout.strip()
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True, cwd=ROOT,
                         env=_clean_env()).stdout.strip().splitlines()[-1]
    assert got == default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_worker_tasks_allocate_large_arrays_from_the_heap():
    """A task on a worker (here a LocalCluster's, whose nanny sets MALLOC_TRIM_THRESHOLD_ as any `dask worker`
    does) gets a 4 MiB array from the heap, as this process does, not from a fresh mmap."""
    from data_catalog.parallel import map_cases

    with dask_client(1, None, "auto") as client:
        assert client.submit(_worker_variable, "MALLOC_TRIM_THRESHOLD_").result() is not None  # the premise
        for _ in range(2):  # the first array may grow the heap; the second must reuse it
            done = map_cases(_mapped_blocks_for_an_array, [{"case_id": "a"}], client=client, progress=False)
    assert done[0]["new_mapped_blocks"] == 0


def test_local_cluster_workers_do_not_run_the_statistical_profiler():
    """Each worker's profiler samples its threads every 10 ms, for a dashboard the pipeline does not open; it
    made a single-threaded worker infer 7 % slower than the same code outside Dask."""
    with dask_client(1, None, "auto") as client:
        assert set(client.run(_profiler_enabled).values()) == {False}


def _profiler_enabled() -> bool:
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled"))


def _mapped_blocks_for_an_array(item: dict) -> dict:
    import ctypes

    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblks
    block = np.ones(1 << 19)  # 4 MiB
    after = libc.mallinfo2().hblks
    del block
    return {"case_id": item["case_id"], "new_mapped_blocks": int(after - before)}


def _worker_variable(key: str) -> str | None:
    import os as worker_os  # the worker's own environment (os.environ.get would pickle this process's mapping)

    return worker_os.environ.get(key)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env["PYTHONPATH"] = str(ROOT)
    return env
