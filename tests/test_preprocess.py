"""The preprocessing stage: work counter, incremental additions, crash safety, a real Dask cluster,
and the exact round trip on the real hippocampus cohort."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_catalog.demo import generate_demo_cohort
from data_catalog.ingest import ingest
from data_catalog.case_worker import case_complete, case_records
from data_catalog.preprocess import run_preprocessing
from data_catalog.store import PreprocessedStore
from data_catalog.tables import Catalog
from unet3d.io import read_image, to_numpy
from unet3d.resample import invert_labels
from pipeline_helpers import start_dask_scheduler, stop_processes

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"target_spacing": "auto", "normalisation": "auto", "workers": 2, "dask_address": None,
          "image_interpolation": "cubic", "label_interpolation": "linear", "memory_limit": "2GB"}


def _cohort(tmp_path, n, shape=(32, 32, 16)) -> Path:
    return generate_demo_cohort(tmp_path / "src", n_cases=n, seed=5, shape=shape, base_spacing=(3.0, 3.0, 6.0))


def _complete_cases(ws: Path, cohort: str, plan_id: str) -> list[Path]:
    return [d for d in (ws / "preprocessed" / cohort / plan_id).iterdir() if d.is_dir() and not d.name.startswith(".")]


def test_rerun_does_nothing_and_new_cases_cost_one_each(tmp_path):
    src, ws = _cohort(tmp_path, 10), tmp_path / "ws"
    ingest(src, "demo", ws)
    first = run_preprocessing(ws, "demo", CONFIG, spacing_factors=(1.0, 2.0), progress=False)
    assert first.processed == 20 and first.cached == 0 and not first.failed
    second = run_preprocessing(ws, "demo", CONFIG, spacing_factors=(1.0, 2.0), progress=False)
    assert second.processed == 0 and second.cached == 20  # the work counter: nothing resampled
    assert second.worker_memory == {}  # no cluster was even started

    _cohort(tmp_path, 15)  # the generator adds cases 10..14, old files untouched
    ingest(src, "demo", ws)
    third = run_preprocessing(ws, "demo", CONFIG, spacing_factors=(1.0,), progress=False)
    assert third.processed == 5 and third.cached == 10
    assert third.plan_ids[1.0] == first.plan_ids[1.0]  # the pinned plan did not move


def test_a_new_plan_invalidates_every_case(tmp_path):
    src, ws = _cohort(tmp_path, 10), tmp_path / "ws"
    ingest(src, "demo", ws)
    a = run_preprocessing(ws, "demo", CONFIG, progress=False)
    b = run_preprocessing(ws, "demo", dict(CONFIG, target_spacing=[4.0, 4.0, 4.0]), progress=False)
    assert a.plan_ids[1.0] != b.plan_ids[1.0] and b.processed == 10
    plan = PreprocessedStore(ws, "demo").load_plan(b.plan_ids[1.0])
    assert plan["target_spacing"] == [4.0, 4.0, 4.0] and plan["normalisation"]["scheme"] == "ct"
    for d in _complete_cases(ws, "demo", b.plan_ids[1.0]):
        props = json.loads((d / "props.json").read_text())
        image = np.load(d / "image.npy", mmap_mode="r")
        assert image.shape[1:] == tuple(props["resampled_shape"]) and image.dtype == np.float32


# Child code for the SIGKILL test: every case the preprocessing stage maps is run through stall_before_publishing.
# Once two cases are complete, the next one is written in full under its temporary name and stopped just before
# the rename that publishes it; the worker writes the number of complete cases on the fifo READY and waits for
# the SIGKILL. (The function is defined in __main__, so Dask ships it to the worker process by value.)
STALL_BEFORE_THIRD_CASE_APPEARS = r"""
import functools
import os
import signal
from pathlib import Path

import data_catalog.preprocess as preprocess
from data_catalog.preprocess import run_preprocessing


def stall_before_publishing(func, case, plan, plan_dir):
    done = [d for d in Path(plan_dir).iterdir() if not d.name.startswith(".") and (d / "props.json").exists()]
    if len(done) >= 2:
        rename = os.rename

        def publish_never(src, dst, *args, **kwargs):
            if Path(dst).parent != Path(plan_dir):
                return rename(src, dst, *args, **kwargs)
            with open(READY, "w") as fifo:
                fifo.write(f"{len(done)}\n")
            while True:
                signal.pause()

        os.rename = publish_never
    return func(case, plan, plan_dir)


map_cases = preprocess.map_cases


def map_cases_stalling(func, items, *args, **kwargs):
    return map_cases(functools.partial(stall_before_publishing, func), items, *args, **kwargs)


preprocess.map_cases = map_cases_stalling
"""


def test_sigkill_midway_leaves_nothing_partial_and_the_rerun_completes(tmp_path):
    src, ws = _cohort(tmp_path, 14, shape=(96, 96, 48)), tmp_path / "ws"
    ingest(src, "demo", ws)
    ready = tmp_path / "ready"
    os.mkfifo(ready)
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              f"READY = {str(ready)!r}\n"
              + STALL_BEFORE_THIRD_CASE_APPEARS +
              "if __name__ == '__main__':\n"
              f"    run_preprocessing({str(ws)!r}, 'demo', {dict(CONFIG, workers=1, target_spacing=[0.9, 0.9, 0.9])!r},"
              " progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, cwd=tmp_path)
    root = ws / "preprocessed" / "demo"
    # Opened read-write so that opening does not block and the child's write finds a reader. The kill follows the
    # child's message; the one-second select only notices a child that ended without reaching the crash point.
    fifo = os.open(ready, os.O_RDWR)
    reported = b""
    try:
        deadline = time.monotonic() + 240
        while not reported.endswith(b"\n") and proc.poll() is None and time.monotonic() < deadline:
            if select.select([fifo], [], [], 1.0)[0]:
                reported += os.read(fifo, 64)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler and the worker processes
        proc.wait(timeout=60)
        os.close(fifo)
    killed_with = int(reported) if reported.endswith(b"\n") else None
    assert killed_with is not None and killed_with < 14, "preprocessing finished before it could be killed"
    assert list(root.glob("*/.tmp-*")), "the kill did not land while a case was half published"

    result = run_preprocessing(ws, "demo", dict(CONFIG, target_spacing=[0.9, 0.9, 0.9]), progress=False)
    assert not result.failed
    assert result.processed + result.cached == 14 and result.processed <= 14 - killed_with + 1
    store = PreprocessedStore(ws, "demo")
    plan_id = result.plan_ids[1.0]
    assert not list(root.glob(f"{plan_id}/.tmp-*"))
    cases = case_records(Catalog(ws).cases(cohort="demo"))
    for case in cases:
        assert case_complete(store.case_dir(plan_id, case))
        image, label, props = store.load_case(plan_id, case)
        assert np.isfinite(image).all() and label.shape == image.shape[1:]


def test_preprocessing_on_a_real_dask_scheduler_with_two_workers(tmp_path):
    pytest.importorskip("distributed")
    src, ws = _cohort(tmp_path, 12), tmp_path / "ws"
    ingest(src, "demo", ws)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dask = [sys.executable, "-m", "distributed.cli"]
    scheduler, address = start_dask_scheduler(tmp_path, env)  # listening before any worker starts
    procs = [scheduler]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([*dask[:2], "distributed.cli.dask_worker", address, "--nthreads", "1",
                                           "--nworkers", "1", "--no-dashboard", "--memory-limit", "2GB"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        result = run_preprocessing(ws, "demo", dict(CONFIG, dask_address=address), progress=False)
        assert result.processed == 12 and not result.failed
        assert len(result.worker_memory) == 2
        assert all(m["peak_rss_mb"] > 0 for m in result.worker_memory.values())
    finally:
        stop_processes(list(reversed(procs)))


@pytest.mark.realdata
@pytest.mark.slow
def test_hippocampus_round_trip_is_exact_for_every_case(hippocampus_dir, tmp_path):
    ws = tmp_path / "ws"
    ingest(hippocampus_dir, "hippocampus", ws)
    result = run_preprocessing(ws, "hippocampus", dict(CONFIG, label_interpolation="nearest"), progress=False)
    assert not result.failed and result.processed == 220
    store = PreprocessedStore(ws, "hippocampus")
    plan_id = result.plan_ids[1.0]
    cases = case_records(Catalog(ws).cases(cohort="hippocampus", status="ok"))
    assert len(cases) == 220
    for case in cases:
        _image, label, props = store.load_case(plan_id, case)
        original = to_numpy(read_image(case["label_path"]))
        restored = invert_labels(np.asarray(label), props, "nearest")
        assert restored.shape == original.shape, case["case_id"]
        assert np.array_equal(restored, original.astype(restored.dtype)), case["case_id"]


def test_a_failing_case_is_recorded_and_the_others_go_on(tmp_path):
    src, ws = _cohort(tmp_path, 10), tmp_path / "ws"
    ingest(src, "demo", ws)
    broken = sorted((src / "imagesTr").glob("*.nii.gz"))[3]
    broken.write_bytes(b"this is not an image")  # damaged after ingestion
    result = run_preprocessing(ws, "demo", CONFIG, progress=False)
    assert [f["case_id"] for f in result.failed] == [broken.name[:-7]]
    assert result.processed == 9
    catalog = Catalog(ws)
    issues = catalog.read("issues")
    row = issues[issues["code"] == "preprocess_failed"].iloc[0]
    assert row["case_id"] == broken.name[:-7] and row["severity"] == "error" and row["message"]
    cases = catalog.cases(cohort="demo").set_index("case_id")
    assert cases.loc[broken.name[:-7], "status"] == "quarantined"
    assert (cases["status"] == "ok").sum() == 9


def test_refresh_tries_failed_cases_again(tmp_path):
    src, ws = _cohort(tmp_path, 10), tmp_path / "ws"
    ingest(src, "demo", ws)
    image = sorted((src / "imagesTr").glob("*.nii.gz"))[2]
    original = image.read_bytes()
    image.write_bytes(b"this is not an image")
    assert len(run_preprocessing(ws, "demo", CONFIG, progress=False).failed) == 1
    image.write_bytes(original)  # repaired, same content as ingested
    again = run_preprocessing(ws, "demo", CONFIG, refresh=True, progress=False)
    assert not again.failed and again.processed + again.cached == 10
    catalog = Catalog(ws)
    assert (catalog.cases(cohort="demo")["status"] == "ok").all()
    assert not (catalog.read("issues")["code"] == "preprocess_failed").any()


def test_ct_intensity_statistics_leave_out_the_ignore_label(tmp_path):
    """Sparse labels: the unannotated voxels carry `ignore_label` and are not foreground. The CT plan's clipping
    and z-score statistics came from every voxel with a label above 0, so the air of the unannotated slices
    (-1000 HU) entered the 'foreground' intensities of the organ (about 100 HU)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "src" / folder).mkdir(parents=True)
    for i in range(3):
        image = np.full((10, 20, 20), -1000.0, dtype=np.float32)  # z, y, x: air
        image[:, 5:15, 5:15] = 100 + rng.normal(0, 10, (10, 10, 10))  # the organ
        label = np.full(image.shape, 7, dtype=np.uint8)  # unannotated
        label[2:4] = 0  # two annotated slices: background ...
        label[2:4, 5:15, 5:15] = 1  # ... and organ
        for array, folder in ((image, "imagesTr"), (label, "labelsTr")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(tmp_path / "src" / folder / f"ct_{i:03d}.nii.gz"))
    ws = tmp_path / "ws"
    ingest(tmp_path / "src", "ct", ws, modality="CT", declared_labels={1: "organ"}, ignore_label=7)
    result = run_preprocessing(ws, "ct", dict(CONFIG, workers=1), ignore_label=7, progress=False)
    norm = PreprocessedStore(ws, "ct").load_plan(result.plan_ids[1.0])["normalisation"]
    assert norm["scheme"] == "ct"
    assert 50 < norm["mean"] < 150 and norm["clip_low"] > 0, norm
