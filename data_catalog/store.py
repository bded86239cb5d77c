"""The preprocessed-data store of a cohort: plans, fingerprints and preprocessed cases, keyed by (case
content hash, plan id). Its folders are decided by data_catalog.workspace.Workspace.

Layout, under WORKSPACE/preprocessed/COHORT/:
    fingerprints/CASE__KEY.json         per-case statistics (kept: a re-plan fingerprints only new cases)
    plans/PLAN_ID.json                  a plan: target spacing, normalisation, interpolation
    plans/pinned-CONFIGKEY.json         the plan in force for a preprocess config (data_catalog.plan)
    PLAN_ID/CASE__KEY/image.npy         float32 (1, X, Y, Z), memory-mappable
    PLAN_ID/CASE__KEY/label.npy         uint8 (X, Y, Z), when the case is labelled
    PLAN_ID/CASE__KEY/props.json        everything needed to invert each step (unet3d.resample.CaseProperties)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from filelock import FileLock

from unet3d.case_folder import case_properties, read_case_folder
from unet3d.io import write_json_atomic

from .case_worker import TMP_PREFIX, case_complete, case_dirname, fingerprint_path
from .workspace import Workspace


class PreprocessedStore:
    def __init__(self, workspace: str | Path, cohort: str):
        self.workspace = Workspace(workspace)
        self.cohort = cohort
        self.root = self.workspace.preprocessed_dir(cohort)
        self.fingerprint_dir = self.workspace.fingerprints_dir(cohort)
        self.plans_dir = self.workspace.plans_dir(cohort)

    def plan_dir(self, plan_id: str) -> Path:
        return self.workspace.plan_dir(self.cohort, plan_id)

    def save_plan(self, plan: dict) -> None:
        write_json_atomic(self.workspace.plan_file(self.cohort, plan["plan_id"]), plan, indent=1, sort_keys=True)

    def load_plan(self, plan_id: str) -> dict:
        return json.loads(self.workspace.plan_file(self.cohort, plan_id).read_text())

    def pinned(self, key: str) -> dict | None:
        path = self.workspace.pinned_plan_file(self.cohort, key)
        return json.loads(path.read_text()) if path.exists() else None

    def pin(self, key: str, plan: dict) -> None:
        self.save_plan(plan)
        write_json_atomic(self.workspace.pinned_plan_file(self.cohort, key), plan, indent=1, sort_keys=True)

    def fingerprint_file(self, case: dict, ignore_label: int | None = None) -> Path:
        return fingerprint_path(self.fingerprint_dir, case, ignore_label)

    def case_dir(self, plan_id: str, case: dict) -> Path:
        return self.plan_dir(plan_id) / case_dirname(case)

    def has_case(self, plan_id: str, case: dict) -> bool:
        return case_complete(self.case_dir(plan_id, case))

    def load_case(self, plan_id: str, case: dict, mmap: bool = True):
        """(image (1, X, Y, Z) float32, label (X, Y, Z) uint8 or None, CaseProperties)."""
        image, label, props = read_case_folder(self.case_dir(plan_id, case), mmap=mmap)
        return image, label, case_properties(props)

    def lock(self) -> FileLock:
        path = self.workspace.preprocessed_lock(self.cohort)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=24 * 3600)

    def remove_partial(self) -> int:
        """Temporary folders of a run that was killed; called under the lock, so none is in use."""
        n = 0
        for d in list(self.root.glob(f"*/{TMP_PREFIX}*")):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        for f in list(self.root.rglob(".*.tmp")):
            f.unlink(missing_ok=True)
        return n
