"""The pipeline's stages as plain functions over the workspace (thin wiring of `data_catalog` and `unet3d`).

Each `run_*` function takes the workspace, the validated config (as a dict) and its upstream stages' results,
does its work idempotently (per case, or from the last checkpoint), and returns a small JSON-able result:
its `key`, what it produced (`outputs`, paths checked before a cache hit is trusted) and a few numbers.
Each `key_*` function computes the stage's cache key from content (see flows/caching.py).
The Prefect tasks and flows that call them are in flows/pipeline.py.
"""
from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from data_catalog.hashing import stable_hash
from data_catalog.ingest import ingest
from data_catalog.case_worker import case_dirname, case_records
from data_catalog.splits import split_table, update_splits
from data_catalog.preprocess import run_preprocessing
from data_catalog.store import PreprocessedStore
from data_catalog.tables import Catalog
from unet3d.recipe import stage_time_budgets

from .caching import (code_version, cohort_fingerprint, config_part, drop_marker, file_digest, source_fingerprint,
                      split_fingerprint, stage_key, to_data, write_marker)

log = logging.getLogger("flows.stages")


def stage_list(cfg: dict) -> list[dict]:
    from unet3d.config import PipelineConfig
    return [s.model_dump(mode="json") for s in PipelineConfig.model_validate(cfg).resolved_stages()]


def _factors(cfg: dict) -> tuple[float, ...]:
    return tuple(sorted({float(s["spacing_factor"]) for s in stage_list(cfg)}))


def _cohort(cfg: dict) -> str:
    return cfg["cohort"]["name"]


def _finish(workspace: str, stage: str, key: str, result: dict) -> dict:
    # As JSON data: what a cache hit reads back is then identical to what this run returns.
    result = to_data(dict(result, key=key, stage=stage, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    write_marker(workspace, stage, key, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------------------
def key_ingest(workspace: str, cfg: dict) -> str:
    c = cfg["cohort"]
    if not c.get("source"):
        return stage_key("ingest", c["name"], "catalog", cohort_fingerprint(workspace, c["name"]))
    return stage_key("ingest", c["name"], source_fingerprint(c["source"], c.get("labels_dir")), c.get("modality"),
                     cfg.get("labels"))


def run_ingest(workspace: str, cfg: dict, key: str) -> dict:
    c = cfg["cohort"]
    catalog = Catalog(workspace)
    if not c.get("source"):
        cases = catalog.cases(cohort=c["name"])
        if cases.empty:
            raise ValueError(f"cohort {c['name']!r} is not in the catalog and the config gives no cohort.source")
        log.info("cohort %s: no source in the config, using the %d cases already in the catalog", c["name"], len(cases))
        return _finish(workspace, "ingest", key, {"cohort": c["name"], "n_cases": len(cases),
                                                  "n_ok": int((cases["status"] == "ok").sum()),
                                                  "outputs": [str(catalog.cases_path)]})
    labels = {int(k): v for k, v in cfg["labels"].items()} if cfg.get("labels") else None
    declared = {**labels, 0: "background"} if labels else None
    result = ingest(c["source"], c["name"], workspace, labels=c.get("labels_dir"), modality=c.get("modality"),
                    declared_labels=declared, workers=cfg.get("preprocess", {}).get("workers", 1))
    log.info(result.summary())
    issues = catalog.read("issues")
    errors = issues[(issues["cohort"] == c["name"]) & (issues["severity"] == "error")]
    for r in errors.to_dict("records"):
        log.warning("case %s quarantined: %s: %s", r["case_id"], r["code"], r["message"])
    _labels_match_the_data(cfg, result, errors)
    return _finish(workspace, "ingest", key, {
        "cohort": c["name"], "n_cases": result.n_cases, "n_ok": result.n_ok, "n_quarantined": result.n_quarantined,
        "new": result.new, "changed": result.changed, "n_issues": result.n_issues,
        "outputs": [result.cases_path, result.issues_path]})


def _labels_match_the_data(cfg: dict, result, errors: pd.DataFrame) -> None:
    """No usable case because the config's labels are not the data's: a config error naming `labels`, not a
    later "no ok cases" (a dataset.json's labels were compared before ingestion; this covers plain folders)."""
    undeclared = errors[errors["code"] == "label_undeclared"]
    if result.n_ok or undeclared.empty or not cfg.get("labels"):
        return
    from unet3d.config import ConfigError

    example = undeclared.sort_values("case_id").iloc[0]
    raise ConfigError(f"labels: no usable case in cohort {_cohort(cfg)!r}: {undeclared['case_id'].nunique()} of "
                      f"{result.n_cases} cases hold label values that labels {sorted(int(k) for k in cfg['labels'])} "
                      f"does not declare (e.g. {example['case_id']}: {example['message']})")


# ---------------------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------------------
def _content_rows(workspace: str, cohort: str) -> list:
    """Case contents (not statuses, which preprocessing itself may change) of the ok cases."""
    cases = Catalog(workspace).cases(cohort=cohort)
    cols = ["case_id", "image_sha256", "label_sha256"]
    return cases[cols].astype(str).sort_values("case_id").to_numpy().tolist() if len(cases) else []


def key_preprocess(workspace: str, cfg: dict) -> str:
    return stage_key("preprocess", _content_rows(workspace, _cohort(cfg)), config_part("preprocess", cfg["preprocess"]),
                     _factors(cfg), cfg["cohort"].get("modality"))


def run_preprocess(workspace: str, cfg: dict, key: str, refresh: bool = False) -> dict:
    cohort = _cohort(cfg)
    modality = cfg["cohort"].get("modality")
    result = run_preprocessing(workspace, cohort, cfg["preprocess"], modality=None if modality == "other" else modality,
                               spacing_factors=_factors(cfg), refresh=refresh)
    log.info(result.summary())
    for f in result.failed:
        log.error("case %s failed %s: %s", f["case_id"], f.get("step"), f.get("error"))
    store = PreprocessedStore(workspace, cohort)
    return _finish(workspace, "preprocess", key, {
        "cohort": cohort, "plan_ids": {str(k): v for k, v in result.plan_ids.items()}, "processed": result.processed,
        "cached_cases": result.cached, "failed": len(result.failed), "seconds": round(result.seconds, 2),
        "outputs": [str(store.plans_dir / f"{p}.json") for p in result.plan_ids.values()]})


# ---------------------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------------------
def key_split(workspace: str, cfg: dict) -> str:
    return stage_key("split", cohort_fingerprint(workspace, _cohort(cfg)), cfg["split"])


def run_split(workspace: str, cfg: dict, key: str) -> dict:
    s = cfg["split"]
    result = update_splits(workspace, _cohort(cfg), s["ratios"], s["seed"], s["group_by"])
    log.info(result.summary())
    return _finish(workspace, "split", key, {"cohort": _cohort(cfg), "counts": result.counts, "new": result.new,
                                             "digest": split_fingerprint(workspace, _cohort(cfg)),
                                             "outputs": [result.path]})


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def _stage_cases(workspace: str, cfg: dict) -> pd.DataFrame:
    df = split_table(workspace, _cohort(cfg))
    return df[df["label_path"].notna()].sort_values("case_id").reset_index(drop=True)


def _stage_settings(cfg: dict, stage: dict) -> tuple[dict | None, dict]:
    """(roi settings for a cascade's second stage, train config with stage overrides)."""
    stages = stage_list(cfg)
    roi = None
    if stage.get("roi_from"):
        first = next(s for s in stages if s["name"] == stage["roi_from"])
        merge = first.get("merge") or {k: [int(k)] for k in first["classes"]}
        roi = {"label_values": sorted({int(v) for vs in merge.values() for v in vs}), "margin_mm": stage["margin_mm"]}
    train = dict(cfg["train"])
    if stage.get("max_epochs"):
        train["max_epochs"] = stage["max_epochs"]
    train["time_limit_min"] = stage_time_budgets(cfg["train"].get("time_limit_min"),
                                                 [s.get("time_limit_min") for s in stages])[stages.index(stage)]
    if stage.get("patch_size"):
        train["patch_size"] = stage["patch_size"]
    return roi, train


def _training_inputs(workspace: str, cfg: dict, stage: dict, preprocess: dict) -> tuple[str, list]:
    """The stage's plan id and the (case, split, content hashes) rows it trains and validates on."""
    cases = _stage_cases(workspace, cfg)
    members = cases[cases["split"].isin(["train", "val"])][["case_id", "split", "image_sha256", "label_sha256"]]
    return preprocess["plan_ids"][str(float(stage["spacing_factor"]))], members.astype(str).to_numpy().tolist()


def key_train(workspace: str, cfg: dict, stage: dict, preprocess: dict) -> str:
    plan_id, members = _training_inputs(workspace, cfg, stage, preprocess)
    roi, train = _stage_settings(cfg, stage)
    # Budgets (epochs, time) are part of the key: a longer budget is a different model. The trainer resumes
    # a shorter run's checkpoints when only the budget grew (see TrainSpec.identity).
    return stage_key("train", stage, config_part("train", train), plan_id, roi, members)


def model_dir(workspace: str, cfg: dict, stage: dict, preprocess: dict) -> Path:
    """Checkpoints of a stage live under its data + stage + model-config identity, not the budget, so that
    raising max_epochs continues the run instead of starting over."""
    _roi, train = _stage_settings(cfg, stage)
    budget = ("max_epochs", "time_limit_min")
    identity = {k: v for k, v in config_part("train", train).items() if k not in budget}
    stage_identity = {k: v for k, v in stage.items() if k not in budget}
    plan_id, members = _training_inputs(workspace, cfg, stage, preprocess)
    ident = stable_hash([stage_identity, identity, plan_id, members], 12)
    return Path(workspace) / "models" / _cohort(cfg) / f"{stage['name']}-{ident}"


def _set_aside(folder: Path) -> None:
    """Remove a folder atomically: renamed aside first (so no reader ever sees half of it), then deleted."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.replaced-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}")
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(folder: Path) -> None:
    """Folders set aside by a refresh that was killed before it could delete them."""
    for d in folder.parent.glob(f".{folder.name}.replaced-*"):
        shutil.rmtree(d, ignore_errors=True)


def run_train(workspace: str, cfg: dict, key: str, stage: dict, preprocess: dict, progress: bool = True,
              refresh: bool = False) -> dict:
    """Train one stage (resuming its checkpoints). `refresh` (--refresh train): the stage's previous
    checkpoints are removed first, so the model is really trained again from scratch."""
    from unet3d.train import TrainSpec, train

    cohort = _cohort(cfg)
    marker = f"train-{stage['name']}"
    store = PreprocessedStore(workspace, cohort)
    plan_id = preprocess["plan_ids"][str(float(stage["spacing_factor"]))]
    cases = _stage_cases(workspace, cfg)
    records = {r["case_id"]: r for r in case_records(cases)}
    dirs = {cid: str(store.case_dir(plan_id, r)) for cid, r in records.items() if store.has_case(plan_id, r)}
    train_ids = [c for c in cases.loc[cases["split"] == "train", "case_id"] if c in dirs]
    val_ids = [c for c in cases.loc[cases["split"] == "val", "case_id"] if c in dirs]
    roi, train_cfg = _stage_settings(cfg, stage)
    out = model_dir(workspace, cfg, stage, preprocess)
    classes = {int(k): v for k, v in stage["classes"].items()}
    merge = stage.get("merge") or {k: [int(k)] for k in stage["classes"]}
    label_map = {int(src): int(dst) for dst, srcs in merge.items() for src in srcs}
    spec = TrainSpec(out_dir=str(out), train_cases=[dirs[c] for c in train_ids], val_cases=[dirs[c] for c in val_ids],
                     classes=classes, label_map=label_map, train=train_cfg, stage=stage["name"], roi=roi,
                     overlap=cfg["infer"]["overlap"], spacing=store.load_plan(plan_id)["target_spacing"])
    out.parent.mkdir(parents=True, exist_ok=True)
    # The lock sits beside the model folder (a refresh replaces the folder): two runs never write one model.
    with FileLock(str(out.parent / f".{out.name}.lock"), timeout=24 * 3600):
        _remove_leftovers(out)
        if refresh:
            drop_marker(workspace, marker, key)
            if out.exists():
                _set_aside(out)
                log.info("stage %s: --refresh train: previous checkpoints in %s removed, training from scratch",
                         stage["name"], out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_spec.json").write_text(spec.to_json())
        log.info("stage %s: training on %d cases, validating on %d, in %s", stage["name"], len(train_ids),
                 len(val_ids), out)
        result = train(spec, progress=progress)
    log.info("stage %s: %d epochs (%s), best val Dice %s at epoch %d, %.0f s%s", stage["name"], result.epochs,
             result.stopped_by, f"{result.best_val_dice:.4f}" if result.best_val_dice is not None else "n/a",
             result.best_epoch, result.seconds,
             f" (resumed after epoch {result.resumed_from_epoch})" if result.resumed_from_epoch is not None else "")
    return _finish(workspace, marker, key, {
        "stage_name": stage["name"], "model_dir": str(out), "plan_id": plan_id, **result.to_dict(),
        # the model's identity for everything downstream (a retrained model is a new run, a new stage-1 cache)
        "checkpoint_sha256": file_digest(result.best_checkpoint),
        "outputs": [result.model_json, result.best_checkpoint]})


# ---------------------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------------------
def key_infer(workspace: str, cfg: dict, trains: list[dict], preprocess: dict) -> str:
    cases = _stage_cases(workspace, cfg)
    chosen = cases[cases["split"].isin(cfg["infer"]["splits"])][["case_id", "split", "image_sha256"]]
    # the trained models by content too: `--refresh train` retrains under the same training key
    models = [[t["key"], t.get("checkpoint_sha256")] for t in trains]
    return stage_key("infer", models, config_part("infer", cfg["infer"]), preprocess["plan_ids"],
                     [s["margin_mm"] for s in stage_list(cfg)], chosen.astype(str).to_numpy().tolist())


def run_id_for(cfg: dict, infer_key: str) -> str:
    return f"{_cohort(cfg)}-{infer_key[:10]}"


def run_record_path(workspace: str, run_id: str) -> Path:
    """runs/RUN_ID.json; a run id is a plain name (`--model ../../outside_run` is refused, never read)."""
    from unet3d.config import safe_name

    safe_name(run_id, "run id", max_len=128)
    return Path(workspace) / "runs" / f"{run_id}.json"


def workspace_relative(workspace: str, path: str | Path) -> str:
    """A path inside the workspace as stored in run records: relative, so a moved or mounted-elsewhere
    workspace still predicts."""
    p, ws = Path(path).resolve(), Path(workspace).resolve()
    return p.relative_to(ws).as_posix() if p.is_relative_to(ws) else str(path)


def resolve_in_workspace(workspace: str, path: str, what: str = "path") -> Path:
    """A path read from a run record, as a path inside this workspace. Relative (new records) or absolute
    (records written before paths were stored relative; an absolute path of a workspace that has moved is
    re-rooted at its `models/COHORT/STAGE-ID` tail). Anything that resolves outside the workspace is refused."""
    ws = Path(workspace).resolve()
    p = Path(path)
    if not p.is_absolute():
        p = ws / p
    elif not p.resolve().is_relative_to(ws) and len(p.parts) >= 3 and p.parts[-3] == "models":
        moved = ws.joinpath(*p.parts[-3:])  # WORKSPACE/models/COHORT/STAGE-ID
        p = moved if moved.exists() else p
    resolved = p.resolve()
    if not resolved.is_relative_to(ws):
        raise ValueError(f"{what} {path!r} is outside the workspace {ws}: refused")
    return resolved


def read_run_record(workspace: str, run_id: str) -> dict:
    """A run record with every stage's model_dir resolved inside the workspace (old absolute records too)."""
    path = run_record_path(workspace, run_id)
    if not path.exists():
        runs = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
        raise ValueError(f"no run {run_id!r} in {Path(workspace) / 'runs'}" + (f"; runs: {', '.join(runs)}" if runs else ""))
    record = json.loads(path.read_text())
    for s in record.get("stages", []):
        s["model_dir"] = str(resolve_in_workspace(workspace, s["model_dir"], f"run {run_id}: stage {s.get('name')} model_dir"))
    return record


def stage1_cache_dir(workspace: str, cfg: dict, trains: list[dict], plan1: dict) -> Path:
    """Where stage 1's probabilities are cached, keyed by everything that changes them: the model (training
    key and checkpoint content), its plan, the inference settings that change outputs (overlap, TTA) and
    the inference code."""
    model = trains[0]
    ident = stable_hash({"train_key": model["key"], "checkpoint": file_digest(Path(model["model_dir"]) / "checkpoint_best.pt"),
                         "plan": plan1["plan_id"], "infer": config_part("infer", {k: v for k, v in cfg["infer"].items()
                                                                                   if k != "splits"}),
                         "code": code_version("infer")}, 16)
    return Path(workspace) / "cache" / "stage1" / ident


def run_infer(workspace: str, cfg: dict, key: str, trains: list[dict], preprocess: dict, progress: bool = True,
              refresh: bool = False) -> dict:
    """Predict every chosen case (resuming: a case predicted before an interruption is kept). `refresh`
    (--refresh infer): this run's predictions and the stage-1 cache are removed first and recomputed."""
    from tqdm.auto import tqdm

    from unet3d.inference import StageModel, cascade
    from unet3d.io import Geometry, from_numpy, write_image_atomic

    cohort = _cohort(cfg)
    run_id = run_id_for(cfg, key)
    stages = stage_list(cfg)
    store = PreprocessedStore(workspace, cohort)
    device = cfg["train"].get("device", "auto")
    models = [StageModel.load(t["model_dir"], device=device, margin_mm=s["margin_mm"] if s.get("roi_from") else None)
              for t, s in zip(trains, stages)]
    plans = [store.load_plan(preprocess["plan_ids"][str(float(s["spacing_factor"]))]) for s in stages]
    pred_root = Path(workspace) / "predictions" / run_id
    cache_root = stage1_cache_dir(workspace, cfg, trains, plans[0]) if len(stages) > 1 else None
    if refresh:
        drop_marker(workspace, "infer", key)
        _set_aside(pred_root)
        if cache_root is not None:
            _set_aside(cache_root)
        log.info("infer %s: --refresh infer: previous predictions and stage-1 cache removed", run_id)
    record = {"run_id": run_id, "cohort": cohort, "config": cfg, "created_at": datetime.now(timezone.utc).isoformat(),
              "stages": [{"name": s["name"], "model_dir": workspace_relative(workspace, t["model_dir"]), "plan": p,
                          "classes": s["classes"],
                          "merge": s.get("merge"), "roi_from": s.get("roi_from"), "margin_mm": s["margin_mm"],
                          "train_key": t["key"]} for s, t, p in zip(stages, trains, plans)]}
    path = run_record_path(workspace, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)

    cases = _stage_cases(workspace, cfg)
    chosen = cases[cases["split"].isin(cfg["infer"]["splits"])]
    records = case_records(chosen)
    splits = dict(zip(chosen["case_id"], chosen["split"]))
    done = skipped = 0
    warnings = []
    bar = tqdm(records, desc="infer", unit="case", disable=not progress, leave=False)
    for case in bar:
        targets = {s["name"]: pred_root / s["name"] / f"{case['case_id']}.nii.gz" for s in stages}
        if all(p.exists() for p in targets.values()):
            skipped += 1  # predicted before this run was interrupted
            continue
        if not all(store.has_case(p["plan_id"], case) for p in plans):
            warnings.append(f"{case['case_id']}: not preprocessed (quarantined?), skipped")
            continue
        inputs = []
        for p in plans:
            image, _label, props = store.load_case(p["plan_id"], case, mmap=False)
            inputs.append((image, props))
        cache_file = cache_root / f"{case_dirname(case)}.npy" if cache_root is not None else None
        cached = np.load(cache_file).astype(np.float32) if cache_file is not None and cache_file.exists() else None
        out, probs1 = cascade(inputs, models, cfg["infer"]["overlap"], cfg["infer"]["tta"],
                              cfg["infer"].get("batch_size", 4), stage1_probs=cached)
        if cached is None and cache_file is not None:
            cache_root.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.tmp.npy")
            np.save(tmp, probs1.astype(np.float16))
            tmp.replace(cache_file)
        for w in out.warnings:
            warnings.append(f"{case['case_id']}: {w}")
            log.warning("case %s: %s", case["case_id"], w)
        geometry = Geometry.from_dict(inputs[0][1].original)
        for name, labels in out.labels.items():
            write_image_atomic(from_numpy(labels.astype(np.uint8), geometry), targets[name])
        done += 1
    log.info("infer %s: %d cases predicted, %d already predicted, %d warnings -> %s", run_id, done, skipped,
             len(warnings), pred_root)
    return _finish(workspace, "infer", key, {
        "run_id": run_id, "n_cases": len(records), "predicted": done, "resumed": skipped, "warnings": warnings,
        "splits": {cid: splits[cid] for cid in sorted(splits)}, "predictions_dir": str(pred_root),
        "outputs": [str(path), str(pred_root)]})


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------
def key_evaluate(cfg: dict, infer: dict) -> str:
    return stage_key("evaluate", infer["key"], cfg["evaluate"])


def run_evaluate(workspace: str, cfg: dict, key: str, infer: dict, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from unet3d.io import read_image, to_numpy
    from unet3d.metrics import case_metrics, lesion_metrics
    from unet3d.report_tables import LESIONS_SCHEMA, METRICS_SCHEMA, write_partition
    from unet3d.labels import map_labels

    cohort = _cohort(cfg)
    run_id = infer["run_id"]
    run_date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    catalog = Catalog(workspace)
    cases = catalog.cases(cohort=cohort).set_index("case_id")
    stages = stage_list(cfg)
    pred_root = Path(infer["predictions_dir"])
    rows, lesion_rows = [], []
    for cid, split in tqdm(sorted(infer["splits"].items()), desc="evaluate", unit="case", disable=not progress,
                           leave=False):
        ref_raw = None
        for s in stages:
            pred_path = pred_root / s["name"] / f"{cid}.nii.gz"
            if not pred_path.exists():
                continue
            if ref_raw is None:
                ref_img = read_image(cases.loc[cid, "label_path"])
                spacing = ref_img.GetSpacing()
                ref_raw = to_numpy(ref_img)
                if not np.issubdtype(ref_raw.dtype, np.integer):
                    ref_raw = np.round(ref_raw)
                ref_raw = ref_raw.astype(np.int64)
            merge = s.get("merge") or {k: [int(k)] for k in s["classes"]}
            label_map = {int(src): int(dst) for dst, srcs in merge.items() for src in srcs}
            ref = map_labels(ref_raw, label_map)
            pred = to_numpy(read_image(pred_path))
            classes = {int(k): v for k, v in s["classes"].items()}
            base = {"cohort": cohort, "stage": s["name"], "model": cfg["train"]["architecture"], "case_id": cid,
                    "split": split}
            rows += [dict(base, **m) for m in case_metrics(pred, ref, spacing, classes)]
            lesion_rows += [dict(base, **m) for m in lesion_metrics(pred, ref, spacing, classes,
                                                                    connectivity=cfg["evaluate"]["lesion_connectivity"])]
    if not rows:
        raise ValueError(f"run {run_id}: no prediction to evaluate in {pred_root}")
    reports = Path(workspace) / "reports"
    metrics_path = write_partition(pd.DataFrame(rows), reports / "metrics", run_date, run_id, METRICS_SCHEMA)
    lesions_path = write_partition(pd.DataFrame(lesion_rows), reports / "lesions", run_date, run_id, LESIONS_SCHEMA)
    log.info("evaluate %s: %d metric rows (%d cases) -> %s", run_id, len(rows), len(infer["splits"]), metrics_path)
    return _finish(workspace, "evaluate", key, {"run_id": run_id, "run_date": run_date, "n_rows": len(rows),
                                                "metrics_path": str(metrics_path), "lesions_path": str(lesions_path),
                                                "outputs": [str(metrics_path), str(lesions_path)]})


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def key_report(cfg: dict, evaluate: dict) -> str:
    return stage_key("report", evaluate["key"], cfg["evaluate"])


def run_report(workspace: str, cfg: dict, key: str, evaluate: dict) -> dict:
    from unet3d.metrics import summarize
    from unet3d.overlays import pick_overlay_cases
    from unet3d.report import format_summary, write_markdown_report
    from unet3d.report_tables import SUMMARY_SCHEMA, write_partition

    run_id, run_date = evaluate["run_id"], evaluate["run_date"]
    metrics = pd.read_parquet(evaluate["metrics_path"])
    lesions = pd.read_parquet(evaluate["lesions_path"])
    summary = summarize(metrics, n_boot=cfg["evaluate"]["n_boot"], seed=0)
    reports = Path(workspace) / "reports"
    summary_path = write_partition(summary, reports / "summary", run_date, run_id, SUMMARY_SCHEMA)

    record = read_run_record(workspace, run_id)
    catalog = Catalog(workspace)
    cases = catalog.cases(cohort=_cohort(cfg)).set_index("case_id")
    pred_root = Path(workspace) / "predictions" / run_id
    overlay_cases = []
    for s in record["stages"]:
        split = "test" if (metrics["split"] == "test").any() else None
        picks = pick_overlay_cases(metrics, s["name"], split)
        merge = s.get("merge") or {k: [int(k)] for k in s["classes"]}
        for label, cid in picks.items():
            overlay_cases.append({"case_id": cid, "stage": s["name"], "label": label,
                                  "image_path": cases.loc[cid, "image_path"] if cases.loc[cid, "source_kind"] != "dicom"
                                  else list(cases.loc[cid, "image_files"]),
                                  "reference_path": cases.loc[cid, "label_path"],
                                  "prediction_path": str(pred_root / s["name"] / f"{cid}.nii.gz"),
                                  "classes": {int(k): v for k, v in s["classes"].items()},
                                  "label_map": {int(src): int(dst) for dst, srcs in merge.items() for src in srcs}})
    report_dir = reports / "runs" / run_id
    md = write_markdown_report(report_dir, run_id, summary, metrics, overlay_cases, lesions=lesions,
                               title=f"{_cohort(cfg)}: run {run_id}")
    table = format_summary(summary)
    log.info("report %s:\n%s", run_id, table)
    return _finish(workspace, "report", key, {"run_id": run_id, "run_date": run_date, "summary_path": str(summary_path),
                                              "report_md": str(md), "table": table,
                                              "outputs": [str(summary_path), str(md)]})
