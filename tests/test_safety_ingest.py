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
from data_catalog.ingest import ingest
from data_catalog.validate import ISSUE_CODES
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
        from data_catalog.discover import SourceCase
        from data_catalog.validate import inspect_case
        t0 = time.perf_counter()
        out = inspect_case(SourceCase("bomb", [{str(bomb)!r}], None), None)
        seconds = time.perf_counter() - t0
        # VmHWM: this process's own peak (ru_maxrss would carry over the forking test process's size)
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
        print(json.dumps({{"seconds": seconds, "issues": out["issues"],
                          "peak_mb": int(hwm.split()[1]) / 1024}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", timeout=120)
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


# ---------------------------------------------------------------------------------------------------------
# Item 10: re-ingesting an unchanged cohort costs no per-case pandas work
# ---------------------------------------------------------------------------------------------------------
def test_reingesting_an_unchanged_cohort_does_no_per_case_dataframe_work(tmp_path, monkeypatch):
    """Re-ingesting 500 unchanged cases took 5 s in-process, mostly one DataFrame filter + to_dict per case
    (quadratic in the cohort). The number of DataFrame operations must not grow with the number of cases;
    benchmarks/reingest.py times 10,000 cases."""
    import pandas as pd

    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(60):
        write(images / f"c{i:03d}.nii", blob(shape=(4, 4, 4), seed=i))
        label = np.zeros((4, 4, 4), np.uint8)
        label[1:3, 1:3, 1:3] = i % 3 != 0  # every 3rd empty: a warning to carry over
        write(labels / f"c{i:03d}.nii", label)
    ws = tmp_path / "ws"
    first = ingest(images, "c", ws, labels=labels)
    assert first.n_ok == 60 and first.n_issues == 20
    calls = {"to_dict": 0, "getitem": 0}
    to_dict, getitem = pd.DataFrame.to_dict, pd.DataFrame.__getitem__

    def counting_to_dict(self, *args, **kwargs):
        calls["to_dict"] += 1
        return to_dict(self, *args, **kwargs)

    def counting_getitem(self, key):
        calls["getitem"] += 1
        return getitem(self, key)

    monkeypatch.setattr(pd.DataFrame, "to_dict", counting_to_dict)
    monkeypatch.setattr(pd.DataFrame, "__getitem__", counting_getitem)
    again = ingest(images, "c", ws, labels=labels)
    assert again.unchanged == 60 and again.n_issues == 20
    assert calls["to_dict"] <= 5 and calls["getitem"] <= 100, calls  # a constant, not per case (was 63 and 284)


# ---------------------------------------------------------------------------------------------------------
# Issue 11 items 2, 5, 6: folders as users keep them
# ---------------------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pairs_folder(folder: Path) -> dict[str, Path]:
    """Images with their masks beside them, three naming conventions. Returns case id -> mask file."""
    masks = {}
    for i, (image_name, mask_name) in enumerate((("brain1_image", "brain1_label"), ("brain2_image", "brain2_seg"),
                                                 ("lung3", "lung3_mask"))):
        write(folder / f"{image_name}.nrrd", blob(seed=i))
        m = mask()
        m[0, 0, 0] = i + 1  # each mask differs
        masks[image_name.replace("_image", "")] = write(folder / f"{mask_name}.nrrd", m)
    return masks


@pytest.mark.parametrize("labels_option", [None, "same_folder"])
def test_images_and_masks_side_by_side_make_one_case_per_pair(tmp_path, labels_option):
    folder = tmp_path / "lesions"
    masks = _pairs_folder(folder)
    ws = tmp_path / "ws"
    result = ingest(folder, "pairs", ws, labels=folder if labels_option else None)
    cases = Catalog(ws).cases(cohort="pairs").set_index("case_id")
    assert sorted(cases.index) == ["brain1", "brain2", "lung3"]
    for cid, mask_file in masks.items():
        assert cases.loc[cid, "label_path"] == str(mask_file.resolve())
        assert cases.loc[cid, "label_sha256"] == _sha(mask_file) != cases.loc[cid, "image_sha256"]
    assert (cases["status"] == "ok").all() and codes(ws, "pairs") == {}
    assert "3 of 3 images paired" in result.summary()


def test_a_folder_of_unpaired_images_gives_image_only_cases_and_says_so(tmp_path):
    folder = tmp_path / "scans"
    for i in range(3):
        write(folder / f"scan{i}.nrrd", blob(seed=i))
    result = ingest(folder, "plain", tmp_path / "ws")
    cases = Catalog(tmp_path / "ws").cases(cohort="plain")
    assert len(cases) == 3 and cases["label_path"].isna().all() and (cases["status"] == "ok").all()
    assert "no labels: 3 image-only cases" in result.summary()


def test_a_file_is_never_its_own_label(tmp_path):
    """--labels pointing at the images' own folder paired every image with itself (two passed as ok)."""
    folder = tmp_path / "scans"
    for i in range(3):
        write(folder / f"scan{i}.nii.gz", blob(seed=i))
    ingest(folder, "self", tmp_path / "ws", labels=folder)
    cases = Catalog(tmp_path / "ws").cases(cohort="self")
    assert len(cases) == 3 and cases["label_path"].isna().all()


def test_symlinked_files_keep_their_own_names(tmp_path):
    """Issue 11 item 5: links images/brain1.nrrd -> data/brain1_image.nrrd were resolved before the case id was
    taken, so images and labels no longer paired (label_missing for all)."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(2):
        target = write(images / "data" / f"brain{i}_image.nrrd", blob(seed=i))
        (images / f"brain{i}.nrrd").symlink_to(Path("data") / target.name)
        label = write(labels / "data" / f"brain{i}_label.nrrd", mask())
        (labels / f"brain{i}.nrrd").symlink_to(Path("data") / label.name)
    ws = tmp_path / "ws"
    ingest(images, "links", ws, labels=labels)
    cases = Catalog(ws).cases(cohort="links").set_index("case_id")
    assert sorted(cases.index) == ["brain0", "brain1"] and codes(ws, "links") == {}
    assert cases.loc["brain1", "label_path"] == str((labels / "data" / "brain1_label.nrrd").resolve())


def test_an_msd_folder_without_dataset_json_is_recognised(tmp_path):
    """Issue 11 item 6: imagesTr + labelsTr without dataset.json was rejected ("No Series were found")."""
    root = tmp_path / "Task99"
    for i in range(2):
        write(root / "imagesTr" / f"case_{i}.nii.gz", blob(seed=i))
        write(root / "labelsTr" / f"case_{i}.nii.gz", mask())
    write(root / "imagesTr" / "nolabel.nii.gz", blob())
    result = ingest(root, "msd", tmp_path / "ws")
    cases = Catalog(tmp_path / "ws").cases(cohort="msd").set_index("case_id")
    assert sorted(cases.index) == ["case_0", "case_1", "nolabel"]
    assert cases.loc["case_1", "label_path"].endswith("labelsTr/case_1.nii.gz")
    assert codes(tmp_path / "ws", "msd") == {"nolabel": {"label_missing"}}
    assert "no dataset.json" in result.summary()


def test_a_ct_used_as_a_label_gives_a_short_message(tmp_path):
    """Issue 11 item 2: a CT's negative values as a label produced a 5 KB error line listing every value."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    write(images / "ct.nii.gz", blob())
    write(labels / "ct.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (12, 14, 10)).astype(np.int16))
    ingest(images, "ct", tmp_path / "ws", labels=labels)
    message = Catalog(tmp_path / "ws").read("issues").query("code == 'label_undeclared'").iloc[0]["message"]
    assert len(message) < 200 and "values)" in message, message


# ---------------------------------------------------------------------------------------------------------
# Item 8 (ingest part): a malformed dataset.json is refused with one line naming the file and the key
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, key", [
    ("null", "JSON object"),
    ("[1, 2]", "JSON object"),
    ('{"training": 5}', "'training' must be a list"),
    ('{"training": [5]}', "training[0] must be an object"),
    ('{"training": [{"image": 5, "label": "./labelsTr/a.nii.gz"}]}', "training[0].image must be a path"),
    ('{"labels": ["background", "a"], "training": []}', "'labels' must be an object"),
    ('{"labels": {"0": "background", "x": [1]}, "training": []}', "'labels' must map"),
])
def test_a_malformed_dataset_json_is_refused_with_one_line_naming_the_key(tmp_path, content, key):
    from data_catalog.ingest import IngestError

    root = tmp_path / "Task"
    write(root / "imagesTr" / "a.nii.gz", blob())
    write(root / "labelsTr" / "a.nii.gz", mask())
    (root / "dataset.json").write_text(content)
    with pytest.raises(IngestError) as info:
        ingest(root, "bad", tmp_path / "ws")
    message = str(info.value)
    assert key in message and "dataset.json" in message and "\n" not in message
    assert not (tmp_path / "ws" / "catalog" / "cases.parquet").exists()  # refused before anything is written


def test_a_header_naming_a_data_file_outside_the_cohort_is_not_read(tmp_path):
    """Detached headers (.nhdr "data file:", .mhd "ElementDataFile =") made ITK read any file on the machine
    into the catalog and the training data."""
    folder, secret = tmp_path / "scans", tmp_path / "private" / "secret.raw"
    folder.mkdir()
    secret.parent.mkdir()
    secret.write_bytes(bytes(range(64)))
    (folder / "inside.raw").write_bytes(bytes(range(64)))
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nspacings: 1 1 1\nencoding: raw\ndata file: {}\n\n"
    (folder / "fine.nhdr").write_text(header.format("inside.raw"))
    (folder / "relative.nhdr").write_text(header.format("../private/secret.raw"))
    (folder / "absolute.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 1 1\n"
                                         f"ElementType = MET_UCHAR\nElementDataFile = {secret}\n")
    ws = tmp_path / "ws"
    ingest(folder, "detached", ws)
    assert codes(ws, "detached") == {"relative": {"path_outside_cohort"}, "absolute": {"path_outside_cohort"}}
    assert statuses(ws, "detached") == {"absolute": "quarantined", "fine": "ok", "relative": "quarantined"}
    cases = Catalog(ws).cases(cohort="detached").set_index("case_id")
    assert cases["size"].isna()["relative"] and cases["size"].isna()["absolute"]  # never read
