"""Run one function over many cases on dask.distributed, with a progress bar and per-case failures.

By default a LocalCluster of `workers` single-threaded processes with a memory limit each; or the
scheduler at `dask_address` (an existing cluster: dask-jobqueue on SLURM, dask-kubernetes, `dask scheduler`).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

# Numerical libraries in a worker must not start their own thread pools: one worker is one core.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}


@contextlib.contextmanager
def dask_client(workers: int, dask_address: str | None, memory_limit: str) -> Iterator[Any]:
    """A Dask client: on the scheduler at `dask_address`, else on a LocalCluster of `workers` single-threaded
    processes (the settings of unet3d.config.PreprocessConfig, where their defaults are written)."""
    from distributed import Client, LocalCluster

    if dask_address:
        log.info("preprocessing on the Dask scheduler at %s", dask_address)
        with Client(dask_address, timeout="30s") as client:
            yield client
        return
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                           dashboard_address=None, silence_logs=logging.ERROR, env=dict(WORKER_ENV))
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run_chunk(func: Callable[..., dict], items: list[dict], *args) -> list[dict]:
    return [func(item, *args) for item in items]


def map_cases(func: Callable[..., dict], items: Sequence[dict], *args, client=None, desc: str = "cases",
              progress: bool = True, chunk_size: int | None = None) -> list[dict]:
    """func(item, *args) for every item on the Dask client; results in completion order.

    Small cases are grouped into chunks (a task costs the scheduler about a millisecond; a small case
    is not much more). `func` returns {"status": "failed"} for a case whose data is bad. A failure of the
    machine is not the case's: an EnvironmentFault raised by `func` (disk full, I/O error, no memory), or a
    worker that died (Dask's KilledWorker: killed on every worker it was tried on, as an out-of-memory
    kill does), cancels the remaining work and raises EnvironmentFault, whose one line names the problem
    and the cases. Cases completed before stay completed, and nothing is recorded against the cases.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not items:
        return []
    items = list(items)
    if chunk_size is None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        chunk_size = max(1, min(8, len(items) // (n_workers * 6)))
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    futures = client.map(_run_chunk, [func] * len(chunks), chunks, *[[a] * len(chunks) for a in args], pure=False,
                         key=[f"{desc}-{i}-{c[0]['case_id']}" for i, c in enumerate(chunks)])
    by_key = {f.key: c for f, c in zip(futures, chunks)}
    results = []
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    try:
        for future in as_completed(futures):
            chunk = by_key[future.key]
            try:
                results.extend(future.result())
            except Exception as exc:
                raise _environment_fault(exc, desc, chunk) from exc
            bar.update(len(chunk))
            future.release()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return results


_WORKER_DEATHS = ("KilledWorker", "CommClosedError", "StreamClosedError", "FutureCancelledError")


def _environment_fault(exc: BaseException, desc: str, chunk: list[dict]) -> BaseException:
    """The exception a failed chunk becomes: an EnvironmentFault for the machine's problems, else itself."""
    from .case_worker import EnvironmentFault, as_environment_fault

    if isinstance(exc, EnvironmentFault):
        return exc
    ids = ", ".join(str(item["case_id"]) for item in chunk[:5]) + (f" (+{len(chunk) - 5} more)" if len(chunk) > 5 else "")
    fault = as_environment_fault(exc, f"{desc} of cases {ids}")
    if fault is not None:
        return fault
    if type(exc).__name__ in _WORKER_DEATHS:
        detail = " ".join(str(exc).split())[:300]
        return EnvironmentFault(None, f"a worker process died (killed, e.g. out of memory: raise "
                                      f"preprocess.memory_limit or use fewer workers) during {desc} of cases {ids}: "
                                      f"{type(exc).__name__}: {detail}")
    return exc


def worker_memory(client) -> dict[str, dict[str, float]]:
    """Peak and current RSS (MB) of every worker process."""
    peaks = client.run(_peak_rss_mb)
    current = client.run(_current_rss_mb)
    return {w: {"peak_rss_mb": peaks[w], "rss_mb": current[w]} for w in peaks}
