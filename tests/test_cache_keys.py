"""The cache-key rules of flows/cache_keys.py, without Prefect or a pipeline run: what changes a stage's key
(its config section, an upstream key, a case's content, a split assignment, the code of a listed source) and
what must not (runtime-only knobs, timestamps, the order of dict keys)."""
from __future__ import annotations

import pandas as pd
import pytest

import flows.cache_keys as K
from unet3d.config import parse_config

CASES = [("c1", "p1", "a1", "l1", "train"), ("c2", "p2", "a2", "l2", "train"), ("c3", "p3", "a3", "l3", "val"),
         ("c4", "p4", "a4", "l4", "test")]


def _config(**sections):
    data = {"cohort": {"name": "tiny", "modality": "CT"}, "labels": {1: "organ", 2: "lesion"},
            "stages": [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}, "spacing_factor": 2.0},
                       {"name": "lesion", "classes": {1: "lesion"}, "merge": {1: [2]}, "roi_from": "organ"}],
            "train": {"features": [4, 8], "max_epochs": 2}}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return parse_config(data)


class _Catalog:
    """The catalog tables the keys read, from a list of (case, patient, image sha, label sha, split) rows."""
    rows = CASES
    ingested_at = "2026-01-01T00:00:00"

    def __init__(self, workspace):
        pass

    def cases(self, cohort=None):
        return pd.DataFrame({"case_id": [r[0] for r in self.rows], "patient_id": [r[1] for r in self.rows],
                             "image_sha256": [r[2] for r in self.rows], "label_sha256": [r[3] for r in self.rows],
                             "status": "ok", "ingested_at": self.ingested_at, "cohort": cohort})

    def read(self, table):
        assert table == "splits"
        return pd.DataFrame({"cohort": "tiny", "case_id": [r[0] for r in self.rows], "split": [r[4] for r in self.rows]})


@pytest.fixture
def catalog(monkeypatch):
    state = type("State", (_Catalog,), {})

    def split_table(workspace, cohort):
        frame = state("ws").cases(cohort)
        return frame.assign(split=[r[4] for r in state.rows], label_path=[f"/l/{r[0]}.nii.gz" for r in state.rows])

    monkeypatch.setattr(K, "Catalog", state)
    monkeypatch.setattr(K, "split_table", split_table)
    return state


PREPROCESS = {"plan_ids": {"1.0": "plan-a", "2.0": "plan-b"}}
TRAINS = [{"key": "t1", "checkpoint_sha256": "s1"}, {"key": "t2", "checkpoint_sha256": "s2"}]


def _keys(cfg) -> dict[str, str]:
    stages = cfg.resolved_stages()
    return {"preprocess": K.key_preprocess("ws", cfg), "split": K.key_split("ws", cfg),
            **{f"train-{s.name}": K.key_train("ws", cfg, s, PREPROCESS) for s in stages},
            "infer": K.key_infer("ws", cfg, TRAINS, PREPROCESS), "evaluate": K.key_evaluate(cfg, {"key": "i"}),
            "report": K.key_report(cfg, {"key": "e"})}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k] != after[k]}


@pytest.mark.parametrize("section, value, stages", [
    ("preprocess", {"target_spacing": [1.0, 1.0, 2.0]}, {"preprocess"}),
    ("split", {"seed": 3}, {"split"}),
    ("train", {"lr": 0.02}, {"train-organ", "train-lesion"}),
    ("infer", {"overlap": 0.25}, {"infer"}),
    ("evaluate", {"n_boot": 10}, {"evaluate", "report"}),
])
def test_a_stage_config_section_changes_that_stage_key(catalog, section, value, stages):
    assert _changed(_keys(_config()), _keys(_config(**{section: value}))) == stages


@pytest.mark.parametrize("section, value", [
    ("preprocess", {"workers": 7}), ("preprocess", {"dask_address": "tcp://h:8786"}),
    ("preprocess", {"memory_limit": "4GB"}), ("train", {"threads": 3}), ("train", {"device": "cpu"}),
    ("infer", {"batch_size": 9}),
])
def test_runtime_only_knobs_change_no_key(catalog, section, value):
    assert _changed(_keys(_config()), _keys(_config(**{section: value}))) == set()


def test_the_order_of_dict_keys_changes_no_key(catalog):
    forward = _config(train={"lr": 0.01, "dropout": 0.1}, preprocess={"normalisation": "ct", "workers": 1})
    backward = _config(preprocess={"workers": 1, "normalisation": "ct"}, train={"dropout": 0.1, "lr": 0.01})
    assert _keys(forward) == _keys(backward)
    assert K.stage_key("split", {"a": 1, "b": [1, 2]}) == K.stage_key("split", {"b": [1, 2], "a": 1})


def test_timestamps_change_no_key(catalog):
    before = _keys(_config())
    catalog.ingested_at = "2027-06-30T12:00:00"
    assert _keys(_config()) == before


def test_upstream_keys_change_downstream_keys(catalog):
    cfg = _config()
    assert K.key_evaluate(cfg, {"key": "i1"}) != K.key_evaluate(cfg, {"key": "i2"})
    assert K.key_report(cfg, {"key": "e1"}) != K.key_report(cfg, {"key": "e2"})
    retrained = [dict(TRAINS[0], checkpoint_sha256="other"), TRAINS[1]]  # --refresh train: same key, new weights
    assert K.key_infer("ws", cfg, TRAINS, PREPROCESS) != K.key_infer("ws", cfg, retrained, PREPROCESS)
    replanned = {"plan_ids": {"1.0": "plan-a", "2.0": "plan-c"}}
    organ = cfg.resolved_stages()[0]
    assert K.key_train("ws", cfg, organ, PREPROCESS) != K.key_train("ws", cfg, organ, replanned)


def test_a_case_content_hash_changes_the_keys_that_read_it(catalog):
    before = _keys(_config())
    catalog.rows = [CASES[0], ("c2", "p2", "a2-new", "l2", "train"), *CASES[2:]]
    # ingest recorded a new image for c2: preprocessing, the split (catalog fingerprint), training on it, and
    # the run (the same cases, but infer reads image hashes only for the chosen val/test cases) change
    assert _changed(before, _keys(_config())) == {"preprocess", "split", "train-organ", "train-lesion"}
    catalog.rows = [*CASES[:3], ("c4", "p4", "a4-new", "l4", "test")]
    assert "infer" in _changed(before, _keys(_config()))


def test_a_split_assignment_changes_training_and_inference_keys(catalog):
    before = _keys(_config())
    catalog.rows = [*CASES[:2], ("c3", "p3", "a3", "l3", "test"), ("c4", "p4", "a4", "l4", "val")]
    assert _changed(before, _keys(_config())) == {"train-organ", "train-lesion", "infer"}


def test_the_checkpoint_folder_ignores_budgets_but_the_train_key_does_not(catalog):
    short, long = _config(train={"max_epochs": 2}), _config(train={"max_epochs": 20})
    organ_short, organ_long = short.resolved_stages()[0], long.resolved_stages()[0]
    assert K.key_train("ws", short, organ_short, PREPROCESS) != K.key_train("ws", long, organ_long, PREPROCESS)
    assert (K.model_identity("ws", short, organ_short, PREPROCESS)
            == K.model_identity("ws", long, organ_long, PREPROCESS))


def test_the_code_of_a_listed_source_changes_the_key(tmp_path, monkeypatch):
    (tmp_path / "lib.py").write_text("x = 1\n")
    monkeypatch.setattr(K, "PACKAGE_ROOT", tmp_path)
    monkeypatch.setitem(K.STAGE_SOURCES, "split", ["lib.py"])
    K.code_version.cache_clear()
    try:
        before = K.stage_key("split", "same input")
        (tmp_path / "lib.py").write_text("x = 2\n")
        K.code_version.cache_clear()
        assert K.stage_key("split", "same input") != before
    finally:
        K.code_version.cache_clear()


@pytest.mark.parametrize("ref", ["no_such_file.py", "flows.stages:no_such_function", "flows.no_such_module:f"])
def test_a_missing_source_is_an_error_naming_it(tmp_path, monkeypatch, ref):
    monkeypatch.setitem(K.STAGE_SOURCES, "split", ["data_catalog/splits.py", ref])
    K.code_version.cache_clear()
    try:
        with pytest.raises(K.MissingStageSource, match=ref.replace(".", r"\.")):
            K.code_version("split")
    finally:
        K.code_version.cache_clear()


def test_every_listed_source_exists():
    """A file renamed or split without updating STAGE_SOURCES would stop its changes invalidating the cache."""
    K.code_version.cache_clear()
    assert all(len(K.code_version(stage)) == 12 for stage in K.STAGES)


def test_later_train_settings_at_their_default_leave_a_models_identity_unchanged():
    """train.devices and train.class_weights came after models had been trained: at their default they must not
    change the checkpoint folder, the resume check or the recipe's identity (an existing model would otherwise
    be trained again from scratch); set to anything else they do."""
    from unet3d.config import LATER_TRAIN_SETTINGS, TrainConfig, model_train_settings
    from unet3d.train import TrainSpec

    train = TrainConfig().model_dump(mode="json")
    before = {k: v for k, v in train.items() if k not in LATER_TRAIN_SETTINGS}  # a config of older code
    assert model_train_settings(train) == before
    spec = dict(out_dir="m", train_cases=["a__1"], val_cases=[], classes={1: "x"}, label_map={1: 1})
    assert TrainSpec(train=train, **spec).identity() == TrainSpec(train=before, **spec).identity()
    assert model_train_settings(dict(train, devices=2))["devices"] == 2
    assert model_train_settings(dict(train, class_weights=[0.5, 1.0]))["class_weights"] == [0.5, 1.0]
