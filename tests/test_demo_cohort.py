"""The synthetic phantom cohorts: MSD layout, geometry, label semantics, orientation consistency, determinism,
idempotent re-runs and incremental growth."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from data_catalog import demo
from data_catalog.demo import case_patient, generate_ct_sized_cohort, generate_demo_cohort

SMALL = dict(shape=(32, 32, 16), base_spacing=(3.0, 3.0, 6.0))  # 96 mm field of view, few voxels
N_CASES = 10


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in _files(root)}


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_demo_cohort(tmp_path_factory.mktemp("demo"), n_cases=N_CASES, seed=0, **SMALL)


@pytest.fixture(scope="module")
def dataset(cohort) -> dict:
    return json.loads((cohort / "dataset.json").read_text())


def _cases(cohort: Path, dataset: dict):
    for entry in dataset["training"]:
        image, image_array = _read(cohort / entry["image"])
        label, label_array = _read(cohort / entry["label"])
        yield entry, image, image_array, label, label_array


def test_layout_and_dataset_json(cohort, dataset):
    assert dataset["modality"] == {"0": "CT"}
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert dataset["numTraining"] == N_CASES == len(dataset["training"])
    assert dataset["test"] == []
    expected_ids = [f"demo_{i:03d}" for i in range(N_CASES)]
    assert [e["image"] for e in dataset["training"]] == [f"./imagesTr/{c}.nii.gz" for c in expected_ids]
    assert [e["label"] for e in dataset["training"]] == [f"./labelsTr/{c}.nii.gz" for c in expected_ids]
    assert sorted(p.name for p in (cohort / "imagesTr").iterdir()) == [f"{c}.nii.gz" for c in expected_ids]
    assert sorted(p.name for p in (cohort / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in expected_ids]
    manifest = json.loads((cohort / demo.MANIFEST_NAME).read_text())
    assert sorted(manifest["cases"]) == expected_ids
    for case_id, entry in manifest["cases"].items():
        image_bytes = (cohort / "imagesTr" / f"{case_id}.nii.gz").read_bytes()
        assert hashlib.sha256(image_bytes).hexdigest() == entry["image_sha256"]
        assert image_bytes[:2] == b"\x1f\x8b" and image_bytes[4:8] == b"\0\0\0\0"  # gzip without an mtime


def test_image_and_label_share_geometry_and_types(cohort, dataset):
    for entry, image, image_array, label, label_array in _cases(cohort, dataset):
        assert image.GetPixelID() == sitk.sitkInt16
        assert label.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == label.GetSize()
        assert image.GetSpacing() == label.GetSpacing()
        assert image.GetOrigin() == label.GetOrigin()
        assert image.GetDirection() == label.GetDirection()
        assert sorted(image.GetSize()) == sorted(SMALL["shape"])
        assert image_array.shape == image.GetSize()  # (x, y, z) after the transpose


def test_labels_and_intensities_describe_the_phantom(cohort, dataset):
    organ_means, tissue_means, lesion_contrasts = [], [], []
    for entry, image, hu, label, labels in _cases(cohort, dataset):
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert np.count_nonzero(labels == 1) > 50
        # air outside the body, soft tissue inside
        assert np.median(hu[labels == 0]) < -500 or np.mean(hu[labels == 0] < -900) > 0.2
        lesions, n_components = ndimage.label(labels == 2)
        organ_shell = ndimage.binary_dilation(labels == 1)
        for component in range(1, n_components + 1):
            # each lesion sits in the organ: it touches organ voxels and lies inside the body
            assert np.any(organ_shell[lesions == component])
            assert np.all(hu[lesions == component] > -400)
        organ_means.append(hu[labels == 1].mean())
        body_not_organ = (labels == 0) & (hu > -50) & (hu < 150) & ~ndimage.binary_dilation(labels > 0, iterations=2)
        tissue_means.append(hu[body_not_organ].mean())
        if np.count_nonzero(labels == 2) >= 10:
            lesion_contrasts.append(abs(hu[labels == 2].mean() - hu[labels == 1].mean()))
    assert 50 < np.mean(organ_means) < 95
    assert np.mean(organ_means) > np.mean(tissue_means) + 10
    assert lesion_contrasts and np.mean(lesion_contrasts) > 10


def test_lesion_counts_range_over_zero_to_three(cohort, dataset):
    manifest = json.loads((cohort / demo.MANIFEST_NAME).read_text())
    counts = []
    for entry, image, hu, label, labels in _cases(cohort, dataset):
        case_id = Path(entry["image"]).name.removesuffix(".nii.gz")
        n_lesions = manifest["cases"][case_id]["n_lesions"]
        assert 0 <= n_lesions <= demo.MAX_LESIONS
        assert (n_lesions == 0) == (not np.any(labels == 2))
        counts.append(n_lesions)
    assert 0 in counts and max(counts) > 0


def test_grids_differ_but_anatomy_is_consistent_after_reorientation(cohort, dataset):
    spacings, directions, origins, organ_positions = set(), set(), set(), []
    for entry, image, _, label, _ in _cases(cohort, dataset):
        spacings.add(image.GetSpacing())
        directions.add(tuple(round(v) for v in image.GetDirection()))
        origins.add(image.GetOrigin())
        canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(label, "LPS")).transpose(2, 1, 0)
        organ_positions.append(np.array(ndimage.center_of_mass(canonical > 0)) / np.array(canonical.shape))
    assert len(spacings) == N_CASES and len(origins) == N_CASES
    assert len(directions) >= 3
    positions = np.array(organ_positions)
    # the organ is on the patient's right (low x in LPS), consistently so across orientations
    assert positions[:, 0].mean() < 0.45 and np.all(positions[:, 0] < 0.5)
    assert np.all(positions.std(axis=0) < 0.06)


def test_follow_up_scans_share_patient_id_and_anatomy(cohort, dataset):
    patient_ids = [e["patient_id"] for e in dataset["training"]]
    assert patient_ids[4] == patient_ids[5]  # every fifth patient has a follow-up
    assert len(set(patient_ids)) == N_CASES - 1
    assert [case_patient(i) for i in range(12)] == [
        (0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (5, 0), (6, 0), (7, 0), (8, 0), (9, 0), (9, 1)
    ]
    organ_volumes = []
    for entry, image, _, label, labels in _cases(cohort, dataset):
        organ_volumes.append(np.count_nonzero(labels > 0) * np.prod(image.GetSpacing()))
    baseline, follow_up = organ_volumes[4], organ_volumes[5]
    assert abs(baseline - follow_up) / baseline < 0.12  # same organ, different grid
    others = [v for i, v in enumerate(organ_volumes) if i not in (4, 5)]
    assert max(others) / min(others) > 1.3  # while organs differ between patients


def test_regeneration_is_byte_identical(cohort, tmp_path):
    again = generate_demo_cohort(tmp_path / "again", n_cases=N_CASES, seed=0, **SMALL)
    assert _hashes(again) == _hashes(cohort)
    other_seed = generate_demo_cohort(tmp_path / "other", n_cases=2, seed=1, **SMALL)
    assert _hashes(other_seed)["imagesTr/demo_000.nii.gz"] != _hashes(cohort)["imagesTr/demo_000.nii.gz"]


def test_rerun_touches_nothing_and_renders_nothing(tmp_path, monkeypatch):
    root = generate_demo_cohort(tmp_path / "c", n_cases=4, seed=0, **SMALL)
    before_hashes, before_mtimes = _hashes(root), _mtimes(root)

    def must_not_render(*args, **kwargs):
        raise AssertionError("a re-run with the same parameters rendered a case")

    monkeypatch.setattr(demo, "render_case", must_not_render)
    generate_demo_cohort(root, n_cases=4, seed=0, **SMALL)
    assert _hashes(root) == before_hashes
    assert _mtimes(root) == before_mtimes


def test_damaged_file_is_repaired_alone(tmp_path):
    root = generate_demo_cohort(tmp_path / "c", n_cases=3, seed=0, **SMALL)
    before_hashes, before_mtimes = _hashes(root), _mtimes(root)
    damaged = root / "labelsTr" / "demo_001.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (root / "imagesTr" / "demo_002.nii.gz").unlink()
    generate_demo_cohort(root, n_cases=3, seed=0, **SMALL)
    assert _hashes(root) == before_hashes
    after_mtimes = _mtimes(root)
    untouched = set(before_mtimes) - {"labelsTr/demo_001.nii.gz", "imagesTr/demo_002.nii.gz"}
    assert all(after_mtimes[name] == before_mtimes[name] for name in untouched)


def test_growing_keeps_old_cases_and_shrinking_removes_extras(cohort, tmp_path):
    root = generate_demo_cohort(tmp_path / "c", n_cases=4, seed=0, **SMALL)
    small_mtimes = _mtimes(root)
    generate_demo_cohort(root, n_cases=6, seed=0, **SMALL)
    grown_hashes, grown_mtimes = _hashes(root), _mtimes(root)
    for i in range(4):
        for folder in ("imagesTr", "labelsTr"):
            name = f"{folder}/demo_{i:03d}.nii.gz"
            assert grown_mtimes[name] == small_mtimes[name]
    reference = _hashes(cohort)  # the 10-case cohort made in one go
    for name, digest in grown_hashes.items():
        if name.startswith(("imagesTr/", "labelsTr/")):
            assert digest == reference[name]
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["numTraining"] == 6 and dataset["training"][5]["patient_id"] == dataset["training"][4]["patient_id"]

    generate_demo_cohort(root, n_cases=3, seed=0, **SMALL)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [f"demo_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [f"demo_{i:03d}.nii.gz" for i in range(3)]
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 3
    assert sorted(json.loads((root / demo.MANIFEST_NAME).read_text())["cases"]) == ["demo_000", "demo_001", "demo_002"]


def test_changed_parameters_regenerate(tmp_path):
    root = generate_demo_cohort(tmp_path / "c", n_cases=2, seed=0, **SMALL)
    before = _hashes(root)
    generate_demo_cohort(root, n_cases=2, seed=0, shape=(24, 24, 12), base_spacing=(4.0, 4.0, 8.0))
    after = _hashes(root)
    assert after["imagesTr/demo_000.nii.gz"] != before["imagesTr/demo_000.nii.gz"]
    assert sorted(sitk.ReadImage(str(root / "imagesTr" / "demo_000.nii.gz")).GetSize()) == [12, 24, 24]
    assert after == _hashes(generate_demo_cohort(tmp_path / "fresh", n_cases=2, seed=0, shape=(24, 24, 12),
                                                 base_spacing=(4.0, 4.0, 8.0)))


def test_leftover_partial_files_of_a_dead_run_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, encoding="utf-8")
    dead_pid = int(finished.stdout)
    images = tmp_path / "c" / "imagesTr"
    images.mkdir(parents=True)
    leftover = images / f".demo_000.nii.gz.{dead_pid}.partial"
    leftover.write_bytes(b"half a volume")
    root = generate_demo_cohort(tmp_path / "c", n_cases=1, seed=0, **SMALL)
    assert not leftover.exists()
    assert not list(root.rglob("*.partial"))


def test_ct_sized_cohort_uses_the_same_generator(tmp_path):
    root = generate_ct_sized_cohort(tmp_path / "ct", n_cases=2, shape=(40, 40, 10), base_spacing=(2.0, 2.0, 5.0))
    dataset = json.loads((root / "dataset.json").read_text())
    assert [e["image"] for e in dataset["training"]] == ["./imagesTr/ctsim_000.nii.gz", "./imagesTr/ctsim_001.nii.gz"]
    demo_root = generate_demo_cohort(tmp_path / "d", n_cases=1, **SMALL)
    assert dataset["name"] != json.loads((demo_root / "dataset.json").read_text())["name"]
    _, labels = _read(root / "labelsTr" / "ctsim_000.nii.gz")
    assert np.any(labels == 1)


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError):
        generate_demo_cohort(tmp_path, n_cases=0)
    with pytest.raises(ValueError):
        generate_demo_cohort(tmp_path, shape=(32, 32))
    with pytest.raises(ValueError):
        generate_demo_cohort(tmp_path, base_spacing=(1.0, -1.0, 1.0))
    assert not os.listdir(tmp_path)
