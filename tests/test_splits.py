"""The split: seeded, grouped by patient, stable as the cohort grows."""
from __future__ import annotations

import pandas as pd
import pytest

from data_catalog.splits import assign_groups, update_splits
from data_catalog.tables import Catalog, utc_now


def _catalog_with(ws, cases: list[tuple[str, str]], cohort="c"):
    now = utc_now()
    rows = [{"cohort": cohort, "case_id": cid, "patient_id": pid, "image_path": f"/x/{cid}.nii.gz",
             "label_path": f"/y/{cid}.nii.gz", "image_sha256": cid, "label_sha256": cid, "modality": "CT",
             "size": [4, 4, 4], "spacing_mm": [1.0, 1.0, 1.0], "status": "ok", "ingested_at": now} for cid, pid in cases]
    Catalog(ws).write("cases", pd.DataFrame(rows))


def test_ratios_and_patient_grouping(tmp_path):
    cases = [(f"case{i:03d}", f"p{i // 2:03d}") for i in range(200)]  # two scans per patient
    _catalog_with(tmp_path, cases)
    result = update_splits(tmp_path, "c", seed=0)
    assert result.counts == {"train": 160, "val": 20, "test": 20}
    splits = Catalog(tmp_path).read("splits")
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    assert set(splits.columns) >= {"cohort", "case_id", "patient_id", "split", "seed", "assigned_at"}


def test_seed_changes_assignment_and_is_deterministic(tmp_path):
    cases = [(f"c{i}", f"p{i}") for i in range(50)]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _catalog_with(tmp_path / name, cases)
        update_splits(tmp_path / name, "c", seed=seed)
    get = lambda n: Catalog(tmp_path / n).read("splits").set_index("case_id")["split"]
    assert get("a").equals(get("b"))
    assert not get("a").equals(get("c"))


def test_new_cases_never_move_old_ones_and_follow_their_patient(tmp_path):
    cases = [(f"c{i:03d}", f"p{i:03d}") for i in range(40)]
    _catalog_with(tmp_path, cases)
    update_splits(tmp_path, "c")
    before = Catalog(tmp_path).read("splits").set_index("case_id")["split"]
    test_patient = before[before == "test"].index[0].replace("c", "p")
    more = cases + [(f"n{i:03d}", f"q{i:03d}") for i in range(60)] + [("followup", test_patient)]
    _catalog_with(tmp_path, more)
    result = update_splits(tmp_path, "c", seed=123)  # even with another seed
    after = Catalog(tmp_path).read("splits").set_index("case_id")["split"]
    assert after[before.index].equals(before)
    assert after["followup"] == "test"  # a test patient's new scan never reaches training
    assert result.new == 61
    assert abs(result.counts["train"] / 101 - 0.8) < 0.05


def test_assign_groups_fills_the_largest_deficit():
    out = assign_groups({"a": 1}, {"train": 8, "val": 0, "test": 1}, [0.8, 0.1, 0.1], 0)
    assert out == {"a": "val"}
    with pytest.raises(KeyError):
        assign_groups({"a": 1}, {"train": 0}, [0.8, 0.1, 0.1], 0)
