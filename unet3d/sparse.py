"""Sparse annotation (Çiçek et al.'s semi-automatic setting): labels annotated on a few slices, the rest marked
with the cohort's ignore value, and how well a network fills in the unannotated voxels.

- `evenly_spaced_slices` and `sparsify` turn a list of annotated slices into a sparse label (the unannotated
  voxels set to the ignore value): how a sparse label file is written from a slice-wise annotation, and how
  benchmarks/sparse_to_dense.py makes sparse labels from dense ones.
- `fill_in_dice` scores a prediction against a dense reference on the unannotated voxels only (the filled-in
  part); `fill_in_case_rows` gives the rows of the evaluate stage's `fill_in` table (FILL_IN_SCHEMA in
  unet3d/report_tables.py) for one case with a dense reference.

Training on sparse labels needs nothing of this module: the loss, the patch sampler and the metrics leave out
every voxel whose label is the ignore value (unet3d.labels.map_labels turns the config's `ignore_label` into
IGNORE_LABEL, the one ignore code of stage labels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .labels import IGNORE_LABEL, map_labels
from .metrics import dice_per_class


def evenly_spaced_slices(label: np.ndarray, per_axis: int = 3, ignore_value: int = IGNORE_LABEL) -> dict[int, list[int]]:
    """{axis: slice indices}: `per_axis` slices per axis spread evenly through the extent of the structure (the
    voxels that are neither background nor ignored) along that axis, at the interior points k / (per_axis + 1)
    of the extent, so no slice grazes the structure's edge. A label without structure gets slices evenly
    spaced through the whole volume. Deterministic: the same label gives the same slices."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a 3D label map, got shape {label.shape}")
    if per_axis < 1:
        raise ValueError(f"per_axis must be >= 1, got {per_axis}")
    structure = (label != 0) & (label != ignore_value)
    slices = {}
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(structure.any(axis=other))
        low, high = (int(hit[0]), int(hit[-1])) if len(hit) else (0, label.shape[axis] - 1)
        positions = [low + (high - low) * (k + 1) / (per_axis + 1) for k in range(per_axis)]
        slices[axis] = sorted({int(round(p)) for p in positions})
    return slices


def annotated_mask(shape: Sequence[int], slices: Mapping[int, Sequence[int]]) -> np.ndarray:
    """The voxels on the listed slices ({axis: indices}, axes 0-2 of the array): a boolean mask of `shape`."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for axis, indices in slices.items():
        axis = int(axis)
        if axis not in (0, 1, 2):
            raise ValueError(f"annotated slices: axis must be 0, 1 or 2, got {axis}")
        for i in indices:
            if not 0 <= int(i) < shape[axis]:
                raise ValueError(f"annotated slices: index {i} is outside axis {axis} of size {shape[axis]}")
            index = [slice(None)] * 3
            index[axis] = int(i)
            mask[tuple(index)] = True
    return mask


def sparsify(label: np.ndarray, slices: Mapping[int, Sequence[int]], ignore_value: int = IGNORE_LABEL) -> np.ndarray:
    """A copy of `label` in which every voxel off the listed slices ({axis: indices}) is `ignore_value`."""
    label = np.asarray(label)
    dtype = label.dtype
    if np.issubdtype(dtype, np.integer) and int(ignore_value) > np.iinfo(dtype).max:
        dtype = np.dtype(np.int64)  # a uint8 label with an ignore value above 255
    out = label.astype(dtype, copy=True)
    out[~annotated_mask(label.shape, slices)] = ignore_value
    return out


def fill_in_dice(pred: np.ndarray, dense: np.ndarray, sparse: np.ndarray, classes: Sequence[int],
                 ignore_value: int = IGNORE_LABEL) -> dict[int, dict]:
    """Per class: Dice of `pred` against the `dense` reference on the voxels that `sparse` leaves unannotated
    (sparse == ignore_value) only, with the metrics' empty-mask rule (unet3d.metrics.empty_mask_scores).

    pred and dense hold class indices; sparse holds the source label values it was annotated with. Returns
    {class: {"dice", "ref_voxels", "pred_voxels", "n_unannotated"}} (dice None when the case has no unannotated
    voxel: nothing was filled in)."""
    pred, dense, sparse = np.asarray(pred), np.asarray(dense), np.asarray(sparse)
    if not pred.shape == dense.shape == sparse.shape:
        raise ValueError(f"prediction {pred.shape}, dense reference {dense.shape} and sparse reference "
                         f"{sparse.shape} must have one shape")
    unannotated = sparse == ignore_value
    n_unannotated = int(unannotated.sum())
    # the annotated voxels become ignored in the reference: dice_per_class leaves ignored voxels out
    reference = np.where(unannotated, dense, IGNORE_LABEL)
    dice = dice_per_class(pred, reference, [int(c) for c in classes]) if n_unannotated else {}
    return {int(c): {"dice": dice.get(int(c)), "n_unannotated": n_unannotated,
                     "ref_voxels": int(((dense == c) & unannotated).sum()),
                     "pred_voxels": int(((pred == c) & unannotated).sum())} for c in classes}


def fill_in_case_rows(case_id: str, split: str, sparse_reference: str | Path, dense_reference: str | Path,
                      predictions: Mapping[str, str | Path], stages: Sequence, cohort: str, model: str,
                      ignore_value: int | None = None) -> list[dict]:
    """The fill_in table's rows of one case: for each stage with a prediction file, Dice per class on the voxels
    the sparse reference leaves unannotated, against the dense reference (both label files in the case's original
    geometry, as the predictions are). stages: unet3d.evaluation.EvaluatedStage; ignore_value: the config's
    ignore_label (None: IGNORE_LABEL)."""
    from .evaluation import read_reference
    from .io import read_image, to_numpy

    ignore_value = IGNORE_LABEL if ignore_value is None else int(ignore_value)
    sparse, _ = read_reference(sparse_reference)
    dense, _ = read_reference(dense_reference)
    if dense.shape != sparse.shape:
        raise ValueError(f"case {case_id}: dense reference {dense_reference} has shape {dense.shape}, its label "
                         f"{sparse_reference} {sparse.shape}: not the same volume")
    rows = []
    for stage in stages:
        pred_path = predictions.get(stage.name)
        if pred_path is None or not Path(pred_path).exists():
            continue
        pred = to_numpy(read_image(pred_path))
        dense_classes = map_labels(dense, stage.label_map, ignore_value)
        scores = fill_in_dice(pred, dense_classes, sparse, list(stage.classes), ignore_value)
        for class_index, name in stage.classes.items():
            rows.append({"cohort": cohort, "stage": stage.name, "model": stage.model or model, "case_id": case_id,
                         "split": split, "class_index": int(class_index), "class_name": str(name),
                         **scores[int(class_index)]})
    return rows
