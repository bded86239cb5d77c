"""Bad configs are refused up front (issue 10 items 5 and 8, issue 11 item 7): at config load or before any
stage writes anything, with one line naming the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unet3d.config import ConfigError, load_config, parse_config

BASE = {"cohort": {"name": "h", "modality": "MRI"}, "labels": {1: "a", 2: "b"}}


def _with(**sections) -> dict:
    data = json.loads(json.dumps(BASE))
    data.update(sections)
    return data


@pytest.mark.parametrize("data, key", [
    (_with(cohort={"name": "my cohort"}), "cohort.name"),  # a space
    (_with(cohort={"name": "leber-\u00f6"}), "cohort.name"),  # non-ASCII
    (_with(cohort={"name": ".."}), "cohort.name"),
    (_with(cohort={"name": "a/../../b"}), "cohort.name"),
    (_with(cohort={"name": "-rf"}), "cohort.name"),
    (_with(cohort={"name": "x" * 65}), "cohort.name"),
    (_with(stages=[{"name": "../../../escaped", "classes": {1: "a"}}]), "stages.0.name"),
    (_with(stages=[{"name": "roi", "classes": {1: "a"}}, {"name": "fin al", "classes": {1: "b"}, "roi_from": "roi"}]),
     "stages.1.name"),
    (_with(stages=[{"name": "s", "classes": {}}]), "classes"),
    (_with(stages=[{"name": "s", "classes": {1: "a"}, "merge": {1: []}}]), "merge"),
    (_with(split={"ratios": [1, 0, 0]}), "infer.splits"),  # val and test would be empty
    (_with(split={"ratios": [0.9, 0.1, 0.0]}), "infer.splits"),  # test would be empty
    (_with(split={"ratios": [0.0, 0.5, 0.5]}), "split.ratios"),  # nothing to train on
    (_with(split={"ratios": [float("nan"), 0.5, 0.5]}), "split.ratios"),
    (_with(infer={"splits": []}), "infer.splits"),
    (_with(infer={"splits": ["test", "test"]}), "infer.splits"),
    (_with(labels={}), "labels"),
])
def test_bad_configs_are_refused_naming_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert key in message and "\n" not in message, message


def test_good_names_and_train_only_inference_still_accepted():
    cfg = parse_config(_with(cohort={"name": "Task04_Hippocampus.v2-a"},
                             stages=[{"name": "roi_1", "classes": {1: "a"}}],
                             split={"ratios": [0.9, 0.1, 0.0]}, infer={"splits": ["val"]}))
    assert cfg.cohort.name == "Task04_Hippocampus.v2-a" and cfg.infer.splits == ["val"]


@pytest.mark.parametrize("text, key", [
    ("cohort: {name: h}\ntrain: {max_epochs: 100}\nlabels: {1: a}\ntrain: {lr: 0.01}\n", "'train'"),
    ("cohort: {name: h, name: g}\nlabels: {1: a}\n", "'name'"),
    ("cohort: {name: h}\nlabels:\n  1: a\n  1: b\n", "1"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"duplicate key {key}") as info:
        load_config(path)
    assert "line" in str(info.value) and "\n" not in str(info.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cohort: {name: h}\nlabels: &l {1: a, 2: b}\nstages:\n  - {name: s, classes: {<<: *l, 2: c}}\n")
    assert load_config(path).stages[0].classes == {1: "a", 2: "c"}  # a merge key may be overridden


# ---------------------------------------------------------------------------------------------------------
# Through the command line: refused in one line, before anything is written
# ---------------------------------------------------------------------------------------------------------
def _cli(capsys, *argv, env: dict | None = None) -> tuple[int, str]:
    """The command as a user runs it (its own process: Prefect's console handlers stay out of pytest)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, encoding="utf-8", timeout=300,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr.strip()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, key", [
    ({"cohort": {"name": "my cohort"}}, "cohort.name"),
    ({"stages": [{"name": "../../../escaped", "classes": {1: "organ"}}]}, "stages.0.name"),
    ({"split": {"ratios": [1, 0, 0]}}, "infer.splits"),
    ({"infer": {"splits": []}}, "infer.splits"),
    ({"stages": [{"name": "s", "classes": {}}]}, "classes"),
    ({"labels": {1: "organ", 3: "tumour"}}, "labels"),  # the cohort's dataset.json declares 1 and 2
    ({"labels": {1: "organ"}}, "labels"),  # ... and 2 would quarantine every case with a lesion
    ({"cohort": {"name": "tiny", "source": "/nonexistent/cohort"}}, "cohort.source"),
    ({"cohort": {"name": "never_ingested"}}, "cohort.source"),  # no source and not in the catalog
    ({"labels": None}, "stages"),  # neither stages nor labels: nothing to segment
])
def test_run_refuses_a_bad_config_before_writing_anything(tiny_cohort, tmp_path, capsys, change, key):
    data = {"cohort": {"name": "tiny", "source": str(tiny_cohort), "modality": "CT"},
            "labels": {1: "organ", 2: "lesion"}, "train": {"max_epochs": 1}}
    data.update(change)
    ws = tmp_path / "ws"
    rc, err = _cli(capsys, "--workspace", str(ws), "run", str(_write(tmp_path / "c.yaml", data)))
    assert rc == 1 and key in err and len(err.splitlines()) == 1, err
    assert not ws.exists(), f"{sorted(p.name for p in ws.rglob('*'))} written before the config was refused"


def test_plain_folder_labels_not_matching_the_data_fail_naming_labels(tiny_cohort, tmp_path):
    """Without a dataset.json the labels are only known after reading the cases: ingestion is then the
    only stage that ran, and the error names `labels` instead of a later 'no ok cases'."""
    from flows.pipeline import pipeline_flow

    config = _write(tmp_path / "c.yaml", {
        "cohort": {"name": "plain", "source": str(tiny_cohort / "imagesTr"), "labels_dir": str(tiny_cohort / "labelsTr"),
                   "modality": "CT"},
        "labels": {5: "organ", 6: "lesion"}, "preprocess": {"workers": 1}})
    ws = tmp_path / "ws"
    with pytest.raises(ConfigError, match=r"^labels: no usable case in cohort 'plain'.*label values"):
        pipeline_flow(config_path=str(config), workspace=str(ws))
    assert not (ws / "preprocessed").exists() and not (ws / "models").exists()


def test_serve_refuses_a_missing_cohort_source_at_registration(tmp_path, capsys):
    config = _write(tmp_path / "c.yaml", {"cohort": {"name": "x", "source": str(tmp_path / "gone")},
                                          "labels": {1: "a"}})
    rc, err = _cli(capsys, "--workspace", str(tmp_path / "ws"), "serve", str(config), "--cron", "0 2 * * *",
                   env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})  # never reached: refused before serving
    assert rc == 1 and err.startswith("unet3d serve: error: cohort.source:") and "does not exist" in err, err
    assert len(err.splitlines()) == 1


def test_ingest_refuses_a_cohort_name_that_is_not_a_folder_name(tiny_cohort, tmp_path, capsys):
    ws = tmp_path / "ws"
    rc, err = _cli(capsys, "--workspace", str(ws), "ingest", str(tiny_cohort), "--cohort", "../escaped")
    assert rc == 1 and "--cohort" in err and "'../escaped'" in err, err
    assert not ws.exists()
