"""Tests of unet3d.metrics: hand-made volumes with known answers, the SPEC's empty-mask policy, agreement with
independent implementations (brute force, SimpleITK, MONAI), lesion detection and the bootstrap summary."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from unet3d.metrics import case_metrics, lesion_metrics, summarize, surface_distances

CASE_KEYS = {
    "class_index", "class_name", "tp", "fp", "fn", "tn", "precision", "recall", "specificity", "dice", "iou",
    "hd95_mm", "assd_mm", "volume_ref_ml", "volume_pred_ml", "ref_empty", "pred_empty",
}


def _blob(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float = 2.0, fraction: float = 0.25):
    """A random smooth blob mask covering about `fraction` of the volume."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1.0 - fraction)


def _brute_force_distances(pred_mask, ref_mask, spacing):
    """Surfaces by scipy's 6-connected erosion (border = outside) and all-pairs distances between them."""
    cross = ndimage.generate_binary_structure(3, 1)
    pred_surface = pred_mask & ~ndimage.binary_erosion(pred_mask, cross, border_value=0)
    ref_surface = ref_mask & ~ndimage.binary_erosion(ref_mask, cross, border_value=0)
    pred_points = np.argwhere(pred_surface) * np.asarray(spacing)
    ref_points = np.argwhere(ref_surface) * np.asarray(spacing)
    pairwise = cdist(pred_points, ref_points)
    return pairwise.min(axis=1), pairwise.min(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Hand-made volumes
# ---------------------------------------------------------------------------------------------------------------
def test_thin_plates_offset_along_z_give_hand_computed_metrics():
    # One-voxel-thick plates (every voxel is surface): reference z in 2..11, prediction z in 6..15, 4 rows in y.
    # Along each y row the prediction's distances to the reference are 0 (x6), then 1, 2, 3, 4 voxels of 2.5 mm.
    spacing = (1.5, 0.8, 2.5)
    ref = np.zeros((10, 12, 20), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[5, 2:6, 2:12] = 1
    pred[5, 2:6, 6:16] = 1
    (row,) = case_metrics(pred, ref, spacing, {1: "plate"})

    assert set(row) == CASE_KEYS
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (24, 16, 16, ref.size - 56)
    assert row["dice"] == pytest.approx(48 / 80)
    assert row["iou"] == pytest.approx(24 / 56)
    assert row["precision"] == pytest.approx(24 / 40) and row["recall"] == pytest.approx(24 / 40)
    assert row["specificity"] == pytest.approx((ref.size - 56) / (ref.size - 40))
    directed = np.array(4 * ([0.0] * 6 + [2.5, 5.0, 7.5, 10.0]))
    assert row["hd95_mm"] == pytest.approx(np.percentile(directed, 95)) and row["hd95_mm"] == pytest.approx(10.0)
    assert row["assd_mm"] == pytest.approx(2.5)
    voxel_mm3 = 1.5 * 0.8 * 2.5
    assert row["volume_ref_ml"] == pytest.approx(40 * voxel_mm3 / 1000)
    assert row["volume_pred_ml"] == pytest.approx(40 * voxel_mm3 / 1000)
    assert row["ref_empty"] is False and row["pred_empty"] is False
    assert isinstance(row["tp"], int) and isinstance(row["dice"], float) and isinstance(row["class_index"], int)


def test_cubes_offset_by_two_voxels_with_anisotropic_spacing():
    spacing = (2.0, 1.0, 3.0)  # 6 mm^3 voxels
    ref = np.zeros((32, 30, 28), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[10:20, 10:20, 10:20] = 1
    pred[12:22, 10:20, 10:20] = 1
    (row,) = case_metrics(pred, ref, spacing, {1: "cube"})

    assert (row["tp"], row["fp"], row["fn"]) == (800, 200, 200)
    assert row["tn"] == ref.size - 1200
    assert row["dice"] == pytest.approx(0.8)
    assert row["iou"] == pytest.approx(800 / 1200)
    assert row["volume_ref_ml"] == pytest.approx(6.0) and row["volume_pred_ml"] == pytest.approx(6.0)
    # The farthest surface voxels are the prediction's far x face, two voxels (4 mm) beyond the reference's.
    pred_to_ref, ref_to_pred = surface_distances(pred == 1, ref == 1, spacing)
    assert max(pred_to_ref.max(), ref_to_pred.max()) == pytest.approx(4.0)
    expected_pred, expected_ref = _brute_force_distances(pred == 1, ref == 1, spacing)
    assert row["hd95_mm"] == pytest.approx(
        max(np.percentile(expected_pred, 95), np.percentile(expected_ref, 95)), rel=1e-12
    )
    assert row["assd_mm"] == pytest.approx(np.concatenate([expected_pred, expected_ref]).mean(), rel=1e-12)


def test_identical_masks_have_perfect_scores():
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[3:9, 2:7, 4:10] = 2
    (row,) = case_metrics(ref.copy(), ref, (0.7, 0.7, 3.0), {2: "organ"})
    assert row["dice"] == 1.0 and row["iou"] == 1.0 and row["fp"] == 0 and row["fn"] == 0
    assert row["hd95_mm"] == 0.0 and row["assd_mm"] == 0.0


def test_multiclass_confusion_counts_are_per_class():
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0:2] = 1  # 72 voxels of class 1
    ref[4:6] = 2  # 72 voxels of class 2
    pred[0:2] = 1
    pred[0, 0, 0] = 2  # a class-1 voxel predicted as class 2
    pred[4:6] = 2
    pred[5, 5, 5] = 0  # a class-2 voxel missed
    pred[3, 3, 3] = 1  # a background voxel predicted as class 1
    rows = {r["class_name"]: r for r in case_metrics(pred, ref, (1.0, 1.0, 1.0), {1: "one", 2: "two"})}
    assert (rows["one"]["tp"], rows["one"]["fp"], rows["one"]["fn"]) == (71, 1, 1)
    assert (rows["two"]["tp"], rows["two"]["fp"], rows["two"]["fn"]) == (71, 1, 1)
    for row in rows.values():
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == ref.size


def test_ignore_label_is_left_out_of_counts_but_not_of_volumes():
    ref = np.zeros((8, 8, 8), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[2:4, 2:4, 2:4] = 1
    ref[6:8] = 255  # 128 unlabelled voxels
    pred[2:4, 2:4, 2:4] = 1
    pred[7, 0, 0] = 1  # predicted on an unlabelled voxel: neither right nor wrong
    (row,) = case_metrics(pred, ref, (1.0, 1.0, 1.0), {1: "a"})
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (8, 0, 0, ref.size - 128 - 8)
    assert row["volume_pred_ml"] == pytest.approx(9 / 1000)


# ---------------------------------------------------------------------------------------------------------------
# Empty-mask policy (SPEC)
# ---------------------------------------------------------------------------------------------------------------
EMPTY_SPACING = (1.5, 0.5, 4.0)
EMPTY_SHAPE = (10, 14, 6)
DIAGONAL = math.sqrt((10 * 1.5) ** 2 + (14 * 0.5) ** 2 + (6 * 4.0) ** 2)


def _empty_case(ref_has: bool, pred_has: bool) -> dict:
    ref = np.zeros(EMPTY_SHAPE, dtype=np.uint8)
    pred = np.zeros_like(ref)
    if ref_has:
        ref[2:5, 3:8, 1:4] = 1
    if pred_has:
        pred[5:9, 6:10, 2:5] = 1
    (row,) = case_metrics(pred, ref, EMPTY_SPACING, {1: "a"})
    return row


def test_both_empty():
    row = _empty_case(ref_has=False, pred_has=False)
    assert row["dice"] == 1.0 and row["iou"] == 1.0
    assert row["precision"] == 1.0 and row["recall"] == 1.0
    assert row["hd95_mm"] == 0.0 and row["assd_mm"] == 0.0
    assert row["specificity"] == 1.0
    assert row["ref_empty"] is True and row["pred_empty"] is True
    assert row["volume_ref_ml"] == 0.0 and row["volume_pred_ml"] == 0.0


def test_reference_only_is_a_miss():
    row = _empty_case(ref_has=True, pred_has=False)
    assert row["dice"] == 0.0 and row["iou"] == 0.0 and row["recall"] == 0.0
    assert row["precision"] is None
    assert row["hd95_mm"] == pytest.approx(DIAGONAL) and row["assd_mm"] == pytest.approx(DIAGONAL)
    assert row["specificity"] == 1.0
    assert row["ref_empty"] is False and row["pred_empty"] is True


def test_prediction_only_is_a_false_alarm():
    row = _empty_case(ref_has=False, pred_has=True)
    assert row["dice"] == 0.0 and row["iou"] == 0.0 and row["precision"] == 0.0
    assert row["recall"] is None
    assert row["hd95_mm"] == pytest.approx(DIAGONAL) and row["assd_mm"] == pytest.approx(DIAGONAL)
    n_pred = 4 * 4 * 3
    assert row["specificity"] == pytest.approx((np.prod(EMPTY_SHAPE) - n_pred) / np.prod(EMPTY_SHAPE))
    assert row["ref_empty"] is True and row["pred_empty"] is False


def test_specificity_without_negatives_is_one():
    full = np.ones((4, 4, 4), dtype=np.uint8)
    (row,) = case_metrics(full, full, (1.0, 1.0, 1.0), {1: "everything"})
    assert row["tn"] == 0 and row["fp"] == 0 and row["specificity"] == 1.0
    assert row["hd95_mm"] == 0.0


def test_invalid_inputs_are_rejected():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        case_metrics(a, np.zeros((4, 4, 5), dtype=np.uint8), (1, 1, 1), {1: "a"})
    with pytest.raises(ValueError, match="background"):
        case_metrics(a, a, (1, 1, 1), {0: "background"})
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, (1, 1), {1: "a"})
    with pytest.raises(ValueError, match="integer"):
        case_metrics(a + 0.5, a, (1, 1, 1), {1: "a"})


# ---------------------------------------------------------------------------------------------------------------
# Independent implementations
# ---------------------------------------------------------------------------------------------------------------
def _random_pair(seed: int, shape=(26, 22, 14)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = _blob(rng, shape)
    # A prediction that is the reference, a little eroded in places and with extra blobs: realistic overlap.
    pred = ndimage.binary_erosion(ref, iterations=1) | _blob(rng, shape, sigma=1.5, fraction=0.05)
    return pred.astype(np.uint8), ref.astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_brute_force_on_random_blobs(seed):
    spacing = (0.7, 1.3, 3.1)
    pred, ref = _random_pair(seed)
    assert ref[0].any() or ref[-1].any() or ref[:, 0].any()  # blobs reach the image border: border = outside
    (row,) = case_metrics(pred, ref, spacing, {1: "blob"})
    expected_pred, expected_ref = _brute_force_distances(pred == 1, ref == 1, spacing)
    hd95 = max(np.percentile(expected_pred, 95), np.percentile(expected_ref, 95))
    assert row["hd95_mm"] == pytest.approx(hd95, rel=1e-12)
    assert row["assd_mm"] == pytest.approx(np.concatenate([expected_pred, expected_ref]).mean(), rel=1e-12)


def test_cropping_does_not_change_distances():
    spacing = (0.9, 0.9, 2.0)
    pred, ref = _random_pair(3, shape=(16, 16, 10))
    (small,) = case_metrics(pred, ref, spacing, {1: "blob"})
    big_pred, big_ref = (np.pad(v, ((5, 7), (3, 9), (4, 2))) for v in (pred, ref))
    (big,) = case_metrics(big_pred, big_ref, spacing, {1: "blob"})
    for key in ("tp", "fp", "fn", "dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "volume_ref_ml"):
        assert big[key] == pytest.approx(small[key], rel=1e-12), key
    assert big["tn"] == small["tn"] + big_ref.size - ref.size


@pytest.mark.parametrize("seed", [4, 5])
def test_overlap_matches_simpleitk(seed):
    pred, ref = _random_pair(seed)
    (row,) = case_metrics(pred, ref, (0.8, 0.8, 2.5), {1: "blob"})
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    # SimpleITK arrays are (z, y, x): transpose our (x, y, z) volumes on the way in.
    overlap.Execute(sitk.GetImageFromArray(ref.transpose(2, 1, 0)), sitk.GetImageFromArray(pred.transpose(2, 1, 0)))
    assert row["dice"] == pytest.approx(overlap.GetDiceCoefficient(1), rel=1e-6)
    assert row["iou"] == pytest.approx(overlap.GetJaccardCoefficient(1), rel=1e-6)
    ref_mask, pred_mask = ref == 1, pred == 1
    assert row["tp"] == int((ref_mask & pred_mask).sum())
    assert row["fp"] == int((~ref_mask & pred_mask).sum())
    assert row["fn"] == int((ref_mask & ~pred_mask).sum())
    assert row["tn"] == int((~ref_mask & ~pred_mask).sum())


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_distances_match_monai(seed):
    pytest.importorskip("monai", reason="MONAI (a dev-extra dependency) is not installed: cross-check skipped")
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    spacing = (0.6, 1.1, 2.7)
    pred, ref = _random_pair(seed)
    (row,) = case_metrics(pred, ref, spacing, {1: "blob"})
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(ref[None, None].astype(np.float32))
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True, spacing=spacing)
    # MONAI returns float32.
    assert row["hd95_mm"] == pytest.approx(float(hd95), rel=1e-5)
    assert row["assd_mm"] == pytest.approx(float(assd), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Lesion metrics
# ---------------------------------------------------------------------------------------------------------------
def test_lesions_one_detected_one_missed_one_false():
    ref = np.zeros((30, 30, 30), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1  # lesion A: hit by a shifted prediction
    ref[20:24, 20:24, 20:24] = 1  # lesion B: missed
    pred[4:8, 4:8, 4:8] = 1
    pred[2:5, 20:23, 10:13] = 1  # false lesion, touches no reference lesion
    (row,) = lesion_metrics(pred, ref, (1.0, 1.0, 2.0), {1: "lesion"})
    assert row == {
        "class_index": 1, "class_name": "lesion", "n_ref_lesions": 2, "n_pred_lesions": 2, "detected": 1,
        "missed": 1, "false_lesions": 1, "lesion_precision": 0.5, "lesion_recall": 0.5, "lesion_f1": 0.5,
    }


def test_lesion_classes_are_separate_and_connectivity_matters():
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[2, 2, 2] = 1
    ref[3, 3, 3] = 1  # touches the first only at a corner
    pred[2, 2, 2] = 2  # right place, wrong class
    (row26,) = lesion_metrics(pred, ref, (1, 1, 1), {1: "a"}, connectivity=26)
    (row6,) = lesion_metrics(pred, ref, (1, 1, 1), {1: "a"}, connectivity=6)
    assert row26["n_ref_lesions"] == 1 and row6["n_ref_lesions"] == 2
    assert row26["detected"] == 0 and row26["lesion_recall"] == 0.0 and row26["lesion_precision"] is None
    assert row26["lesion_f1"] == 0.0
    pred[3, 3, 3] = 1
    (row26,) = lesion_metrics(pred, ref, (1, 1, 1), {1: "a"}, connectivity=26)
    (row6,) = lesion_metrics(pred, ref, (1, 1, 1), {1: "a"}, connectivity=6)
    assert row26["detected"] == 1 and row26["lesion_recall"] == 1.0
    assert row6["detected"] == 1 and row6["missed"] == 1 and row6["lesion_recall"] == 0.5
    with pytest.raises(ValueError, match="connectivity"):
        lesion_metrics(pred, ref, (1, 1, 1), {1: "a"}, connectivity=8)


def test_lesion_empty_policy():
    empty = np.zeros((6, 6, 6), dtype=np.uint8)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = 1
    (both,) = lesion_metrics(empty, empty, (1, 1, 1), {1: "a"})
    (miss,) = lesion_metrics(empty, some, (1, 1, 1), {1: "a"})
    (false,) = lesion_metrics(some, empty, (1, 1, 1), {1: "a"})
    assert (both["lesion_precision"], both["lesion_recall"], both["lesion_f1"]) == (1.0, 1.0, 1.0)
    assert (miss["lesion_precision"], miss["lesion_recall"], miss["lesion_f1"]) == (None, 0.0, 0.0)
    assert miss["missed"] == 1
    assert (false["lesion_precision"], false["lesion_recall"], false["lesion_f1"]) == (0.0, None, 0.0)
    assert false["false_lesions"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------
def _metrics_table(n_cases: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("val", "test"):
        for case in range(n_cases):
            for class_name in ("anterior", "posterior"):
                tp, fp, fn = (int(v) for v in rng.integers(1, 400, size=3))
                rows.append(
                    {
                        "run_id": "r1", "cohort": "hippocampus", "stage": "final", "case_id": f"c{case}",
                        "split": split, "class_index": 1 if class_name == "anterior" else 2,
                        "class_name": class_name, "tp": tp, "fp": fp, "fn": fn, "tn": 10_000,
                        "precision": tp / (tp + fp), "recall": tp / (tp + fn), "specificity": 10_000 / (10_000 + fp),
                        "dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
                        "hd95_mm": float(rng.gamma(2.0, 2.0)), "assd_mm": float(rng.gamma(1.0, 1.0)),
                    }
                )
    return pd.DataFrame(rows)


def test_summary_shape_keys_and_statistics():
    table = _metrics_table()
    summary = summarize(table, n_boot=300, seed=0)
    assert list(summary.columns) == [
        "run_id", "cohort", "stage", "split", "class_name",
        "metric", "n_cases", "mean", "median", "std", "ci_low", "ci_high", "pooled",
    ]
    assert len(summary) == 2 * 2 * 7  # split x class x metric
    row = summary.query("split == 'test' and class_name == 'posterior' and metric == 'dice'").iloc[0]
    values = table.query("split == 'test' and class_name == 'posterior'")["dice"].to_numpy()
    assert row["n_cases"] == 12
    assert row["mean"] == pytest.approx(values.mean())
    assert row["median"] == pytest.approx(np.median(values))
    assert row["std"] == pytest.approx(values.std(ddof=1))
    assert (summary["ci_low"] <= summary["mean"]).all() and (summary["mean"] <= summary["ci_high"]).all()
    assert (summary["ci_low"] < summary["ci_high"]).all()


def test_summary_pooled_metrics_from_summed_counts():
    table = _metrics_table()
    summary = summarize(table, n_boot=50)
    group = table.query("split == 'val' and class_name == 'anterior'")
    tp, fp, fn, tn = (group[c].sum() for c in ("tp", "fp", "fn", "tn"))
    pooled = summary.query("split == 'val' and class_name == 'anterior'").set_index("metric")["pooled"]
    assert pooled["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert pooled["iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)
    assert pooled["precision"] == pytest.approx(tp / (tp + fp), rel=1e-12)
    assert pooled["recall"] == pytest.approx(tp / (tp + fn), rel=1e-12)
    assert pooled["specificity"] == pytest.approx(tn / (tn + fp), rel=1e-12)
    assert pooled[["hd95_mm", "assd_mm"]].isna().all()


def test_summary_bootstrap_is_seeded():
    table = _metrics_table()
    first = summarize(table, n_boot=200, seed=7)
    again = summarize(table, n_boot=200, seed=7)
    other = summarize(table, n_boot=200, seed=8)
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["ci_low"], other["ci_low"])
    # A group's interval does not depend on the other groups present in the table.
    alone = summarize(table[table["split"] == "val"], n_boot=200, seed=7)
    pd.testing.assert_frame_equal(alone, first[first["split"] == "val"].reset_index(drop=True))
    # Narrower confidence level, narrower interval.
    narrow = summarize(table, n_boot=200, seed=7, ci=0.5)
    assert ((narrow["ci_high"] - narrow["ci_low"]) <= (first["ci_high"] - first["ci_low"]) + 1e-12).all()


def test_summary_skips_nulls_and_counts_non_null_cases():
    table = pd.DataFrame(
        {
            "class_name": ["a"] * 4,
            "tp": [10, 0, 5, 0], "fp": [2, 3, 0, 0], "fn": [1, 0, 5, 0], "tn": [100] * 4,
            "precision": [10 / 12, 0.0, 1.0, 1.0],
            "recall": [10 / 11, None, 0.5, 1.0],  # case 2 had an empty reference: recall is null
            "hd95_mm": [1.0, 9.0, 3.0, 0.0],
            "assd_mm": [None, None, None, None],
        }
    )
    summary = summarize(table, n_boot=100).set_index("metric")
    assert list(summary.index) == ["precision", "recall", "hd95_mm", "assd_mm"]  # only metrics present
    assert summary.loc["recall", "n_cases"] == 3
    assert summary.loc["recall", "mean"] == pytest.approx((10 / 11 + 0.5 + 1.0) / 3)
    assert summary.loc["assd_mm", "n_cases"] == 0
    assert summary.loc["assd_mm", ["mean", "median", "std", "ci_low", "ci_high", "pooled"]].isna().all()
    assert summary.loc["recall", "pooled"] == pytest.approx(15 / 21)


def test_summary_single_case_and_categorical_keys():
    table = _metrics_table(n_cases=1).head(1).assign(run_date=pd.Categorical(["2026-01-01"], ["2026-01-01", "x"]))
    summary = summarize(table, n_boot=20)
    assert len(summary) == 7  # the unused category "x" forms no group
    assert "run_date" in summary.columns and summary["run_date"].iloc[0] == "2026-01-01"
    dice = summary.set_index("metric").loc["dice"]
    assert dice["n_cases"] == 1 and pd.isna(dice["std"])
    assert dice["ci_low"] == pytest.approx(dice["mean"]) and dice["ci_high"] == pytest.approx(dice["mean"])


def test_summary_without_group_keys_and_empty_input():
    table = _metrics_table().drop(columns=["run_id", "cohort", "stage", "split", "class_name"])
    summary = summarize(table, n_boot=20)
    assert list(summary["metric"]) == ["precision", "recall", "specificity", "dice", "iou", "hd95_mm", "assd_mm"]
    assert (summary["n_cases"] == len(table)).all()
    empty = summarize(_metrics_table().iloc[0:0], n_boot=20)
    assert empty.empty and "pooled" in empty.columns


def test_summary_interval_is_scipys_percentile_bootstrap():
    from scipy import stats

    table = _metrics_table()
    summary = summarize(table, n_boot=400, seed=3, ci=0.9)
    row = summary.query("split == 'test' and class_name == 'anterior' and metric == 'hd95_mm'").iloc[0]
    values = table.query("split == 'test' and class_name == 'anterior'")["hd95_mm"].to_numpy()
    expected = stats.bootstrap((values,), np.mean, n_resamples=400, vectorized=True, method="percentile",
                               confidence_level=0.9, rng=np.random.default_rng(3)).confidence_interval
    assert row["ci_low"] == pytest.approx(expected.low, rel=1e-12)
    assert row["ci_high"] == pytest.approx(expected.high, rel=1e-12)


def test_summary_bootstrap_edge_cases():
    table = pd.DataFrame({"class_name": ["a"] * 5 + ["b"], "dice": [0.8] * 5 + [0.4]})
    summary = summarize(table, n_boot=100).set_index("class_name")
    # All-equal values: every resample has the same mean, so the interval is that value.
    assert summary.loc["a", ["mean", "ci_low", "ci_high"]].tolist() == pytest.approx([0.8, 0.8, 0.8])
    assert summary.loc["b", ["mean", "ci_low", "ci_high"]].tolist() == pytest.approx([0.4, 0.4, 0.4])
    # evaluate.n_boot: 0 (allowed by the config) means no bootstrap: the statistics without an interval.
    none = summarize(table, n_boot=0).set_index("class_name")
    assert none.loc["a", "mean"] == pytest.approx(0.8)
    assert none[["ci_low", "ci_high"]].isna().all().all()
    with pytest.raises(ValueError, match="n_boot"):
        summarize(table, n_boot=-1)
