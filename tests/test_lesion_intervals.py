"""Lesion-level precision, recall and F1 with 95 % bootstrap intervals over cases, like the voxel metrics: rows of
the same long summary table (metric lesion_precision, lesion_recall, lesion_f1; the SPEC's schema unchanged),
written by the report stage and shown in the report's lesion table as `mean [low, high]`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from unet3d.metrics import LESION_SUMMARY_METRICS, lesion_metrics, summarize
from unet3d.report import write_markdown_report
from unet3d.report_tables import SUMMARY_SCHEMA, write_partition

CLASSES = {1: "lesion"}
SPACING = (1.0, 1.0, 1.0)


def _case(n_ref: int, n_hit: int, n_false: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference with n_ref separate cubes; the prediction hits the first n_hit and adds n_false elsewhere."""
    reference = np.zeros((40, 12, 12), np.uint8)
    prediction = np.zeros_like(reference)
    for i in range(n_ref):
        reference[4 * i:4 * i + 2, 2:4, 2:4] = 1
        if i < n_hit:
            prediction[4 * i:4 * i + 2, 2:4, 2:4] = 1
    for i in range(n_false):
        prediction[4 * i:4 * i + 2, 8:10, 8:10] = 1
    return prediction, reference


CASES = {"a": (3, 3, 0), "b": (2, 1, 1), "c": (4, 2, 2), "d": (1, 1, 3), "e": (2, 0, 1)}


@pytest.fixture(scope="module")
def lesions() -> pd.DataFrame:
    rows = []
    for case_id, counts in CASES.items():
        prediction, reference = _case(*counts)
        for row in lesion_metrics(prediction, reference, SPACING, CLASSES):
            rows.append({"cohort": "phantom", "stage": "final", "model": "unet3d", "case_id": case_id,
                         "split": "test", **row})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def metrics(lesions) -> pd.DataFrame:
    # voxel rows for the same cases (only the columns summarize reads)
    return lesions[["cohort", "stage", "model", "case_id", "split", "class_index", "class_name"]].assign(dice=0.5)


def test_lesion_metrics_get_bootstrap_rows_in_the_summary(lesions, metrics):
    summary = summarize(metrics, n_boot=200, seed=0, lesions=lesions)
    rows = summary[summary["metric"].isin(LESION_SUMMARY_METRICS)].set_index("metric")
    assert list(rows.index) == list(LESION_SUMMARY_METRICS)
    for metric in LESION_SUMMARY_METRICS:
        values = lesions[metric].dropna().to_numpy(dtype=float)
        row = rows.loc[metric]
        assert row["n_cases"] == len(values) and row["mean"] == pytest.approx(values.mean())
        # the same percentile bootstrap as the voxel metrics: scipy's, over cases, seeded
        expected = stats.bootstrap((values,), np.mean, n_resamples=200, vectorized=True, method="percentile",
                                   confidence_level=0.95, rng=np.random.default_rng(0)).confidence_interval
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
        assert row["ci_low"] <= row["mean"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    # pooled: the summed counts' detection scores (7 of 12 reference lesions detected, 7 of 14 predicted ones hit)
    assert rows.loc["lesion_recall", "pooled"] == pytest.approx(7 / 12)
    assert rows.loc["lesion_precision", "pooled"] == pytest.approx(7 / 14)
    # the voxel rows are those of a summary without lesions
    without = summarize(metrics, n_boot=200, seed=0)
    pd.testing.assert_frame_equal(summary[~summary["metric"].isin(LESION_SUMMARY_METRICS)].reset_index(drop=True),
                                  without)


def test_lesion_summary_rows_fit_the_spec_summary_schema(lesions, metrics, tmp_path):
    summary = summarize(metrics, n_boot=50, lesions=lesions)
    path = write_partition(summary, tmp_path / "summary", "2024-05-01", "run1", SUMMARY_SCHEMA)
    back = pd.read_parquet(path)
    assert set(LESION_SUMMARY_METRICS) <= set(back["metric"])
    assert list(back.columns) == SUMMARY_SCHEMA.names


def test_report_lesion_table_shows_mean_and_interval_with_the_means_decimals(lesions, metrics, tmp_path):
    summary = summarize(metrics.assign(run_id="run1"), n_boot=200, lesions=lesions.assign(run_id="run1"))
    text = write_markdown_report(tmp_path, "run1", summary, metrics, [], lesions=lesions).read_text()
    section = text.split("## Lesion-level detection")[1]
    assert "lesion F1" in section and "pooled precision" in section
    for metric in LESION_SUMMARY_METRICS:
        row = summary[summary["metric"] == metric].iloc[0]
        assert f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in section, metric
    # a summary without lesion rows (an older run): the mean alone, no made-up interval
    bare = summarize(metrics.assign(run_id="run1"), n_boot=200)
    text = write_markdown_report(tmp_path / "bare", "run1", bare, metrics, [], lesions=lesions).read_text()
    f1 = lesions["lesion_f1"].mean()
    section = text.split("## Lesion-level detection")[1]
    assert f"{f1:.3f}" in section and f"{f1:.3f} [" not in section
