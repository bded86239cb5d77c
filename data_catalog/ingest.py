"""Cohort ingestion: find the cases of a source folder (data_catalog.discover), hash and validate the new or
changed ones (data_catalog.validate, in isolated worker processes for large cohorts), and record them in the
catalog (cases.parquet, issues.parquet).

A case that fails a check gets one issues row per problem (stable `code`); an `error` quarantines it, a
`warning` does not. The rest of the cohort goes on. Re-ingesting reads only files whose size or mtime
changed (and hashes only those).
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from .discover import IngestError, Source, SourceCase, discover, discover_unlabelled, normalise_modality
from .hashing import stat_fingerprint
from .parallel import WORKER_SERVER, cases_per_task
from .tables import Catalog, utc_now
from .validate import ERROR, WARNING, geometry_outliers, inspect_case, inspect_cases, issue_row

log = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestResult", "ingest"]


@dataclass
class IngestResult:
    cohort: str
    n_cases: int
    n_ok: int
    n_quarantined: int
    new: int
    changed: int
    unchanged: int
    removed: int
    n_issues: int
    cases_path: str
    issues_path: str
    notes: list[str] = field(default_factory=list)  # what discovery found and ignored

    def summary(self) -> str:
        line = (f"cohort {self.cohort}: {self.n_cases} cases ({self.n_ok} ok, {self.n_quarantined} quarantined); "
                f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged, {self.removed} removed; "
                f"{self.n_issues} issues")
        return "\n".join([line] + [f"  {note}" for note in self.notes])


def _clean(value):
    """Parquet round trips give NaN for missing strings and numpy arrays for lists; compare plain values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _previous_rows(previous: pd.DataFrame) -> dict[str, dict]:
    return {r["case_id"]: {k: _clean(v) for k, v in r.items()} for r in previous.to_dict("records")}


def _unchanged(case: SourceCase, prev: dict | None) -> bool:
    if prev is None:
        return False
    if (prev.get("image_path") or None) != case.image_path or (prev.get("label_path") or None) != case.label_path:
        return False
    try:
        image_stat = stat_fingerprint(case.image_files) if case.image_files else None
        label_stat = stat_fingerprint([case.label_path]) if case.label_path else None
    except OSError:
        return False
    return image_stat == (prev.get("image_stat") or None) and label_stat == (prev.get("label_stat") or None)


def ingest(
    source: str | Path,
    cohort: str,
    workspace: str | Path,
    labels: str | Path | None = None,
    unlabelled: str | Path | None = None,
    modality: str | None = None,
    declared_labels: dict[int, str] | None = None,
    workers: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
    ignore_label: int | None = None,
) -> IngestResult:
    """Add or refresh a cohort in the catalog. Only new or changed cases are read. `unlabelled`: a folder of scans
    without labels (data_catalog.discover.discover_unlabelled) that joins the cohort as unlabelled cases."""
    src = discover(source, labels)
    if unlabelled is not None:
        # the scans need the channels of the cohort's cases (the models' inputs)
        _add_unlabelled(src, discover_unlabelled(unlabelled, max((c.n_channels for c in src.cases), default=1)))
    declared = declared_labels or src.declared_labels
    if declared and ignore_label is not None:  # sparse labels: unannotated voxels carry the ignore value
        declared = {**declared, int(ignore_label): "ignore"}
    catalog = Catalog(workspace)
    cohort_modality = normalise_modality(modality) or src.modality

    with catalog.lock():
        all_cases = catalog.read("cases")
        all_issues = catalog.read("issues")
        previous = _previous_rows(all_cases[all_cases["cohort"] == cohort])
        prev_issues = all_issues[(all_issues["cohort"] == cohort)]
        # One pass over the previous issues, grouped by case: no per-case DataFrame filtering (O(cases x issues))
        prev_issue_records = prev_issues.to_dict("records")
        issues_of: dict[str, list[dict]] = {}
        for r in prev_issue_records:
            issues_of.setdefault(r["case_id"], []).append(r)
        now = utc_now()

        # a case whose reading killed its process last time is read again (the machine may have had less memory),
        # and one quarantined for undeclared label values (the declared labels or the ignore value may have changed)
        retry = set(prev_issues.loc[prev_issues["code"].isin(["worker_died", "label_undeclared"]), "case_id"])
        todo, reused = [], []
        for case in src.cases:
            unchanged = case.case_id not in retry and _unchanged(case, previous.get(case.case_id))
            (reused if unchanged else todo).append(case)
        log.info("cohort %s: %d cases found in %s, %d to read, %d unchanged", cohort, len(src.cases), src.root,
                 len(todo), len(reused))
        for note in src.notes:
            log.info("cohort %s: %s", cohort, note)

        inspected = _inspect_all(todo, declared, workers, progress)

        rows, issue_rows = [], []
        new = changed = 0
        for case in reused:
            prev = dict(previous[case.case_id])
            prev["unlabelled"] = case.unlabelled  # discovery decides (a catalog written before the column has none)
            rows.append(prev)
            issue_rows += [r for r in issues_of.get(case.case_id, ())
                           if r["stage"] == "ingest" and r["code"] != "geometry_outlier"]
        for case, result in zip(todo, inspected):
            prev = previous.get(case.case_id)
            same_content = prev is not None and prev.get("image_sha256") == result.get("image_sha256") \
                and prev.get("label_sha256") == result.get("label_sha256")
            if prev is None:
                new += 1
            elif not same_content:
                changed += 1
            rows.append({
                "cohort": cohort,
                "case_id": case.case_id,
                "patient_id": case.patient_id or case.case_id,
                "image_path": case.image_path,
                "label_path": case.label_path,
                "image_sha256": result.get("image_sha256"),
                "label_sha256": result.get("label_sha256"),
                "modality": cohort_modality or case.modality or "other",
                "size": result.get("size"),
                "spacing_mm": result.get("spacing_mm"),
                "status": None,
                "ingested_at": prev["ingested_at"] if same_content else now,
                "source_kind": case.source_kind,  # an unlabelled folder's DICOM series beside an MSD source
                "origin_mm": result.get("origin_mm"),
                "direction": result.get("direction"),
                "pixel_type": result.get("pixel_type"),
                "image_files": case.image_files,
                "image_stat": result.get("image_stat"),
                "label_stat": result.get("label_stat"),
                "unlabelled": case.unlabelled,
            })
            old_found = {}
            if same_content:
                old_found = {(r["code"], r["message"]): r["found_at"] for r in issues_of.get(case.case_id, ())}
            for issue in result["issues"]:
                issue_rows.append({"cohort": cohort, "case_id": case.case_id, "stage": "ingest",
                                   "found_at": old_found.get((issue["code"], issue["message"]), now), **issue})

        prev_outliers = {(r["case_id"], r["message"]): r["found_at"]
                         for r in prev_issue_records if r["code"] == "geometry_outlier"}
        for cid, message in geometry_outliers(rows).items():
            issue_rows.append({"cohort": cohort, "case_id": cid, "stage": "ingest", "code": "geometry_outlier",
                               "severity": WARNING, "path": None, "message": message,
                               "found_at": prev_outliers.get((cid, message), now)})
        # Problems found later (preprocessing) stay recorded while the case's content is unchanged.
        current = {(r["case_id"], r.get("image_sha256"), r.get("label_sha256")) for r in rows}
        for r in (r for r in prev_issue_records if r["stage"] != "ingest"):
            prev = previous.get(r["case_id"])
            if prev is not None and (r["case_id"], prev.get("image_sha256"), prev.get("label_sha256")) in current:
                issue_rows.append(r)

        errors = {r["case_id"] for r in issue_rows if r["severity"] == ERROR}
        for row in rows:
            row["status"] = "quarantined" if row["case_id"] in errors else "ok"
        removed = len(set(previous) - {c.case_id for c in src.cases})

        cases_df = pd.DataFrame(rows)
        issues_df = pd.DataFrame(issue_rows)
        other_cases = all_cases[all_cases["cohort"] != cohort]
        other_issues = all_issues[all_issues["cohort"] != cohort]
        catalog.write("cases", _concat(other_cases, cases_df).sort_values(["cohort", "case_id"]))
        catalog.write("issues", _concat(other_issues, issues_df))

    n_ok = int((cases_df["status"] == "ok").sum()) if len(cases_df) else 0
    return IngestResult(cohort, len(cases_df), n_ok, len(cases_df) - n_ok, new, changed,
                        len(reused) + (len(todo) - new - changed), removed, len(issues_df),
                        str(catalog.cases_path), str(catalog.issues_path), list(src.notes))


def _add_unlabelled(src: Source, extra: Source) -> None:
    """The unlabelled folder's cases join the source's; a case id the source already has (in any letter case) is
    a duplicate_case_id of the unlabelled scan, which gets a distinct id."""
    taken = {c.case_id.casefold() for c in src.cases}
    for case in extra.cases:
        if case.case_id.casefold() in taken:
            case.issues.append(("duplicate_case_id", case.image_path or "", f"unlabelled scan {case.case_id} has the "
                                f"case id of a case of {src.root}"))
            case.case_id = f"{case.case_id}__unlabelled"
        taken.add(case.case_id.casefold())
        src.cases.append(case)
    src.cases.sort(key=lambda c: c.case_id)
    src.notes.extend(extra.notes)


def _concat(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    frames = [f for f in (a, b) if len(f)]
    if not frames:
        return b if len(b.columns) else a
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


def _inspect_all(cases: list[SourceCase], declared, workers: int, progress) -> list[dict]:
    wrap = progress or (lambda it, **_: it)
    if workers > 1 and len(cases) > 16:
        return _inspect_in_processes(cases, declared, workers, wrap)
    return [inspect_case(c, declared) for c in wrap(cases, total=len(cases), desc="ingest")]


def _inspect_in_processes(cases: list[SourceCase], declared, workers: int, wrap) -> list[dict]:
    """inspect_case over worker processes, a few cases per task (a small case takes a few milliseconds, about
    what handing it to a process and back costs). A worker that dies (an out-of-memory kill, a crash in a
    reader) breaks the pool: the cases in flight are then inspected one process each, the one whose process
    dies gets a `worker_died` issue, and the rest of the cohort goes on in a fresh pool."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    results: list[dict | None] = [None] * len(cases)
    per_task = cases_per_task(len(cases), workers)
    todo = [list(range(i, min(i + per_task, len(cases)))) for i in range(0, len(cases), per_task)][::-1]
    window = 2 * workers  # tasks in flight: a dead worker makes only their cases suspects
    # forked from the command's worker server, or spawned; never forked from this multi-threaded Prefect process
    ctx = WORKER_SERVER.context()
    bar = iter(wrap(_Ticks(len(cases)), total=len(cases), desc="ingest"))
    while todo:
        suspects: list[int] = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            running: dict = {}
            try:
                while todo or running:
                    while todo and len(running) < window:
                        chunk = todo.pop()  # a stack: pop() takes cases in order
                        running[pool.submit(inspect_cases, inspect_case, [cases[i] for i in chunk], declared)] = chunk
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        for i, result in zip(running[future], future.result()):  # BrokenProcessPool: in `running`
                            results[i] = result
                            next(bar, None)
                        del running[future]
            except BrokenProcessPool:
                suspects = sorted(i for chunk in running.values() for i in chunk)
        for i in suspects:  # one process each: the case that kills its process is found and recorded
            results[i] = _inspect_isolated(cases[i], declared, ctx)
            next(bar, None)
    for _ in bar:
        pass
    return results  # type: ignore[return-value]


class _Ticks:
    """An iterable of n ticks for the progress wrapper (which wants an iterable and a total)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _inspect_child(conn, inspect, case: SourceCase, declared) -> None:
    conn.send(inspect(case, declared))
    conn.close()


def _inspect_isolated(case: SourceCase, declared, ctx) -> dict:
    """inspect_case in a process of its own; its death becomes the case's `worker_died` issue."""
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_inspect_child, args=(sender, inspect_case, case, declared), daemon=True)
    process.start()
    sender.close()
    try:
        result = receiver.recv()  # EOFError when the child dies without answering
    except EOFError:
        result = None
    finally:
        receiver.close()
        process.join()
    if result is not None:
        return result
    code = process.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    hint = " (SIGKILL: usually the out-of-memory killer)" if code == -9 else ""
    return {"case_id": case.case_id,
            "issues": [issue_row(c, p, m) for c, p, m in case.issues] +
                      [issue_row("worker_died", case.image_path or case.label_path,
                              f"the process reading this case died ({how}{hint}); the case is read again on the "
                              f"next ingest")]}
