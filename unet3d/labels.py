"""Label values: the ignore value, source labels -> stage classes, and a stage's label map from its `merge`.

Every module that masks ignored voxels, maps a reference to stage classes or derives a stage's label map
imports it from here, so the three rules cannot drift apart.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# Voxels with this label value are left out of the loss and of every metric (unlabelled or unsure regions).
IGNORE_LABEL = 255


def as_label_values(values: np.ndarray, dtype=None) -> np.ndarray:
    """A label array as integers: a float label file's values rounded to the nearest integer (ingestion checked
    that they are integers; storing labels as float32 is common), integer arrays unchanged. `dtype` None: the
    smallest unsigned type that holds the values (uint8, uint16), else int64. The one rule every reader of a label
    file uses (preprocessing, evaluation, volumes, overlays), so that they cannot read one file differently."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values)
    if dtype is None:
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        dtype = np.uint8 if low >= 0 and high <= 255 else np.uint16 if low >= 0 and high <= 65535 else np.int64
    return values.astype(dtype, copy=False)


def label_map_from_merge(classes: Mapping[int, object] | Sequence[int],
                         merge: Mapping[int, Sequence[int]] | None) -> dict[int, int]:
    """source label value -> stage class index.

    `merge` {stage class: [source label values]} names the source labels each class is made of; without it (None or
    empty) each class is its own source label (identity). `classes` gives the class indices (a mapping's keys, or a
    sequence of them); keys read back from JSON as strings are turned into ints."""
    if not merge:
        merge = {k: [k] for k in classes}
    return {int(src): int(dst) for dst, srcs in merge.items() for src in srcs}


def map_labels(label: np.ndarray, label_map: Mapping[int, int], ignore_value: int | None = None) -> np.ndarray:
    """Source label values -> stage classes through a lookup table; unmapped values become background, and the
    source's ignore value (the config's `ignore_label`; None: IGNORE_LABEL) becomes IGNORE_LABEL, the one ignore
    code of stage labels that the loss, the patch sampler and the metrics leave out."""
    ignore_value = IGNORE_LABEL if ignore_value is None else int(ignore_value)
    lut = np.zeros(max(256, int(label.max(initial=0)) + 1, ignore_value + 1), dtype=np.uint8)
    for src, dst in label_map.items():
        lut[int(src)] = int(dst)
    lut[ignore_value] = IGNORE_LABEL
    return lut[label]
