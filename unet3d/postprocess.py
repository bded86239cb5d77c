"""Post-processing of predicted label maps, chosen on validation (nnU-Net's rule: a step is kept only where
it raises the validation Dice).

The one step today: keep only the largest connected component of a class (an organ is one piece; isolated
false-positive blobs elsewhere are removed).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .metrics import dice_per_class

# 26-connectivity: diagonal neighbours belong to the same piece of an organ.
STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def keep_largest_component(label: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """label (X, Y, Z) integer map -> a copy in which each listed class keeps only its largest 26-connected
    component (the rest becomes background)."""
    out = np.array(label, copy=True)
    for c in classes:
        mask = out == c
        if not mask.any():
            continue
        components, n = ndimage.label(mask, structure=STRUCTURE)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def apply_postprocessing(label: np.ndarray, postprocess: dict | None) -> np.ndarray:
    """Apply what `choose_postprocessing` chose (as stored in model.json); None or nothing chosen: unchanged."""
    if not postprocess or not postprocess.get("largest_component"):
        return label
    return keep_largest_component(label, postprocess["largest_component"])


def choose_postprocessing(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], classes: Iterable[int],
                          force: bool = False) -> dict:
    """Per class, keep the largest component when that raises the mean validation Dice of the class (or always,
    with force). Returns {"largest_component": [classes], "val_dice_before": .., "val_dice_after": ..,
    "per_class": {class: [before, after]}} for model.json."""
    classes = list(classes)
    chosen, per_class, before_all, after_all = [], {}, [], []
    for c in classes:
        before = [dice_per_class(p, r, [c])[c] for p, r in zip(preds, refs)]
        after = [dice_per_class(keep_largest_component(p, [c]), r, [c])[c] for p, r in zip(preds, refs)]
        b, a = float(np.mean(before)) if before else 0.0, float(np.mean(after)) if after else 0.0
        per_class[int(c)] = [round(b, 5), round(a, 5)]
        keep = force or a > b
        if keep:
            chosen.append(int(c))
        before_all.append(b)
        after_all.append(a if keep else b)
    return {"largest_component": chosen, "val_dice_before": float(np.mean(before_all)) if before_all else 0.0,
            "val_dice_after": float(np.mean(after_all)) if after_all else 0.0, "per_class": per_class,
            "decided_on": f"{len(preds)} validation cases"}
