"""Multi-channel cases (issue 13, acceptance 3): several co-registered images per case in nnU-Net's CASE_0000,
CASE_0001 ... naming, through ingestion (one case, channels validated against channel 0), preprocessing (one
normalisation per channel, a channel axis in the stored image), training (in_channels from the data), inference
and `unet3d predict` on two files per case; single-channel cohorts keep their catalog rows, hashes and plans."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pipeline_helpers import write_config

from data_catalog.channels import channel_groups, cohort_channel_count
from data_catalog.demo import generate_demo_cohort
from data_catalog.hashing import sha256_file, stable_hash
from data_catalog.ingest import ingest
from data_catalog.plan import make_plan, plan_key
from data_catalog.tables import Catalog
from unet3d.augment import AugmentConfig, BatchAugmenter
from unet3d.io import Geometry
from unet3d.resample import Normalisation, preprocess_arrays

REPO = Path(__file__).resolve().parent.parent
ONE_STAGE = [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}}]
TINY = {"architecture": "unet3d", "features": [4, 8], "max_epochs": 1, "iterations_per_epoch": 2, "batch_size": 2,
        "device": "cpu", "threads": 2, "deep_supervision": False, "patch_size": [16, 16, 16], "augment": "light",
        "val_every": 1}


def unet3d(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, capture_output=True, encoding="utf-8",
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def two_channel_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mc_cohort")
    return generate_demo_cohort(root / "cohort", n_cases=10, seed=5, shape=(24, 24, 16), base_spacing=(4.0, 4.0, 6.0),
                                channels=2)


def _plain_copy(source: Path, dest: Path, n_cases: int = 3) -> Path:
    """The first cases of an MSD cohort as a plain folder: X_0000, X_0001 beside X_label."""
    dest.mkdir(parents=True)
    for i in range(n_cases):
        cid = f"demo_{i:03d}"
        for c in (0, 1):
            shutil.copy(source / "imagesTr" / f"{cid}_{c:04d}.nii.gz", dest / f"{cid}_{c:04d}.nii.gz")
        shutil.copy(source / "labelsTr" / f"{cid}.nii.gz", dest / f"{cid}_label.nii.gz")
    return dest


# ---------------------------------------------------------------------------------------------------------
# ingestion
# ---------------------------------------------------------------------------------------------------------
def test_the_generator_writes_co_registered_channels_declared_in_dataset_json(two_channel_cohort):
    meta = json.loads((two_channel_cohort / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT", "1": "gradient"}
    first, second = (sitk.ReadImage(str(two_channel_cohort / "imagesTr" / f"demo_000_{c:04d}.nii.gz")) for c in (0, 1))
    assert Geometry.of(first) == Geometry.of(second)
    grad = sitk.GetArrayFromImage(second)
    assert grad.min() >= 0 and grad.max() > 0  # a gradient magnitude, not a copy of the CT
    assert not np.allclose(grad, sitk.GetArrayFromImage(first))


def test_channel_files_are_one_case_with_its_channels_in_order(two_channel_cohort, tmp_path):
    result = ingest(two_channel_cohort, "mc", tmp_path / "ws")
    assert result.n_cases == 10 and result.n_quarantined == 0, result.summary()
    assert any("2 channels per case" in note for note in result.notes)
    row = Catalog(tmp_path / "ws").cases("mc").set_index("case_id").loc["demo_004"]
    images = two_channel_cohort / "imagesTr"
    assert list(row["image_files"]) == [str(images / "demo_004_0000.nii.gz"), str(images / "demo_004_0001.nii.gz")]
    assert row["image_path"] == str(images / "demo_004_0000.nii.gz")
    # a plain folder: the same grouping, the mask beside by name
    plain = ingest(_plain_copy(two_channel_cohort, tmp_path / "plain"), "plain", tmp_path / "ws")
    assert plain.n_cases == 3 and plain.n_quarantined == 0, plain.summary()
    rows = Catalog(tmp_path / "ws").cases("plain")
    assert all(len(files) == 2 for files in rows["image_files"]) and rows["label_path"].notna().all()


def test_channel_geometry_mismatch_is_quarantined_naming_case_and_channel(two_channel_cohort, tmp_path):
    folder = _plain_copy(two_channel_cohort, tmp_path / "plain")
    moved = folder / "demo_001_0001.nii.gz"
    image = sitk.ReadImage(str(moved))
    image.SetSpacing(tuple(s * 1.5 for s in image.GetSpacing()))
    image.SetOrigin(tuple(o + 20.0 for o in image.GetOrigin()))
    sitk.WriteImage(image, str(moved))
    result = ingest(folder, "plain", tmp_path / "ws")
    assert result.n_quarantined == 1 and result.n_ok == 2, result.summary()
    catalog = Catalog(tmp_path / "ws")
    assert catalog.cases("plain").set_index("case_id").loc["demo_001", "status"] == "quarantined"
    issues = catalog.read("issues")
    issues = issues[issues["case_id"] == "demo_001"]
    assert set(issues["code"]) == {"spacing_mismatch", "origin_mismatch"}
    for message in issues["message"]:
        assert "\n" not in message and "demo_001" in message and "channel 1" in message, message
    assert set(issues["path"]) == {str(moved)}


def test_a_missing_channel_is_reported_naming_case_and_channel(two_channel_cohort, tmp_path):
    source = tmp_path / "msd"
    shutil.copytree(two_channel_cohort, source)
    (source / "imagesTr" / "demo_007_0001.nii.gz").unlink()
    result = ingest(source, "mc", tmp_path / "ws")
    assert result.n_quarantined == 1, result.summary()
    issues = Catalog(tmp_path / "ws").read("issues")
    (row,) = issues[issues["case_id"] == "demo_007"].to_dict("records")
    assert row["code"] == "channel_missing" and row["severity"] == "error"
    assert "demo_007" in row["message"] and "channel 1 (demo_007_0001.nii.gz)" in row["message"], row["message"]


def test_single_channel_cohorts_keep_their_catalog_rows_hashes_and_plans(tmp_path):
    source = generate_demo_cohort(tmp_path / "one", n_cases=3, shape=(16, 16, 8))
    assert sorted(p.name for p in (source / "imagesTr").iterdir()) == [f"demo_00{i}.nii.gz" for i in range(3)]
    result = ingest(source, "one", tmp_path / "ws")
    assert not any("channels" in note for note in result.notes)
    for row in Catalog(tmp_path / "ws").cases("one").to_dict("records"):
        assert list(row["image_files"]) == [row["image_path"]]
        assert row["image_sha256"] == sha256_file(row["image_path"])  # the file's own hash, as before
    # a plan and its pinning key made as before multi-channel plans existed (no channel keys, same ids)
    fingerprints = [{"case_id": "a", "canonical_spacing": [1.0, 1.0, 2.0], "canonical_shape": [10, 10, 5],
                     "labelled": True, "foreground_sample": [0.0, 10.0, 20.0]}]
    plan = make_plan(fingerprints, "CT", {})
    assert "channel_normalisations" not in plan
    identity = {k: plan[k] for k in ("target_spacing", "normalisation", "image_order", "label_mode", "version")}
    # the literals: what the code before multi-channel support computed for the same input
    assert plan["plan_id"] == stable_hash(identity, 12) == "a4fcb99b6197"
    assert plan_key({}, "CT") == plan_key({}, "CT", channels=1) == "b92e6d7e4200"
    assert plan_key({}, "CT", channels=2) != plan_key({}, "CT")
    # one series of numbered files is not one case's channels; two cases' channel files are
    assert cohort_channel_count(channel_groups(Path(f"scan_{i:04d}.nii.gz") for i in range(3))) == 1
    assert cohort_channel_count(channel_groups(Path(f"{c}_{i:04d}.nii.gz") for c in "ab" for i in range(3))) == 3


# ---------------------------------------------------------------------------------------------------------
# preprocessing, augmentation
# ---------------------------------------------------------------------------------------------------------
def test_each_channel_is_normalised_by_its_own_scheme_and_statistics():
    rng = np.random.default_rng(0)
    ct = np.full((12, 10, 8), -1000.0)
    ct[2:10, 2:8, 2:6] = rng.normal(50.0, 20.0, (8, 6, 4))
    ct[5, 5, 4] = 3000.0  # clipped by the CT window
    mri = np.zeros_like(ct)
    mri[2:10, 2:8, 2:6] = rng.normal(400.0, 80.0, (8, 6, 4))  # a zero background: a mask, kept at 0
    label = np.zeros(ct.shape, np.uint8)
    label[3:9, 3:7, 3:5] = 1
    fingerprints = [{"case_id": "a", "canonical_spacing": [1.0, 1.0, 1.0], "canonical_shape": list(ct.shape),
                     "labelled": True, "foreground_sample": list(ct[label > 0]),
                     "channel_foreground_samples": [list(ct[label > 0]), list(mri[label > 0])]}]
    plan = make_plan(fingerprints, "CT", {"normalisation": ["ct", "zscore"], "target_spacing": [1.0, 1.0, 1.0]},
                     channels=2)
    norm_ct, norm_mri = plan["channel_normalisations"]
    assert norm_ct == plan["normalisation"] and norm_ct["scheme"] == "ct" and norm_mri == {"scheme": "zscore"}
    assert norm_ct["mean"] == pytest.approx(float(np.mean(ct[label > 0])))
    assert norm_ct["clip_high"] == pytest.approx(float(np.percentile(ct[label > 0], 99.5)))
    with pytest.raises(ValueError, match=r"lists 3 schemes .* 2 channel"):
        make_plan(fingerprints, "CT", {"normalisation": ["ct", "zscore", "none"]}, channels=2)

    geometry = Geometry((12, 10, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    norms = [Normalisation("ct", norm_ct["clip_low"], norm_ct["clip_high"], norm_ct["mean"], norm_ct["std"]),
             Normalisation("zscore")]
    image, out_label, props = preprocess_arrays([ct, mri], label, geometry, [1.0, 1.0, 1.0], norms, image_order=1)
    assert image.shape == (2, 12, 10, 8) and out_label.shape == (12, 10, 8)  # the CT's -1000 keeps the whole box
    expected_ct = (np.clip(ct, norm_ct["clip_low"], norm_ct["clip_high"]) - norm_ct["mean"]) / norm_ct["std"]
    np.testing.assert_allclose(image[0], expected_ct, rtol=1e-5, atol=1e-5)
    inside = mri != 0
    np.testing.assert_allclose(image[1][inside], (mri[inside] - mri[inside].mean()) / mri[inside].std(), rtol=1e-4,
                               atol=1e-4)
    assert not image[1][~inside].any()
    assert [s["scheme"] for s in props.normalisation] == ["ct", "zscore"]
    # one channel: the array and the statistics as before (no channel axis, one dict)
    single, _, single_props = preprocess_arrays(ct, label, geometry, [1.0, 1.0, 1.0], norms[0], image_order=1)
    np.testing.assert_array_equal(single, image[0])
    assert single_props.normalisation == props.normalisation[0]


def test_spatial_augmentation_warps_every_channel_alike_and_intensity_per_channel():
    torch.manual_seed(0)
    base = torch.rand(2, 1, 16, 16, 16)
    image = torch.cat([base, base], dim=1)  # two identical channels
    label = (base > 0.5).to(torch.uint8)
    intensity_off = dict(p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0, p_gamma=0.0)
    spatial = BatchAugmenter(AugmentConfig(p_flip=1.0, p_rotate=1.0, p_scale=1.0, p_elastic=1.0, **intensity_off))
    out, _ = spatial(image, label, torch.Generator().manual_seed(1))
    assert not torch.equal(out[:, 0], base[:, 0])  # warped
    torch.testing.assert_close(out[:, 0], out[:, 1])  # by the same warp
    intensity = BatchAugmenter(AugmentConfig(p_flip=0.0, p_rotate=0.0, p_scale=0.0, p_elastic=0.0, p_noise=0.0,
                                             p_blur=0.0, p_brightness=1.0, p_contrast=0.0, p_lowres=0.0, p_gamma=0.0))
    out, _ = intensity(image, label, torch.Generator().manual_seed(2))
    assert not torch.allclose(out[:, 0], out[:, 1])  # each channel its own brightness


# ---------------------------------------------------------------------------------------------------------
# the pipeline end to end, and predict
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_channel_run(two_channel_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("mc_run")
    config = write_config(root / "c.yaml", two_channel_cohort, stages=ONE_STAGE, train=TINY,
                          preprocess={"workers": 1, "normalisation": ["ct", "zscore"]},
                          split={"ratios": [0.6, 0.2, 0.2], "seed": 0}, evaluate={"n_boot": 0})
    ws = root / "ws"
    done = unet3d("--workspace", str(ws), "run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = re.search(r"^run id:\s+(\S+)", done.stdout, re.M).group(1)
    return ws, run_id


def test_a_two_channel_cohort_trains_and_infers_through_the_pipeline(two_channel_run):
    ws, run_id = two_channel_run
    case_dirs = [d for d in (ws / "preprocessed").rglob("demo_000__*") if d.is_dir()]
    assert case_dirs
    image = np.load(case_dirs[0] / "image.npy", mmap_mode="r")
    assert image.ndim == 4 and image.shape[0] == 2
    props = json.loads((case_dirs[0] / "props.json").read_text())
    assert [n["scheme"] for n in props["normalisation"]] == ["ct", "zscore"]
    (model_json,) = list((ws / "models").rglob("model.json"))
    assert json.loads(model_json.read_text())["model"]["in_channels"] == 2
    predictions = list((ws / "predictions" / run_id).rglob("*.nii.gz"))
    assert predictions  # val and test cases segmented from both channels


def test_predict_takes_two_files_per_case(two_channel_run, two_channel_cohort, tmp_path):
    ws, run_id = two_channel_run
    images = two_channel_cohort / "imagesTr"
    reference = sitk.ReadImage(str(images / "demo_001_0000.nii.gz"))
    # nnU-Net's names, given as files or as a folder
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for c in (0, 1):
        shutil.copy(images / f"demo_001_{c:04d}.nii.gz", folder / f"scan_{c:04d}.nii.gz")
    # any names, one case's files in channel order
    shutil.copy(images / "demo_002_0000.nii.gz", tmp_path / "t1.nii.gz")
    shutil.copy(images / "demo_002_0001.nii.gz", tmp_path / "t2.nii.gz")
    out = tmp_path / "out"
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(folder), "-i",
                  str(tmp_path / "t1.nii.gz"), "-i", str(tmp_path / "t2.nii.gz"), "-o", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["scan.nii.gz", "t1.nii.gz"]
    written = sitk.ReadImage(str(out / "scan.nii.gz"))
    assert Geometry.of(written) == Geometry.of(reference)

    # a wrong channel count is refused naming the case and the channel
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(images / "demo_003_0000.nii.gz", lone / "demo_003_0000.nii.gz")
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(lone), "-o", str(tmp_path / "o2"),
                  timeout=600)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "demo_003" in line and "channel 1 (demo_003_0001.nii.gz)" in line and "2 channels" in line, line
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(tmp_path / "t1.nii.gz"), "-o",
                  str(tmp_path / "o3"), timeout=600)
    assert done.returncode == 1 and "2 channels per case" in done.stderr and "t1.nii.gz" in done.stderr, done.stderr


def test_a_case_with_other_channels_than_the_cohorts_is_quarantined_and_the_others_go_on():
    from data_catalog.channels import cohort_channels

    cases = [{"case_id": f"c{i}", "image_files": ["a_0000.nii.gz", "a_0001.nii.gz"], "source_kind": "msd"}
             for i in range(3)] + [{"case_id": "odd", "image_files": ["odd.nii.gz"], "source_kind": "folder"}]
    channels, odd = cohort_channels(cases)
    assert channels == 2
    (failure,) = odd
    assert failure["case_id"] == "odd" and "odd has 1 channel(s)" in failure["error"] and "have 2" in failure["error"]
    assert cohort_channels([{"case_id": "d", "image_files": ["1.dcm", "2.dcm"], "source_kind": "dicom"}]) == (1, [])


def test_regenerating_with_another_channel_count_leaves_one_layout(tmp_path):
    generate_demo_cohort(tmp_path / "c", n_cases=2, shape=(12, 12, 8))
    generate_demo_cohort(tmp_path / "c", n_cases=2, shape=(12, 12, 8), channels=2)
    names = sorted(p.name for p in (tmp_path / "c" / "imagesTr").iterdir())
    assert names == ["demo_000_0000.nii.gz", "demo_000_0001.nii.gz", "demo_001_0000.nii.gz", "demo_001_0001.nii.gz"]
    generate_demo_cohort(tmp_path / "c", n_cases=2, shape=(12, 12, 8))
    assert sorted(p.name for p in (tmp_path / "c" / "imagesTr").iterdir()) == ["demo_000.nii.gz", "demo_001.nii.gz"]


def test_a_4d_image_is_not_3d_with_the_channel_file_convention_named(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 6, 5, 4), np.float32), isVector=False), str(folder / "x.nii.gz"))
    ingest(folder, "four", tmp_path / "ws")
    issues = Catalog(tmp_path / "ws").read("issues")
    (message,) = issues.loc[issues["code"] == "not_3d", "message"]
    assert "is 4-D" in message and "one file per channel, CASE_0000, CASE_0001" in message, message
