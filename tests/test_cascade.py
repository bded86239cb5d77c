"""Cascaded inference: ROI from stage 1, stage 2 inside the crop, results on the input's exact grid;
end to end on the real hippocampus cohort; `unet3d predict` on the real DICOM series."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from torch import nn

from unet3d.inference import StageModel, roi_from_mask, run_cascade
from unet3d.io import Geometry

REPO = Path(__file__).resolve().parent.parent


class ThresholdNet(nn.Module):
    """Logits that say: class k where the (normalised) intensity exceeds thresholds[k-1]."""

    def __init__(self, thresholds):
        super().__init__()
        self.thresholds = thresholds
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = [torch.zeros_like(x)]
        for t in self.thresholds:
            logits.append(20.0 * (x - t))
        return torch.cat(logits, dim=1)


def stage(name, thresholds, margin=None, patch=(16, 16, 16)):
    n = len(thresholds) + 1
    return StageModel(name, ThresholdNet(thresholds).eval(), list(patch), {k: f"c{k}" for k in range(1, n)},
                      {k: k for k in range(1, n)}, [1.0, 1.0, 1.0], margin, torch.device("cpu"))


def plan(spacing):
    return {"target_spacing": list(spacing), "normalisation": {"scheme": "none"}, "image_order": 1,
            "label_mode": "nearest"}


def test_roi_ignores_small_components_and_grows_by_the_margin():
    mask = np.zeros((40, 40, 20), bool)
    mask[10:20, 12:22, 5:10] = True
    mask[35, 35, 18] = True  # a speck of noise
    assert roi_from_mask(mask, (1.0, 1.0, 2.0), 4.0) == [[6, 24], [8, 26], [3, 12]]
    assert roi_from_mask(np.zeros((4, 4, 4), bool), (1, 1, 1), 3) is None


def test_cascade_crops_pastes_and_keeps_the_input_geometry():
    image = np.zeros((48, 40, 24), np.float32)
    image[20:30, 15:25, 8:16] = 1.0  # the organ
    image[23:26, 18:21, 10:13] = 2.0  # a lesion inside
    image[2:4, 2:4, 2:4] = 2.0  # a bright spot outside the organ: stage 2 must not see it
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    g = Geometry(image.shape, (0.8, 0.8, 2.0), (10.0, 20.0, -5.0), direction)
    stages = [stage("organ", [0.5]), stage("lesion", [1.5], margin=3.0)]
    out, probs1 = run_cascade(image, g, stages, [plan((1.6, 1.6, 4.0)), plan((0.8, 0.8, 2.0))])
    assert not out.warnings
    organ, lesion = out.labels["organ"], out.labels["lesion"]
    assert organ.shape == lesion.shape == image.shape
    assert organ[25, 20, 12] == 1 and organ[0, 0, 0] == 0
    assert lesion[24, 19, 11] == 1
    assert lesion[3, 3, 3] == 0  # outside the ROI: background whatever stage 2 would have said
    assert probs1.shape[0] == 2
    # the stage-1 cache gives the same answer without running stage 1
    again, _ = run_cascade(image, g, stages, [plan((1.6, 1.6, 4.0)), plan((0.8, 0.8, 2.0))], stage1_probs=probs1)
    assert all(np.array_equal(again.labels[k], out.labels[k]) for k in out.labels)


def test_stage1_finding_nothing_gives_an_empty_prediction_and_a_warning():
    image = np.zeros((20, 20, 10), np.float32)
    g = Geometry(image.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    out, _ = run_cascade(image, g, [stage("organ", [0.5]), stage("lesion", [1.5], margin=3.0)],
                         [plan((2.0, 2.0, 2.0)), plan((1.0, 1.0, 1.0))])
    assert out.labels["lesion"].shape == image.shape and not out.labels["lesion"].any()
    assert out.warnings and "found no foreground" in out.warnings[0]


@pytest.mark.realdata
@pytest.mark.slow
def test_hippocampus_cascade_end_to_end_and_predict_on_dicom(hippocampus_dir, dicom_dir, tmp_path):
    from flows.cli import main as cli
    from flows.pipeline import pipeline_flow

    cfg = yaml.safe_load((REPO / "configs" / "hippocampus.yaml").read_text())
    cfg["cohort"]["source"] = str(hippocampus_dir)
    cfg["train"].update({"features": [4, 8, 16], "max_epochs": 1, "iterations_per_epoch": 3, "threads": 2,
                         "val_max_cases": 4, "device": "cpu"})
    cfg["evaluate"] = {"n_boot": 50}
    config = tmp_path / "hippocampus.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "ws"
    results = pipeline_flow(config_path=str(config), workspace=str(ws))
    run_id = results["report"]["run_id"]
    evaluated = results["infer"]["splits"]
    assert len(evaluated) == 44  # 22 val + 22 test

    from data_catalog.tables import Catalog
    cases = Catalog(ws).cases(cohort="hippocampus").set_index("case_id")
    for cid in evaluated:
        source = sitk.ReadImage(cases.loc[cid, "image_path"])
        for name in ("roi", "final"):
            pred = sitk.ReadImage(str(ws / "predictions" / run_id / name / f"{cid}.nii.gz"))
            assert pred.GetSize() == source.GetSize(), cid
            assert pred.GetSpacing() == pytest.approx(source.GetSpacing())
            assert pred.GetOrigin() == pytest.approx(source.GetOrigin())
            assert pred.GetDirection() == pytest.approx(source.GetDirection())
    metrics = pd.read_parquet(ws / "reports" / "metrics")
    assert len(metrics) == 44 * 3  # roi: 1 class, final: 2 classes
    assert metrics.groupby(["case_id", "stage", "class_index"]).size().max() == 1
    assert set(metrics["class_name"]) == {"hippocampus", "anterior", "posterior"}

    out = tmp_path / "predicted"
    code = cli(["predict", "--workspace", str(ws), "--model", run_id, str(dicom_dir), "--out", str(out)])
    assert code == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    dicom = reader.Execute()
    pred = sitk.ReadImage(str(out / f"{dicom_dir.name}.nii.gz"))
    assert pred.GetSize() == dicom.GetSize()
    assert pred.GetSpacing() == pytest.approx(dicom.GetSpacing())
    assert pred.GetOrigin() == pytest.approx(dicom.GetOrigin())
    assert pred.GetDirection() == pytest.approx(dicom.GetDirection())
    assert (out / "stage1" / f"{dicom_dir.name}.nii.gz").exists()  # the roi stage's mask, apart from the final ones
