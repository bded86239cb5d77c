"""The evaluation tables: hive-partitioned Parquet datasets of metrics, lesions and summaries.

Tables live under a root such as WORKSPACE/reports/metrics as

    ROOT/run_date=YYYY-MM-DD/run_id=ID/part-0.parquet

so that `pandas.read_parquet(ROOT)` reads every run at once, with run_date and run_id coming back as columns from
the directory names; the files themselves never store them. Each run owns exactly one partition: writing a run
again replaces its file (through a temporary file and an atomic rename), so re-evaluating a run never duplicates
rows and a reader never sees half a file.

A bare `pandas.read_parquet(ROOT)` infers the partition keys from the directory names, and pyarrow infers
nothing but integers and strings there: run_date comes back as a category of strings. With this module's typed
partitioning, `pandas.read_parquet(ROOT, partitioning=PARTITIONING)`, run_date is a datetime64 column (the day,
at midnight) and run_id a string column (a run id of digits stays a string).

The writer is ours, not `pyarrow.dataset.write_dataset(existing_data_behavior="delete_matching")`: that one
deletes a partition's files before writing the new ones in place (a failed rewrite leaves part of the run, or an
unreadable file), and does not see the same run under an earlier run_date. benchmarks/partition_writer.py
measures both in one run.
"""
from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from unet3d.io import atomic_path

PARTITION_KEYS: tuple[str, ...] = ("run_date", "run_id")
#: The typed hive partitioning of every report table, for readers: pandas.read_parquet(ROOT, partitioning=...).
PARTITIONING: ds.Partitioning = ds.partitioning(
    pa.schema([("run_date", pa.timestamp("s")), ("run_id", pa.string())]), flavor="hive"
)
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

#: Sparse annotation: one row per stage x case x class of a case with a dense reference (cohort.dense_labels_dir):
#: Dice of the prediction on the voxels its sparse label leaves unannotated (the filled-in part, unet3d.sparse).
FILL_IN_SCHEMA: pa.Schema = pa.schema(
    [
        *_CASE_FIELDS,
        ("n_unannotated", pa.int64()),  # voxels of the case without annotation
        ("ref_voxels", pa.int64()),  # the class's voxels among them, in the dense reference
        ("pred_voxels", pa.int64()),  # ... and in the prediction
        ("dice", pa.float64()),
    ]
)

#: One row per segmented scan x structure of the final stage (unet3d.volumes): the segment stage's table.
VOLUMES_SCHEMA: pa.Schema = pa.schema(
    [
        ("cohort", pa.string()),
        ("stage", pa.string()),
        ("model", pa.string()),  # the model chain's identity (flows.cache_keys.segment_chain_identity)
        ("case_id", pa.string()),
        ("class_index", pa.int16()),
        ("structure", pa.string()),
        ("volume_ml", pa.float64()),
        ("voxel_count", pa.int64()),
        ("n_components", pa.int64()),
        ("roi_found", pa.bool_()),  # a cascade's stage 1 found an ROI; null for a single stage
        ("qc_empty", pa.bool_()),
        ("qc_volume_outlier", pa.bool_()),  # outside [train_min_ml, train_max_ml]; null without references
        ("qc_roi_at_border", pa.bool_()),
        ("train_min_ml", pa.float64()),
        ("train_max_ml", pa.float64()),
        ("prediction_path", pa.string()),  # relative to the workspace
    ]
)

#: One row per champion / challenger decision of a run (unet3d.champion): who served, who challenged, the numbers.
DECISIONS_SCHEMA: pa.Schema = pa.schema(
    [
        ("cohort", pa.string()),
        ("chain", pa.string()),  # the stage names, "roi -> final"
        ("challenger_run_id", pa.string()),
        ("champion_run_id", pa.string()),  # the champion it was compared with (null: none yet)
        ("decision", pa.string()),  # promoted | rejected
        ("reason", pa.string()),
        ("metric", pa.string()),  # per-case mean over the final stage's classes
        ("n_cases", pa.int64()),  # frozen cases both models were scored on
        ("n_new_cases", pa.int64()),  # of them, test cases the champion had not been evaluated on
        *[(name, pa.float64()) for name in ("challenger_mean", "champion_mean", "difference", "ci_low", "ci_high",
                                            "margin", "confidence")],
        ("n_boot", pa.int64()),
        ("champion_new_mean", pa.float64()),  # the champion on the new cases, against its own interval
        ("champion_ci_low", pa.float64()),
        ("champion_ci_high", pa.float64()),
        ("champion_dropped", pa.bool_()),
        ("decided_at", pa.string()),
    ]
)

_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")


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
    # The temporary name starts with "." so that dataset discovery (read_table, pandas) skips it meanwhile.
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        pq.write_table(table, handle)

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
