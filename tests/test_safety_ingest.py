"""Hostile and unlucky inputs at ingestion (issue 10): a tiny file claiming a huge volume, a worker process
that dies, symlinks leaving the cohort folder, DICOM series with missing or corrupt slices."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_catalog import ingest as ingest_module
from data_catalog.ingest import ISSUE_CODES, ingest
from data_catalog.tables import Catalog

REPO = Path(__file__).resolve().parent.parent
_real_inspect_case = ingest_module.inspect_case


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def blob(shape=(12, 14, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def mask(shape=(12, 14, 10)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[3:7, 4:9, 3:7] = 1
    return m


def codes(ws: Path, cohort: str) -> dict[str, set[str]]:
    issues = Catalog(ws).read("issues")
    issues = issues[issues["cohort"] == cohort]
    return issues.groupby("case_id")["code"].apply(set).to_dict()


def statuses(ws: Path, cohort: str) -> dict[str, str]:
    return Catalog(ws).cases(cohort=cohort).set_index("case_id")["status"].to_dict()


# ---------------------------------------------------------------------------------------------------------
# Item 4: a 3 KB file whose header claims 2000^3 voxels; a worker that dies
# ---------------------------------------------------------------------------------------------------------
def _header_bomb(path: Path, claimed=(2000, 2000, 2000)) -> Path:
    """A valid NIfTI-1 .nii.gz holding 2x2x2 uint8 voxels whose header claims `claimed`."""
    small = tmp = path.with_suffix("").with_suffix(".tmp.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 2, 2), np.uint8)), str(small))
    raw = bytearray(small.read_bytes())
    small.unlink()
    dims = np.frombuffer(bytes(raw[40:56]), "<i2").copy()
    dims[1:4] = claimed
    raw[40:56] = dims.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    assert not tmp.exists()
    return path


def test_a_tiny_file_claiming_a_huge_volume_is_refused_from_its_header(tmp_path):
    """Issue 10 item 4: 2000^3 claimed by a ~100-byte .nii.gz: refused as `too_large` within a second, and
    the ingesting process never allocates the claimed 8 GB (it runs under a 3 GB address-space limit)."""
    folder = tmp_path / "scans"
    for i in range(2):
        write(folder / f"fine_{i}.nii.gz", blob(seed=i))
    bomb = _header_bomb(folder / "bomb.nii.gz")
    assert bomb.stat().st_size < 4000
    script = textwrap.dedent(f"""
        import json, resource, sys, time
        sys.path.insert(0, {str(REPO)!r})
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from data_catalog.ingest import SourceCase, inspect_case
        t0 = time.perf_counter()
        out = inspect_case(SourceCase("bomb", [{str(bomb)!r}], None), None)
        seconds = time.perf_counter() - t0
        print(json.dumps({{"seconds": seconds, "issues": out["issues"],
                          "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [i["code"] for i in report["issues"]] == ["too_large"], report
    message = report["issues"][0]["message"]
    assert "2000x2000x2000" in message and "MAX_IMAGE_VOXELS" in message and "\n" not in message
    assert report["seconds"] < 1.0, report
    assert report["peak_mb"] < 1000, report

    ws = tmp_path / "ws"
    ingest(folder, "bombs", ws)
    assert codes(ws, "bombs") == {"bomb": {"too_large"}}
    assert statuses(ws, "bombs") == {"bomb": "quarantined", "fine_0": "ok", "fine_1": "ok"}
    assert ISSUE_CODES["too_large"][0] == "error"


def test_read_image_refuses_an_image_over_the_limit_before_reading(tmp_path):
    from unet3d.io import ImageTooLarge, read_image

    path = write(tmp_path / "x.nii.gz", blob())
    assert read_image(path).GetSize() == (12, 14, 10)
    with pytest.raises(ImageTooLarge, match="12x14x10"):
        read_image(path, max_voxels=1000)


def _die_on_poison(case, declared):
    """inspect_case, except that the process reading case `poison` dies as an out-of-memory kill would."""
    if case.case_id == "poison":
        os._exit(137)
    return _real_inspect_case(case, declared)


def test_a_dead_ingest_worker_is_recorded_against_its_case_and_the_rest_go_on(tmp_path, monkeypatch):
    """Issue 10 item 4: a worker process that dies no longer aborts the ingest with "A process in the process
    pool was terminated abruptly": the case it was reading gets a `worker_died` issue; the next ingest
    reads it again."""
    folder = tmp_path / "scans"
    for i in range(20):
        write(folder / f"case_{i:02d}.nii.gz", blob(shape=(6, 6, 6), seed=i))
    write(folder / "poison.nii.gz", blob(shape=(6, 6, 6)))
    ws = tmp_path / "ws"
    monkeypatch.setattr(ingest_module, "inspect_case", _die_on_poison)
    result = ingest(folder, "c", ws, workers=2)
    assert result.n_cases == 21 and result.n_ok == 20
    assert codes(ws, "c") == {"poison": {"worker_died"}}
    issue = Catalog(ws).read("issues").iloc[0]
    assert "exit code 137" in issue["message"] and issue["path"].endswith("poison.nii.gz")
    cases = Catalog(ws).cases(cohort="c").set_index("case_id")
    assert cases.drop(index="poison")["image_sha256"].notna().all()

    monkeypatch.setattr(ingest_module, "inspect_case", _real_inspect_case)  # e.g. more memory tonight
    again = ingest(folder, "c", ws, workers=2)
    assert again.n_ok == 21 and codes(ws, "c") == {}


# ---------------------------------------------------------------------------------------------------------
# Item 5: symlinks that leave the cohort folder
# ---------------------------------------------------------------------------------------------------------
def test_a_symlink_leaving_a_plain_cohort_folder_is_reported_not_ingested(tmp_path):
    folder, outside = tmp_path / "scans", tmp_path / "private"
    write(folder / "real.nii.gz", blob())
    secret = write(outside / "secret.nii.gz", blob(seed=9))
    (folder / "escape.nii.gz").symlink_to(secret)
    (folder / "alias.nii.gz").symlink_to("real.nii.gz")  # inside the folder: fine, keeps its own name
    ws = tmp_path / "ws"
    ingest(folder, "plain", ws)
    assert codes(ws, "plain") == {"escape": {"path_outside_cohort"}}
    assert statuses(ws, "plain") == {"alias": "ok", "escape": "quarantined", "real": "ok"}
    cases = Catalog(ws).cases(cohort="plain").set_index("case_id")
    assert not isinstance(cases.loc["escape", "image_sha256"], str)  # never read
    message = Catalog(ws).read("issues").iloc[0]["message"]
    assert "escape.nii.gz" in message and "outside the cohort folder" in message


def test_a_symlink_leaving_an_msd_folder_is_reported_not_ingested(tmp_path):
    root, outside = tmp_path / "Task", tmp_path / "private"
    for i in range(2):
        write(root / "imagesTr" / f"c{i}.nii.gz", blob(seed=i))
        write(root / "labelsTr" / f"c{i}.nii.gz", mask())
    (root / "imagesTr" / "leak.nii.gz").symlink_to(write(outside / "img.nii.gz", blob()))
    write(root / "labelsTr" / "leak.nii.gz", mask())
    write(root / "imagesTr" / "leaklabel.nii.gz", blob())
    (root / "labelsTr" / "leaklabel.nii.gz").symlink_to(write(outside / "lab.nii.gz", mask()))
    (root / "dataset.json").write_text(json.dumps({"name": "t", "modality": {"0": "MRI"},
                                                   "labels": {"0": "background", "1": "a"}, "training": []}))
    ws = tmp_path / "ws"
    ingest(root, "msd", ws)
    found = codes(ws, "msd")
    assert found["leak"] == {"path_outside_cohort"} and "path_outside_cohort" in found["leaklabel"]
    assert set(found) == {"leak", "leaklabel"}
    assert statuses(ws, "msd") == {"c0": "ok", "c1": "ok", "leak": "quarantined", "leaklabel": "quarantined"}


# ---------------------------------------------------------------------------------------------------------
# Item 7: DICOM series with a missing or a corrupt slice
# ---------------------------------------------------------------------------------------------------------
def _series_copy(dicom_dir: Path, dest: Path) -> Path:
    shutil.copytree(dicom_dir, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


@pytest.mark.parametrize("damage", ["removed", "truncated", "overwritten"])
def test_a_dicom_series_with_a_missing_or_corrupt_slice_is_not_ok(dicom_dir, tmp_path, damage):
    """Issue 10 item 7: ITK reads such a series with a wrong spacing (1.033 instead of 1 mm) and only warns
    on stderr; the ingest reports it (`dicom_slices_missing`, plus `unreadable` naming a corrupt file)."""
    series = _series_copy(dicom_dir, tmp_path / "scans" / "patient1")
    _series_copy(dicom_dir, tmp_path / "scans" / "patient2")  # intact
    victim = series / "16.dcm"
    if damage == "removed":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        data = bytearray(victim.read_bytes())
        data[300:700] = b"\xff" * 400
        victim.write_bytes(bytes(data))
    ws = tmp_path / "ws"
    ingest(tmp_path / "scans", "dcm", ws)
    found = codes(ws, "dcm")
    assert set(found) == {"patient1"}, found
    assert "dicom_slices_missing" in found["patient1"]
    if damage != "removed":
        assert "unreadable" in found["patient1"]
        assert "16.dcm" in " ".join(Catalog(ws).read("issues")["message"])
    assert statuses(ws, "dcm") == {"patient1": "quarantined", "patient2": "ok"}
    message = Catalog(ws).read("issues").query("code == 'dicom_slices_missing'").iloc[0]["message"]
    assert "gap of 2 mm" in message and "spacing is 1 mm" in message
