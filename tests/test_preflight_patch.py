"""Issue 10 item 8, the patch: a patch larger than the cohort's images (256^3 on 35x50x36 hippocampus images)
is refused in one line naming the key, before any training work: by preflight when the cohort is already in
the catalog, else right after ingestion, before preprocessing.

The rule: on every axis the patch may be at most the largest image of the cohort after resampling to the
stage's spacing, rounded up to a multiple of 8 (the rounding nnU-Net's planner applies; its own 40x56x40
hippocampus patch exceeds the 35x50x36 images and is accepted). Anything beyond is all padding in every case."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from pipeline_helpers import write_config

from flows.preflight import check_patch_fits_cohort, preflight
from unet3d.config import ConfigError, load_config


def _cfg(path: Path) -> dict:
    return load_config(path).model_dump(mode="json")


def _hippocampus_like(root: Path, sizes=((35, 50, 36), (34, 47, 35), (36, 48, 37))) -> tuple[Path, Path]:
    """Plain images and labels of the hippocampus' sizes (x, y, z) at 1 mm."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        image = sitk.GetImageFromArray(rng.random(size[::-1]).astype(np.float32))
        label = np.zeros(size[::-1], dtype=np.uint8)
        label[10:20, 10:20, 10:20] = 1
        label_image = sitk.GetImageFromArray(label)
        for img in (image, label_image):
            img.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(images / f"hippo_{i:03d}.nii.gz"))
        sitk.WriteImage(label_image, str(labels / f"hippo_{i:03d}.nii.gz"))
    return images, labels


def _hippo_config(path: Path, images: Path, labels: Path, train: dict | None = None, stages=None) -> Path:
    cfg = {"cohort": {"name": "hippo", "source": str(images), "labels_dir": str(labels), "modality": "MRI"},
           "labels": {1: "hippocampus"}, "split": {"ratios": [0.34, 0.33, 0.33], "seed": 0},
           "train": {"device": "cpu", **(train or {})}}
    if stages is not None:
        cfg["stages"] = stages
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def hippo(tmp_path):
    from data_catalog.ingest import ingest

    images, labels = _hippocampus_like(tmp_path / "src")
    ws = tmp_path / "ws"
    ingest(images, "hippo", ws, labels=labels)
    return images, labels, ws


def test_a_patch_larger_than_every_image_is_refused_by_preflight(hippo, tmp_path):
    images, labels, ws = hippo
    cfg = _cfg(_hippo_config(tmp_path / "c.yaml", images, labels, train={"patch_size": [256, 256, 256]}))
    with pytest.raises(ConfigError) as info:
        preflight(cfg, str(ws))
    message = str(info.value)
    assert message.startswith("train.patch_size:") and "\n" not in message, message
    assert "[256, 256, 256]" in message and "hippo" in message and "[40, 56, 40]" in message, message


def test_one_axis_too_long_is_enough_and_the_stage_key_is_named(hippo, tmp_path):
    images, labels, ws = hippo
    stages = [{"name": "whole", "classes": {1: "hippocampus"}, "patch_size": [40, 56, 64]}]
    cfg = _cfg(_hippo_config(tmp_path / "c.yaml", images, labels, stages=stages))
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.patch_size: .*axis z"):
        preflight(cfg, str(ws))


@pytest.mark.parametrize("patch", [[40, 56, 40], [32, 48, 32], [8, 8, 8]])
def test_nnunet_sized_and_smaller_patches_are_accepted(hippo, tmp_path, patch):
    images, labels, ws = hippo
    preflight(_cfg(_hippo_config(tmp_path / "c.yaml", images, labels, train={"patch_size": patch})), str(ws))


def test_the_stage_spacing_counts(tiny_cohort, tmp_path):
    """The demo cascade's first stage runs at twice the spacing: 32x32x16 images are 16x16x8 voxels there, so
    a 32x32x16 patch fits the second stage and is all padding in the first."""
    from data_catalog.ingest import ingest

    ws = tmp_path / "ws"
    ingest(tiny_cohort, "tiny", ws)
    cfg = _cfg(write_config(tmp_path / "c.yaml", tiny_cohort, train={"patch_size": [32, 32, 16]}))
    with pytest.raises(ConfigError, match=r"^train\.patch_size: .*stage organ"):
        check_patch_fits_cohort(cfg, str(ws))
    stages = [dict(s) for s in cfg["stages"]]
    stages[0]["patch_size"], stages[1]["patch_size"] = [16, 16, 8], [32, 32, 16]
    check_patch_fits_cohort(dict(cfg, stages=stages), str(ws))


def test_without_the_cohort_in_the_catalog_preflight_cannot_tell(tmp_path):
    """Sizes come from the catalog: before the first ingestion there is nothing to compare with (the pipeline
    checks again right after ingesting)."""
    images, labels = _hippocampus_like(tmp_path / "src")
    cfg = _cfg(_hippo_config(tmp_path / "c.yaml", images, labels, train={"patch_size": [256, 256, 256]}))
    preflight(cfg, str(tmp_path / "empty_ws"))
    assert not (tmp_path / "empty_ws").exists()  # preflight writes nothing


@pytest.mark.slow
def test_the_pipeline_refuses_the_patch_right_after_ingestion(tmp_path):
    """First run on a new cohort: ingested, then refused before preprocessing or training writes anything."""
    from flows.pipeline import pipeline_flow

    images, labels = _hippocampus_like(tmp_path / "src")
    config = _hippo_config(tmp_path / "c.yaml", images, labels, train={"patch_size": [256, 256, 256]})
    ws = tmp_path / "ws"
    with pytest.raises(ConfigError, match=r"^train\.patch_size: "):
        pipeline_flow(config_path=str(config), workspace=str(ws))
    assert (ws / "catalog").exists()  # ingestion ran (its result is kept for the next run)
    assert not (ws / "preprocessed").exists() and not (ws / "models").exists()
