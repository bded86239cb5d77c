"""The catalog's Parquet tables: schemas (SPEC), atomic writes, and the lock that serialises writers.

Every table is rewritten whole through a temporary file and `os.replace`, under an inter-process file
lock, so a reader sees either the old or the new table and two concurrent `unet3d ingest` never
interleave their read-modify-write cycles.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from unet3d.io import atomic_path

from .workspace import Workspace

CASES_SCHEMA = pa.schema([
    ("cohort", pa.string()),
    ("case_id", pa.string()),
    ("patient_id", pa.string()),
    ("image_path", pa.string()),
    ("label_path", pa.string()),
    ("image_sha256", pa.string()),
    ("label_sha256", pa.string()),
    ("modality", pa.string()),
    ("size", pa.list_(pa.int32())),
    ("spacing_mm", pa.list_(pa.float64())),
    ("status", pa.string()),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
    # beyond SPEC: what re-ingestion and preprocessing need
    ("source_kind", pa.string()),  # msd | folder | dicom
    ("origin_mm", pa.list_(pa.float64())),
    ("direction", pa.list_(pa.float64())),
    ("pixel_type", pa.string()),
    ("image_files", pa.list_(pa.string())),  # DICOM slices in series order; [image_path] for a file
    ("image_stat", pa.string()),  # size+mtime fingerprint of the files: unchanged -> not re-read
    ("label_stat", pa.string()),
    ("unlabelled", pa.bool_()),  # a scan without label on purpose (imagesTs/, cohort.unlabelled_source): never split
])

ISSUES_SCHEMA = pa.schema([
    ("cohort", pa.string()),
    ("case_id", pa.string()),
    ("path", pa.string()),
    ("severity", pa.string()),
    ("code", pa.string()),
    ("message", pa.string()),
    ("found_at", pa.timestamp("us", tz="UTC")),
    ("stage", pa.string()),  # beyond SPEC: ingest | preprocess | ...
])

SPLITS_SCHEMA = pa.schema([
    ("cohort", pa.string()),
    ("case_id", pa.string()),
    ("patient_id", pa.string()),
    ("split", pa.string()),
    ("seed", pa.int64()),
    ("assigned_at", pa.timestamp("us", tz="UTC")),
])


class Catalog:
    """The workspace's `catalog/` folder."""

    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace)
        layout = Workspace(workspace)
        self.root = layout.catalog_dir
        self.cases_path = layout.catalog_table("cases")
        self.issues_path = layout.catalog_table("issues")
        self.splits_path = layout.catalog_table("splits")
        self.lock_path = layout.catalog_lock

    @contextlib.contextmanager
    def lock(self, timeout: float = 600) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=timeout):
            yield

    def read(self, which: str) -> pd.DataFrame:
        path, schema = self._table(which)
        if not path.exists():
            return schema.empty_table().to_pandas()
        return pq.read_table(path, schema=schema).to_pandas()

    def write(self, which: str, frame: pd.DataFrame) -> Path:
        path, schema = self._table(which)
        write_parquet_atomic(frame, path, schema)
        return path

    def cases(self, cohort: str | None = None, status: str | None = None) -> pd.DataFrame:
        df = self.read("cases")
        if cohort is not None:
            df = df[df["cohort"] == cohort]
        if status is not None:
            df = df[df["status"] == status]
        return df.reset_index(drop=True)

    def _table(self, which: str) -> tuple[Path, pa.Schema]:
        tables = {"cases": (self.cases_path, CASES_SCHEMA), "issues": (self.issues_path, ISSUES_SCHEMA),
                  "splits": (self.splits_path, SPLITS_SCHEMA)}
        if which not in tables:
            raise KeyError(f"unknown catalog table {which!r}; known: {sorted(tables)}")
        return tables[which]


def write_parquet_atomic(frame: pd.DataFrame, path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Write a DataFrame to Parquet through a temporary file and a rename."""
    path = Path(path)
    if schema is not None:
        frame = frame.copy()
        for name in schema.names:
            if name not in frame.columns:
                frame[name] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        frame = frame[schema.names]
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    else:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def utc_now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").floor("us")
