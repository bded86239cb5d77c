"""Overlay images of a segmentation: axial slices of an image with reference and predicted contours, as PNG,
and the choice of the example cases (best, median, worst) a report shows.

Overlays show axial slices (constant z) of an (X, Y, Z) volume with x as panel columns and y as rows, which for
an LPS identity direction is the radiological view (patient's right on the left, anterior at the top), in the
physical aspect ratio given by the spacing. matplotlib is imported only when an overlay is drawn, and only its
Agg canvas is used, so no global backend is switched and no display is needed.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from unet3d.io import read_image, to_numpy, write_bytes_atomic
from unet3d.labels import IGNORE_LABEL, map_labels

REFERENCE_COLOUR = "#ffd700"  # gold; with deep sky blue, a pair that colour-blind readers also tell apart
PREDICTION_COLOUR = "#00bfff"
_CLASS_LINESTYLES = ("solid", "dashed", "dotted", "dashdot")


def _as_labels(labels: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"{name} shape {labels.shape} differs from the image's {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int64)
    return labels


def _foreground_per_slice(labels: np.ndarray) -> np.ndarray:
    return ((labels != 0) & (labels != IGNORE_LABEL)).sum(axis=(0, 1))


def choose_slices(reference: np.ndarray | None, prediction: np.ndarray, n_slices: int) -> list[int]:
    """Axial (z) slices through the structure: the reference's foreground slices (else the prediction's) are cut
    into n consecutive runs and the slice of largest area is taken from each, so the panels are both spread over
    the structure and well filled. With no foreground anywhere, n slices evenly spread over the volume."""
    area = _foreground_per_slice(reference) if reference is not None else np.zeros(prediction.shape[2], np.int64)
    if not area.any():
        area = _foreground_per_slice(prediction)
    candidates = np.flatnonzero(area)
    if candidates.size == 0:
        depth = prediction.shape[2]
        return sorted({int(round(z)) for z in np.linspace(0, depth - 1, n_slices + 2)[1:-1]})
    return [int(run[np.argmax(area[run])]) for run in np.array_split(candidates, min(n_slices, candidates.size))]


def _window(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return (low, high) if high > low else (low - 0.5, low + 0.5)


def overlay_png(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    path: str | Path,
    title: str = "",
    n_slices: int = 3,
    classes: Mapping[int, str] | None = None,
) -> Path:
    """Draw n axial slices of `image` (X, Y, Z) with reference and predicted contours and write them as a PNG.

    reference/prediction: integer label maps (X, Y, Z) of the image's shape (reference may be None); 0 and 255
    (ignore) are not drawn. Reference contours are gold and predicted ones blue; each class has its own line
    style, named in the legend (with `classes`' names when given). The grey image is windowed to its 1st-99th
    percentile over the shown slices. Panels keep the physical aspect ratio of spacing_mm (x, y, z). Written
    atomically; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z), got shape {image.shape}")
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if len(spacing_mm) < 3 or any(float(s) <= 0 for s in spacing_mm[:3]):
        raise ValueError(f"spacing_mm must be three positive numbers (x, y, z), got {tuple(spacing_mm)}")
    prediction = _as_labels(prediction, "prediction", image.shape)
    reference = _as_labels(reference, "reference", image.shape) if reference is not None else None
    sx, sy = float(spacing_mm[0]), float(spacing_mm[1])
    size_x, size_y = image.shape[0] * sx, image.shape[1] * sy

    slices = choose_slices(reference, prediction, n_slices)
    low, high = _window(image[:, :, slices])
    layers = [(reference, REFERENCE_COLOUR, "reference"), (prediction, PREDICTION_COLOUR, "prediction")]
    drawn = sorted(
        {
            int(v)
            for labels, _, _ in layers
            if labels is not None
            for v in np.unique(labels[:, :, slices])
            if v not in (0, IGNORE_LABEL)
        }
    )
    style = {c: _CLASS_LINESTYLES[i % len(_CLASS_LINESTYLES)] for i, c in enumerate(drawn)}

    n_legend_entries = len(drawn) * (1 if reference is None else 2) + (reference is None)
    legend_rows = math.ceil(n_legend_entries / 4)
    # Margins in inches, so that title and legend keep their room whatever the panels' aspect ratio.
    top_in, bottom_in = (0.65 if title else 0.35), 0.1 + 0.22 * legend_rows
    panel_width = 3.6
    panel_height = float(np.clip(panel_width * size_y / size_x, 1.2, 8.0))
    figure_height = panel_height + top_in + bottom_in
    figure = Figure(figsize=(panel_width * len(slices), figure_height), dpi=100)
    FigureCanvasAgg(figure)
    # Voxel centres in mm, so that contours fall on the voxels shown by imshow's extent.
    xs = (np.arange(image.shape[0]) + 0.5) * sx
    ys = (np.arange(image.shape[1]) + 0.5) * sy
    axes = figure.subplots(1, len(slices), squeeze=False)[0]
    for ax, z in zip(axes, slices):
        # Rows are y (anterior at the top for an LPS identity direction), columns x.
        ax.imshow(image[:, :, z].T, cmap="gray", vmin=low, vmax=high, extent=(0, size_x, size_y, 0),
                  interpolation="nearest")
        for labels, colour, _ in layers:
            if labels is None:
                continue
            for class_index in drawn:
                mask = labels[:, :, z] == class_index
                if mask.any():
                    ax.contour(xs, ys, mask.T.astype(np.float32), levels=[0.5], colors=[colour],
                               linestyles=[style[class_index]], linewidths=1.4)
        ax.set_xlim(0, size_x)
        ax.set_ylim(size_y, 0)
        ax.set_aspect("equal")
        ax.set_title(f"z = {z}", fontsize=9)
        ax.set_axis_off()

    handles = []
    for labels, colour, layer_name in layers:
        if labels is None:
            continue
        for class_index in drawn:
            name = classes.get(class_index, str(class_index)) if classes else str(class_index)
            handles.append(Line2D([], [], color=colour, linestyle=style[class_index], linewidth=1.6,
                                  label=f"{layer_name}: {name}"))
    if reference is None:
        handles.append(Line2D([], [], color="none", label="no reference"))
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False,
                      borderaxespad=0.2)
    if title:
        figure.suptitle(title, fontsize=10, y=1 - 0.08 / figure_height, va="top")
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - top_in / figure_height, bottom=bottom_in / figure_height,
                           wspace=0.04)

    png = io.BytesIO()
    figure.savefig(png, format="png", facecolor="white")
    return write_bytes_atomic(path, png.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Example cases and the volumes they are drawn from
# ---------------------------------------------------------------------------------------------------------------
def mean_dice_per_case(metrics: pd.DataFrame, stage: str, split: str | None = None) -> pd.Series:
    """case_id -> the case's mean dice over the stage's classes (in `split`); cases without a dice value left out."""
    rows = metrics[metrics["stage"].astype(str) == stage]
    if split is not None:
        rows = rows[rows["split"].astype(str) == split]
    dice = pd.to_numeric(rows["dice"], errors="coerce")
    return dice.groupby(rows["case_id"].astype(str)).mean().dropna()


def pick_overlay_cases(metrics: pd.DataFrame, stage: str, split: str | None = None) -> dict[str, str]:
    """{"best", "median", "worst"} -> case_id by each case's mean dice over the stage's classes (in `split`).

    Ties go to the smaller case_id; the median is the lower middle case of the ranking. Raises ValueError when
    the stage (and split) has no case with a dice value.
    """
    per_case = mean_dice_per_case(metrics, stage, split)
    if per_case.empty:
        where = f"stage {stage!r}" + (f", split {split!r}" if split is not None else "")
        raise ValueError(f"no case with a dice value for {where}")
    ranked = sorted(per_case.items(), key=lambda item: (item[1], item[0]))  # worst first
    best = min(per_case.items(), key=lambda item: (-item[1], item[0]))
    return {"best": best[0], "median": ranked[(len(ranked) - 1) // 2][0], "worst": ranked[0][0]}


def read_overlay_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxels (X, Y, Z) and spacing of an image file or DICOM folder; the first channel of a multichannel one."""
    volume = read_image(path)
    if volume.GetNumberOfComponentsPerPixel() > 1:
        volume = sitk.VectorIndexSelectionCast(volume, 0)
    array = to_numpy(volume)
    spacing = tuple(float(s) for s in volume.GetSpacing())
    if array.ndim == 4:  # a 4D scalar image (x, y, z, channel), as MSD stores multi-sequence MRI
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got {array.ndim}D")
    return array, spacing[:3]


def reference_classes(labels: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """A reference label file's values -> the stage's classes (unmapped values -> 0), as drawn in an overlay;
    no map: the labels as they are.

    The mapping is the one training and evaluation use (unet3d.labels.map_labels). An overlay draws
    classes only, so the ignore value, which map_labels keeps for the loss, is background here."""
    if label_map is None:
        return labels
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels)
    # Negative values name no class (map_labels' lookup table would read them from its end).
    mapped = map_labels(np.clip(labels, 0, None).astype(np.int64), {int(s): int(t) for s, t in label_map.items()})
    mapped[mapped == IGNORE_LABEL] = 0
    return mapped
