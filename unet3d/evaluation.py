"""Evaluation of a run's predictions: per case and stage, the metric rows and the lesion rows.

Pure over files: prediction paths, reference paths and each stage's classes and label map in, rows out (the
rows of the METRICS_SCHEMA and LESIONS_SCHEMA tables of unet3d/report.py, without the partition columns). The
metrics themselves are computed in unet3d/metrics.py; this module only pairs predictions with references.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics
from .config import EVALUATE_DEFAULTS
from .io import read_image, read_label_image, to_numpy
from .labels import map_labels


@dataclass(frozen=True)
class EvaluatedStage:
    name: str
    classes: dict[int, str]
    label_map: dict[int, int]  # source label value -> stage class index
    # the stage's own architecture (cascade stages may differ); None: the `model` argument of evaluate_case(s)
    model: str | None = None
    # the reference's value of unannotated voxels (the config's ignore_label; None: IGNORE_LABEL): a sparse
    # reference is scored on its annotated voxels only
    ignore_value: int | None = None


@dataclass
class EvaluatedCase:
    case_id: str
    split: str
    reference: str | Path
    predictions: dict[str, Path] = field(default_factory=dict)  # stage name -> prediction file


def read_reference(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A reference label image as int64 label values (a float label file is rounded) and its spacing."""
    labels, image = read_label_image(path, np.int64)
    return labels, image.GetSpacing()


def evaluate_cases(cases: Sequence[EvaluatedCase], stages: Sequence[EvaluatedStage], cohort: str, model: str,
                   connectivity: int = EVALUATE_DEFAULTS.lesion_connectivity,
                   progress: bool = True) -> tuple[list[dict], list[dict]]:
    """(metric rows, lesion rows) of every case's existing predictions, stage by stage; `cohort` and `model`
    (the architecture, for stages whose EvaluatedStage.model is None) fill those columns. A case without any
    prediction file gives no row."""
    from tqdm.auto import tqdm

    rows, lesion_rows = [], []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, leave=False):
        case_rows, case_lesion_rows = evaluate_case(case, stages, cohort, model, connectivity)
        rows += case_rows
        lesion_rows += case_lesion_rows
    return rows, lesion_rows


def evaluate_case(case: EvaluatedCase, stages: Sequence[EvaluatedStage], cohort: str, model: str,
                  connectivity: int = EVALUATE_DEFAULTS.lesion_connectivity) -> tuple[list[dict], list[dict]]:
    """One case of `evaluate_cases` (the unit a Dask worker runs): its metric rows and lesion rows."""
    rows, lesion_rows = [], []
    reference = None
    for stage in stages:
        pred_path = case.predictions.get(stage.name)
        if pred_path is None or not Path(pred_path).exists():
            continue
        if reference is None:  # read once per case, only when something is to be compared with it
            reference, spacing = read_reference(case.reference)
        ref = map_labels(reference, stage.label_map, stage.ignore_value)
        pred = to_numpy(read_image(pred_path))
        base = {"cohort": cohort, "stage": stage.name, "model": stage.model or model, "case_id": case.case_id,
                "split": case.split}
        rows += [dict(base, **m) for m in metrics.case_metrics(pred, ref, spacing, stage.classes)]
        lesion_rows += [dict(base, **m) for m in metrics.lesion_metrics(pred, ref, spacing, stage.classes,
                                                                        connectivity=connectivity)]
    return rows, lesion_rows
