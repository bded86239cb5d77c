"""The validated config: errors name the offending key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unet3d.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
BASE = {"cohort": {"name": "h", "modality": "MRI"}, "labels": {1: "a", 2: "b"}}


def test_the_shipped_hippocampus_config_is_valid():
    cfg = load_config(REPO / "configs" / "hippocampus.yaml")
    stages = cfg.resolved_stages()
    assert [s.name for s in stages] == ["roi", "final"]
    assert stages[0].label_map() == {1: 1, 2: 1} and stages[1].roi_from == "roi"


@pytest.mark.parametrize("data, key", [
    ({"train": {"max_epoch": 3}}, "train.max_epoch: unknown key"),
    ({"preprocess": {"normalization": "ct"}}, "preprocess.normalization: unknown key"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"train": {"architecture": "vnet"}}, "train.architecture"),
    ({"split": {"ratios": [0.5, 0.5, 0.5]}}, "split.ratios"),
    ({"preprocess": {"target_spacing": [1, 1]}}, "preprocess.target_spacing"),
    ({"stages": [{"name": "s", "classes": {1: "a"}, "roi_from": "x"}]}, "roi_from"),
    ({"stages": [{"name": "s", "classes": {1: "a"}, "merge": {1: [9]}}]}, "not among labels"),
    ({"infer": {"overlap": 1.5}}, "infer.overlap"),
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        parse_config({**BASE, **data})


def test_missing_cohort_and_defaults(tmp_path):
    with pytest.raises(ConfigError, match="cohort"):
        parse_config({"labels": {1: "a"}})
    cfg = parse_config(BASE)
    assert cfg.resolved_stages()[0].classes == {1: "a", 2: "b"}
    assert cfg.preprocess.workers == 2 and cfg.split.ratios == [0.8, 0.1, 0.1]
    path = tmp_path / "c.yaml"
    path.write_text("cohort: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_relative_source_resolves_from_cwd_then_config_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "data" / "cohort").mkdir(parents=True)
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump({"cohort": {"name": "x", "source": "../data/cohort"}, "labels": {1: "a"}}))
    monkeypatch.chdir(tmp_path / "data")
    assert load_config(path).cohort.source == str((tmp_path / "data" / "cohort").resolve())
