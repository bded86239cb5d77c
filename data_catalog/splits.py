"""The train/val/test split: seeded, grouped by patient, and stable.

Stability is the point: once a case is assigned, it keeps its split in every later run, and a new case of
a patient already assigned joins that patient's split. So no test case (and no scan of a test patient)
ever reaches training, however the cohort grows. New patients are dealt in a seeded order, each to the
split furthest below its target share, which keeps the ratios close to 8:1:1 as cases arrive.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from unet3d.config import SPLIT_DEFAULTS

from .tables import Catalog, utc_now

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _seeded_order(keys: Sequence[str], seed: int) -> list[str]:
    """A deterministic shuffle that does not depend on which other keys exist (adding a patient does not
    reorder the others)."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def assign_groups(new_groups: dict[str, int], counts: dict[str, int], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """Deal new groups (group -> number of cases) to splits, each to the one furthest below its share."""
    counts = dict(counts)
    out = {}
    for group in _seeded_order(list(new_groups), seed):
        total = sum(counts.values()) + new_groups[group]
        deficit = {s: r * total - counts[s] for s, r in zip(SPLITS, ratios) if r > 0}
        choice = max(deficit, key=lambda s: (deficit[s], -SPLITS.index(s)))
        out[group] = choice
        counts[choice] += new_groups[group]
    return out


@dataclass
class SplitResult:
    cohort: str
    counts: dict[str, int]
    new: int
    path: str

    def summary(self) -> str:
        c = ", ".join(f"{k} {self.counts.get(k, 0)}" for k in SPLITS)
        return f"split {self.cohort}: {c} ({self.new} newly assigned)"


def update_splits(workspace: str | Path, cohort: str, ratios: Sequence[float] = tuple(SPLIT_DEFAULTS.ratios),
                  seed: int = SPLIT_DEFAULTS.seed, group_by: str = SPLIT_DEFAULTS.group_by) -> SplitResult:
    """Assign every labelled `ok` case of the cohort that has no split yet; never move an assigned one."""
    catalog = Catalog(workspace)
    with catalog.lock():
        cases = catalog.cases(cohort=cohort, status="ok")
        # an unlabelled scan (imagesTs/, cohort.unlabelled_source) is segmented, never trained or tested on
        cases = cases[cases["label_path"].notna() & ~cases["unlabelled"].eq(True)]
        splits = catalog.read("splits")
        mine = splits[splits["cohort"] == cohort]
        assigned = dict(zip(mine["case_id"], mine["split"]))
        group_of_case = dict(zip(mine["case_id"], mine["patient_id"] if group_by == "patient_id" else mine["case_id"]))
        group_split = {}
        for cid, split in assigned.items():
            group_split.setdefault(group_of_case[cid], split)

        new_cases = cases[~cases["case_id"].isin(assigned)]
        groups = new_cases["patient_id"] if group_by == "patient_id" else new_cases["case_id"]
        new_groups: dict[str, int] = {}
        for g in groups:
            if g not in group_split:
                new_groups[g] = new_groups.get(g, 0) + 1
        live = mine[mine["case_id"].isin(cases["case_id"])]
        counts = {s: int((live["split"] == s).sum()) for s in SPLITS}
        # Cases of already-assigned patients first: they are not a choice, but they count.
        for g in groups:
            if g in group_split:
                counts[group_split[g]] += 1
        group_split.update(assign_groups(new_groups, counts, ratios, seed))

        now = utc_now()
        rows = [{"cohort": cohort, "case_id": r["case_id"], "patient_id": r["patient_id"],
                 "split": group_split[r["patient_id"] if group_by == "patient_id" else r["case_id"]],
                 "seed": seed, "assigned_at": now} for r in new_cases.to_dict("records")]
        if rows:
            frames = [f for f in (splits, pd.DataFrame(rows)) if len(f)]
            catalog.write("splits", pd.concat(frames, ignore_index=True))
            splits = catalog.read("splits")
        mine = splits[(splits["cohort"] == cohort) & splits["case_id"].isin(cases["case_id"])]
        counts = {s: int((mine["split"] == s).sum()) for s in SPLITS}
    if len(mine) and counts["val"] == 0:
        log.warning("cohort %s: no validation case (only %d labelled cases)", cohort, len(mine))
    return SplitResult(cohort, counts, len(rows), str(catalog.splits_path))


def split_table(workspace: str | Path, cohort: str) -> pd.DataFrame:
    """The cohort's current split joined with its catalog rows (ok, labelled cases only)."""
    catalog = Catalog(workspace)
    cases = catalog.cases(cohort=cohort, status="ok")
    splits = catalog.read("splits")
    splits = splits[splits["cohort"] == cohort][["case_id", "split"]]
    return cases.merge(splits, on="case_id", how="inner")
