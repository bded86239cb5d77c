"""The command's worker server (data_catalog/parallel.py: WorkerServer; issue 11, acceptance 6).

A command that runs stages on worker processes starts a fork server first; it imports the workers' modules on
an idle core while the command imports Prefect, and every worker (ingest's pool, the LocalCluster's workers) is
forked from it with those modules loaded, instead of being spawned and importing them anew (0.5-0.8 s per pool
on the 220-case hippocampus cohort: benchmarks/command_overhead.py). What the workers must still get: Ctrl-C
ignored (the command stops them), one thread each, the environment of the command that runs them, and a
worker that dies still recorded against its case.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from data_catalog import ingest as ingest_module
from data_catalog.parallel import WORKER_ENV, WORKER_SERVER, dask_client

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fork server on Windows: workers are spawned")


def _worker_facts(key: str | None = None) -> dict:
    return {"ppid": os.getppid(), "deaf_to_ctrl_c": _ctrl_c_survived(),
            "preloaded": "data_catalog.case_worker" in sys.modules and "distributed" in sys.modules,
            "env": {k: os.environ.get(k) for k in WORKER_ENV}, "key": os.environ.get(key) if key else None}


def _report(queue, key) -> None:
    queue.put(_worker_facts(key))


def _run_in_worker(key: str | None = None) -> dict:
    ctx = WORKER_SERVER.context()
    queue = ctx.Queue()
    process = ctx.Process(target=_report, args=(queue, key))
    process.start()
    facts = queue.get(timeout=60)
    process.join(timeout=60)
    return facts


@pytest.fixture
def server():
    assert threading.current_thread() is threading.main_thread()
    WORKER_SERVER.start()
    yield WORKER_SERVER
    WORKER_SERVER.stop()


def _forkserver_pid():
    from multiprocessing import forkserver
    return forkserver._forkserver._forkserver_pid


def test_workers_are_forked_from_the_server_loaded_single_threaded_and_deaf_to_ctrl_c():
    environment, handler = dict(os.environ), signal.getsignal(signal.SIGINT)
    WORKER_SERVER.start()
    try:
        assert WORKER_SERVER.running and WORKER_SERVER.context().get_start_method() == "forkserver"
        facts = _run_in_worker()
        assert facts["ppid"] == _forkserver_pid() != os.getpid()
        assert facts["preloaded"]
        assert facts["deaf_to_ctrl_c"]
        assert facts["env"] == WORKER_ENV
        # this process is as it was: its own Ctrl-C handler, its own environment
        assert signal.getsignal(signal.SIGINT) == handler and dict(os.environ) == environment
    finally:
        WORKER_SERVER.stop()


def test_the_server_is_gone_after_stop_and_workers_are_spawned_again():
    WORKER_SERVER.start()
    pid = _forkserver_pid()
    assert pid is not None
    WORKER_SERVER.stop()
    assert not WORKER_SERVER.running and _forkserver_pid() is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert WORKER_SERVER.context().get_start_method() == "spawn"


def test_a_later_command_gives_its_workers_the_environment_of_its_own_time(monkeypatch):
    for value in ("first", "second"):  # two commands in one process, as tests and notebooks run them
        monkeypatch.setenv("UNET3D_TEST_MARK", value)
        WORKER_SERVER.start()
        try:
            assert _run_in_worker("UNET3D_TEST_MARK")["key"] == value
        finally:
            WORKER_SERVER.stop()


def test_local_cluster_workers_are_forked_from_the_server(server):
    with dask_client(2, None, "auto") as client:
        facts = list(client.run(_worker_facts).values())
    assert len(facts) == 2
    for f in facts:
        assert f["ppid"] == _forkserver_pid()
        assert f["preloaded"] and f["deaf_to_ctrl_c"] and f["env"] == WORKER_ENV


def test_a_dead_ingest_worker_forked_from_the_server_is_recorded_against_its_case(server, tmp_path, monkeypatch):
    from tests.test_safety_ingest import _die_on_poison, blob, codes, write

    folder = tmp_path / "scans"
    for i in range(40):
        write(folder / f"case_{i:02d}.nii.gz", blob(shape=(6, 6, 6), seed=i))
    write(folder / "poison.nii.gz", blob(shape=(6, 6, 6)))
    monkeypatch.setattr(ingest_module, "inspect_case", _die_on_poison)
    result = ingest_module.ingest(folder, "c", tmp_path / "ws", workers=2)
    assert result.n_cases == 41 and result.n_ok == 40
    assert codes(tmp_path / "ws", "c") == {"poison": {"worker_died"}}


def test_a_command_stops_its_worker_server(tmp_path, monkeypatch):
    from flows import cli

    folder = tmp_path / "scans"
    from tests.test_safety_ingest import blob, write
    for i in range(3):
        write(folder / f"case_{i}.nii.gz", blob(shape=(6, 6, 6), seed=i))
    started = []
    real_start = WORKER_SERVER.start

    def start():
        real_start()
        started.append(_forkserver_pid())
    monkeypatch.setattr(WORKER_SERVER, "start", start)
    assert cli.main(["--workspace", str(tmp_path / "ws"), "ingest", str(folder), "--cohort", "c"]) == 0
    assert started and started[0] is not None
    assert not WORKER_SERVER.running and _forkserver_pid() is None


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C while worker processes start or stop: held back, then delivered; never lost, never raised midway
# ---------------------------------------------------------------------------------------------------------
CTRL_C_DURING_CLUSTER_START = r"""
import os, signal, sys
import distributed
from distributed.deploy.spec import SpecCluster
from data_catalog import parallel


def started_with_ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the cluster starts
    return REAL(*args, **kwargs)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        parallel.WORKER_SERVER.start()
    REAL, distributed.LocalCluster = distributed.LocalCluster, started_with_ctrl_c
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with parallel.dask_client(2, None, "auto") as client:
            print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("clusters left running:", sum(c.status.name != "closed" for c in list(SpecCluster._instances)), flush=True)
    parallel.WORKER_SERVER.stop()
"""


@pytest.mark.parametrize("mode", ["server", "spawn"])
def test_ctrl_c_while_the_local_cluster_starts_interrupts_and_leaves_no_cluster(tmp_path, mode):
    """It was ignored: SIGINT was set to SIG_IGN in this process while the workers started, so that they
    inherited it, and a press in that half second was lost (the command ran on to the end). Now it is held back
    until the cluster is up, then raised; the cluster is closed on the way out."""
    import subprocess

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_DURING_CLUSTER_START)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script), mode], capture_output=True, encoding="utf-8", timeout=120,
                          cwd=root, env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["interrupted", "clusters left running: 0"], done.stdout + done.stderr[-2000:]


def _ctrl_c_survived() -> bool:
    """Deaf to Ctrl-C: SIGINT blocked or ignored in this thread, and a SIGINT sent to the process changes nothing."""
    import time

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (adds nothing: reads the mask)
    deaf = signal.getsignal(signal.SIGINT) == signal.SIG_IGN or signal.SIGINT in blocked
    os.kill(os.getpid(), signal.SIGINT)  # as the terminal's Ctrl-C reaches every process of the group
    time.sleep(0.05)
    return deaf


@pytest.mark.parametrize("mode", ["server", "spawn"])
def test_local_cluster_workers_do_not_receive_ctrl_c(mode):
    if mode == "server":
        WORKER_SERVER.start()
    try:
        with dask_client(2, None, "auto") as client:
            assert list(client.run(_ctrl_c_survived).values()) == [True, True]
            assert client.submit(sum, [1, 2]).result() == 3
    finally:
        WORKER_SERVER.stop()


def test_a_press_while_workers_start_comes_before_an_error_of_the_start():
    from data_catalog.parallel import _ctrl_c_held

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)  # held back: nothing is raised here
                raise RuntimeError("Nanny failed to start")
    finally:
        signal.signal(signal.SIGINT, previous)
