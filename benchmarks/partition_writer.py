"""The report tables' partition writer: ours (`unet3d.report_tables.write_partition`) against
`pyarrow.dataset.write_dataset(..., partitioning=hive, existing_data_behavior="delete_matching")`.

Both write one run's metrics table as WORKSPACE/reports/metrics/run_date=D/run_id=R/. Measured in the same run:

- time: the median of `--repeats` rewrites of one run's partition (`--rows` rows of the metrics schema), ms;
- failed rewrite: a run's partition is rewritten and the write fails midway (ours: the Parquet writer raises after
  writing part of the file; write_dataset: the record batches it is fed raise halfway). Counted:
  the rows of that run a reader (`pandas.read_parquet(ROOT)`) sees afterwards (the old partition had `--rows`),
  and files left in the partition besides one complete Parquet file;
- re-evaluated later: the run is written on one day, then again under a later run_date. Counted: the run's rows
  a reader sees (should be `--rows`, not twice as many).

write_dataset's "delete_matching" deletes a partition's files before it writes the new ones, in place, and only
under the partition directory it writes; it cannot keep the old partition when the new write fails, nor find the
same run under another run_date. The last line printed is one JSON object: {"benchmark", "ours", "baseline",
"unit", "ratio" (baseline / ours time: > 1 means ours is faster), "failed_rewrite", "re_evaluated"}.

    python benchmarks/partition_writer.py --rows 20000 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unet3d.report_tables import METRICS_SCHEMA, write_partition  # noqa: E402

_WRITE_PARTITIONING = ds.partitioning(pa.schema([("run_date", pa.string()), ("run_id", pa.string())]),
                                      flavor="hive")


def _metrics_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {}
    for field in METRICS_SCHEMA:
        if pa.types.is_string(field.type):
            columns[field.name] = [f"{field.name}_{i % 97}" for i in range(rows)]
        elif pa.types.is_boolean(field.type):
            columns[field.name] = rng.random(rows) < 0.1
        elif pa.types.is_integer(field.type):
            columns[field.name] = rng.integers(0, 1000, rows).astype(field.type.to_pandas_dtype())
        else:
            columns[field.name] = rng.random(rows)
    return pd.DataFrame(columns)


def _write_dataset(frame: pd.DataFrame, root: Path, run_date: str, run_id: str, batches=None) -> None:
    # With `batches` (the failed rewrite), row groups of a twentieth of the table: the writer flushes as it goes,
    # as it does for a table larger than its default row group, so the write fails after some rows reached the
    # file, as a real one does. Timed with the defaults.
    row_groups = {} if batches is None else {"max_rows_per_group": max(1, len(frame) // 20)}
    table = pa.Table.from_pandas(frame, schema=METRICS_SCHEMA, preserve_index=False)
    table = table.append_column("run_date", pa.array([run_date] * len(table)))
    table = table.append_column("run_id", pa.array([run_id] * len(table)))
    data = table if batches is None else batches(table)
    ds.write_dataset(data, root, schema=table.schema, format="parquet", partitioning=_WRITE_PARTITIONING,
                     existing_data_behavior="delete_matching", basename_template="part-{i}.parquet", **row_groups)


def _run_rows(root: Path, run_id: str) -> int:
    try:
        frame = pd.read_parquet(root)
    except Exception:  # noqa: BLE001 - a half-written file makes the whole dataset unreadable
        return -1
    return int((frame["run_id"].astype(str) == run_id).sum())


def _extra_files(partition: Path) -> int:
    files = [p for p in partition.iterdir()] if partition.is_dir() else []
    complete = 0
    for path in files:
        try:
            pq.read_metadata(path)
            complete += 1
        except Exception:  # noqa: BLE001
            pass
    return len(files) - min(complete, 1)


def _timed(write, repeats: int) -> float:
    write()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    frame = _metrics_frame(args.rows)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours_ms = _timed(lambda: write_partition(frame, tmp / "ours", "2024-05-01", "r1", METRICS_SCHEMA), args.repeats)
        base_ms = _timed(lambda: _write_dataset(frame, tmp / "base", "2024-05-01", "r1"), args.repeats)

        # A rewrite of run r1 that fails midway.
        real_write_table = pq.write_table

        def failing_write_table(table, where, **kwargs):
            real_write_table(table.slice(0, 10), where, **kwargs)
            raise OSError("disk full (injected)")

        with mock.patch.object(pq, "write_table", failing_write_table):
            try:
                write_partition(frame.iloc[:5], tmp / "ours", "2024-05-01", "r1", METRICS_SCHEMA)
            except OSError:
                pass

        def failing_batches(table):
            for i, batch in enumerate(table.to_batches(max_chunksize=max(1, len(table) // 100))):
                if i == 50:
                    raise OSError("disk full (injected)")
                yield batch

        try:
            _write_dataset(frame, tmp / "base", "2024-05-01", "r1", batches=failing_batches)
        except OSError:
            pass
        failed = {
            side: {"rows_left": _run_rows(tmp / side, "r1"), "expected_rows": args.rows,
                   "extra_files": _extra_files(tmp / side / "run_date=2024-05-01" / "run_id=r1")}
            for side in ("ours", "base")
        }

        # The same run evaluated on one day, then re-evaluated on a later day (fresh roots).
        for run_date in ("2024-05-01", "2024-05-02"):
            write_partition(frame, tmp / "ours_days", run_date, "r1", METRICS_SCHEMA)
            _write_dataset(frame, tmp / "base_days", run_date, "r1")
        later = {side: {"rows": _run_rows(tmp / f"{side}_days", "r1"), "expected_rows": args.rows}
                 for side in ("ours", "base")}

    print(f"rewrite of one partition ({args.rows} rows): ours {ours_ms:.1f} ms, write_dataset {base_ms:.1f} ms")
    print(f"failed rewrite: ours {failed['ours']}, write_dataset {failed['base']}")
    print(f"re-evaluated on a later day: ours {later['ours']}, write_dataset {later['base']}")
    print(json.dumps({"benchmark": "partition_writer", "ours": round(ours_ms, 2), "baseline": round(base_ms, 2),
                      "unit": "ms per partition rewrite", "ratio": round(base_ms / ours_ms, 3),
                      "failed_rewrite": {"ours": failed["ours"], "write_dataset": failed["base"]},
                      "re_evaluated": {"ours": later["ours"], "write_dataset": later["base"]}}))


if __name__ == "__main__":
    main()
