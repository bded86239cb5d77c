"""Checks of a validated config against the world (folders, the data's declared labels, the catalog), run
before any stage writes anything: by `unet3d run`/stage commands before Prefect starts, by `unet3d serve`
when it registers the deployment (not at 2 am), and by the pipeline flow itself (a deployment's run).

Each failure is a ConfigError with one line naming the key. Reads only: no file is written.

`check_patch_fits_cohort` needs the cohort's image sizes, which the catalog has once the cohort is ingested:
preflight runs it when the cohort is already there, and the pipeline runs it again right after ingestion (a
first run), before preprocessing.
"""
from __future__ import annotations

import json
from pathlib import Path

from unet3d.config import ConfigError, PipelineConfig


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


def check_sources(cfg: PipelineConfig) -> None:
    """cohort.source, cohort.labels_dir and cohort.unlabelled_source exist and are folders."""
    if cfg.cohort.unlabelled_source and not cfg.cohort.source:
        raise ConfigError("cohort.unlabelled_source: needs cohort.source (the unlabelled scans join its cases)")
    for key in ("source", "labels_dir", "unlabelled_source"):
        path = getattr(cfg.cohort, key)
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"cohort.{key}: {p} does not exist")
        if not p.is_dir():
            raise ConfigError(f"cohort.{key}: {p} is not a folder")


def check_labels_against_source(cfg: PipelineConfig) -> None:
    """The config's labels are the labels the data declares (an MSD/nnU-Net dataset.json): otherwise every
    case would be quarantined as label_undeclared, or a declared class would never be seen."""
    declared, source = cfg.labels, cfg.cohort.source
    if not declared or not source:
        return
    path = Path(source) / "dataset.json"
    if not path.is_file():
        return
    try:
        data_labels = _dataset_labels(json.loads(path.read_text(encoding="utf-8")))
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


def check_catalog_cohort(workspace: str, cfg: PipelineConfig) -> None:
    """A config without cohort.source uses the catalog's cases: the cohort must be there."""
    if cfg.cohort.source:
        return
    from data_catalog.tables import Catalog

    name = cfg.cohort.name
    if Catalog(workspace).cases(cohort=name).empty:
        raise ConfigError(f"cohort.source: not given, and cohort {name!r} is not in the catalog of {workspace} "
                          f"(give cohort.source or run `unet3d ingest SOURCE --cohort {name}` first)")


# The planner rounds a patch up to a multiple of the network's downsampling (nnU-Net plans 40x56x40 for
# 35x50x36 hippocampus images): a patch is refused only beyond that rounding of the largest image.
PATCH_MULTIPLE = 8


def check_patch_fits_cohort(cfg: PipelineConfig | dict, workspace: str) -> None:
    """A patch set in the config (train.patch_size, a stage's patch_size) is at most the cohort's largest
    image after resampling to the stage's spacing, rounded up to a multiple of 8, on every axis. A larger
    patch is padding along that axis in every case: refused before any training time is spent on it
    (nnU-Net never plans a patch beyond the median image; a patch set by hand may exceed the median, since
    images vary, but not the largest). Sizes and spacings are the catalog's (headers), the target spacing the
    one the preprocessing plan takes from them; nothing to check before the cohort is ingested."""
    import numpy as np

    from data_catalog.plan import header_fingerprints, make_plan
    from data_catalog.tables import Catalog

    cfg = PipelineConfig.model_validate(cfg)
    stages = cfg.resolved_stages()
    train_patch = cfg.train.patch_size
    patches = []
    for i, s in enumerate(stages):
        own = s.train_overrides()  # a stage's patch_size, given directly or in its `train`, replaces train's
        patch = own["patch_size"] if "patch_size" in own else train_patch
        if patch:  # None: planned from the data, which fits by construction
            key = ("train.patch_size" if "patch_size" not in own
                   else f"stages[{i}].patch_size" if s.patch_size else f"stages[{i}].train.patch_size")
            patches.append((key, list(patch), s))
    if not patches:
        return
    name = cfg.cohort.name
    cases = Catalog(workspace).cases(cohort=name, status="ok")
    if cases.empty:
        return
    fingerprints = header_fingerprints(cases)
    # the plan's target spacing needs only the spacings (the normalisation is not planned here)
    plan = make_plan(fingerprints, "other", cfg.preprocess.model_copy(update={"normalisation": "zscore"}))
    extents_mm = np.array([np.asarray(f["canonical_shape"]) * np.asarray(f["canonical_spacing"]) for f in fingerprints])
    for key, patch, stage in patches:
        spacing = np.asarray(plan["target_spacing"]) * float(stage.spacing_factor)
        sizes = np.round(extents_mm / spacing).astype(int)
        largest = sizes.max(axis=0)
        limit = [max(PATCH_MULTIPLE, int(-(-n // PATCH_MULTIPLE) * PATCH_MULTIPLE)) for n in largest]
        over = [axis for axis, (p, lim) in enumerate(zip(patch, limit)) if p > lim]
        if over:
            axes = ("axis " if len(over) == 1 else "axes ") + ", ".join("xyz"[a] for a in over)
            raise ConfigError(
                f"{key}: {patch} is larger than every image of cohort {name!r} on {axes} for stage "
                f"{stage.name} ({len(cases)} cases at {[round(float(s), 3) for s in spacing]} mm: largest "
                f"{[int(n) for n in largest]} voxels, median {[int(n) for n in np.median(sizes, axis=0)]}); "
                f"use at most {limit}, or leave patch_size unset to have it planned from the data")


def preflight(cfg: PipelineConfig | dict, workspace: str | None = None) -> None:
    """Every check that needs more than the config itself; raises ConfigError naming the key. Config data (a
    dict) is validated here first."""
    cfg = PipelineConfig.model_validate(cfg)
    cfg.resolved_stages()  # a stages or a labels section
    check_sources(cfg)
    check_labels_against_source(cfg)
    if workspace is not None:
        check_catalog_cohort(workspace, cfg)
        check_patch_fits_cohort(cfg, workspace)
