"""Checks of a validated config against the world (folders, the data's declared labels, the catalog), run
before any stage writes anything: by `unet3d run`/stage commands before Prefect starts, by `unet3d serve`
when it registers the deployment (not at 2 am), and by the pipeline flow itself (a deployment's run).

Each failure is a ConfigError with one line naming the key. Reads only: no file is written.
"""
from __future__ import annotations

import json
from pathlib import Path

from unet3d.config import ConfigError


def _dataset_labels(meta: object) -> dict[int, str] | None:
    """Label value -> name from a dataset.json `labels` entry (MSD: {"1": "name"}, nnU-Net v2: {"name": 1});
    None when absent or not readable as either (ingestion reports a malformed dataset.json itself)."""
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):
            return {int(k): str(v) for k, v in labels.items()}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
            return {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        return None
    return None


def check_sources(cfg: dict) -> None:
    """cohort.source and cohort.labels_dir exist and are folders."""
    cohort = cfg["cohort"]
    for key in ("source", "labels_dir"):
        path = cohort.get(key)
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"cohort.{key}: {p} does not exist")
        if not p.is_dir():
            raise ConfigError(f"cohort.{key}: {p} is not a folder")


def check_labels_against_source(cfg: dict) -> None:
    """The config's labels are the labels the data declares (an MSD/nnU-Net dataset.json): otherwise every
    case would be quarantined as label_undeclared, or a declared class would never be seen."""
    declared = cfg.get("labels")
    source = cfg["cohort"].get("source")
    if not declared or not source:
        return
    path = Path(source) / "dataset.json"
    if not path.is_file():
        return
    try:
        data_labels = _dataset_labels(json.loads(path.read_text()))
    except (OSError, ValueError):
        return
    if data_labels is None:
        return
    ours = {int(k) for k in declared}
    theirs = {v for v in data_labels if v != 0}
    missing, undeclared = sorted(ours - theirs), sorted(theirs - ours)
    if missing or undeclared:
        what = []
        if missing:
            what.append(f"values {missing} are not labels of the data")
        if undeclared:
            what.append(f"the data's values {undeclared} are not declared")
        shown = {k: v for k, v in sorted(data_labels.items()) if k != 0}
        raise ConfigError(f"labels: {' and '.join(what)} ({path} declares {shown})")


def check_catalog_cohort(workspace: str, cfg: dict) -> None:
    """A config without cohort.source uses the catalog's cases: the cohort must be there."""
    if cfg["cohort"].get("source"):
        return
    from data_catalog.tables import Catalog

    name = cfg["cohort"]["name"]
    if Catalog(workspace).cases(cohort=name).empty:
        raise ConfigError(f"cohort.source: not given, and cohort {name!r} is not in the catalog of {workspace} "
                          f"(give cohort.source or run `unet3d ingest SOURCE --cohort {name}` first)")


def preflight(cfg: dict, workspace: str | None = None) -> None:
    """Every check that needs more than the config itself; raises ConfigError naming the key."""
    from unet3d.config import PipelineConfig

    PipelineConfig.model_validate(cfg).resolved_stages()  # a stages or a labels section
    check_sources(cfg)
    check_labels_against_source(cfg)
    if workspace is not None:
        check_catalog_cohort(workspace, cfg)
