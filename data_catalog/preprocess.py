"""The preprocessing stage: fingerprint -> plan -> preprocess every `ok` case of a cohort into the store,
per case on Dask; only missing (case, plan) pairs do work. A case whose data cannot be preprocessed becomes
an issues row and is quarantined; a failure of the machine (data_catalog.case_worker.EnvironmentFault)
stops the stage and quarantines nothing.

The planning is in data_catalog.plan, the per-case work in data_catalog.case_worker, the folders in
data_catalog.store.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from unet3d.config import PreprocessConfig

from .case_worker import case_records, preprocess_case, remove_stale_versions
from .channels import cohort_channels
from .parallel import dask_client, map_cases, worker_memory
from .plan import plan_cohort, plan_key, scaled_plan
from .store import PreprocessedStore
from .tables import Catalog, utc_now

log = logging.getLogger(__name__)


@dataclass
class PreprocessResult:
    cohort: str
    plan_ids: dict[float, str]  # spacing factor -> plan id
    n_cases: int
    fingerprinted: int = 0
    processed: int = 0  # the work counter: cases actually resampled and written in this run
    cached: int = 0
    failed: list[dict] = field(default_factory=list)
    removed_partial: int = 0
    seconds: float = 0.0
    worker_memory: dict = field(default_factory=dict)

    def summary(self) -> str:
        plans = ", ".join(f"x{f:g}: {p}" for f, p in self.plan_ids.items())
        return (f"preprocess {self.cohort}: {self.n_cases} cases, {self.processed} processed, {self.cached} cached, "
                f"{len(self.failed)} failed (plans {plans}) in {self.seconds:.1f} s")


def run_preprocessing(workspace: str | Path, cohort: str, preprocess_config: PreprocessConfig | dict,
                      modality: str | None = None,
                      spacing_factors: tuple[float, ...] = (1.0,), refresh: bool = False, progress: bool = True,
                      case_ids: list[str] | None = None, ignore_label: int | None = None) -> PreprocessResult:
    """Fingerprint, plan and preprocess every `ok` case of a cohort; only missing (case, plan) pairs do work.
    `ignore_label`: the label value of unannotated voxels (sparse labels), not foreground for the plan."""
    t0 = time.perf_counter()
    cfg = PreprocessConfig.model_validate(preprocess_config)
    catalog = Catalog(workspace)
    if refresh:
        retried = clear_failures(catalog, cohort)
        if retried:
            log.info("refresh: %d cases that failed preprocessing before are tried again", retried)
    cases_df = catalog.cases(cohort=cohort, status="ok")
    if case_ids is not None:
        cases_df = cases_df[cases_df["case_id"].isin(case_ids)]
    if cases_df.empty:
        raise ValueError(f"cohort {cohort!r} has no ok cases in the catalog; run `unet3d ingest` first")
    modality = modality or str(cases_df["modality"].mode().iloc[0])
    cases = case_records(cases_df)
    store = PreprocessedStore(workspace, cohort)
    result = PreprocessResult(cohort, {}, len(cases))
    channels, odd = cohort_channels(cases)
    if odd:  # a case with other channels than the cohort's is quarantined; the others go on
        odd_ids = {f["case_id"] for f in odd}
        cases = [c for c in cases if c["case_id"] not in odd_ids]
        result.failed += odd
    key = plan_key(cfg, modality, channels, ignore_label)

    with store.lock():
        result.removed_partial = store.remove_partial()
        if result.removed_partial:
            log.warning("removed %d partial case folders left by an interrupted run", result.removed_partial)
        plan = None if refresh else store.pinned(key)
        client_cm = None
        client = None

        def get_client():
            nonlocal client_cm, client
            if client is None:
                client_cm = dask_client(cfg.workers, cfg.dask_address, cfg.memory_limit)
                client = client_cm.__enter__()
            return client

        try:
            if plan is None:
                plan, result.fingerprinted, failures = plan_cohort(store, cases, cases_df, modality, cfg,
                                                                   get_client, progress, channels, ignore_label)
                result.failed += failures
                store.pin(key, plan)
                log.info("planned %s: target spacing %s mm, normalisation %s", plan["plan_id"],
                         plan["target_spacing"], plan["normalisation"]["scheme"])
            failed_ids = {f["case_id"] for f in result.failed}
            for factor in spacing_factors:
                p = scaled_plan(plan, factor)
                store.save_plan(p)
                result.plan_ids[factor] = p["plan_id"]
                store.plan_dir(p["plan_id"]).mkdir(parents=True, exist_ok=True)
                processed, cached, new_failures = _preprocess_missing(
                    store, p, [c for c in cases if c["case_id"] not in failed_ids], get_client, progress,
                    f"preprocess x{factor:g}")
                result.processed += processed
                result.cached += cached
                result.failed += new_failures
                failed_ids |= {f["case_id"] for f in new_failures}
            if client is not None:
                result.worker_memory = worker_memory(client)
        finally:
            if client_cm is not None:
                client_cm.__exit__(None, None, None)

    if result.failed:
        record_failures(catalog, cohort, result.failed)
    result.seconds = time.perf_counter() - t0
    return result


def _preprocess_missing(store: PreprocessedStore, plan: dict, cases: list[dict], get_client, progress: bool,
                        desc: str) -> tuple[int, int, list[dict]]:
    """Preprocess under `plan` the cases of `cases` it does not have yet (a saved plan, its folder made):
    (cases processed now, cases found done, failures as {"case_id", "error", "step"})."""
    plan_dir = store.plan_dir(plan["plan_id"])
    plan_dir.mkdir(parents=True, exist_ok=True)
    pending = [c for c in cases if not store.has_case(plan["plan_id"], c)]
    outs = map_cases(preprocess_case, pending, plan, str(plan_dir), client=get_client(), desc=desc,
                     progress=progress) if pending else []
    # after the cases' new versions are published (also those of a run stopped before this line)
    removed = remove_stale_versions(plan_dir, cases)
    if removed:
        log.info("%s: removed %d older versions of cases whose content changed", desc, removed)
    failures = [dict(o, step=desc) for o in outs if o["status"] == "failed"]
    return (sum(o["status"] == "done" for o in outs),
            len(cases) - len(pending) + sum(o["status"] == "cached" for o in outs), failures)


def preprocess_under_plans(workspace: str | Path, cohort: str, plan_ids: list[str], case_ids: list[str],
                           preprocess_config: PreprocessConfig | dict, progress: bool = True) -> list[dict]:
    """Preprocess the `ok` cases `case_ids` under saved plans that are not the current one, where not done yet:
    a model trained under an earlier plan (the champion, after `preprocess` settings changed) predicting cases
    that arrived since. Returns the failures, recorded and quarantined as run_preprocessing records them."""
    cfg = PreprocessConfig.model_validate(preprocess_config)
    store = PreprocessedStore(workspace, cohort)
    cases_df = Catalog(workspace).cases(cohort=cohort, status="ok")
    cases = case_records(cases_df[cases_df["case_id"].isin(case_ids)])
    failures: list[dict] = []
    if not cases:
        return failures
    with store.lock(), contextlib.ExitStack() as stack:
        client = None

        def get_client():
            nonlocal client
            if client is None:
                client = stack.enter_context(dask_client(cfg.workers, cfg.dask_address, cfg.memory_limit))
            return client

        for plan_id in plan_ids:
            plan = store.load_plan(plan_id)
            failed = {f["case_id"] for f in failures}
            processed, _, new_failures = _preprocess_missing(store, plan, [c for c in cases if c["case_id"] not in failed],
                                                             get_client, progress, f"preprocess {plan_id}")
            if processed:
                log.info("preprocess %s: %d cases preprocessed under plan %s (a model trained under it predicts them)",
                         cohort, processed, plan_id)
            failures += new_failures
    if failures:
        record_failures(Catalog(workspace), cohort, failures)
    return failures


def record_failures(catalog: Catalog, cohort: str, failures: list[dict]) -> None:
    """A case that failed preprocessing becomes an issues row and is quarantined; the others go on."""
    now = utc_now()
    with catalog.lock():
        cases = catalog.read("cases")
        issues = catalog.read("issues")
        rows = []
        for f in failures:
            path = cases.loc[(cases["cohort"] == cohort) & (cases["case_id"] == f["case_id"]), "image_path"]
            rows.append({"cohort": cohort, "case_id": f["case_id"], "path": path.iloc[0] if len(path) else None,
                         "severity": "error", "code": "preprocess_failed", "stage": "preprocess",
                         "message": f"{f.get('step', 'preprocess')}: {f.get('error')}", "found_at": now})
            log.error("case %s failed %s: %s", f["case_id"], f.get("step"), f.get("error"))
        ids = {f["case_id"] for f in failures}
        cases.loc[(cases["cohort"] == cohort) & cases["case_id"].isin(ids), "status"] = "quarantined"
        stale = (issues["cohort"] == cohort) & issues["case_id"].isin(ids) & (issues["code"] == "preprocess_failed")
        issues = pd.concat([issues[~stale], pd.DataFrame(rows)], ignore_index=True)
        catalog.write("cases", cases)
        catalog.write("issues", issues)


def clear_failures(catalog: Catalog, cohort: str) -> int:
    """Forget earlier preprocessing failures (for a refresh): their cases are tried again."""
    with catalog.lock():
        cases = catalog.read("cases")
        issues = catalog.read("issues")
        mine = issues["cohort"] == cohort
        failed = mine & (issues["code"] == "preprocess_failed")
        if not failed.any():
            return 0
        issues = issues[~failed]
        still_bad = set(issues.loc[mine[~failed] & (issues["severity"] == "error"), "case_id"])
        retry = (cases["cohort"] == cohort) & (cases["status"] == "quarantined") & ~cases["case_id"].isin(still_bad)
        cases.loc[retry, "status"] = "ok"
        catalog.write("cases", cases)
        catalog.write("issues", issues)
        return int(retry.sum())
