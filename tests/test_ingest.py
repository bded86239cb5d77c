"""Ingestion and validation: every issue code on crafted files, re-ingestion reads only what changed,
concurrent writers, DICOM series."""
from __future__ import annotations

import json
import locale
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_catalog import validate as validate_module
from data_catalog.discover import IngestError, discover
from data_catalog.ingest import ingest
from data_catalog.validate import ISSUE_CODES
from data_catalog.tables import Catalog
from image_files import write

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def blob(shape=(12, 14, 10), seed=0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(100, 20, shape)).astype(dtype)


def mask(shape=(12, 14, 10), values=(1,)) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    for i, v in enumerate(values):
        m[3 + i:7 + i, 4:9, 3:7] = v
    return m


def make_msd(root: Path) -> dict[str, tuple[str, str]]:
    """An MSD cohort with one case per defect. Returns case -> (expected code or 'ok', severity or '')."""
    img, lab = root / "imagesTr", root / "labelsTr"
    expected: dict[str, tuple[str, str]] = {}
    entries = []

    def case(cid, image=None, label=None, code="ok", listed=True, image_kw=None, label_kw=None):
        if image is not None:
            write(img / f"{cid}.nii.gz", image, **(image_kw or {}))
        if label is not None:
            write(lab / f"{cid}.nii.gz", label, **(label_kw or {}))
        if listed:
            entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        expected[cid] = (code, ISSUE_CODES[code][0] if code != "ok" else "")

    for i in range(6):  # enough normal cases for a cohort median
        case(f"ok_{i}", blob(seed=i), mask())
    case("no_label", blob(), None, "label_missing")
    case("no_image", None, mask(), "image_missing", listed=False)
    case("nan_voxels", np.where(blob() > 120, np.nan, blob()).astype(np.float32), mask(), "non_finite")
    case("tiny_spacing", blob(), mask(), "spacing_implausible",
         image_kw={"spacing": (0.001, 1.0, 1.0)}, label_kw={"spacing": (0.001, 1.0, 1.0)})
    case("size_off", blob(), mask(shape=(12, 14, 11)), "size_mismatch")
    case("spacing_off", blob(), mask(), "spacing_mismatch", label_kw={"spacing": (1.0, 1.0, 1.5)})
    case("origin_off", blob(), mask(), "origin_mismatch", label_kw={"origin": (0.0, 0.0, 5.0)})
    case("direction_off", blob(), mask(), "direction_mismatch",
         label_kw={"direction": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)})
    frac = mask().astype(np.float32)
    frac[5, 5, 5] = 0.5
    case("fractional_label", blob(), frac, "label_non_integer")
    case("undeclared_value", blob(), mask(values=(1, 7)), "label_undeclared")
    case("empty_label", blob(), np.zeros((12, 14, 10), np.uint8), "label_empty")
    case("float_label", blob(), mask().astype(np.float32), "label_float_dtype")
    case("thick_slices", blob(), mask(), "geometry_outlier",
         image_kw={"spacing": (1.0, 1.0, 8.0)}, label_kw={"spacing": (1.0, 1.0, 8.0)})
    case("flat", blob(shape=(12, 14, 1))[:, :, 0], mask(shape=(12, 14, 1))[:, :, 0], "not_3d")
    case("truncated", blob(), mask(), "unreadable")
    data = (img / "truncated.nii.gz").read_bytes()
    (img / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    # an entry escaping the cohort folder
    outside = write(root.parent / "elsewhere" / "escape.nii.gz", blob())
    entries.append({"image": "../elsewhere/escape.nii.gz", "label": "./labelsTr/escape.nii.gz"})
    write(lab / "escape.nii.gz", mask())
    expected["escape"] = ("path_outside_cohort", "error")
    assert outside.exists()
    (root / "dataset.json").write_text(json.dumps({
        "name": "crafted", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "training": entries, "test": []}))
    return expected


def test_every_validation_code_on_crafted_files(tmp_path):
    root = tmp_path / "cohort"
    expected = make_msd(root)
    ws = tmp_path / "ws"
    result = ingest(root, "crafted", ws)
    catalog = Catalog(ws)
    cases = catalog.cases(cohort="crafted").set_index("case_id")
    issues = catalog.read("issues")
    codes_by_case = issues.groupby("case_id")["code"].apply(set).to_dict()
    for cid, (code, severity) in expected.items():
        assert cid in cases.index, cid
        if code == "ok":
            assert cid not in codes_by_case, (cid, codes_by_case.get(cid))
            assert cases.loc[cid, "status"] == "ok"
            continue
        assert code in codes_by_case.get(cid, set()), (cid, code, codes_by_case.get(cid))
        assert cases.loc[cid, "status"] == ("quarantined" if severity == "error" else "ok"), cid
    # every message names its problem; every row names its case
    assert issues["message"].str.len().min() > 10
    assert set(issues["severity"]) <= {"error", "warning"}
    assert result.n_ok == sum(1 for c, s in expected.values() if s != "error")
    # the catalog carries SPEC's columns and types
    df = catalog.read("cases")
    for col in ["cohort", "case_id", "patient_id", "image_path", "label_path", "image_sha256", "label_sha256",
                "modality", "size", "spacing_mm", "status", "ingested_at"]:
        assert col in df.columns
    assert str(df["ingested_at"].dtype).startswith("datetime64") and "UTC" in str(df["ingested_at"].dtype)
    ok0 = cases.loc["ok_0"]
    assert list(ok0["size"]) == [12, 14, 10] and list(ok0["spacing_mm"]) == [1.0, 1.0, 1.0]
    assert ok0["modality"] == "MRI"


def test_duplicate_case_id_in_a_plain_folder(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write(images / "a.nii.gz", blob())
    write(images / "a.nrrd", blob())
    write(labels / "a.nii.gz", mask())
    write(images / "b.mha", blob())
    ingest(images, "plain", tmp_path / "ws", labels=labels)
    issues = Catalog(tmp_path / "ws").read("issues")
    assert "duplicate_case_id" in set(issues["code"])
    assert "label_missing" in set(issues.loc[issues["case_id"] == "b", "code"])


def test_reingest_reads_only_new_or_changed_files(tmp_path, monkeypatch):
    root = tmp_path / "cohort"
    for i in range(4):
        write(root / "imagesTr" / f"c{i}.nii.gz", blob(seed=i))
        write(root / "labelsTr" / f"c{i}.nii.gz", mask())
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}, "modality": {"0": "CT"}}))
    ws = tmp_path / "ws"
    first = ingest(root, "c", ws)
    assert (first.new, first.unchanged) == (4, 0)
    before = Catalog(ws).cases(cohort="c").set_index("case_id")["ingested_at"]

    hashed = []
    real = validate_module.sha256_file
    monkeypatch.setattr(validate_module, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    second = ingest(root, "c", ws)
    assert (second.new, second.changed, second.unchanged) == (0, 0, 4)
    assert hashed == []  # nothing re-read

    write(root / "labelsTr" / "c1.nii.gz", mask(values=(1, 1)) * 0 + mask())  # same content, rewritten file
    write(root / "labelsTr" / "c2.nii.gz", np.roll(mask(), 1, axis=0))  # changed content
    write(root / "imagesTr" / "c9.nii.gz", blob(seed=9))
    write(root / "labelsTr" / "c9.nii.gz", mask())
    third = ingest(root, "c", ws)
    assert (third.new, third.changed) == (1, 1)
    assert {Path(p).name for p in hashed} == {"c1.nii.gz", "c2.nii.gz", "c9.nii.gz"}
    after = Catalog(ws).cases(cohort="c").set_index("case_id")["ingested_at"]
    assert after["c0"] == before["c0"] and after["c1"] == before["c1"]  # same content keeps its date
    assert after["c2"] > before["c2"]


def _ingest_in_process(args):
    root, cohort, ws = args
    return ingest(root, cohort, ws).n_cases


def test_concurrent_writers_do_not_lose_updates(tmp_path):
    ws = tmp_path / "ws"
    roots = []
    for k in range(3):
        root = tmp_path / f"cohort{k}"
        for i in range(3):
            write(root / "imagesTr" / f"k{k}_{i}.nii.gz", blob(seed=i))
            write(root / "labelsTr" / f"k{k}_{i}.nii.gz", mask())
        (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}}))
        roots.append(root)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        counts = pool.map(_ingest_in_process, [(str(r), f"co{k}", str(ws)) for k, r in enumerate(roots)])
    assert counts == [3, 3, 3]
    cases = Catalog(ws).read("cases")
    assert sorted(cases["cohort"].unique()) == ["co0", "co1", "co2"]
    assert len(cases) == 9
    assert not list((ws / "catalog").glob("*.tmp"))


def write_dicom_series(folder: Path, array: np.ndarray, spacing, series_uid: str, patient: str) -> None:
    """A minimal CT DICOM series from an (x, y, z) int16 array, one file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    volume.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets "C" and leaves it
    try:
        _write_slices(writer, volume, folder, spacing, series_uid, patient)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_slices(writer, volume, folder: Path, spacing, series_uid: str, patient: str) -> None:
    for z in range(volume.GetDepth()):
        s = volume[:, :, z]
        for tag, value in {"0008|0060": "CT", "0010|0020": patient, "0020|000e": series_uid,
                           "0020|000d": series_uid + ".1", "0008|0018": f"{series_uid}.{z + 1}",
                           "0020|0013": str(z + 1), "0020|0032": f"0\\0\\{z * spacing[2]}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]}\\{spacing[0]}",
                           "0018|0050": str(spacing[2])}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)


def test_writing_a_dicom_series_leaves_the_process_locale_as_it_was(tmp_path):
    """GDCM's writer sets the C library's locale to "C" and leaves it there: every later test of this process
    that decoded a subprocess's output with the locale's encoding then read ASCII and failed on a progress
    bar (`pytest tests/test_ingest.py tests/test_multichannel.py`)."""
    before = (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False))
    write_dicom_series(tmp_path / "s", blob((8, 8, 3), dtype=np.int16), (1.0, 1.0, 2.0), "1.2.3.9", "PX")
    assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == before


def test_dicom_series_each_series_is_a_case(tmp_path):
    root = tmp_path / "dicom"
    write_dicom_series(root / "patA" / "ct1", blob((16, 12, 6), dtype=np.int16), (0.8, 0.8, 2.5), "1.2.3.4.1", "PA")
    write_dicom_series(root / "patB" / "ct1", blob((16, 12, 5), dtype=np.int16), (0.7, 0.7, 3.0), "1.2.3.4.2", "PB")
    src = discover(root)
    assert src.kind == "dicom" and len(src.cases) == 2
    result = ingest(root, "dcm", tmp_path / "ws")
    assert result.n_ok == 2
    cases = Catalog(tmp_path / "ws").cases(cohort="dcm").set_index("case_id")
    a = cases.loc["patA_ct1"]
    assert list(a["size"]) == [16, 12, 6]
    assert np.allclose(list(a["spacing_mm"]), [0.8, 0.8, 2.5])
    assert a["patient_id"] == "PA" and a["modality"] == "CT" and a["label_path"] is None or np.isnan(a["label_path"])
    assert len(a["image_files"]) == 6


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", "x", tmp_path / "ws")
