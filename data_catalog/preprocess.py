"""The preprocessing stage: fingerprint -> plan -> preprocess every `ok` case of a cohort into the store,
per case on Dask; only missing (case, plan) pairs do work. A case whose data cannot be preprocessed becomes
an issues row and is quarantined; a failure of the machine (data_catalog.case_worker.EnvironmentFault)
stops the stage and quarantines nothing.

The planning is in data_catalog.plan, the per-case work in data_catalog.case_worker, the folders in
data_catalog.store.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from unet3d.config import PreprocessConfig

from .case_worker import case_records, preprocess_case
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
                pending = [c for c in cases if c["case_id"] not in failed_ids and not store.has_case(p["plan_id"], c)]
                result.cached += len(cases) - len(pending) - len(failed_ids)
                if not pending:
                    continue
                outs = map_cases(preprocess_case, pending, p, str(store.plan_dir(p["plan_id"])), client=get_client(),
                                 desc=f"preprocess x{factor:g}", progress=progress)
                result.processed += sum(o["status"] == "done" for o in outs)
                result.cached += sum(o["status"] == "cached" for o in outs)
                new_failures = [dict(o, step=f"preprocess x{factor:g}") for o in outs if o["status"] == "failed"]
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
