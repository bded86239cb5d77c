"""Run one function over many cases on dask.distributed, with a progress bar and per-case failures.

By default a LocalCluster of `workers` single-threaded processes with a memory limit each; or the
scheduler at `dask_address` (an existing cluster: dask-jobqueue on SLURM, dask-kubernetes, `dask scheduler`).
Preprocessing, inference and evaluation all run here, one case per task (small cases grouped in chunks).

GPU workers: inference asks for the worker resource "GPU" (one per task) whenever a worker of the cluster
declares it, so that GPU work goes to GPU workers only. Start one single-threaded worker per GPU:

    dask scheduler --host 0.0.0.0 --port 8786
    CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1
    CUDA_VISIBLE_DEVICES=1 dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1
    dask worker tcp://HOST:8786 --nthreads 1 --nworkers 8     # CPU workers: preprocessing and evaluation

and set `preprocess.dask_address: tcp://HOST:8786`. The workers need this repository importable (PYTHONPATH or
an installed package), as for preprocessing. Start them with DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
in their environment, as the LocalCluster's are (WORKER_DASK_CONFIG below): Dask's sampling profiler slows
compute-bound tasks by about 7 %.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

# Numerical libraries in a worker must not start their own thread pools: one worker is one core.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}

# No statistical profiler in the workers: it samples every worker thread each 10 ms for a dashboard the
# pipeline does not open, and cost single-threaded inference 7 %. (A nanny hands its config to its worker.)
WORKER_DASK_CONFIG = {"distributed.worker.profile.enabled": False}


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ctrl-C held back while worker processes start or stop, then delivered to the command's own handler.

    * SIGINT is blocked in this thread for the block: the threads started meanwhile (a LocalCluster's event loop)
      and every process started from them or from here inherit the blocked signal, so a worker never receives
      the terminal's Ctrl-C (it reaches every process of the group; the command stops its workers itself, and
      they print no KeyboardInterrupt tracebacks). The stdlib starts its resource tracker the same way.
    * A press meanwhile is recorded, then handed to the handler that was in place once the block is done: it is
      neither lost (SIGINT used to be ignored here, and a press while a cluster started was dropped) nor raised
      midway (a half-started cluster would be left to distributed's exit handler, which waits up to 10 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    blocking = hasattr(signal, "pthread_sigmask")  # POSIX; Windows has no signal masks
    if blocking:
        from multiprocessing import resource_tracker

        # started first: starting it later, inside the block, ends by unblocking SIGINT in this thread
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending press reaches the recorder
        signal.signal(signal.SIGINT, previous)
        if pressed and callable(previous):
            previous(signal.SIGINT, None)  # the command's handler (raises KeyboardInterrupt): the press comes first


# Modules a case worker needs (inspection at ingest; preprocessing, inference and evaluation on Dask workers),
# imported once by the command's worker server so that each worker process starts with them loaded.
WORKER_MODULES = ("data_catalog.validate", "data_catalog.case_worker", "distributed")


class WorkerServer:
    """The command's source of worker processes: a multiprocessing fork server, started at the beginning of a
    command, that imports the workers' modules on an idle core while this process imports Prefect, and then
    forks every worker process (ingest's pool, the LocalCluster's workers) with them already loaded. A spawned
    worker imports them anew each time: the pool and the cluster cost 0.5-0.8 s each to start, on a command that
    does 1-2 s of work (issue 11).

    Started from the main thread with SIGINT blocked and WORKER_ENV in its environment: every worker forked from
    it inherits both (Ctrl-C stops the command, which closes its workers; one thread per worker). Stopped at the
    end of the command, so a later command in the same process gets the environment of its own time. Where a
    fork server is not available (Windows), or outside a command, workers are spawned as before."""

    def __init__(self) -> None:
        self.pid: int | None = None  # the process that started the server: only its workers are forked from it

    def start(self) -> None:
        import multiprocessing

        if (self.pid == os.getpid() or threading.current_thread() is not threading.main_thread()
                or "forkserver" not in multiprocessing.get_all_start_methods()):
            return
        from multiprocessing import forkserver

        forkserver.set_forkserver_preload(list(WORKER_MODULES))
        with _ctrl_c_held(), _parent_environment_kept():  # the server and its workers never receive Ctrl-C
            os.environ.update(WORKER_ENV)
            forkserver.ensure_running()  # returns at once: the server imports in its own process
        self.pid = os.getpid()

    def context(self):
        """The multiprocessing context for this command's worker processes."""
        import multiprocessing

        return multiprocessing.get_context("forkserver" if self.running else "spawn")

    @property
    def running(self) -> bool:
        return self.pid == os.getpid()

    def stop(self) -> None:
        if not self.running:
            return
        from multiprocessing import forkserver

        self.pid = None
        server = forkserver._forkserver
        with server._lock:
            pid, alive = server._forkserver_pid, server._forkserver_alive_fd
            if pid is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # it may still be importing: do not wait for that
            os.close(alive)
            with contextlib.suppress(ChildProcessError):  # reaped already
                os.waitpid(pid, 0)
            with contextlib.suppress(OSError, TypeError):
                os.unlink(server._forkserver_address)
            server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None


WORKER_SERVER = WorkerServer()


@contextlib.contextmanager
def dask_client(workers: int, dask_address: str | None, memory_limit: str) -> Iterator[Any]:
    """A Dask client: on the scheduler at `dask_address`, else on a LocalCluster of `workers` single-threaded
    processes (the settings of unet3d.config.PreprocessConfig, where their defaults are written)."""
    import dask
    from distributed import Client, LocalCluster

    if dask_address:
        log.info("working on the Dask scheduler at %s", dask_address)
        with Client(dask_address, timeout="30s") as client:
            yield client
        return
    # The scheduler's HTTP server starts even without a dashboard, on port 8787 when the address is None (and
    # warns "Port 8787 is already in use" when another cluster has it): a free local port instead.
    config = {**WORKER_DASK_CONFIG,
              "distributed.worker.multiprocessing-method": WORKER_SERVER.context().get_start_method()}
    cluster = None
    try:
        with _ctrl_c_held(), _parent_environment_kept(), dask.config.set(config):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR, env=dict(WORKER_ENV))
        with Client(cluster) as client:
            yield client
    finally:
        if cluster is not None:
            # a worker restarted by its nanny wrote the variables again; a Ctrl-C waits for the close
            with _ctrl_c_held(), _parent_environment_kept():
                cluster.close()


@contextlib.contextmanager
def _parent_environment_kept() -> Iterator[None]:
    """os.environ as it was before the block. distributed's Nanny writes its pre-spawn variables
    (OMP_NUM_THREADS=1 ...) into this process's environment to pass them to a worker, and leaves them there;
    torch sizes its thread pool from OMP_NUM_THREADS when it first runs, so training after preprocessing
    ran on one core."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_TUNED = False


def _heap_for_large_arrays() -> None:
    """Undo, once per worker process, what MALLOC_TRIM_THRESHOLD_ does to glibc's malloc. Every Dask nanny sets
    it (distributed.nanny.pre-spawn-environ, to hand memory back to the system sooner), and setting it also
    pins the mmap threshold at 128 KiB: each array or tensor above that is then mapped fresh from the kernel
    and zeroed page by page, and inference on a worker ran 1.5-2x slower than the same code elsewhere. These
    are the limits glibc's own adaptive thresholds reach (mmap from 32 MiB, heap trimmed above 64 MiB free).
    A worker of an existing cluster gets the same, since the nanny's environment cannot be changed from here."""
    global _HEAP_TUNED
    if _HEAP_TUNED:
        return
    _HEAP_TUNED = True
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
    except (OSError, AttributeError):  # not glibc (musl, ...): its malloc has no such switch
        pass


def cases_per_task(n_cases: int, n_workers: int) -> int:
    """How many cases one task takes: up to 8 small cases together (a task costs about a millisecond to hand
    over, a small case not much more), while every worker still gets about six tasks to balance the load."""
    return max(1, min(8, n_cases // (max(1, n_workers) * 6)))


def _run_chunk(func: Callable[..., dict], items: list[dict], *args) -> list[dict]:
    _heap_for_large_arrays()
    return [func(item, *args) for item in items]


def map_cases(func: Callable[..., dict], items: Sequence[dict], *args, client=None, desc: str = "cases",
              progress: bool = True, chunk_size: int | None = None, resources: dict | None = None) -> list[dict]:
    """func(item, *args) for every item on the Dask client; results in completion order.

    Small cases are grouped into chunks (a task costs the scheduler about a millisecond; a small case
    is not much more). `func` returns {"status": "failed"} for a case whose data is bad. A failure of the
    machine is not the case's: an EnvironmentFault raised by `func` (disk full, I/O error, no memory), or a
    worker that died (Dask's KilledWorker: killed on every worker it was tried on, as an out-of-memory
    kill does), cancels the remaining work and raises EnvironmentFault, whose one line names the problem
    and the cases. Cases completed before stay completed, and nothing is recorded against the cases.
    `resources`: worker resources each task needs (e.g. {"GPU": 1}).
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not items:
        return []
    items = list(items)
    if chunk_size is None:
        chunk_size = cases_per_task(len(items), len(client.scheduler_info().get("workers", {})))
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    futures = client.map(_run_chunk, [func] * len(chunks), chunks, *[[a] * len(chunks) for a in args], pure=False,
                         key=[f"{desc}-{i}-{c[0]['case_id']}" for i, c in enumerate(chunks)], resources=resources)
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


# ---------------------------------------------------------------------------------------------------------
# Inference and evaluation per case on the cluster (the per-case functions live in unet3d)
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def case_client(n_cases: int, workers: int, dask_address: str | None, memory_limit: str) -> Iterator[Any]:
    """A Dask client for `n_cases` cases, or None where one process does the work as fast: a single case, or
    a single local worker (starting a cluster for that costs seconds and gains nothing)."""
    if n_cases <= 1 or (workers <= 1 and not dask_address):
        yield None
        return
    with dask_client(min(workers, n_cases), dask_address, memory_limit) as client:
        yield client


def _worker_torch_threads() -> None:
    """One torch thread per worker: two single-threaded workers on two cores, not two workers of N threads each
    (a LocalCluster's OMP_NUM_THREADS does not reach the workers of an existing cluster)."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _infer_item(item: dict, refs, plans, overlap: float, tta: bool, batch_size: int, resume: bool,
                keep_going: bool) -> dict:
    from unet3d.inference import infer_case, load_models

    _worker_torch_threads()
    outcome = infer_case(item["job"], load_models(refs), plans, overlap, tta, batch_size, resume, keep_going)
    return {"case_id": item["case_id"], "index": item["index"], "outcome": outcome}


def gpu_resources(client, device: str) -> dict | None:
    """{"GPU": 1} when inference may use CUDA and the cluster has workers that declare a GPU; None otherwise.
    Asking for CUDA on an existing cluster where no worker declares one is refused (the tasks would land on
    CPU-only workers and fail there)."""
    if device == "cpu":
        return None
    workers = client.scheduler_info().get("workers", {})
    if any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers.values()):
        return {"GPU": 1}
    if device == "cuda" and client.cluster is None:
        raise ValueError("train.device is 'cuda' but no worker of the Dask scheduler declares a GPU: start GPU "
                         "workers with `dask worker ADDRESS --nthreads 1 --resources GPU=1` (data_catalog/parallel.py)")
    return None


def infer_on_cluster(client, jobs, refs, plans, overlap: float, tta: bool, batch_size: int, resume: bool = True,
                     keep_going: bool = False, progress: bool = True, desc: str = "infer"):
    """unet3d.inference.infer_cases over the cluster, one task per case: each worker
    loads the models of `refs` (unet3d.inference.ModelRef) once, and writes each case's label maps atomically,
    so a worker lost midway loses only its current case. The summary's outcomes are in the order of `jobs`."""
    from unet3d.inference import InferenceSummary, infer_case, job_pending

    outcomes = [None] * len(jobs)
    items = []
    for i, job in enumerate(jobs):
        if job_pending(job, resume):
            items.append({"case_id": job.case_id, "index": i, "job": job})
        else:  # resumed or not preprocessed: answered here, no model needed, no task sent
            outcomes[i] = infer_case(job, [], plans, resume=resume)
    if items:
        resources = gpu_resources(client, refs[0].device) if refs else None
        # One case per task: a case's inference takes far longer than a task costs, and with chunks the last
        # one kept a single worker busy while the others idled (25 chunks of 8 on 2 workers: 8 cases' time).
        for d in map_cases(_infer_item, items, list(refs), list(plans), overlap, tta, batch_size, resume, keep_going,
                           client=client, desc=desc, progress=progress, resources=resources, chunk_size=1):
            outcomes[d["index"]] = d["outcome"]
    for o in outcomes:
        for w in o.warnings:
            log.warning("case %s: %s", o.case_id, w)
    return InferenceSummary(outcomes)


def infer_jobs(jobs, refs, plans, pre, infer, resume: bool = True, progress: bool = True, desc: str = "infer"):
    """unet3d.inference.infer_cases over `jobs` with the models of `refs` (unet3d.inference.ModelRef): on the Dask
    cluster of `pre` (PreprocessConfig: workers, dask_address, memory_limit) when more than one case is pending
    and there is more than one worker or an address, else in this process; `infer` (InferConfig) gives overlap,
    TTA and batch size. Where the work runs changes no output (tests/test_distributed_infer.py)."""
    from unet3d.inference import StageModel, infer_cases, job_pending

    pending = sum(job_pending(job, resume) for job in jobs)
    with case_client(pending, pre.workers, pre.dask_address, pre.memory_limit) as client:
        if client is not None:  # each worker loads the models once, keyed by the checkpoint's sha256
            return infer_on_cluster(client, jobs, refs, plans, infer.overlap, infer.tta, infer.batch_size,
                                    resume=resume, progress=progress, desc=desc)
        models = [StageModel.load(r.model_dir, device=r.device, checkpoint=r.checkpoint, margin_mm=r.margin_mm)
                  for r in refs] if pending else []  # nothing to predict: no model to load
        return infer_cases(jobs, models, plans, infer.overlap, infer.tta, infer.batch_size, resume=resume,
                           progress=progress, desc=desc)


def evaluate_jobs(cases, stages, cohort: str, model: str, pre, connectivity: int,
                  progress: bool = True) -> tuple[list[dict], list[dict]]:
    """unet3d.evaluation.evaluate_cases (metric rows, lesion rows), on the Dask cluster of `pre` when there are
    several cases and workers, else in this process: the same rows in the same order either way."""
    from unet3d.evaluation import evaluate_cases

    with case_client(len(cases), pre.workers, pre.dask_address, pre.memory_limit) as client:
        if client is None:
            return evaluate_cases(cases, stages, cohort, model, connectivity, progress=progress)
        return evaluate_on_cluster(client, cases, stages, cohort, model, connectivity, progress=progress)


def _evaluate_item(item: dict, stages, cohort: str, model: str, connectivity: int) -> dict:
    from unet3d.evaluation import evaluate_case

    rows, lesion_rows = evaluate_case(item["case"], stages, cohort, model, connectivity)
    return {"case_id": item["case_id"], "index": item["index"], "rows": rows, "lesion_rows": lesion_rows}


def evaluate_on_cluster(client, cases, stages, cohort: str, model: str, connectivity: int,
                        progress: bool = True) -> tuple[list[dict], list[dict]]:
    """unet3d.evaluation.evaluate_cases over the cluster, one task per case (small cases grouped): the same
    rows in the same order (that of `cases`) as the single-process loop."""
    items = [{"case_id": case.case_id, "index": i, "case": case} for i, case in enumerate(cases)]
    done = sorted(map_cases(_evaluate_item, items, list(stages), cohort, model, connectivity, client=client,
                            desc="evaluate", progress=progress), key=lambda d: d["index"])
    return [r for d in done for r in d["rows"]], [r for d in done for r in d["lesion_rows"]]
