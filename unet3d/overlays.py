"""Overlay images of a segmentation: an axial, a coronal and a sagittal slice of an image with reference and
predicted contours, as PNG, and the choice of the example cases (best, median, worst) a report shows.

Orientation. Volumes are read with their geometry and reoriented, without resampling, to LPS voxel order with
SimpleITK's DICOMOrient (axis x runs from the patient's right to left, y from anterior to posterior, z from
inferior to superior), so a scan stored with flipped or permuted axes gives the same picture. The panels follow
the radiological convention:

- axial, seen from the feet: the patient's right on the image's left, anterior at the top;
- coronal, seen from the front: the patient's right on the image's left, superior at the top;
- sagittal, seen from the patient's left: anterior on the image's left, superior at the top.

Each panel carries the letters R/L, A/P, S/I at its edges, a millimetre scale bar, the physical aspect ratio of
the voxel spacing (all panels at the same mm-per-pixel scale), and a title naming the plane and the slice's
position in patient coordinates (DICOM LPS, e.g. "axial, S 12.5 mm"). An oblique scan is shown on its voxel grid
nearest to these planes (DICOMOrient picks the closest axis order), not resampled onto them.

matplotlib is imported only when an overlay is drawn, and only its Agg canvas is used, so no global backend is
switched and no display is needed.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk

from unet3d.io import read_image, to_numpy, write_bytes_atomic
from unet3d.labels import IGNORE_LABEL, as_label_values, map_labels

REFERENCE_COLOUR = "#ffd700"  # gold; with deep sky blue, a pair that colour-blind readers also tell apart
PREDICTION_COLOUR = "#00bfff"
_CLASS_LINESTYLES = ("solid", "dashed", "dotted", "dashdot")
DISPLAY_ORIENTATION = "LPS"  # DICOMOrient's code for axes pointing to the patient's left, posterior, superior
_SCALE_BAR_LENGTHS_MM = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Plane(NamedTuple):
    """One display plane of an LPS-ordered (X, Y, Z) volume: the array axis held constant, the array axes shown
    as columns (left to right) and rows (top to bottom, `rows_flipped` when the row axis's index 0 is at the
    bottom), the letters at the left, right, top and bottom edges, and the letters of the slice axis's negative
    and positive directions (for the slice position)."""
    name: str
    slice_axis: int
    column_axis: int
    row_axis: int
    rows_flipped: bool
    edge_letters: tuple[str, str, str, str]
    position_letters: tuple[str, str]


PLANES = (
    Plane("axial", 2, 0, 1, False, ("R", "L", "A", "P"), ("I", "S")),
    Plane("coronal", 1, 0, 2, True, ("R", "L", "S", "I"), ("A", "P")),
    Plane("sagittal", 0, 1, 2, True, ("A", "P", "S", "I"), ("R", "L")),
)


class OverlayVolume(NamedTuple):
    """Voxels in LPS order (X, Y, Z) with their spacing (mm), the LPS position of voxel (0, 0, 0) (mm) and the
    direction left after reorientation (identity unless the scan is oblique)."""
    voxels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray


def _as_labels(labels: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"{name} shape {labels.shape} differs from the image's {shape}")
    return as_label_values(labels, np.int64)


def _foreground_per_slice(labels: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(3) if a != axis)
    return ((labels != 0) & (labels != IGNORE_LABEL)).sum(axis=other)


def choose_slices(reference: np.ndarray | None, prediction: np.ndarray, n_slices: int, axis: int = 2) -> list[int]:
    """Slices across `axis` (default z, axial) through the structure: the reference's foreground slices (else the
    prediction's) are cut into n consecutive runs and the slice of largest area is taken from each, so the slices
    are both spread over the structure and well filled. With no foreground anywhere, n slices evenly spread over
    the volume."""
    depth = prediction.shape[axis]
    area = _foreground_per_slice(reference, axis) if reference is not None else np.zeros(depth, np.int64)
    if not area.any():
        area = _foreground_per_slice(prediction, axis)
    candidates = np.flatnonzero(area)
    if candidates.size == 0:
        return sorted({int(round(z)) for z in np.linspace(0, depth - 1, n_slices + 2)[1:-1]})
    return [int(run[np.argmax(area[run])]) for run in np.array_split(candidates, min(n_slices, candidates.size))]


def plane_view(volume: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    """The 2D slice `index` of an LPS-ordered (X, Y, Z) volume in `plane`, as displayed: row 0 at the top,
    column 0 at the left."""
    section = np.take(volume, index, axis=plane.slice_axis)
    # np.take drops the slice axis; of the two left, the lower-numbered array axis comes first.
    if plane.column_axis < plane.row_axis:
        section = section.T
    return section[::-1] if plane.rows_flipped else section


def _window(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return (low, high) if high > low else (low - 0.5, low + 0.5)


def _slice_position(plane: Plane, index: int, shape: Sequence[int], spacing: Sequence[float],
                    origin: Sequence[float], direction: np.ndarray) -> str:
    """The slice's LPS coordinate along the plane's normal, at the slice's centre, e.g. "S 12.5 mm"."""
    centre = np.array([(n - 1) / 2.0 for n in shape], dtype=np.float64)
    centre[plane.slice_axis] = index
    point = np.asarray(origin, np.float64) + direction @ (centre * np.asarray(spacing, np.float64))
    value = round(float(point[plane.slice_axis]), 1) + 0.0  # + 0.0: no "-0.0"
    letter = plane.position_letters[1] if value >= 0 else plane.position_letters[0]
    return f"{letter} {abs(value):.1f} mm"


def _scale_bar_length(width_mm: float) -> int:
    fitting = [length for length in _SCALE_BAR_LENGTHS_MM if length <= 0.3 * width_mm]
    return fitting[-1] if fitting else _SCALE_BAR_LENGTHS_MM[0]


def overlay_png(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    path: str | Path,
    title: str = "",
    classes: Mapping[int, str] | None = None,
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> Path:
    """Draw an axial, a coronal and a sagittal slice of `image` with reference and predicted contours and write
    them as a PNG, in the radiological convention of this module's docstring.

    image: an (X, Y, Z) volume in LPS voxel order (as read_overlay_volume returns it); reference/prediction:
    integer label maps of its shape (reference may be None); 0 and 255 (ignore) are not drawn. Each plane's slice
    is the one where the reference (else the prediction) has the most foreground. spacing_mm (x, y, z) gives the
    panels' aspect ratio and scale bars; origin_mm (the LPS position of voxel (0, 0, 0)) and direction (identity
    when None) give the slice positions in the panel titles. Reference contours are gold and predicted ones
    blue; each class has its own line style, named in the legend (with `classes`' names when given). The grey
    image is windowed to its 1st-99th percentile over the shown slices. Written atomically; returns the path.
    """
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z), got shape {image.shape}")
    if len(spacing_mm) < 3 or any(float(s) <= 0 for s in spacing_mm[:3]):
        raise ValueError(f"spacing_mm must be three positive numbers (x, y, z), got {tuple(spacing_mm)}")
    spacing = tuple(float(s) for s in spacing_mm[:3])
    direction = np.eye(3) if direction is None else np.asarray(direction, np.float64).reshape(3, 3)
    prediction = _as_labels(prediction, "prediction", image.shape)
    reference = _as_labels(reference, "reference", image.shape) if reference is not None else None
    layers = [(reference, REFERENCE_COLOUR, "reference"), (prediction, PREDICTION_COLOUR, "prediction")]

    indices = [choose_slices(reference, prediction, 1, axis=plane.slice_axis)[0] for plane in PLANES]
    low, high = _window(np.concatenate([plane_view(image, p, i).ravel() for p, i in zip(PLANES, indices)]))
    drawn = sorted(
        {
            int(v)
            for labels, _, _ in layers
            if labels is not None
            for plane, index in zip(PLANES, indices)
            for v in np.unique(np.take(labels, index, axis=plane.slice_axis))
            if v not in (0, IGNORE_LABEL)
        }
    )
    style = {c: _CLASS_LINESTYLES[i % len(_CLASS_LINESTYLES)] for i, c in enumerate(drawn)}

    widths_mm = [image.shape[p.column_axis] * spacing[p.column_axis] for p in PLANES]
    heights_mm = [image.shape[p.row_axis] * spacing[p.row_axis] for p in PLANES]
    n_legend_entries = len(drawn) * (1 if reference is None else 2) + (reference is None)
    legend_rows = math.ceil(n_legend_entries / 4)
    # Margins in inches, so that titles and legend keep their room whatever the panels' aspect ratio. All panels
    # share one mm-per-inch scale: the figure is as tall as the tallest panel needs.
    top_in, bottom_in = (0.75 if title else 0.4), 0.1 + 0.22 * legend_rows
    gap_in, panels_width_in = 0.15, 10.8
    inch_per_mm = (panels_width_in - gap_in * (len(PLANES) - 1)) / sum(widths_mm)
    panel_height_in = float(np.clip(max(heights_mm) * inch_per_mm, 1.2, 9.0))
    figure_height = panel_height_in + top_in + bottom_in
    figure = Figure(figsize=(panels_width_in + 0.2, figure_height), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, len(PLANES), width_ratios=widths_mm, left=0.1 / (panels_width_in + 0.2),
                               right=1 - 0.1 / (panels_width_in + 0.2), top=1 - top_in / figure_height,
                               bottom=bottom_in / figure_height, wspace=gap_in * len(PLANES) / panels_width_in)
    outline = [patheffects.withStroke(linewidth=2.0, foreground="black")]
    for k, (plane, index) in enumerate(zip(PLANES, indices)):
        ax = figure.add_subplot(grid[0, k])
        width, height = widths_mm[k], heights_mm[k]
        # Voxel centres in mm, so that contours fall on the voxels shown by imshow's extent.
        columns_mm = (np.arange(image.shape[plane.column_axis]) + 0.5) * spacing[plane.column_axis]
        rows_mm = (np.arange(image.shape[plane.row_axis]) + 0.5) * spacing[plane.row_axis]
        ax.imshow(plane_view(image, plane, index), cmap="gray", vmin=low, vmax=high, extent=(0, width, height, 0),
                  interpolation="nearest")
        for labels, colour, _ in layers:
            if labels is None:
                continue
            view = plane_view(labels, plane, index)
            for class_index in drawn:
                mask = view == class_index
                if mask.any():
                    ax.contour(columns_mm, rows_mm, mask.astype(np.float32), levels=[0.5], colors=[colour],
                               linestyles=[style[class_index]], linewidths=1.4)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_aspect("equal")
        ax.set_axis_off()
        position = _slice_position(plane, index, image.shape, spacing, origin_mm, direction)
        ax.set_title(f"{plane.name}, {position}", fontsize=9)
        left, right, top, bottom = plane.edge_letters
        for letter, xy, ha, va in ((left, (0.02, 0.5), "left", "center"), (right, (0.98, 0.5), "right", "center"),
                                   (top, (0.5, 0.98), "center", "top"), (bottom, (0.5, 0.02), "center", "bottom")):
            ax.text(*xy, letter, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9,
                    fontweight="bold", path_effects=outline)
        bar_mm = _scale_bar_length(width)
        scale_bar = AnchoredSizeBar(ax.transData, bar_mm, f"{bar_mm} mm", loc="lower right", color="white",
                                    frameon=False, size_vertical=max(height / 150, 0.5 * min(spacing)),
                                    pad=0.3, borderpad=0.3, sep=2, fontproperties={"size": 7, "weight": "bold"})
        scale_bar.txt_label.get_children()[0].set_path_effects(outline)  # readable on bright tissue too
        ax.add_artist(scale_bar)

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


def read_overlay_volume(path: str | Path | Sequence[str]) -> OverlayVolume:
    """An image file, DICOM folder or DICOM series (list of slice files) reoriented, without resampling, to LPS
    voxel order; the first channel of a multichannel one."""
    volume = read_image(path)
    if volume.GetNumberOfComponentsPerPixel() > 1:
        volume = sitk.VectorIndexSelectionCast(volume, 0)
    if volume.GetDimension() == 4:  # a 4D scalar image (x, y, z, channel), as MSD stores multi-sequence MRI
        volume = volume[:, :, :, 0]
    if volume.GetDimension() != 3:
        raise ValueError(f"{_source_name(path)}: expected a 3D image, got {volume.GetDimension()}D")
    volume = sitk.DICOMOrient(volume, DISPLAY_ORIENTATION)
    return OverlayVolume(
        voxels=to_numpy(volume),
        spacing=tuple(float(s) for s in volume.GetSpacing()),
        origin=tuple(float(o) for o in volume.GetOrigin()),
        direction=np.asarray(volume.GetDirection(), np.float64).reshape(3, 3),
    )


def _source_name(path: str | Path | Sequence[str]) -> str:
    if isinstance(path, (list, tuple)):
        return str(Path(path[0]).parent) if path else "empty DICOM series"
    return str(path)


def read_overlay_case(
    image_path: str | Path | Sequence[str],
    prediction_path: str | Path | Sequence[str],
    reference_path: str | Path | Sequence[str] | None = None,
) -> tuple[OverlayVolume, np.ndarray | None, np.ndarray]:
    """(image, reference voxels or None, prediction voxels) of one case, all in LPS voxel order.

    Raises ValueError naming the file when a label volume does not lie on the image's voxel grid (another shape,
    or an origin more than half a voxel away), since its contours would then be drawn in the wrong place."""
    image = read_overlay_volume(image_path)

    def on_image_grid(path: str | Path | Sequence[str], kind: str) -> np.ndarray:
        labels = read_overlay_volume(path)
        offset = np.abs(np.subtract(labels.origin, image.origin))
        if labels.voxels.shape != image.voxels.shape or np.any(offset > 0.5 * np.asarray(image.spacing)):
            raise ValueError(
                f"{kind} {_source_name(path)} is not on the voxel grid of image {_source_name(image_path)}: "
                f"shape {labels.voxels.shape} at {tuple(round(o, 2) for o in labels.origin)} mm against "
                f"{image.voxels.shape} at {tuple(round(o, 2) for o in image.origin)} mm (LPS)"
            )
        return labels.voxels

    prediction = on_image_grid(prediction_path, "prediction")
    reference = on_image_grid(reference_path, "reference") if reference_path is not None else None
    return image, reference, prediction


def reference_classes(labels: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """A reference label file's values -> the stage's classes (unmapped values -> 0), as drawn in an overlay;
    no map: the labels as they are.

    The mapping is the one training and evaluation use (unet3d.labels.map_labels). An overlay draws
    classes only, so the ignore value, which map_labels keeps for the loss, is background here."""
    if label_map is None:
        return labels
    labels = as_label_values(labels, np.int64)
    # Negative values name no class (map_labels' lookup table would read them from its end).
    mapped = map_labels(np.clip(labels, 0, None), {int(s): int(t) for s, t in label_map.items()})
    mapped[mapped == IGNORE_LABEL] = 0
    return mapped
