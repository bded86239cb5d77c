"""The preprocessed-data store and the preprocessing stage: fingerprint -> plan -> preprocess, per case,
on Dask, keyed by (case content hash, plan id).

Layout, under WORKSPACE/preprocessed/COHORT/:
    fingerprints/CASE__KEY.json         per-case statistics (kept: a re-plan fingerprints only new cases)
    plans/PLAN_ID.json                  a plan: target spacing, normalisation, interpolation
    plans/pinned-CONFIGKEY.json         the plan in force for a preprocess config (see below)
    PLAN_ID/CASE__KEY/image.npy         float32 (1, X, Y, Z), memory-mappable
    PLAN_ID/CASE__KEY/label.npy         uint8 (X, Y, Z), when the case is labelled
    PLAN_ID/CASE__KEY/props.json        everything needed to invert each step (unet3d.resample.CaseProperties)

The plan is pinned the first time a cohort is preprocessed with a given config: adding cases later does not
move the target spacing or the CT intensity window, so N new cases cost N preprocessings, not a rerun of
the whole cohort (nnU-Net's #176). `refresh` (or `unet3d preprocess --refresh preprocess`) re-plans;
a re-plan that lands on the same plan id still reuses every case.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from unet3d.resample import ANISOTROPY_THRESHOLD, CaseProperties, canonical_axes

from .hashing import stable_hash
from .parallel import dask_client, map_cases, worker_memory
from .preprocess import (PREPROCESS_VERSION, TMP_PREFIX, _atomic_json, case_complete, case_dirname, fingerprint_case,
                         preprocess_case)
from .tables import Catalog, utc_now

log = logging.getLogger(__name__)

CASE_COLUMNS = ["case_id", "patient_id", "image_path", "label_path", "image_files", "image_sha256", "label_sha256",
                "source_kind"]


def case_records(cases: pd.DataFrame) -> list[dict]:
    """Catalog rows as small picklable dicts for workers."""
    out = []
    for row in cases[CASE_COLUMNS].to_dict("records"):
        files = row.get("image_files")
        row["image_files"] = list(files) if files is not None and len(files) else None
        row["label_path"] = row["label_path"] if isinstance(row.get("label_path"), str) else None
        row["label_sha256"] = row["label_sha256"] if isinstance(row.get("label_sha256"), str) else None
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------
def plan_key(preprocess_config: dict, modality: str) -> str:
    relevant = {k: preprocess_config.get(k) for k in ("target_spacing", "normalisation", "image_interpolation",
                                                      "label_interpolation")}
    return stable_hash({"config": relevant, "modality": modality, "version": PREPROCESS_VERSION}, 12)


def make_plan(fingerprints: list[dict], modality: str, preprocess_config: dict) -> dict:
    """Target spacing, normalisation and interpolation for a cohort, from its per-case fingerprints."""
    if not fingerprints:
        raise ValueError("no case could be fingerprinted: nothing to plan from")
    spacings = np.array([f["canonical_spacing"] for f in fingerprints], dtype=np.float64)
    if preprocess_config.get("target_spacing", "auto") == "auto":
        target = np.median(spacings, axis=0)
        if target.max() / target.min() > ANISOTROPY_THRESHOLD:
            # Strongly anisotropic: a median thick-slice spacing would blur the thinner-sliced cases; take
            # the 10th percentile of that axis (nnU-Net's rule), so most cases are upsampled along it.
            thick = int(np.argmax(target))
            target[thick] = np.percentile(spacings[:, thick], 10)
    else:
        target = np.asarray(preprocess_config["target_spacing"], dtype=np.float64)
    target = np.round(target, 6)

    scheme = preprocess_config.get("normalisation", "auto")
    if scheme == "auto":
        scheme = "ct" if modality == "CT" else "zscore"
    norm: dict = {"scheme": scheme}
    if scheme == "ct":
        sample = np.concatenate([np.asarray(f["foreground_sample"], dtype=np.float64) for f in fingerprints
                                 if f.get("labelled")] or [np.asarray(f["foreground_sample"]) for f in fingerprints])
        norm.update(clip_low=float(np.percentile(sample, 0.5)), clip_high=float(np.percentile(sample, 99.5)),
                    mean=float(sample.mean()), std=float(sample.std()))
    shapes = np.array([np.asarray(f.get("cropped_shape", f["canonical_shape"])) * np.asarray(f["canonical_spacing"])
                       / target for f in fingerprints])
    plan = {
        "target_spacing": [float(t) for t in target],
        "normalisation": norm,
        "image_order": 3 if preprocess_config.get("image_interpolation", "cubic") == "cubic" else 1,
        "label_mode": preprocess_config.get("label_interpolation", "linear"),
        "version": PREPROCESS_VERSION,
    }
    plan["plan_id"] = stable_hash(plan, 12)
    plan["median_shape"] = [int(round(s)) for s in np.median(shapes, axis=0)]
    plan["modality"] = modality
    plan["n_cases_planned"] = len(fingerprints)
    plan["spacing_factor"] = 1.0
    return plan


def scaled_plan(plan: dict, factor: float) -> dict:
    """The same plan at a coarser spacing (a cascade's first stage)."""
    if factor == 1.0:
        return plan
    out = json.loads(json.dumps(plan))
    out["target_spacing"] = [round(t * factor, 6) for t in plan["target_spacing"]]
    out["median_shape"] = [max(1, int(round(s / factor))) for s in plan["median_shape"]]
    out["spacing_factor"] = factor
    identity = {k: out[k] for k in ("target_spacing", "normalisation", "image_order", "label_mode", "version")}
    out["plan_id"] = stable_hash(identity, 12)
    return out


# ---------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------
class PreprocessedStore:
    def __init__(self, workspace: str | Path, cohort: str):
        self.root = Path(workspace) / "preprocessed" / cohort
        self.fingerprint_dir = self.root / "fingerprints"
        self.plans_dir = self.root / "plans"

    def plan_dir(self, plan_id: str) -> Path:
        return self.root / plan_id

    def save_plan(self, plan: dict) -> None:
        self.plans_dir.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.plans_dir / f"{plan['plan_id']}.json", plan)

    def load_plan(self, plan_id: str) -> dict:
        return json.loads((self.plans_dir / f"{plan_id}.json").read_text())

    def pinned(self, key: str) -> dict | None:
        path = self.plans_dir / f"pinned-{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def pin(self, key: str, plan: dict) -> None:
        self.save_plan(plan)
        _atomic_json(self.plans_dir / f"pinned-{key}.json", plan)

    def case_dir(self, plan_id: str, case: dict) -> Path:
        return self.plan_dir(plan_id) / case_dirname(case)

    def has_case(self, plan_id: str, case: dict) -> bool:
        return case_complete(self.case_dir(plan_id, case))

    def load_case(self, plan_id: str, case: dict, mmap: bool = True):
        """(image (1, X, Y, Z) float32, label (X, Y, Z) uint8 or None, CaseProperties)."""
        d = self.case_dir(plan_id, case)
        mode = "r" if mmap else None
        image = np.load(d / "image.npy", mmap_mode=mode)
        label = np.load(d / "label.npy", mmap_mode=mode) if (d / "label.npy").exists() else None
        meta = json.loads((d / "props.json").read_text())
        props = CaseProperties.from_dict({k: meta[k] for k in CaseProperties.__dataclass_fields__ if k in meta})
        return image, label, props

    def lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=24 * 3600)

    def remove_partial(self) -> int:
        """Temporary folders of a run that was killed; called under the lock, so none is in use."""
        n = 0
        for d in list(self.root.glob(f"*/{TMP_PREFIX}*")):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        for f in list(self.root.rglob(".*.tmp")):
            f.unlink(missing_ok=True)
        return n


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


def run_preprocessing(workspace: str | Path, cohort: str, preprocess_config: dict, modality: str | None = None,
                      spacing_factors: tuple[float, ...] = (1.0,), refresh: bool = False, progress: bool = True,
                      case_ids: list[str] | None = None) -> PreprocessResult:
    """Fingerprint, plan and preprocess every `ok` case of a cohort; only missing (case, plan) pairs do work."""
    t0 = time.perf_counter()
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
    key = plan_key(preprocess_config, modality)

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
                client_cm = dask_client(preprocess_config.get("workers", 2), preprocess_config.get("dask_address"),
                                        preprocess_config.get("memory_limit", "auto"))
                client = client_cm.__enter__()
            return client

        try:
            if plan is None:
                plan = _plan_cohort(store, cases, cases_df, modality, preprocess_config, result, get_client, progress)
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


def needs_intensity_fingerprint(preprocess_config: dict, modality: str) -> bool:
    scheme = preprocess_config.get("normalisation", "auto")
    return scheme == "ct" or (scheme == "auto" and modality == "CT")


def header_fingerprints(cases_df: pd.DataFrame) -> list[dict]:
    """Canonical spacings straight from the catalog (headers): all a non-CT plan needs."""
    out = []
    for row in cases_df.to_dict("records"):
        perm, _ = canonical_axes(np.asarray(row["direction"], dtype=np.float64).reshape(3, 3))
        out.append({"case_id": row["case_id"], "canonical_spacing": [float(row["spacing_mm"][p]) for p in perm],
                    "canonical_shape": [int(row["size"][p]) for p in perm], "labelled": row["label_path"] is not None})
    return out


def _plan_cohort(store, cases, cases_df, modality, preprocess_config, result, get_client, progress) -> dict:
    """Fingerprint (voxels only where the plan needs intensities: CT) and plan."""
    if not needs_intensity_fingerprint(preprocess_config, modality):
        return make_plan(header_fingerprints(cases_df), modality, preprocess_config)
    todo = [c for c in cases if not (store.fingerprint_dir / f"{case_dirname(c)}.json").exists()]
    failures = []
    if todo:
        fps = map_cases(fingerprint_case, todo, str(store.fingerprint_dir), client=get_client(),
                        desc="fingerprint", progress=progress)
        failures = [f for f in fps if f["status"] == "failed"]
        result.fingerprinted = sum(f["status"] == "done" for f in fps)
    result.failed += [dict(f, step="fingerprint") for f in failures]
    failed_ids = {f["case_id"] for f in failures}
    fingerprints = [json.loads((store.fingerprint_dir / f"{case_dirname(c)}.json").read_text())
                    for c in cases if c["case_id"] not in failed_ids]
    return make_plan(fingerprints, modality, preprocess_config)


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
