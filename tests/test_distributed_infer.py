"""Inference and evaluation on a real Dask cluster (a `dask scheduler` and two `dask worker` processes on
loopback): the same predictions and metric rows as one process, and a worker killed midway loses no finished
case (the rerun predicts only the missing ones)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_helpers import start_dask_scheduler, stop_processes, write_config

from data_catalog.case_worker import EnvironmentFault, case_records
from data_catalog.demo import generate_demo_cohort
from data_catalog.ingest import ingest
from data_catalog.parallel import case_client, evaluate_on_cluster, infer_on_cluster
from data_catalog.preprocess import run_preprocessing
from data_catalog.store import PreprocessedStore
from data_catalog.tables import Catalog
from unet3d.evaluation import EvaluatedCase, EvaluatedStage, evaluate_cases
from unet3d.inference import ModelRef, PredictionJob, StageModel, infer_cases
from unet3d.io import read_image, to_numpy
from unet3d.train import ModelFiles, build_model_from_config

pytestmark = pytest.mark.slow
distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parent.parent
CLASSES = {0: "background", 1: "organ", 2: "lesion"}
N_CASES = 14


def _random_model(folder: Path, spacing) -> Path:
    """A model folder (model.json + best checkpoint) with seeded random weights: inference needs a network,
    not a good one."""
    config = {"architecture": "unet3d", "in_channels": 1, "num_classes": 3, "features": [8, 16],
              "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "norm": "instance",
              "dropout": 0.0, "deep_supervision": False}
    torch.manual_seed(0)
    network = build_model_from_config(config)
    files = ModelFiles(folder)
    folder.mkdir(parents=True)
    torch.save({"model": network.state_dict()}, files.best_checkpoint)
    files.model_json.write_text(json.dumps({
        "model": config, "patch_size": [16, 16, 16], "spacing": list(spacing), "classes": CLASSES,
        "label_map": {0: 0, 1: 1, 2: 2}, "roi": None, "stage": "full"}))
    return folder


def _start_cluster(folder: Path, env: dict, allowed_failures: int = 3) -> tuple[subprocess.Popen, str,
                                                                                list[subprocess.Popen]]:
    """A `dask scheduler` (listening before any worker starts) and two nanny-less `dask worker`s (the Popen is the
    worker process itself, so that SIGKILL really removes it): (scheduler, its address, workers).
    allowed_failures 0: the scheduler gives up on a task at its first lost worker, so that killing a worker fails
    the run and the rerun has something to redo (Dask's default, 3, retries it on the other worker)."""
    scheduler, address = start_dask_scheduler(
        folder, dict(env, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=str(allowed_failures)))
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                 "--no-nanny", "--no-dashboard", "--memory-limit", "2GB"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    return scheduler, address, workers


def test_a_test_cluster_scheduler_is_up_on_a_port_of_its_own_before_workers_start(tmp_path):
    """The test clusters picked a free port and handed it to the scheduler while its workers started: once the
    system gave a worker that very port first, the scheduler died and the suite hung (CI, this round)."""
    scheduler, address = start_dask_scheduler(tmp_path, dict(os.environ))
    try:
        with distributed.Client(address, timeout="30s") as client:
            assert client.scheduler_info()["address"] == address  # the scheduler answers there, nothing else
    finally:
        stop_processes([scheduler])


def test_one_case_or_one_local_worker_starts_no_cluster():
    for n_cases, workers in ((1, 4), (0, 2), (20, 1)):
        with case_client(n_cases, workers, None, "2GB") as client:
            assert client is None, (n_cases, workers)


# On a worker: the ids of the models it holds (the same id later: the model was not reloaded). A lambda, because
# cloudpickle ships it by value; a named function of this test module would have to be importable on the worker.
_loaded_model_ids = lambda: [id(m) for m in __import__("unet3d.inference").inference._loaded_models.values()]  # noqa


def _wait_until_idle(client) -> None:
    """Until no worker runs a task, twice in a row (a cancelled task still runs to its end, and writes its case)."""
    quiet = 0
    while quiet < 2:
        running = client.run(lambda dask_worker: len(dask_worker.state.all_running_tasks))
        quiet = quiet + 1 if not any(running.values()) and not any(client.processing().values()) else 0
        time.sleep(0.1)


def _finished(folder: Path) -> list[Path]:
    """The prediction files of a folder, not the hidden temporaries a writer renames onto them."""
    return sorted(p for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def _predictions(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: to_numpy(read_image(p)) for p in _finished(folder)}


def _file_identity(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished(folder)}


def test_inference_and_evaluation_on_two_dask_workers_match_one_process_and_survive_a_killed_worker(tmp_path):
    src = generate_demo_cohort(tmp_path / "src", n_cases=N_CASES, seed=5, shape=(40, 40, 20),
                               base_spacing=(2.0, 2.0, 4.0))
    ws = tmp_path / "ws"
    ingest(src, "demo", ws)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    scheduler, address, workers = _start_cluster(tmp_path, env, allowed_failures=0)
    try:
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            pre = run_preprocessing(ws, "demo", {"workers": 2, "dask_address": address, "memory_limit": "2GB"},
                                    progress=False)
            assert pre.processed == N_CASES and not pre.failed
            store = PreprocessedStore(ws, "demo")
            plan = store.load_plan(pre.plan_ids[1.0])
            model_dir = _random_model(tmp_path / "model", plan["target_spacing"])
            records = case_records(Catalog(ws).cases(cohort="demo", status="ok"))
            assert len(records) == N_CASES

            def jobs(out: Path) -> list[PredictionJob]:
                return [PredictionJob(r["case_id"], {"full": out / f"{r['case_id']}.nii.gz"},
                                      case_dirs=[store.case_dir(plan["plan_id"], r)]) for r in records]

            stages = [EvaluatedStage("full", {c: n for c, n in CLASSES.items() if c}, {0: 0, 1: 1, 2: 2})]

            def evaluated(out: Path) -> list[EvaluatedCase]:
                return [EvaluatedCase(r["case_id"], "test", r["label_path"], {"full": out / f"{r['case_id']}.nii.gz"})
                        for r in records]

            settings = dict(overlap=0.5, tta=False, batch_size=2)
            ref = ModelRef.of(model_dir, device="cpu")

            # --- one process: the reference ---------------------------------------------------------------
            single = tmp_path / "single"
            one = infer_cases(jobs(single), [StageModel.load(model_dir, device="cpu")], [plan], **settings,
                              progress=False)
            assert one.predicted == N_CASES
            voxels = np.stack([np.bincount(a.ravel(), minlength=3) for a in _predictions(single).values()])
            assert (voxels[:, 1:] > 0).any(), "the model predicts background only: a weak comparison"
            rows, lesion_rows = evaluate_cases(evaluated(single), stages, "demo", "unet3d", 26, progress=False)

            # --- the cluster: same arrays, same rows in the same order ------------------------------------
            spread = tmp_path / "spread"
            two = infer_on_cluster(client, jobs(spread), [ref], [plan], **settings, progress=False)
            assert [o.case_id for o in two.outcomes] == [r["case_id"] for r in records]
            assert two.predicted == N_CASES and two.resumed == 0
            reference_arrays, spread_arrays = _predictions(single), _predictions(spread)
            assert reference_arrays.keys() == spread_arrays.keys() and len(reference_arrays) == N_CASES
            for name, array in reference_arrays.items():
                np.testing.assert_array_equal(spread_arrays[name], array, err_msg=name)
            rows2, lesion_rows2 = evaluate_on_cluster(client, evaluated(spread), stages, "demo", "unet3d", 26,
                                                      progress=False)
            pd.testing.assert_frame_equal(pd.DataFrame(rows2), pd.DataFrame(rows))
            pd.testing.assert_frame_equal(pd.DataFrame(lesion_rows2), pd.DataFrame(lesion_rows))
            # each worker loaded the model once, whatever number of cases it predicted
            # each worker that predicted holds the model once; the same object serves the later runs (not reloaded)
            loaded = client.run(_loaded_model_ids)
            assert all(len(ids) <= 1 for ids in loaded.values()) and any(loaded.values()), loaded
            assert set(client.run(torch.get_num_threads).values()) == {1}  # two workers on two cores, not four threads

            # --- a worker killed once predictions exist: finished cases stay, the rerun redoes the rest -----
            killed = tmp_path / "killed"
            failure: list[BaseException] = []

            def first_run():
                try:
                    infer_on_cluster(client, jobs(killed), [ref], [plan], **settings, progress=False)
                except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                    failure.append(exc)

            runner = threading.Thread(target=first_run)
            runner.start()
            deadline = time.monotonic() + 300
            while not _finished(killed):
                assert runner.is_alive() and time.monotonic() < deadline, "no prediction appeared"
                time.sleep(0.01)
            finished_at_kill = _file_identity(killed)
            busy = [a for a, keys in client.processing().items() if keys]  # a worker with a case in hand
            pids = client.run(os.getpid)
            victim = next(p for p in workers if p.pid == pids[busy[0]])
            os.kill(victim.pid, signal.SIGKILL)
            runner.join(timeout=300)
            assert not runner.is_alive()
            assert len(finished_at_kill) < N_CASES, "every case had finished before the kill"
            assert failure and isinstance(failure[0], EnvironmentFault), failure
            assert "worker process died" in str(failure[0])

            # a case the surviving worker was running when the run was cancelled still finishes (and is kept)
            _wait_until_idle(client)
            survivors = _file_identity(killed)
            assert finished_at_kill.items() <= survivors.items()  # nothing finished was lost or rewritten
            assert len(survivors) < N_CASES
            rerun = infer_on_cluster(client, jobs(killed), [ref], [plan], **settings, progress=False)
            assert rerun.resumed == len(survivors) and rerun.predicted == N_CASES - len(survivors)
            assert survivors.items() <= _file_identity(killed).items()  # the rerun did not touch them
            survivor = next(a for a in pids if a != busy[0])
            if loaded.get(survivor):
                assert client.run(_loaded_model_ids, workers=[survivor])[survivor] == loaded[survivor]
            # the killed writer's temporary, if it left one, went with the rewrite of its case
            assert not [p.name for p in killed.iterdir() if p.name.startswith(".")]
            rerun_arrays = _predictions(killed)
            assert rerun_arrays.keys() == reference_arrays.keys()
            for name, array in reference_arrays.items():
                np.testing.assert_array_equal(rerun_arrays[name], array, err_msg=name)

            # --- GPU work goes to the workers that declare a GPU ---------------------------------------------
            with pytest.raises(ValueError, match="no worker of the Dask scheduler declares a GPU"):
                infer_on_cluster(client, jobs(tmp_path / "cuda"), [ModelRef.of(model_dir, device="cuda")], [plan],
                                 **settings, progress=False)
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--memory-limit", "2GB", "--resources", "GPU=1"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            client.wait_for_workers(2, timeout=120)
            gpu_workers = {a for a, w in client.scheduler_info()["workers"].items()
                           if (w.get("resources") or {}).get("GPU")}
            assert len(gpu_workers) == 1
            with distributed.get_task_stream(client) as stream:
                routed = infer_on_cluster(client, jobs(tmp_path / "routed"), [ModelRef.of(model_dir, device="auto")],
                                          [plan], **settings, progress=False)
            assert routed.predicted == N_CASES
            infer_tasks = [t for t in stream.data if str(t["key"]).startswith("infer-")]
            assert infer_tasks and {t["worker"] for t in infer_tasks} == gpu_workers
    finally:
        stop_processes([*workers, scheduler])


def test_the_pipeline_infers_and_evaluates_on_a_dask_scheduler_as_in_one_process(tiny_cohort, tmp_path):
    """flows: run_infer and run_evaluate on `preprocess.dask_address` (a cascade, so the stage-1 cache too) give
    the single-process run's predictions and metric rows; dask_address is runtime-only, so the run is the same."""
    from flows.pipeline import pipeline_flow

    ws = tmp_path / "ws"
    first = pipeline_flow(config_path=str(write_config(tmp_path / "one.yaml", tiny_cohort)), workspace=str(ws))
    run_id = first["report"]["run_id"]
    predictions = ws / "predictions" / run_id
    reference = {p.relative_to(predictions): to_numpy(read_image(p)) for p in predictions.rglob("*.nii.gz")}
    assert len(reference) == 2 * len(first["infer"]["splits"]) >= 4
    tables = {name: pd.read_parquet(ws / "reports" / name) for name in ("metrics", "lesions")}

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    scheduler, address, workers = _start_cluster(tmp_path, env)
    try:
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            config = write_config(tmp_path / "cluster.yaml", tiny_cohort,
                                  preprocess={"workers": 2, "dask_address": address})
            second = pipeline_flow(config_path=str(config), workspace=str(ws), refresh=["infer"])
            # the work ran on the workers: each that predicted holds both stages' models, loaded once
            loaded = client.run(lambda: len(__import__("unet3d.inference").inference._loaded_models))
        assert sum(loaded.values()) >= 2 and set(loaded.values()) <= {0, 2}, loaded
    finally:
        stop_processes([*workers, scheduler])
    assert second["report"]["run_id"] == run_id
    assert second["infer"]["predicted"] == len(first["infer"]["splits"]) and second["infer"]["resumed"] == 0
    again = {p.relative_to(predictions): to_numpy(read_image(p)) for p in predictions.rglob("*.nii.gz")}
    assert again.keys() == reference.keys()
    for name, array in reference.items():
        np.testing.assert_array_equal(again[name], array, err_msg=str(name))
    for name, table in tables.items():
        pd.testing.assert_frame_equal(pd.read_parquet(ws / "reports" / name), table)
