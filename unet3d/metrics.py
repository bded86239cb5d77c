"""Segmentation metrics per case and class, lesion-level detection metrics, and the bootstrap summary.

Inputs are integer label maps of shape (X, Y, Z) on the case's original grid, with the spacing (x, y, z) in mm.
Label 0 is background and 255 marks unlabelled ("ignore") voxels of a sparse reference; those voxels are left out
of the confusion counts (they are neither positives nor negatives), while volumes and surfaces use the masks as
they are (an ignore voxel belongs to no class).

Empty-mask policy (SPEC, binding; no NaN hides a failure):

=====================  ==================  ===================  =================
case                   dice, iou           precision / recall   hd95_mm, assd_mm
=====================  ==================  ===================  =================
both empty             1                   1 / 1                0
reference only (miss)  0                   None / 0             image diagonal
prediction only        0                   0 / None             image diagonal
=====================  ==================  ===================  =================

Specificity is tn / (tn + fp), and 1.0 in the degenerate case of an image with no negative voxel at all (nothing
could have been wrongly included, so nothing was).

Surface distances follow MONAI's definitions: a surface voxel is a mask voxel with at least one of its 6 face
neighbours outside the mask (the image border counts as outside); HD95 is the larger of the two directed 95th
percentiles of surface-to-surface distances, ASSD the mean of both directions' distances pooled together.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from .config import EVALUATE_DEFAULTS
from .labels import IGNORE_LABEL

#: Metrics that `summarize` aggregates, in output order.
SUMMARY_METRICS: tuple[str, ...] = ("precision", "recall", "specificity", "dice", "iou", "hd95_mm", "assd_mm")
#: Lesion-level metrics that `summarize` aggregates from a lesion table (summary rows of the same schema: the
#: summary's `metric` column names them).
LESION_SUMMARY_METRICS: tuple[str, ...] = ("lesion_precision", "lesion_recall", "lesion_f1")
#: Columns that define a summary group, when present in the metrics table.
SUMMARY_GROUP_KEYS: tuple[str, ...] = ("run_id", "run_date", "cohort", "stage", "split", "class_name")
SUMMARY_COLUMNS: tuple[str, ...] = ("metric", "n_cases", "mean", "median", "std", "ci_low", "ci_high", "pooled")
_COUNT_METRICS = ("precision", "recall", "specificity", "dice", "iou")

# bincount on int64 indices of a whole 512x512x120 volume would allocate ~250 MB at once.
_CHUNK_VOXELS = 1 << 22


# ---------------------------------------------------------------------------------------------------------------
# Overlap scores from confusion counts
# ---------------------------------------------------------------------------------------------------------------
def empty_mask_scores(ref_empty: bool, pred_empty: bool) -> dict[str, float | None] | None:
    """The SPEC's empty-mask policy (module docstring) for precision, recall, dice and iou, or None when neither
    mask is empty (the scores are then computed from the counts). Lesion detection reads dice as its F1."""
    if ref_empty and pred_empty:
        return {"precision": 1.0, "recall": 1.0, "dice": 1.0, "iou": 1.0}
    if pred_empty:  # a missed structure
        return {"precision": None, "recall": 0.0, "dice": 0.0, "iou": 0.0}
    if ref_empty:  # a hallucinated structure
        return {"precision": 0.0, "recall": None, "dice": 0.0, "iou": 0.0}
    return None


def overlap_scores(tp: int, fp: int, fn: int, tn: int, ref_empty: bool, pred_empty: bool) -> dict[str, float | None]:
    """precision, recall, specificity, dice, iou from confusion counts, applying the SPEC's empty-mask policy."""
    policy = empty_mask_scores(ref_empty, pred_empty)
    if policy is not None:
        precision, recall, dice, iou = policy["precision"], policy["recall"], policy["dice"], policy["iou"]
    else:
        # tp + fp can be 0 only if every predicted voxel lies on ignored reference voxels: nothing to judge.
        precision = tp / (tp + fp) if tp + fp > 0 else None
        recall = tp / (tp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
    specificity = tn / (tn + fp) if tn + fp > 0 else 1.0
    return {"precision": precision, "recall": recall, "specificity": specificity, "dice": dice, "iou": iou}


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice per class under the empty-mask policy (empty_mask_scores); ignored voxels don't count."""
    valid = ref != IGNORE_LABEL
    out = {}
    for c in classes:
        p, r = (pred == c) & valid, (ref == c) & valid
        n_pred, n_ref = int(p.sum()), int(r.sum())
        policy = empty_mask_scores(n_ref == 0, n_pred == 0)
        out[c] = policy["dice"] if policy is not None else 2.0 * int((p & r).sum()) / (n_pred + n_ref)
    return out


def _as_label_map(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"{name} must be a 3D (X, Y, Z) label map, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values ({labels.dtype})")
        labels = rounded.astype(np.int64)
    return labels


def _compact_lookup(
    labels: np.ndarray, class_indices: Sequence[int], ignore_code: int | None
) -> tuple[np.ndarray, int]:
    """A table mapping label value - offset to 0 (other), 1..n (the classes in order) or ignore_code (255)."""
    low, high = int(labels.min()), int(labels.max())
    if high - low > 1 << 16:
        raise ValueError(f"label values span [{low}, {high}]: not a label map of class indices")
    lut = np.zeros(high - low + 1, dtype=np.uint8)
    for code, class_index in enumerate(class_indices, start=1):
        if low <= class_index <= high:
            lut[class_index - low] = code
    if ignore_code is not None and low <= IGNORE_LABEL <= high:
        lut[IGNORE_LABEL - low] = ignore_code
    return lut, low


def _lut_index(labels: np.ndarray, low: int) -> np.ndarray:
    # Widen before subtracting the offset, which could overflow in the labels' own dtype (int8: 100 - (-100)).
    return labels if low == 0 else labels.astype(np.intp) - low


def _joint_counts(pred: np.ndarray, ref: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """Joint histogram M[p, r] of compact labels: p in 0..n (0 = none of the classes), r in 0..n+1 (n+1 = ignore).

    One pass of np.bincount over pred_code * (n + 2) + ref_code gives every class's counts at once.
    """
    n = len(class_indices)
    n_ref_codes = n + 2
    pred_lut, pred_low = _compact_lookup(pred, class_indices, ignore_code=None)
    ref_lut, ref_low = _compact_lookup(ref, class_indices, ignore_code=n + 1)
    pred_flat, ref_flat = pred.reshape(-1), ref.reshape(-1)
    joint = np.zeros((n + 1) * n_ref_codes, dtype=np.int64)
    for start in range(0, pred_flat.size, _CHUNK_VOXELS):
        stop = start + _CHUNK_VOXELS
        pred_code = pred_lut[_lut_index(pred_flat[start:stop], pred_low)].astype(np.int32)
        ref_code = ref_lut[_lut_index(ref_flat[start:stop], ref_low)]
        joint += np.bincount(pred_code * n_ref_codes + ref_code, minlength=joint.size)
    return joint.reshape(n + 1, n_ref_codes)


# ---------------------------------------------------------------------------------------------------------------
# Surface distances
# ---------------------------------------------------------------------------------------------------------------
def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The tightest box (one slice per axis) around the True voxels, or None if there are none."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with at least one face (6-)neighbour outside it; outside the array counts as outside."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    centre = (slice(1, -1),) * 3
    for axis in range(3):
        for step in (-1, 1):
            shifted = list(centre)
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each prediction surface voxel to the reference surface, and the other way round.

    Both boolean masks (X, Y, Z) must be non-empty. Returns (pred_to_ref, ref_to_pred), 1D float64 arrays.
    """
    if not pred_mask.any() or not ref_mask.any():
        raise ValueError("surface distances need two non-empty masks")
    # Work on the bounding box of the union only. This changes no distance: (1) every surface voxel of either mask
    # lies inside that box, so the box holds all the feature voxels (zeros) handed to the distance transform, and
    # the EDT value at a voxel is its distance to the nearest of exactly those features; (2) a face neighbour that
    # falls outside the box lies outside the union, i.e. outside both masks, which is what `_surface` assumes for
    # anything beyond the array (the one-voxel False margin it pads with), so the surfaces are the same as on the
    # full grid, where the image border also counts as outside.
    box = _bounding_box(pred_mask | ref_mask)
    pred_surface = _surface(pred_mask[box])
    ref_surface = _surface(ref_mask[box])
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    return _distances_to(ref_surface, pred_surface, spacing), _distances_to(pred_surface, ref_surface, spacing)


def _distances_to(target: np.ndarray, query: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from each True voxel of `query` to the nearest True voxel of `target`.

    The exact EDT's feature transform (nearest target voxel of every voxel, anisotropic `sampling`) is read at the
    query voxels only: turning the whole box into a float distance map costs as much again as the transform.
    """
    nearest = ndimage.distance_transform_edt(
        ~target, sampling=spacing, return_distances=False, return_indices=True
    )
    query_coords = np.nonzero(query)
    offsets_mm = (nearest[(slice(None), *query_coords)] - np.stack(query_coords)) * spacing[:, None]
    return np.sqrt((offsets_mm**2).sum(axis=0))


def hd95_assd(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> tuple[float, float]:
    """MONAI's HD95 (max of the two directed 95th percentiles, linear interpolation) and symmetric ASSD."""
    hd95 = max(float(np.percentile(pred_to_ref, 95)), float(np.percentile(ref_to_pred, 95)))
    assd = float(np.concatenate([pred_to_ref, ref_to_pred]).mean())
    return hd95, assd


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the distance reported when one of the two masks is empty."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm))))


# ---------------------------------------------------------------------------------------------------------------
# Per-case metrics
# ---------------------------------------------------------------------------------------------------------------
def _check_inputs(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = _as_label_map(pred, "pred"), _as_label_map(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if len(spacing_mm) != 3 or any(float(s) <= 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be three positive numbers (x, y, z), got {tuple(spacing_mm)}")
    return pred, ref


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], classes: Mapping[int, str]
) -> list[dict]:
    """Overlap, distance and volume metrics of one case, one dict per class (background excluded).

    pred, ref: integer label maps (X, Y, Z) on the case's original grid; spacing_mm: (x, y, z) voxel size in mm;
    classes: class_index -> class_name. Keys of each dict: class_index, class_name, tp, fp, fn, tn, precision,
    recall, specificity, dice, iou, hd95_mm, assd_mm, volume_ref_ml, volume_pred_ml, ref_empty, pred_empty;
    undefined values are None (see the module docstring for the empty-mask policy).
    """
    pred, ref = _check_inputs(pred, ref, spacing_mm)
    class_indices = [int(c) for c in classes]
    if any(c in (0, IGNORE_LABEL) for c in class_indices):
        raise ValueError("classes must not contain background (0) or the ignore label (255)")
    joint = _joint_counts(pred, ref, class_indices)
    n = len(class_indices)
    counted = joint[:, : n + 1]  # leaves out voxels whose reference is "ignore"
    total_counted = int(counted.sum())
    voxel_ml = float(np.prod([float(s) for s in spacing_mm])) / 1000.0
    diagonal = image_diagonal_mm(pred.shape, spacing_mm)

    rows = []
    for code, class_index in enumerate(class_indices, start=1):
        tp = int(counted[code, code])
        fp = int(counted[code, :].sum()) - tp
        fn = int(counted[:, code].sum()) - tp
        tn = total_counted - tp - fp - fn
        n_ref = int(joint[:, code].sum())
        n_pred = int(joint[code, :].sum())
        ref_empty, pred_empty = n_ref == 0, n_pred == 0
        if ref_empty and pred_empty:
            hd95, assd = 0.0, 0.0
        elif ref_empty or pred_empty:
            hd95, assd = diagonal, diagonal
        else:
            hd95, assd = hd95_assd(*surface_distances(pred == class_index, ref == class_index, spacing_mm))
        rows.append(
            {
                "class_index": class_index,
                "class_name": str(classes[class_index]),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": tn,
                **overlap_scores(tp, fp, fn, tn, ref_empty, pred_empty),
                "hd95_mm": hd95,
                "assd_mm": assd,
                "volume_ref_ml": n_ref * voxel_ml,
                "volume_pred_ml": n_pred * voxel_ml,
                "ref_empty": ref_empty,
                "pred_empty": pred_empty,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Lesion-level metrics
# ---------------------------------------------------------------------------------------------------------------
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def lesion_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float],
    classes: Mapping[int, str],
    connectivity: int = EVALUATE_DEFAULTS.lesion_connectivity,
) -> list[dict]:
    """Detection metrics over connected components ("lesions"), one dict per class.

    A reference lesion is detected when any predicted voxel of the same class overlaps it; a predicted component
    that overlaps no reference lesion is a false lesion. lesion_precision = predicted components that hit a
    reference lesion / all predicted components; lesion_recall = detected / reference lesions; lesion_f1 is their
    harmonic mean. Empty cases follow the empty-mask policy: no lesion on either side -> 1.0 for all three; no
    predicted lesion -> precision None, recall 0, f1 0; no reference lesion -> precision 0, recall None, f1 0.
    connectivity: 6, 18 or 26 (voxel neighbourhood defining a component). spacing_mm is validated but not needed.
    """
    pred, ref = _check_inputs(pred, ref, spacing_mm)
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])

    rows = []
    for class_index, class_name in classes.items():
        pred_mask, ref_mask = pred == class_index, ref == class_index
        box = _bounding_box(pred_mask | ref_mask)  # components never leave the union's box
        n_ref = n_pred = detected = pred_hits = 0
        if box is not None:
            pred_mask, ref_mask = pred_mask[box], ref_mask[box]
            ref_components, n_ref = ndimage.label(ref_mask, structure=structure)
            pred_components, n_pred = ndimage.label(pred_mask, structure=structure)
            overlap = pred_mask & ref_mask
            detected = int(np.count_nonzero(np.unique(ref_components[overlap])))
            pred_hits = int(np.count_nonzero(np.unique(pred_components[overlap])))
        rows.append(
            {
                "class_index": int(class_index),
                "class_name": str(class_name),
                "n_ref_lesions": int(n_ref),
                "n_pred_lesions": int(n_pred),
                "detected": detected,
                "missed": int(n_ref) - detected,
                "false_lesions": int(n_pred) - pred_hits,
                **lesion_scores(int(n_ref), int(n_pred), detected, pred_hits),
            }
        )
    return rows


def lesion_scores(n_ref: int, n_pred: int, detected: int, pred_hits: int) -> dict[str, float | None]:
    """lesion_precision, lesion_recall and lesion_f1 from lesion counts (one case's, or several cases' summed),
    with the empty-mask policy of `lesion_metrics`. pred_hits: predicted lesions that hit a reference lesion."""
    policy = empty_mask_scores(n_ref == 0, n_pred == 0)
    if policy is not None:
        precision, recall, f1 = policy["precision"], policy["recall"], policy["dice"]
    else:
        precision, recall = pred_hits / n_pred, detected / n_ref
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1}


# ---------------------------------------------------------------------------------------------------------------
# Summary over cases
# ---------------------------------------------------------------------------------------------------------------
def _bootstrap_mean_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator, ci: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over cases (scipy.stats.bootstrap, resampling cases).

    One case has no spread to resample (scipy refuses it): its interval is the value itself, as every resample
    would give it.
    """
    if values.size == 1:
        return float(values[0]), float(values[0])
    from scipy import stats  # here: scipy.stats takes a second to import, and evaluation tasks do not need it

    result = stats.bootstrap((values,), np.mean, n_resamples=n_boot, vectorized=True, method="percentile",
                             confidence_level=ci, rng=rng)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _pooled_scores(frame: pd.DataFrame) -> dict[str, float | None]:
    if not {"tp", "fp", "fn", "tn"} <= set(frame.columns):
        return {}
    tp, fp, fn, tn = (int(pd.to_numeric(frame[c]).sum()) for c in ("tp", "fp", "fn", "tn"))
    return overlap_scores(tp, fp, fn, tn, ref_empty=tp + fn == 0, pred_empty=tp + fp == 0)


_LESION_COUNTS = ("n_ref_lesions", "n_pred_lesions", "detected", "false_lesions")


def _pooled_lesion_scores(frame: pd.DataFrame) -> dict[str, float | None]:
    if not set(_LESION_COUNTS) <= set(frame.columns):
        return {}
    n_ref, n_pred, detected, false_lesions = (int(pd.to_numeric(frame[c]).sum()) for c in _LESION_COUNTS)
    return lesion_scores(n_ref, n_pred, detected, n_pred - false_lesions)


def summarize(
    metrics: pd.DataFrame, n_boot: int = EVALUATE_DEFAULTS.n_boot, seed: int = 0, ci: float = 0.95,
    lesions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Summary table: one row per group x metric.

    Groups are the combinations of whichever of run_id, run_date, cohort, stage, split, class_name are columns of
    `metrics` (missing values form their own group). For each of precision, recall, specificity, dice, iou,
    hd95_mm, assd_mm present: n_cases (non-null values), mean, median, std (sample, ddof=1), ci_low/ci_high (the
    `ci` percentile bootstrap interval over cases of the mean, scipy.stats.bootstrap with `n_boot` resamples,
    seeded: every group and metric draws from a fresh generator seeded with `seed`, so a group's interval does not
    depend on which other groups are in the table; null when n_boot is 0, i.e. no bootstrap asked), and pooled
    (the metric recomputed from the group's summed tp/fp/fn/tn, with the empty-mask policy; null for distances).
    Null values (NaN in these float columns, written as null by pyarrow) mark undefined statistics.

    lesions: a lesion table (unet3d.metrics.lesion_metrics rows with the same group columns): its
    lesion_precision, lesion_recall and lesion_f1 get the same rows after the metrics' rows (the same bootstrap
    over cases; pooled from the group's summed lesion counts), so the summary's schema stays one long table.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    keys = [k for k in SUMMARY_GROUP_KEYS if k in metrics.columns]
    rows = _summary_rows(metrics, keys, SUMMARY_METRICS, _pooled_scores, _COUNT_METRICS, n_boot, seed, ci)
    if lesions is not None:
        rows += _summary_rows(lesions, [k for k in keys if k in lesions.columns], LESION_SUMMARY_METRICS,
                              _pooled_lesion_scores, LESION_SUMMARY_METRICS, n_boot, seed, ci)
    columns = [*keys, *SUMMARY_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    table["n_cases"] = table["n_cases"].astype(np.int64)
    for column in ("mean", "median", "std", "ci_low", "ci_high", "pooled"):
        table[column] = table[column].astype(np.float64)
    return table


def _summary_rows(table: pd.DataFrame, keys: list[str], metric_names: Sequence[str], pooled_scores,
                  pooled_metrics: Sequence[str], n_boot: int, seed: int, ci: float) -> list[dict]:
    """summarize's rows of one table: per group of `keys` and per metric of `metric_names` in it; pooled_scores
    gives a group's pooled value of each of `pooled_metrics`."""
    summarised = [m for m in metric_names if m in table.columns]
    if keys:
        # observed=True: hive partition keys come back as categoricals, whose unused combinations must not appear.
        groups = table.groupby(keys, dropna=False, observed=True, sort=True)
    else:
        groups = [((), table)] if len(table) else []

    rows = []
    for key_values, frame in groups:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        pooled = pooled_scores(frame)
        for metric in summarised:
            values = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            values = values[~np.isnan(values)]
            stats = {"mean": None, "median": None, "std": None, "ci_low": None, "ci_high": None}
            if values.size:
                ci_low, ci_high = (_bootstrap_mean_ci(values, n_boot, np.random.default_rng(seed), ci)
                                   if n_boot else (None, None))
                stats = {
                    "mean": float(values.mean()),
                    "median": float(np.median(values)),
                    "std": float(values.std(ddof=1)) if values.size > 1 else None,
                    "ci_low": ci_low,
                    "ci_high": ci_high,
                }
            rows.append(
                {
                    **dict(zip(keys, key_values)),
                    "metric": metric,
                    "n_cases": int(values.size),
                    **stats,
                    "pooled": pooled.get(metric) if metric in pooled_metrics else None,
                }
            )
    return rows
