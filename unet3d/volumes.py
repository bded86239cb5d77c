"""Structure volumes of segmented scans and their quality-control flags (pure: label maps and files in, rows out).

What clinicians read from a segmentation is the volume of each structure (hippocampal volume is a clinical
measure). For each scan and structure of the final stage this gives the volume in millilitres (voxels x the
voxel volume from the image's spacing, on the prediction in the scan's original geometry), the voxel count, the
connected components, whether a cascade's stage 1 found an ROI, and three QC flags:

- `qc_empty`: the structure has no voxel;
- `qc_volume_outlier`: the volume lies outside the range [min, max] of the same structure's volumes in the
  training references (the labels of the train split, in their own geometry), i.e. smaller or larger than every
  scan the model learned from; null when no training reference holds the structure;
- `qc_roi_at_border`: the ROI touches the image border (a voxel on the first or last slice of an axis), so the
  structure may be cut off by the field of view. The ROI is stage 1's prediction for a cascade, the final
  prediction's foreground for a single stage; one value per scan, repeated on each of its rows.

The rows are those of unet3d.report_tables.VOLUMES_SCHEMA (less the partition keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .config import EVALUATE_DEFAULTS
from .io import read_image, read_label_image, to_numpy
from .labels import map_labels

# scipy's neighbourhood rank for a connectivity in voxels (faces, faces + edges, faces + edges + corners)
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
#: How qc_volume_outlier decides, in words (the README and the stage's log say the same).
VOLUME_OUTLIER_RULE = "volume outside [min, max] of the training references' volumes of the structure"


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """One voxel's volume in millilitres (1 mL = 1000 mm^3)."""
    return float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0


def structure_measures(labels: np.ndarray, spacing_mm: Sequence[float], classes: Mapping[int, str],
                       connectivity: int = EVALUATE_DEFAULTS.lesion_connectivity) -> dict[int, dict]:
    """Per class index of `classes`: voxel_count, volume_ml and n_components (components of `connectivity`)."""
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    voxel_ml = voxel_volume_ml(spacing_mm)
    out = {}
    for index in classes:
        mask = labels == index  # one boolean volume at a time: no int64 copy of a CT-sized label map
        n = int(np.count_nonzero(mask))
        components = int(ndimage.label(mask, structure=structure)[1]) if n else 0
        out[int(index)] = {"voxel_count": n, "volume_ml": n * voxel_ml, "n_components": components}
    return out


def touches_border(mask: np.ndarray) -> bool:
    """Whether any voxel of `mask` lies on the first or last slice of an axis."""
    if not mask.any():
        return False
    for axis in range(mask.ndim):
        if np.take(mask, 0, axis=axis).any() or np.take(mask, -1, axis=axis).any():
            return True
    return False


def reference_volumes(label: np.ndarray, spacing_mm: Sequence[float], label_map: Mapping[int, int],
                      classes: Iterable[int]) -> dict[int, float]:
    """A reference label map's volume (mL) per stage class: its source values mapped through `label_map`."""
    mapped = map_labels(label, label_map)  # the ignore value stays IGNORE_LABEL, never a class
    voxel_ml = voxel_volume_ml(spacing_mm)
    return {int(c): int(np.count_nonzero(mapped == int(c))) * voxel_ml for c in classes}


@dataclass(frozen=True)
class VolumeRange:
    """The training references' volume range of one structure."""

    low_ml: float
    high_ml: float
    n_references: int

    def outside(self, volume_ml: float) -> bool:
        return bool(volume_ml < self.low_ml or volume_ml > self.high_ml)


def training_ranges(per_case: Iterable[Mapping[int, float]]) -> dict[int, VolumeRange]:
    """Per class, [min, max] over the references that hold the structure (an empty reference is not a volume of
    the structure: it says the structure is absent there)."""
    values: dict[int, list[float]] = {}
    for volumes in per_case:
        for index, ml in volumes.items():
            if ml > 0:
                values.setdefault(int(index), []).append(float(ml))
    return {k: VolumeRange(min(v), max(v), len(v)) for k, v in values.items()}


def read_training_ranges(reference_paths: Iterable[str | Path], label_map: Mapping[int, int],
                         classes: Iterable[int]) -> dict[int, VolumeRange]:
    """training_ranges of reference label files (read in their own geometry)."""
    classes = list(classes)
    per_case = []
    for path in reference_paths:
        label, image = read_label_image(path)
        per_case.append(reference_volumes(label, image.GetSpacing(), label_map, classes))
    return training_ranges(per_case)


def scan_rows(case_id: str, labels: np.ndarray, spacing_mm: Sequence[float], classes: Mapping[int, str],
              roi_mask: np.ndarray | None, roi_found: bool | None, ranges: Mapping[int, VolumeRange],
              connectivity: int = EVALUATE_DEFAULTS.lesion_connectivity) -> list[dict]:
    """One row per structure of one scan: measures and QC flags. `labels`: the final stage's label map in the
    scan's geometry; `roi_mask`: stage 1's foreground (a cascade) or None (the final foreground is the ROI)."""
    measures = structure_measures(labels, spacing_mm, classes, connectivity)
    at_border = touches_border(roi_mask if roi_mask is not None else labels > 0)
    rows = []
    for index, name in sorted(classes.items()):
        m, rng = measures[int(index)], ranges.get(int(index))
        rows.append({"case_id": case_id, "class_index": int(index), "structure": name, **m,
                     "roi_found": roi_found, "qc_empty": m["voxel_count"] == 0,
                     "qc_volume_outlier": rng.outside(m["volume_ml"]) if rng is not None else None,
                     "qc_roi_at_border": at_border,
                     "train_min_ml": rng.low_ml if rng is not None else None,
                     "train_max_ml": rng.high_ml if rng is not None else None})
    return rows


def read_scan_rows(case_id: str, prediction: str | Path, classes: Mapping[int, str], roi_prediction: str | Path | None,
                   roi_found: bool | None, ranges: Mapping[int, VolumeRange],
                   connectivity: int = EVALUATE_DEFAULTS.lesion_connectivity) -> list[dict]:
    """scan_rows of written predictions: the final stage's file and, for a cascade, stage 1's file. The voxel
    volume is the prediction's spacing, which is the scan's (predictions are written in its geometry)."""
    image = read_image(prediction)
    labels = to_numpy(image)
    roi_mask = to_numpy(read_image(roi_prediction)) > 0 if roi_prediction is not None else None
    return scan_rows(case_id, labels, image.GetSpacing(), classes, roi_mask, roi_found, ranges, connectivity)
