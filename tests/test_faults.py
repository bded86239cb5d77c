"""Fault injection: a full disk (or another failure of the machine) during preprocessing is not a case's
fault. The stage fails with one line that says what happened, nothing is quarantined, nothing half-written
stays, and the rerun after space is freed gives results identical to an uninterrupted run."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_catalog import preprocess as preprocess_stage
from data_catalog.demo import generate_demo_cohort
from data_catalog.ingest import ingest
from data_catalog.case_worker import EnvironmentFault, environment_problem, preprocess_case, remove_stale_versions
from data_catalog.preprocess import run_preprocessing
from data_catalog.tables import Catalog

CONFIG = {"target_spacing": "auto", "normalisation": "auto", "workers": 1, "dask_address": None,
          "image_interpolation": "cubic", "label_interpolation": "linear", "memory_limit": "2GB"}


@contextlib.contextmanager
def _in_process_client(workers=1, dask_address=None, memory_limit="auto"):
    """Dask workers as threads of this process, so that a monkeypatched write reaches them."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture()
def threads_cluster(monkeypatch):
    monkeypatch.setattr(preprocess_stage, "dask_client", _in_process_client)


def _cohort(root: Path, n: int = 6) -> Path:
    return generate_demo_cohort(root, n_cases=n, seed=5, shape=(32, 32, 16), base_spacing=(3.0, 3.0, 6.0))


def _outputs(ws: Path, cohort: str) -> dict[str, dict]:
    """Every preprocessed case: its arrays and properties, by folder name."""
    out = {}
    for plan_dir in sorted((ws / "preprocessed" / cohort).iterdir()):
        if plan_dir.name in ("plans", "fingerprints") or not plan_dir.is_dir():
            continue
        for d in sorted(plan_dir.iterdir()):
            if d.name.startswith("."):
                continue
            out[f"{plan_dir.name}/{d.name}"] = {
                "image": np.load(d / "image.npy"),
                "label": np.load(d / "label.npy") if (d / "label.npy").exists() else None,
                "props": json.loads((d / "props.json").read_text()),
            }
    return out


def _leftovers(ws: Path) -> list[str]:
    root = ws / "preprocessed"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".tmp") or
                  (p.name.startswith(".") and p.name.endswith(".tmp")))


def _full_disk(kind: str):
    if kind == "enospc":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError("53760 requested and 6112 written")  # numpy's short write on a full disk, no errno


@pytest.mark.parametrize("kind", ["enospc", "short_write"])
def test_full_disk_during_preprocessing_quarantines_nothing_and_the_rerun_is_identical(tmp_path, monkeypatch,
                                                                                       threads_cluster, kind):
    src = _cohort(tmp_path / "src")
    reference_ws, ws = tmp_path / "reference", tmp_path / "ws"
    ingest(src, "demo", reference_ws)
    reference = run_preprocessing(reference_ws, "demo", CONFIG, spacing_factors=(1.0, 2.0), progress=False)
    assert not reference.failed and reference.processed == 12

    ingest(src, "demo", ws)
    real_save = np.save
    calls = {"n": 0}

    def save_until_the_disk_is_full(file, arr, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # the disk fills up in the middle of the third case
            Path(file).write_bytes(b"\x93NUMPY\x01\x00")  # half a file, as a full disk leaves it
            raise _full_disk(kind)
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_the_disk_is_full)
    with pytest.raises(EnvironmentFault) as info:
        run_preprocessing(ws, "demo", CONFIG, spacing_factors=(1.0, 2.0), progress=False)
    message = str(info.value)
    assert "disk full" in message and "\n" not in message, message
    catalog = Catalog(ws)
    assert (catalog.cases(cohort="demo")["status"] == "ok").all()
    assert catalog.read("issues").query("code == 'preprocess_failed'").empty
    assert _leftovers(ws) == []  # no half-written case folder or file stays behind

    monkeypatch.setattr(np, "save", real_save)  # space freed
    rerun = run_preprocessing(ws, "demo", CONFIG, spacing_factors=(1.0, 2.0), progress=False)
    assert not rerun.failed and rerun.processed + rerun.cached == 12 and rerun.cached >= 2
    assert rerun.plan_ids == reference.plan_ids
    assert (catalog.cases(cohort="demo")["status"] == "ok").all()
    assert catalog.read("issues").query("code == 'preprocess_failed'").empty
    ours, theirs = _outputs(ws, "demo"), _outputs(reference_ws, "demo")
    assert sorted(ours) == sorted(theirs) and len(ours) == 12
    for name, case in ours.items():
        assert np.array_equal(case["image"], theirs[name]["image"]), name
        assert np.array_equal(case["label"], theirs[name]["label"]), name
        assert case["props"] == theirs[name]["props"], name


def test_full_disk_while_fingerprinting_quarantines_nothing(tmp_path, monkeypatch, threads_cluster):
    """A CT cohort is fingerprinted first (intensity statistics): the disk fills up there."""
    src, ws = _cohort(tmp_path / "src"), tmp_path / "ws"
    ingest(src, "demo", ws)
    real_write_bytes = Path.write_bytes

    def write_bytes(self, data, *args, **kwargs):
        if self.parent.name == "fingerprints":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_bytes(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(EnvironmentFault, match="disk full"):
        run_preprocessing(ws, "demo", CONFIG, progress=False)
    catalog = Catalog(ws)
    assert (catalog.cases(cohort="demo")["status"] == "ok").all()
    assert catalog.read("issues").query("code == 'preprocess_failed'").empty
    assert _leftovers(ws) == []
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    rerun = run_preprocessing(ws, "demo", CONFIG, progress=False)
    assert not rerun.failed and rerun.processed == 6


def test_bad_data_is_still_a_case_failure_and_memory_errors_are_not(tmp_path, monkeypatch):
    """The line between the two: a damaged file quarantines its case; MemoryError raises."""
    src, ws = _cohort(tmp_path / "src", 1), tmp_path / "ws"
    ingest(src, "demo", ws)
    case = preprocess_stage.case_records(Catalog(ws).cases(cohort="demo"))[0]
    plan = {"plan_id": "p", "target_spacing": [3.0, 3.0, 6.0], "image_order": 1, "label_mode": "nearest",
            "normalisation": {"scheme": "zscore"}}
    Path(case["image_path"]).write_bytes(b"not an image")
    failed = preprocess_case(case, plan, str(tmp_path / "plan"))
    assert failed["status"] == "failed" and "RuntimeError" in failed["error"]

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("data_catalog.case_worker._read_case", no_memory)
    with pytest.raises(EnvironmentFault, match="out of memory while preprocessing case"):
        preprocess_case(case, plan, str(tmp_path / "plan"))


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (OSError(errno.EIO, "Input/output error"), "I/O error"),
    (OSError("53760 requested and 6112 written"), "disk full (short write)"),
    (MemoryError(), "out of memory"),
    (RuntimeError("itk::ERROR: ImportImageContainer: Failed to allocate memory for image."), "out of memory"),
    (RuntimeError("ITK cannot read"), None),
    (FileNotFoundError(errno.ENOENT, "No such file"), None),
    (ValueError("bad spacing"), None),
])
def test_environment_problems_are_told_apart_from_data_problems(exc, expected):
    assert environment_problem(exc) == expected


def test_a_dead_worker_fails_the_stage_instead_of_quarantining(tmp_path):
    """A worker process that dies (as an out-of-memory kill does) is the machine's problem: map_cases raises
    an EnvironmentFault naming the cases, and no case comes back as failed."""
    import dask
    from distributed import Client, LocalCluster

    from data_catalog.parallel import map_cases

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        # Dask blames every task the dead worker held, so the message may name case_6 as well as case_7
        with pytest.raises(EnvironmentFault, match=r"worker process died .* of cases case_\d"):
            map_cases(_die, [{"case_id": f"case_{i}"} for i in range(8)], client=client, progress=False,
                      chunk_size=1)


def _die(item: dict) -> dict:
    if item["case_id"] == "case_7":
        os._exit(9)
    return {"case_id": item["case_id"], "status": "done"}


def _two_cases_x_and_x_underscore(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    import SimpleITK as sitk
    for i, name in enumerate(("X", "X_")):
        sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(i).random((8, 9, 10)).astype(np.float32)),
                        str(src / f"{name}.nii.gz"))
    ws = tmp_path / "ws"
    ingest(src, "c", ws)
    cases = {c["case_id"]: c for c in preprocess_stage.case_records(Catalog(ws).cases(cohort="c"))}
    plan = {"plan_id": "p", "target_spacing": [1.0, 1.0, 1.0], "image_order": 1, "label_mode": "nearest",
            "normalisation": {"scheme": "zscore"}}
    return cases, plan


def test_preprocessing_case_x_keeps_the_folder_of_case_x_underscore(tmp_path):
    """Issue 10 item 6: removing stale versions of case `X` matched every folder starting with `X__`, which
    includes case `X_`'s folder `X___<key>`."""
    cases, plan = _two_cases_x_and_x_underscore(tmp_path)
    plan_dir = tmp_path / "plan"
    assert preprocess_case(cases["X_"], plan, str(plan_dir))["status"] == "done"
    assert preprocess_case(cases["X"], plan, str(plan_dir))["status"] == "done"
    stale = plan_dir / f"X__{'0' * 16}"  # an older version of X: garbage
    stale.mkdir()
    changed = dict(cases["X"], image_sha256="changed")
    assert preprocess_case(changed, plan, str(plan_dir))["status"] == "done"
    assert remove_stale_versions(plan_dir, [changed, cases["X_"]]) == 2  # the made-up one and the first X
    names = sorted(d.name for d in plan_dir.iterdir())
    assert any(n.startswith("X___") for n in names), names  # X_'s folder survives
    assert stale.name not in names and len(names) == 2, names


def test_preprocessing_a_case_does_not_list_the_plan_folder(tmp_path, monkeypatch):
    """Each case's worker listed the whole plan folder to find the case's stale versions: n listings of up to n
    folders, quadratic in the cohort (a 2,000-case cohort: 8 million entries read). The stage lists it once."""
    cases, plan = _two_cases_x_and_x_underscore(tmp_path)
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    listed = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path="."):
        listed.append(Path(path))
        return real_scandir(path)

    def listdir(path="."):
        listed.append(Path(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    for case in cases.values():
        assert preprocess_case(case, plan, str(plan_dir))["status"] == "done"
    assert plan_dir not in listed


def test_a_stale_version_left_by_a_crash_goes_at_the_next_preprocessing(tmp_path, threads_cluster):
    """A command stopped between publishing a case's new version and removing the old one: the next run of the
    stage removes the old version, although the case itself is cached by then."""
    ws = tmp_path / "ws"
    ingest(_cohort(tmp_path / "src", n=3), "demo", ws)
    result = run_preprocessing(ws, "demo", CONFIG, progress=False)
    plan_dir = preprocess_stage.PreprocessedStore(ws, "demo").plan_dir(result.plan_ids[1.0])
    first = sorted(d.name for d in plan_dir.iterdir())
    stale = plan_dir / (first[0].rsplit("__", 1)[0] + "__" + "0" * 16)
    stale.mkdir()
    again = run_preprocessing(ws, "demo", CONFIG, progress=False)
    assert again.cached == 3 and again.processed == 0
    assert sorted(d.name for d in plan_dir.iterdir()) == first


# ---------------------------------------------------------------------------------------------------------
# A full disk as the writers really report it (issue 10 items 2 and 9): torch's zip writer raises a
# RuntimeError ("[enforce fail at inline_container.cc:672] . unexpected pos"), ITK's NIfTI writer only prints
# "wrote only 0 of N bytes" on stderr and returns normally, leaving a truncated file. Both must end as one
# "disk full ... while writing PATH" line with nothing published and no temporary left.
# ---------------------------------------------------------------------------------------------------------
def _no_space_left(monkeypatch, free_bytes: int = 0):
    """os.statvfs reporting a file system with `free_bytes` free (what the writers leave when the disk fills)."""
    real_statvfs = os.statvfs

    def statvfs(path):
        st = real_statvfs(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, free_bytes // 4096, free_bytes // 4096,
                                  st.f_files, st.f_ffree, st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", statvfs)


def _torch_on_a_full_disk(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"PK\x03\x04" + b"\x00" * 722)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")


def test_torch_full_disk_error_is_told_as_disk_full(tmp_path, monkeypatch):
    import torch

    from unet3d.io import save_torch_atomic

    target = tmp_path / "checkpoint_latest.pt"
    monkeypatch.setattr(torch, "save", _torch_on_a_full_disk)
    _no_space_left(monkeypatch)
    with pytest.raises(OSError) as info:
        save_torch_atomic({"w": torch.ones(3)}, target)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "disk full" in message and str(target) in message, message
    assert "\n" not in message and "unexpected pos" in message  # the writer's own words are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_writer_error_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import torch

    from unet3d.io import save_torch_atomic

    monkeypatch.setattr(torch, "save", _torch_on_a_full_disk)
    _no_space_left(monkeypatch, free_bytes=10 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_torch_atomic({"w": torch.ones(3)}, tmp_path / "checkpoint_latest.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_itk_short_write_on_a_full_disk_is_not_published(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from unet3d.io import write_image_atomic

    target = tmp_path / "case_1.nii.gz"

    def write_image_as_itk_does_on_a_full_disk(image, path, *args, **kwargs):
        Path(path).write_bytes(b"\x1f\x8b" + b"\x00" * 40)  # "wrote only 0 of 1048576 bytes", no exception

    monkeypatch.setattr(sitk, "WriteImage", write_image_as_itk_does_on_a_full_disk)
    _no_space_left(monkeypatch)
    with pytest.raises(OSError) as info:
        write_image_atomic(sitk.Image(8, 8, 8, sitk.sitkUInt8), target)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "disk full" in message and str(target) in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no truncated prediction a rerun would trust


def test_writes_on_a_really_full_file_system(tmp_path):
    """The same on a real 256 kB tmpfs (needs the right to mount: root in a container; skipped elsewhere)."""
    import subprocess

    import SimpleITK as sitk
    import torch

    from unet3d.io import atomic_path, save_torch_atomic, write_image_atomic

    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        big = np.random.default_rng(0).random((64, 64, 64)).astype(np.float32)  # 1 MB, four times the disk
        writes = {
            "checkpoint.pt": lambda target: save_torch_atomic({"w": torch.from_numpy(big)}, target),
            "image.nii.gz": lambda target: write_image_atomic(sitk.GetImageFromArray(big), target, compress=False),
        }

        def numpy_save(target):
            with atomic_path(target, suffix=".tmp.npy") as tmp:
                np.save(tmp, big)

        writes["image.npy"] = numpy_save
        for name, write in writes.items():
            with pytest.raises(OSError) as info:
                write(full / name)
            assert "disk full" in str(info.value) and name in str(info.value), (name, str(info.value))
            assert sorted(p.name for p in full.iterdir()) == [], name
    finally:
        subprocess.run(["umount", "--lazy", str(full)], check=False)  # a failed writer may still hold its file open


def test_preprocessed_arrays_are_written_contiguous(tmp_path, monkeypatch):
    """A scan stored with flipped axes (every MSD hippocampus file: RAS on disk, LPS in ITK) reaches the writer as
    a flipped view when its spacing needs no resampling. numpy writes an array that is neither C- nor
    Fortran-contiguous one element per fwrite call: a third of a small case's preprocessing went into writing
    its label. Arrays are made contiguous first (the same bytes)."""
    import SimpleITK as sitk

    src = tmp_path / "src"
    src.mkdir()
    for name, values in (("image", np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)),
                         ("label", (np.random.default_rng(1).random((8, 9, 10)) > 0.5).astype(np.uint8))):
        image = sitk.GetImageFromArray(values)
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        (src / name).mkdir()
        sitk.WriteImage(image, str(src / name / "X.nii.gz"))
    ws = tmp_path / "ws"
    ingest(src / "image", "c", ws, labels=src / "label")
    case = preprocess_stage.case_records(Catalog(ws).cases(cohort="c"))[0]
    plan = {"plan_id": "p", "target_spacing": [1.0, 1.0, 1.0], "image_order": 1, "label_mode": "nearest",
            "normalisation": {"scheme": "zscore"}}
    written = {}
    real_save = np.save

    def save(file, arr, *args, **kwargs):
        written[Path(file).name] = arr.flags.c_contiguous or arr.flags.f_contiguous
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    assert preprocess_case(case, plan, str(tmp_path / "plan"))["status"] == "done"
    assert written == {"image.npy": True, "label.npy": True}
