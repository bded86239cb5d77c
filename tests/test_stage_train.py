"""Per-stage training settings (`stages[i].train`) and `train.class_weights`: validated with errors naming the key,
merged in one place (flows.cache_keys.train_settings), and a cascade whose stages have different architectures
trains, predicts (the pipeline and `unet3d predict`) and is evaluated with each stage's own architecture."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from flows.cache_keys import train_settings
from pipeline_helpers import write_config
from unet3d.config import ConfigError, load_config, parse_config

CASCADE = {
    "cohort": {"name": "c"},
    "labels": {1: "organ", 2: "lesion"},
    "stages": [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}},
               {"name": "lesion", "classes": {1: "lesion"}, "merge": {1: [2]}, "roi_from": "organ"}],
    "train": {"architecture": "unet3d", "lr": 0.001, "max_epochs": 5, "time_limit_min": 10},
}


def config(**stage_train):
    """CASCADE with stage index -> that stage's `train` section."""
    data = copy.deepcopy(CASCADE)
    for index, train in stage_train.items():
        data["stages"][int(index.removeprefix("s"))]["train"] = train
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return str(exc.value)


def test_stage_train_overrides_any_train_key_for_that_stage_only():
    cfg = parse_config(config(s0={"architecture": "residual_unet3d", "features": [8, 16], "augment": True},
                              s1={"architecture": "attention_unet3d", "lr": 0.01}))
    _, organ = train_settings(cfg, cfg.stages[0])
    _, lesion = train_settings(cfg, cfg.stages[1])
    assert (organ["architecture"], organ["features"], organ["augment"], organ["lr"]) == \
        ("residual_unet3d", [8, 16], "full", 0.001)  # augment: true is validated as the top-level key is ("full")
    assert (lesion["architecture"], lesion["features"], lesion["lr"]) == ("attention_unet3d", None, 0.01)
    assert organ["max_epochs"] == lesion["max_epochs"] == 5  # not overridden: the top-level value
    # the top-level section itself is untouched
    assert cfg.train.architecture == "unet3d"


def test_a_stage_train_key_changes_only_that_stages_settings():
    plain = parse_config(config())
    changed = parse_config(config(s1={"architecture": "attention_unet3d"}))
    assert train_settings(plain, plain.stages[0]) == train_settings(changed, changed.stages[0])
    assert train_settings(plain, plain.stages[1]) != train_settings(changed, changed.stages[1])


def test_the_direct_stage_keys_still_work_and_stage_budgets_come_from_either_form():
    data = config()
    data["stages"][0].update(max_epochs=2, patch_size=[16, 16, 8], time_limit_min=3)
    cfg = parse_config(data)
    _, organ = train_settings(cfg, cfg.stages[0])
    assert (organ["max_epochs"], organ["patch_size"], organ["time_limit_min"]) == (2, [16, 16, 8], 3)
    # the same through stages[0].train: the same settings
    moved = parse_config(config(s0={"max_epochs": 2, "patch_size": [16, 16, 8], "time_limit_min": 3}))
    assert train_settings(moved, moved.stages[0]) == train_settings(cfg, cfg.stages[0])
    assert train_settings(moved, moved.stages[1]) == train_settings(cfg, cfg.stages[1])
    # with one stage's budget given, the other stage gets train.time_limit_min, in both forms
    assert train_settings(moved, moved.stages[1])[1]["time_limit_min"] == 10


@pytest.mark.parametrize("key", ["max_epochs", "patch_size", "time_limit_min"])
def test_a_key_given_both_directly_and_in_stage_train_is_refused(key):
    value = {"max_epochs": 3, "patch_size": [16, 16, 8], "time_limit_min": 2}[key]
    data = config(s1={key: value})
    data["stages"][1][key] = value
    message = error_of(data)
    assert f"stage lesion: {key} is given twice, as {key} and as train.{key}" in message
    assert "\n" not in message


def test_stage_train_keys_are_validated_like_the_train_section():
    assert error_of(config(s0={"architectur": "unet3d"})) == "invalid config: stages.0.train.architectur: unknown key"
    assert error_of(config(s1={"architecture": "vnet"})).startswith("invalid config: stages.1.train.architecture:")
    assert error_of(config(s0={"lr": -1})).startswith("invalid config: stages.0.train.lr:")
    assert error_of(config(s0={"features": [8]})).startswith("invalid config: stages.0.train.features:")


def test_the_run_record_form_of_a_stage_keeps_only_the_keys_it_gives():
    cfg = parse_config(config(s0={"architecture": "residual_unet3d"}))
    dumped = cfg.stages[0].model_dump(mode="json")
    assert dumped["train"] == {"architecture": "residual_unet3d"}
    assert cfg.stages[1].model_dump(mode="json")["train"] is None
    # and it reads back as the same overrides
    again = parse_config(cfg.model_dump(mode="json"))
    assert train_settings(again, again.stages[0]) == train_settings(cfg, cfg.stages[0])


# ---------------------------------------------------------------------------------------------------------
# train.class_weights
# ---------------------------------------------------------------------------------------------------------
def test_class_weights_are_accepted_per_stage_and_are_part_of_the_settings():
    data = config(s1={"class_weights": [0.2, 1.0]})
    data["train"]["class_weights"] = [0.5, 1.0]
    cfg = parse_config(data)
    assert train_settings(cfg, cfg.stages[0])[1]["class_weights"] == [0.5, 1.0]
    assert train_settings(cfg, cfg.stages[1])[1]["class_weights"] == [0.2, 1.0]
    # a single stage made from `labels`: background and the two labels
    single = parse_config({"cohort": {"name": "c"}, "labels": {1: "a", 2: "b"}, "train": {"class_weights": [0, 1, 2]}})
    assert train_settings(single, single.resolved_stages()[0])[1]["class_weights"] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("weights, expected", [
    ([0, 0], "train.class_weights: class_weights must be one finite weight >= 0 per class"),
    ([1, -0.5], "train.class_weights: class_weights must be one finite weight >= 0 per class"),
    ([1, float("inf")], "train.class_weights: class_weights must be one finite weight >= 0 per class"),
    ([1, float("nan")], "train.class_weights: class_weights must be one finite weight >= 0 per class"),
    ([1, 1, 1], "train.class_weights: 3 weights for the 2 classes of stage organ"),
])
def test_bad_class_weights_are_refused_naming_the_key(weights, expected):
    data = config()
    data["train"]["class_weights"] = weights
    message = error_of(data)
    assert expected in message and "\n" not in message


def test_a_stage_whose_class_weights_do_not_fit_its_classes_is_named():
    message = error_of(config(s1={"class_weights": [0.1, 1.0, 1.0]}))
    assert "stages.1.train.class_weights: 3 weights for the 2 classes of stage lesion" in message
    data = {"cohort": {"name": "c"}, "labels": {1: "a", 2: "b"}, "train": {"class_weights": [0.1, 1]}}
    assert "train.class_weights: 2 weights for the 3 classes of stage final" in error_of(data)


# ---------------------------------------------------------------------------------------------------------
# End to end: a residual U-Net for stage 1, an attention U-Net for stage 2 (issue 13, acceptance 4)
# ---------------------------------------------------------------------------------------------------------
def test_cascade_with_an_architecture_per_stage_runs_end_to_end_and_predicts(tiny_cohort, tmp_path, monkeypatch):
    import unet3d.train as train_module
    from flows.cli import main as cli
    from flows.pipeline import pipeline_flow

    losses = []  # the class weights each trained stage's loss was built with
    real_loss = train_module.DiceCELoss

    def recording_loss(*args, **kwargs):
        losses.append(kwargs.get("class_weights"))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "DiceCELoss", recording_loss)
    stages = [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}, "spacing_factor": 2.0,
               "train": {"architecture": "residual_unet3d"}},
              {"name": "lesion", "classes": {1: "lesion"}, "merge": {1: [2]}, "roi_from": "organ", "margin_mm": 10,
               "train": {"architecture": "attention_unet3d", "class_weights": [0.25, 1.0]}}]
    config_path = write_config(tmp_path / "c.yaml", tiny_cohort, stages=stages)
    ws = tmp_path / "ws"
    results = pipeline_flow(config_path=str(config_path), workspace=str(ws))

    architectures = {}
    for trained in results["train"]:
        meta = json.loads((Path(trained["model_dir"]) / "model.json").read_text())
        architectures[trained["stage_name"]] = meta["model"]["architecture"]
    assert architectures == {"organ": "residual_unet3d", "lesion": "attention_unet3d"}
    assert losses == [None, [0.25, 1.0]]  # stage 1 unweighted, stage 2 with its own weights

    metrics = pd.read_parquet(ws / "reports" / "metrics")
    assert dict(metrics.groupby("stage")["model"].unique().map(list)) == {"organ": ["residual_unet3d"],
                                                                          "lesion": ["attention_unet3d"]}

    # `unet3d predict` builds each stage's network from its model.json
    run_id = results["report"]["run_id"]
    image = sorted((tiny_cohort / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "predicted"
    assert cli(["predict", "--workspace", str(ws), "--model", run_id, str(image), "--out", str(out)]) == 0
    name = image.name.removesuffix(".nii.gz")
    assert (out / f"{name}.nii.gz").exists() and (out / "stage1" / f"{name}.nii.gz").exists()  # organ: stage 1


def test_a_stage_train_patch_is_checked_against_the_cohort_like_a_direct_one(tiny_cohort, tmp_path):
    from data_catalog.ingest import ingest
    from flows.preflight import check_patch_fits_cohort

    ws = tmp_path / "ws"
    ingest(tiny_cohort, "tiny", ws)
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_cohort)).model_dump(mode="json")
    cfg["stages"][0]["train"] = {"patch_size": [32, 32, 16]}  # all padding on the organ stage's 2x coarser grid
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.train\.patch_size: .*stage organ"):
        check_patch_fits_cohort(cfg, str(ws))
    # null in a stage's train: planned for that stage, whatever train.patch_size says
    cfg["train"]["patch_size"] = [32, 32, 16]
    cfg["stages"][0]["train"] = {"patch_size": None}
    cfg["stages"][1]["patch_size"] = [16, 16, 8]
    check_patch_fits_cohort(cfg, str(ws))
