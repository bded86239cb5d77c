"""The Prefect pipeline end to end on a tiny synthetic cohort: outputs, caching, refresh, and reruns after
failures injected in training and in evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from pipeline_helpers import cached_stages, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline():
    from flows.pipeline import pipeline_flow
    return pipeline_flow


def test_pipeline_outputs_caching_and_refresh(pipeline, tiny_cohort, tmp_path):
    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", tiny_cohort)
    first = pipeline(config_path=str(config), workspace=str(ws))
    assert not any(cached_stages(first).values())
    run_id = first["report"]["run_id"]

    # every evaluated case has a prediction per stage, in its input's exact geometry
    from data_catalog.tables import Catalog
    cases = Catalog(ws).cases(cohort="tiny").set_index("case_id")
    evaluated = first["infer"]["splits"]
    assert len(evaluated) >= 2
    for cid in evaluated:
        source = sitk.ReadImage(cases.loc[cid, "image_path"])
        for stage in ("organ", "lesion"):
            pred = sitk.ReadImage(str(ws / "predictions" / run_id / stage / f"{cid}.nii.gz"))
            assert pred.GetSize() == source.GetSize()
            assert np.allclose(pred.GetSpacing(), source.GetSpacing())
            assert np.allclose(pred.GetOrigin(), source.GetOrigin())
            assert np.allclose(pred.GetDirection(), source.GetDirection())

    # one metrics row per case x class x stage, hive-partitioned, SPEC columns
    metrics = pd.read_parquet(ws / "reports" / "metrics")
    assert len(metrics) == len(evaluated) * 2
    assert set(metrics["run_id"].astype(str)) == {run_id}
    assert {"run_date", "cohort", "stage", "model", "case_id", "split", "class_index", "class_name", "tp", "fp",
            "fn", "tn", "precision", "recall", "specificity", "dice", "iou", "hd95_mm", "assd_mm", "volume_ref_ml",
            "volume_pred_ml", "ref_empty", "pred_empty"} <= set(metrics.columns)
    summary = pd.read_parquet(ws / "reports" / "summary")
    assert {"metric", "n_cases", "mean", "median", "std", "ci_low", "ci_high", "pooled"} <= set(summary.columns)
    assert Path(first["report"]["report_md"]).exists()

    # nothing new: every stage is a cache hit, nothing recomputed
    second = pipeline(config_path=str(config), workspace=str(ws))
    assert all(cached_stages(second).values()), cached_stages(second)
    assert second["report"]["run_id"] == run_id

    # --refresh train: training and everything downstream recompute, upstream stays cached
    third = pipeline(config_path=str(config), workspace=str(ws), refresh=["train"])
    flags = cached_stages(third)
    assert flags["ingest"] and flags["preprocess"] and flags["split"]
    assert not flags["train-organ"] and not flags["infer"] and not flags["report"]

    # a deleted model folder is not trusted from cache
    import shutil
    shutil.rmtree(third["train"][1]["model_dir"])
    fourth = pipeline(config_path=str(config), workspace=str(ws))
    assert not cached_stages(fourth)["train-lesion"] and cached_stages(fourth)["train-organ"]
    assert Path(fourth["train"][1]["best_checkpoint"]).exists()


def test_rerun_after_a_failure_in_training_resumes_from_the_checkpoint(pipeline, tiny_cohort, tmp_path, monkeypatch):
    import unet3d.train as train_module

    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", tiny_cohort, train={"max_epochs": 3})
    # The failure is injected into the per-epoch validation prediction (the trainer's predict_cases).
    real_predict = train_module.predict_cases
    calls = {"n": 0}

    def failing_predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch of the first stage dies
            raise RuntimeError("injected failure during training")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(train_module, "predict_cases", failing_predict)
    with pytest.raises(RuntimeError, match="injected failure"):
        pipeline(config_path=str(config), workspace=str(ws))
    monkeypatch.setattr(train_module, "predict_cases", real_predict)

    rerun = pipeline(config_path=str(config), workspace=str(ws))
    flags = cached_stages(rerun)
    assert flags["ingest"] and flags["preprocess"] and flags["split"]
    organ = rerun["train"][0]
    assert organ["resumed_from_epoch"] == 0 and organ["epochs"] == 3  # epoch 0 was kept, not redone
    assert rerun["report"]["run_id"]


def test_rerun_after_a_failure_in_evaluation_recomputes_only_evaluation(pipeline, tiny_cohort, tmp_path, monkeypatch):
    import unet3d.metrics as metrics_module

    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", tiny_cohort)

    def broken(*args, **kwargs):
        raise OSError(28, "injected: no space left on device")

    monkeypatch.setattr(metrics_module, "case_metrics", broken)
    with pytest.raises(OSError, match="injected"):
        pipeline(config_path=str(config), workspace=str(ws))
    assert not (ws / "reports" / "metrics").exists()  # nothing half-written
    monkeypatch.undo()

    rerun = pipeline(config_path=str(config), workspace=str(ws))
    flags = cached_stages(rerun)
    assert all(flags[s] for s in ("ingest", "preprocess", "split", "train-organ", "train-lesion", "infer"))
    assert not flags["evaluate"] and not flags["report"]
    assert len(pd.read_parquet(ws / "reports" / "metrics")) > 0
