"""Evaluation reports: hive-partitioned Parquet tables, a console summary table, and a Markdown report with
overlay images.

Tables live under a root such as WORKSPACE/reports/metrics as

    ROOT/run_date=YYYY-MM-DD/run_id=ID/part-0.parquet

so that `pandas.read_parquet(ROOT)` reads every run at once, with run_date and run_id coming back as columns from
the directory names; the files themselves never store them. Each run owns exactly one partition: writing a run
again replaces its file (through a temporary file and an atomic rename), so re-evaluating a run never duplicates
rows and a reader never sees half a file.

Overlays show axial slices (constant z) of an (X, Y, Z) volume with x as panel columns and y as rows, which for
an LPS identity direction is the radiological view (patient's right on the left, anterior at the top), in the
physical aspect ratio given by the spacing. matplotlib is imported only when an overlay is drawn, and only its
Agg canvas is used, so no global backend is switched and no display is needed.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from unet3d.io import atomic_path
from unet3d.metrics import IGNORE_LABEL

PARTITION_KEYS: tuple[str, ...] = ("run_date", "run_id")
PART_FILE = "part-0.parquet"

_KEY_FIELDS = [("cohort", pa.string()), ("stage", pa.string())]
_CASE_FIELDS = [
    *_KEY_FIELDS,
    ("model", pa.string()),
    ("case_id", pa.string()),
    ("split", pa.string()),
    ("class_index", pa.int16()),
    ("class_name", pa.string()),
]

#: One row per stage x case x class (SPEC "metrics", less the partition keys run_date and run_id).
METRICS_SCHEMA: pa.Schema = pa.schema(
    [
        *_CASE_FIELDS,
        *[(name, pa.int64()) for name in ("tp", "fp", "fn", "tn")],
        *[
            (name, pa.float64())
            for name in (
                "precision", "recall", "specificity", "dice", "iou", "hd95_mm", "assd_mm",
                "volume_ref_ml", "volume_pred_ml",
            )
        ],
        ("ref_empty", pa.bool_()),
        ("pred_empty", pa.bool_()),
    ]
)

#: One row per stage x split x class x metric (SPEC "summary", less the partition keys).
SUMMARY_SCHEMA: pa.Schema = pa.schema(
    [
        *_KEY_FIELDS,
        ("split", pa.string()),
        ("class_name", pa.string()),
        ("metric", pa.string()),
        ("n_cases", pa.int64()),
        *[(name, pa.float64()) for name in ("mean", "median", "std", "ci_low", "ci_high", "pooled")],
    ]
)

#: One row per stage x case x class of lesion-level detection counts (unet3d.metrics.lesion_metrics).
LESIONS_SCHEMA: pa.Schema = pa.schema(
    [
        *_CASE_FIELDS,
        *[
            (name, pa.int64())
            for name in ("n_ref_lesions", "n_pred_lesions", "detected", "missed", "false_lesions")
        ],
        *[(name, pa.float64()) for name in ("lesion_precision", "lesion_recall", "lesion_f1")],
    ]
)

#: Metrics shown by default in the console table and the Markdown report, in column order.
REPORT_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "specificity", "hd95_mm")
_ROW_KEYS: tuple[str, ...] = ("stage", "split", "class_name")
_DISTANCE_METRICS = frozenset({"hd95_mm", "assd_mm"})
_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")
_MISSING = "–"


# ---------------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(file) on a hidden temporary file beside `path`, fsync it, then rename it over `path`.

    The temporary name starts with "." so that pyarrow's dataset discovery (and so pandas.read_parquet) skips it
    while it exists. On any failure the temporary file is removed and `path` is left as it was.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path


# ---------------------------------------------------------------------------------------------------------------
# Partitioned Parquet tables
# ---------------------------------------------------------------------------------------------------------------
def _check_partition_values(run_date: str, run_id: str) -> None:
    if not isinstance(run_date, str) or not _DATE_PATTERN.fullmatch(run_date):
        raise ValueError(f"run_date must be a YYYY-MM-DD string, got {run_date!r}")
    _dt.date.fromisoformat(run_date)  # rejects 2024-13-01
    if not isinstance(run_id, str) or not _RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(
            f"run_id must be letters, digits, '.', '_' or '-' and not start with '.', got {run_id!r}"
        )


def _as_date_strings(values: pd.Series) -> set[str]:
    return {pd.Timestamp(v).strftime("%Y-%m-%d") for v in values.dropna().unique()}


def _drop_partition_columns(frame: pd.DataFrame, run_date: str, run_id: str) -> pd.DataFrame:
    """Drop run_date/run_id columns, refusing ones that name another run (a frame mixed up between runs)."""
    present = [key for key in PARTITION_KEYS if key in frame.columns]
    for key, expected in (("run_date", run_date), ("run_id", run_id)):
        if key not in frame.columns:
            continue
        found = _as_date_strings(frame[key]) if key == "run_date" else set(frame[key].dropna().astype(str))
        if found - {expected}:
            raise ValueError(f"frame column {key} holds {sorted(found)}, but the partition is {key}={expected}")
    return frame.drop(columns=present)


def _to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    missing = [name for name in schema.names if name not in frame.columns]
    unknown = [name for name in frame.columns if name not in schema.names]
    if missing or unknown:
        raise ValueError(f"frame does not match the table schema: missing columns {missing}, unknown {unknown}")
    # from_pandas casts safely (1.5 -> int64 or 40000 -> int16 is an error) and turns None and NaN into null.
    table = pa.Table.from_pandas(frame[list(schema.names)], schema=schema, preserve_index=False)
    return table.replace_schema_metadata(None)


def _partition_dir(root: Path, run_date: str, run_id: str) -> Path:
    return root / f"run_date={run_date}" / f"run_id={run_id}"


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "_"))


def _run_partitions(root: Path) -> list[tuple[str, str, Path]]:
    """(run_date, run_id, directory) of every partition directory under root."""
    found = []
    if not root.is_dir():
        return found
    for date_dir in sorted(root.glob("run_date=*")):
        if not date_dir.is_dir():
            continue
        for run_dir in sorted(date_dir.glob("run_id=*")):
            if run_dir.is_dir():
                found.append((date_dir.name.split("=", 1)[1], run_dir.name.split("=", 1)[1], run_dir))
    return found


def write_partition(frame: pd.DataFrame, root: str | Path, run_date: str, run_id: str, schema: pa.Schema) -> Path:
    """Write `frame` as the partition of one run: root/run_date=YYYY-MM-DD/run_id=ID/part-0.parquet.

    The columns must be exactly the schema's (run_date/run_id columns, if present, are dropped: the directory
    names carry them); values are cast to the schema, None/NaN become null. The file is replaced atomically, then
    any other Parquet file of the same run is removed, including a partition of this run_id under another
    run_date (a run re-evaluated on a later day), so a run's rows are never duplicated. Returns the file's path.
    """
    _check_partition_values(run_date, run_id)
    root = Path(root)
    table = _to_arrow(_drop_partition_columns(frame, run_date, run_id), schema)
    target = _partition_dir(root, run_date, run_id) / PART_FILE
    _write_atomic(target, lambda handle: pq.write_table(table, handle))

    for other_date, other_id, run_dir in _run_partitions(root):
        if other_id != run_id:
            continue
        for stale in run_dir.glob("*.parquet"):
            if _visible(stale) and stale != target:
                stale.unlink()
        if other_date != run_date and not any(run_dir.iterdir()):
            run_dir.rmdir()
            if not any(run_dir.parent.iterdir()):
                run_dir.parent.rmdir()
    return target


def read_table(root: str | Path, run_id: str | None = None) -> pd.DataFrame:
    """Every run's rows under root (or one run's), with run_id and run_date as leading plain string columns.

    Unlike a bare pandas.read_parquet, the partition keys stay strings (a run id of digits is not turned into a
    number, nor into a categorical) and files written with older or newer column sets are read together (columns
    a file lacks are null). Returns an empty frame (run_id and run_date columns only) when nothing matches.
    """
    root = Path(root)
    empty = pd.DataFrame({"run_id": pd.Series(dtype=str), "run_date": pd.Series(dtype=str)})
    files = [
        str(f)
        for _, found_id, run_dir in _run_partitions(root)
        if run_id is None or found_id == run_id
        for f in sorted(run_dir.glob("*.parquet"))
        if _visible(f)
    ]
    if not files:
        return empty
    partitioning = ds.partitioning(pa.schema([("run_date", pa.string()), ("run_id", pa.string())]), flavor="hive")

    def dataset(schema: pa.Schema | None = None) -> ds.Dataset:
        return ds.dataset(files, format="parquet", partitioning=partitioning, partition_base_dir=str(root),
                          schema=schema)

    schemas = {str(f.physical_schema): f.physical_schema for f in dataset().get_fragments()}
    unified = pa.unify_schemas([*schemas.values(), partitioning.schema], promote_options="permissive")
    table = dataset(unified).to_table()
    frame = table.to_pandas()
    ordered = ["run_id", "run_date", *[c for c in frame.columns if c not in PARTITION_KEYS]]
    frame = frame[ordered]
    for key in PARTITION_KEYS:
        frame[key] = frame[key].astype(str)
    return frame.reset_index(drop=True)


def latest_run_id(root: str | Path) -> str | None:
    """The run with the latest run_date under root, ties broken by the newest file; None when there is none."""
    latest: tuple[str, float, str] | None = None
    for run_date, run_id, run_dir in _run_partitions(Path(root)):
        files = [f for f in run_dir.glob("*.parquet") if _visible(f)]
        if not files:
            continue
        key = (run_date, max(f.stat().st_mtime for f in files), run_id)
        if latest is None or key > latest:
            latest = key
    return latest[2] if latest is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Summary tables (console and Markdown)
# ---------------------------------------------------------------------------------------------------------------
def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _format_cell(metric: str, mean, ci_low, ci_high) -> str:
    """'0.873 [0.85, 0.89]' for scores in [0, 1]; '4.21 [3.1, 5.6]' for distances in mm."""
    if _is_missing(mean):
        return _MISSING
    mean_digits, ci_digits = (2, 1) if metric in _DISTANCE_METRICS else (3, 2)
    text = f"{float(mean):.{mean_digits}f}"
    if not _is_missing(ci_low) and not _is_missing(ci_high):
        text += f" [{float(ci_low):.{ci_digits}f}, {float(ci_high):.{ci_digits}f}]"
    return text


def _summary_rows(
    summary: pd.DataFrame, metrics: Sequence[str]
) -> tuple[list[str], list[str], list[list[str]]]:
    """(key column names, metric column names, rows of cells) with one row per stage x split x class.

    run_id and cohort lead the keys when the summary holds several of them, so that rows never collide.
    """
    keys = [k for k in ("run_id", "cohort") if k in summary.columns and summary[k].nunique(dropna=False) > 1]
    keys += [k for k in _ROW_KEYS if k in summary.columns]
    shown = [m for m in metrics if (summary["metric"] == m).any()] if "metric" in summary.columns else []
    rows = []
    if summary.empty:
        return keys, shown, rows
    grouped = summary.groupby(keys, dropna=False, sort=False, observed=True) if keys else [((), summary)]
    for key_values, group in grouped:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        by_metric = {row["metric"]: row for _, row in group.iterrows()}
        n_cases = pd.to_numeric(group["n_cases"], errors="coerce").max() if "n_cases" in group else None
        cells = [_MISSING if _is_missing(v) else str(v) for v in key_values]
        cells.append(_MISSING if _is_missing(n_cases) else str(int(n_cases)))
        for metric in shown:
            row = by_metric.get(metric)
            if row is None:
                cells.append(_MISSING)
            else:
                cells.append(_format_cell(metric, row.get("mean"), row.get("ci_low"), row.get("ci_high")))
        rows.append(cells)
    return keys, shown, rows


def format_summary(
    summary: pd.DataFrame, metrics: Sequence[str] = REPORT_METRICS, width: int = 120
) -> str:
    """A console table of a summary (unet3d.metrics.summarize's output): one row per stage x split x class with
    n_cases and "mean [95 % CI]" per metric. Metric columns that do not fit in `width` characters continue in a
    further block below, which repeats the row keys.
    """
    keys, shown, rows = _summary_rows(summary, metrics)
    if not rows:
        return "(no summary rows)"
    key_headers = [("class" if k == "class_name" else k) for k in keys] + ["n"]
    headers = key_headers + list(shown)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    n_keys = len(key_headers)
    gap = "  "

    blocks: list[list[int]] = []
    key_width = sum(widths[:n_keys]) + len(gap) * (n_keys - 1)
    used = key_width
    for column in range(n_keys, len(headers)):
        needed = len(gap) + widths[column]
        if not blocks or used + needed > width and blocks[-1]:
            blocks.append([])
            used = key_width
        blocks[-1].append(column)
        used += needed

    def line(cells: Sequence[str], columns: Sequence[int]) -> str:
        parts = [cells[i].ljust(widths[i]) for i in range(n_keys)]
        parts += [cells[i].ljust(widths[i]) for i in columns]
        return gap.join(parts).rstrip()

    out = []
    for columns in blocks or [[]]:
        header = line(headers, columns)
        out += [header, "-" * len(header)] + [line(r, columns) for r in rows] + [""]
    out.append("mean [95 % bootstrap CI] over cases; distances in mm")
    return "\n".join(out)


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_markdown_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_markdown_escape(c) for c in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Overlay images
# ---------------------------------------------------------------------------------------------------------------
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

    path = Path(path)
    return _write_atomic(path, lambda handle: figure.savefig(handle, format="png", facecolor="white"))


# ---------------------------------------------------------------------------------------------------------------
# Choosing example cases and writing the Markdown report
# ---------------------------------------------------------------------------------------------------------------
def _case_mean_dice(metrics: pd.DataFrame, stage: str, split: str | None = None) -> pd.Series:
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
    per_case = _case_mean_dice(metrics, stage, split)
    if per_case.empty:
        where = f"stage {stage!r}" + (f", split {split!r}" if split is not None else "")
        raise ValueError(f"no case with a dice value for {where}")
    ranked = sorted(per_case.items(), key=lambda item: (item[1], item[0]))  # worst first
    best = min(per_case.items(), key=lambda item: (-item[1], item[0]))
    return {"best": best[0], "median": ranked[(len(ranked) - 1) // 2][0], "worst": ranked[0][0]}


def _first_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxels (X, Y, Z) and spacing of an image file or DICOM folder; the first channel of a multichannel one."""
    import SimpleITK as sitk

    from unet3d.io import read_image, to_numpy

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


def _map_labels(labels: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """Source label values -> stage classes; values the map does not name become 0. No map: labels as they are."""
    if label_map is None:
        return labels
    mapped = np.zeros(labels.shape, dtype=np.int16)
    for source, target in label_map.items():
        mapped[labels == int(source)] = int(target)
    return mapped


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "case"


def _lesion_rows(lesions: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Per stage x split x class: summed lesion counts, detection precision/recall of the summed counts, and the
    mean of the cases' lesion F1. Summed counts follow the empty policy of unet3d.metrics.lesion_metrics."""
    keys = [k for k in _ROW_KEYS if k in lesions.columns]
    headers = [("class" if k == "class_name" else k) for k in keys] + [
        "cases", "reference lesions", "predicted lesions", "detected", "missed", "false lesions",
        "lesion precision", "lesion recall", "mean case lesion F1",
    ]
    rows = []
    grouped = lesions.groupby(keys, dropna=False, sort=False, observed=True) if keys else [((), lesions)]
    for key_values, group in grouped:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        total = {c: int(pd.to_numeric(group[c]).sum()) for c in
                 ("n_ref_lesions", "n_pred_lesions", "detected", "missed", "false_lesions")}
        n_ref, n_pred = total["n_ref_lesions"], total["n_pred_lesions"]
        if n_ref == 0 and n_pred == 0:
            precision, recall = 1.0, 1.0
        else:
            precision = (n_pred - total["false_lesions"]) / n_pred if n_pred else None
            recall = total["detected"] / n_ref if n_ref else None
        f1 = pd.to_numeric(group["lesion_f1"], errors="coerce").mean()
        cases = group["case_id"].nunique() if "case_id" in group else len(group)
        rows.append(
            [_MISSING if _is_missing(v) else str(v) for v in key_values]
            + [str(cases), str(n_ref), str(n_pred), str(total["detected"]), str(total["missed"]),
               str(total["false_lesions"])]
            + [_MISSING if _is_missing(v) else f"{v:.3f}" for v in (precision, recall, f1)]
        )
    return headers, rows


def _only_run(frame: pd.DataFrame | None, run_id: str) -> pd.DataFrame | None:
    if frame is None or "run_id" not in frame.columns:
        return frame
    return frame[frame["run_id"].astype(str) == run_id]


def write_markdown_report(
    out_dir: str | Path,
    run_id: str,
    summary: pd.DataFrame,
    metrics: pd.DataFrame,
    overlay_cases: Sequence[dict],
    lesions: pd.DataFrame | None = None,
    title: str | None = None,
) -> Path:
    """Write out_dir/report.md for one run, and one overlay PNG per example case beside it.

    summary: unet3d.metrics.summarize output; metrics: the per case x class table (for the example cases' dice);
    rows of other runs, when the frames carry a run_id column, are left out. overlay_cases: dicts with case_id,
    stage, label ("best" | "median" | "worst"), image_path, reference_path (None if unlabelled),
    prediction_path, classes {class_index: name} and label_map {source label: stage class}, applied to the
    reference before drawing (unmapped values -> 0). lesions: optional per case x class lesion table
    (LESIONS_SCHEMA columns). Returns the report's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = _only_run(summary, run_id)
    metrics = _only_run(metrics, run_id)
    lesions = _only_run(lesions, run_id)

    lines = [f"# {title or f'Segmentation report: run {run_id}'}", "", f"- Run: `{run_id}`"]
    if "cohort" in metrics.columns and metrics["cohort"].notna().any():
        lines.append("- Cohort: " + ", ".join(sorted(metrics["cohort"].dropna().astype(str).unique())))
    if {"stage", "split", "case_id"} <= set(metrics.columns) and len(metrics):
        counts = metrics.groupby(["stage", "split"], sort=True, observed=True)["case_id"].nunique()
        lines.append("- Cases: " + "; ".join(f"{stage} {split}: {n}" for (stage, split), n in counts.items()))
    lines.append(f"- Written: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")

    keys, shown, rows = _summary_rows(summary, REPORT_METRICS)
    lines += ["", "## Summary", ""]
    if rows:
        headers = [("class" if k == "class_name" else k) for k in keys] + ["n"]
        headers += [("hd95 (mm)" if m == "hd95_mm" else m) for m in shown]
        lines += ["Mean over cases [95 % bootstrap confidence interval].", ""]
        lines += _markdown_table(headers, rows)
    else:
        lines.append("No summary rows.")

    if lesions is not None and len(lesions):
        headers, rows = _lesion_rows(lesions)
        lines += ["", "## Lesion-level detection", "",
                  "Counts summed over cases; precision and recall of the summed counts.", ""]
        lines += _markdown_table(headers, rows)

    if overlay_cases:
        lines += ["", "## Example cases", "",
                  "Reference contours gold, predicted contours blue; line style per class.", ""]
    for case in overlay_cases:
        case_id, stage, label = str(case["case_id"]), str(case["stage"]), str(case["label"])
        classes = {int(k): str(v) for k, v in (case.get("classes") or {}).items()}
        image, spacing = _first_volume(case["image_path"])
        prediction, _ = _first_volume(case["prediction_path"])
        reference = None
        if case.get("reference_path") is not None:
            reference, _ = _first_volume(case["reference_path"])
            reference = _map_labels(reference, case.get("label_map"))
        png_name = f"overlay_{_safe_name(stage)}_{_safe_name(label)}_{_safe_name(case_id)}.png"
        per_case = _case_mean_dice(metrics, stage) if {"stage", "case_id", "dice"} <= set(metrics.columns) else None
        dice_note = ""
        if per_case is not None and case_id in per_case.index:
            dice_note = f" (mean dice {per_case[case_id]:.3f})"
        heading = f"{stage}, {label}: {case_id}{dice_note}"
        overlay_png(image, reference, prediction, spacing, out_dir / png_name, title=heading, classes=classes)
        lines += [f"### {stage}, {label}: `{case_id}`{dice_note}", "", f"![{heading}]({png_name})", ""]

    text = "\n".join(lines).rstrip() + "\n"
    return _write_atomic(out_dir / "report.md", lambda handle: handle.write(text.encode("utf-8")))
