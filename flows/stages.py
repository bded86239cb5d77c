"""The pipeline's stages as plain functions over the workspace (thin wiring of `data_catalog` and `unet3d`).

Each `run_*` function takes the workspace, the validated config (`unet3d.config.PipelineConfig`) and its
upstream stages' results, calls the library to do its work idempotently (per case, or from the last
checkpoint), and returns a small JSON-able result: its `key`, what it produced (`outputs`, paths checked before
a cache hit is trusted) and a few numbers. What goes into each stage's key is in flows/cache_keys.py; every
workspace path comes from data_catalog/workspace.py. The Prefect tasks and flows that call them are in
flows/pipeline.py.
"""
from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from filelock import FileLock

from data_catalog.case_worker import case_records
from data_catalog.hashing import sha256_file
from data_catalog.ingest import ingest
from data_catalog.preprocess import run_preprocessing
from data_catalog.splits import update_splits
from data_catalog.store import PreprocessedStore
from data_catalog.tables import Catalog
from data_catalog.workspace import Workspace
from unet3d.config import ConfigError, PipelineConfig, StageConfig

from .cache_keys import (labelled_cases, model_identity, plan_id_of, run_id_for, spacing_factors,
                         split_fingerprint, stage1_cache_identity, train_settings, warm_start_source)
from .caching import drop_marker, to_data, write_marker

log = logging.getLogger("flows.stages")


def _finish(workspace: str, stage: str, key: str, result: dict) -> dict:
    # As JSON data: what a cache hit reads back is then identical to what this run returns.
    result = to_data(dict(result, key=key, stage=stage, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    write_marker(workspace, stage, key, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------------------
def run_ingest(workspace: str, cfg: PipelineConfig, key: str) -> dict:
    c = cfg.cohort
    catalog = Catalog(workspace)
    if not c.source:
        cases = catalog.cases(cohort=c.name)
        if cases.empty:
            raise ValueError(f"cohort {c.name!r} is not in the catalog and the config gives no cohort.source")
        log.info("cohort %s: no source in the config, using the %d cases already in the catalog", c.name, len(cases))
        return _finish(workspace, "ingest", key, {"cohort": c.name, "n_cases": len(cases),
                                                  "n_ok": int((cases["status"] == "ok").sum()),
                                                  "outputs": [str(catalog.cases_path)]})
    declared = {**cfg.labels, 0: "background"} if cfg.labels else None
    result = ingest(c.source, c.name, workspace, labels=c.labels_dir, unlabelled=c.unlabelled_source,
                    modality=c.modality,
                    declared_labels=declared, workers=cfg.preprocess.workers, ignore_label=cfg.ignore_label)
    log.info(result.summary())
    issues = catalog.read("issues")
    errors = issues[(issues["cohort"] == c.name) & (issues["severity"] == "error")]
    for r in errors.to_dict("records"):
        log.warning("case %s quarantined: %s: %s", r["case_id"], r["code"], r["message"])
    _labels_match_the_data(cfg, result, errors)
    return _finish(workspace, "ingest", key, {
        "cohort": c.name, "n_cases": result.n_cases, "n_ok": result.n_ok, "n_quarantined": result.n_quarantined,
        "new": result.new, "changed": result.changed, "n_issues": result.n_issues,
        "outputs": [result.cases_path, result.issues_path]})


def _labels_match_the_data(cfg: PipelineConfig, result, errors: pd.DataFrame) -> None:
    """No usable case because the config's labels are not the data's: a config error naming `labels`, not a
    later "no ok cases" (a dataset.json's labels were compared before ingestion; this covers plain folders)."""
    undeclared = errors[errors["code"] == "label_undeclared"]
    if result.n_ok or undeclared.empty or not cfg.labels:
        return
    example = undeclared.sort_values("case_id").iloc[0]
    raise ConfigError(f"labels: no usable case in cohort {cfg.cohort.name!r}: {undeclared['case_id'].nunique()} of "
                      f"{result.n_cases} cases hold label values that labels {sorted(cfg.labels)} "
                      f"does not declare (e.g. {example['case_id']}: {example['message']}); a value that marks "
                      f"unannotated voxels (sparse labels) is declared as ignore_label")


# ---------------------------------------------------------------------------------------------------------
# preprocess, split
# ---------------------------------------------------------------------------------------------------------
def run_preprocess(workspace: str, cfg: PipelineConfig, key: str, refresh: bool = False) -> dict:
    cohort, modality = cfg.cohort.name, cfg.cohort.modality
    result = run_preprocessing(workspace, cohort, cfg.preprocess,
                               modality=None if modality == "other" else modality,
                               spacing_factors=spacing_factors(cfg), refresh=refresh, ignore_label=cfg.ignore_label)
    log.info(result.summary())
    for f in result.failed:
        log.error("case %s failed %s: %s", f["case_id"], f.get("step"), f.get("error"))
    ws = Workspace(workspace)
    return _finish(workspace, "preprocess", key, {
        "cohort": cohort, "plan_ids": {str(k): v for k, v in result.plan_ids.items()}, "processed": result.processed,
        "cached_cases": result.cached, "failed": len(result.failed), "seconds": round(result.seconds, 2),
        "outputs": [str(ws.plan_file(cohort, p)) for p in result.plan_ids.values()]})


def run_split(workspace: str, cfg: PipelineConfig, key: str) -> dict:
    s, cohort = cfg.split, cfg.cohort.name
    result = update_splits(workspace, cohort, s.ratios, s.seed, s.group_by)
    log.info(result.summary())
    return _finish(workspace, "split", key, {"cohort": cohort, "counts": result.counts, "new": result.new,
                                             "digest": split_fingerprint(workspace, cohort),
                                             "outputs": [result.path]})


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def model_folder(workspace: str, cfg: PipelineConfig, stage: StageConfig, preprocess: dict) -> tuple[Path, Path]:
    """(the stage's checkpoint folder, its lock). Checkpoints live under the stage's data + stage + model-config
    identity (train.devices included: another world size trains another model), not the budget, so that raising
    max_epochs continues the run instead of starting over."""
    ws, identity = Workspace(workspace), model_identity(workspace, cfg, stage, preprocess)
    return ws.model_dir(cfg.cohort.name, stage.name, identity), ws.model_lock(cfg.cohort.name, stage.name, identity)


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


def _train_spec(workspace: str, cfg: PipelineConfig, stage: StageConfig, plan_id: str, out: Path):
    """The stage's TrainSpec: its preprocessed train and val case folders, classes, label map and settings."""
    from unet3d.train import TrainSpec

    store = PreprocessedStore(workspace, cfg.cohort.name)
    cases = labelled_cases(workspace, cfg)
    records = {r["case_id"]: r for r in case_records(cases)}
    dirs = {cid: str(store.case_dir(plan_id, r)) for cid, r in records.items() if store.has_case(plan_id, r)}
    members = {split: [dirs[c] for c in cases.loc[cases["split"] == split, "case_id"] if c in dirs]
               for split in ("train", "val")}
    roi, train_cfg = train_settings(cfg, stage)
    return TrainSpec(out_dir=str(out), train_cases=members["train"], val_cases=members["val"],
                     classes=dict(stage.classes), label_map=stage.label_map(), train=train_cfg, stage=stage.name,
                     roi=roi, overlap=cfg.infer.overlap, spacing=store.load_plan(plan_id)["target_spacing"],
                     ignore_label=cfg.ignore_label)


def _log_training(stage: StageConfig, result) -> None:
    log.info("stage %s: %d epochs (%s), best val Dice %s at epoch %d, %.0f s%s", stage.name, result.epochs,
             result.stopped_by, f"{result.best_val_dice:.4f}" if result.best_val_dice is not None else "n/a",
             result.best_epoch, result.seconds,
             f" (resumed after epoch {result.resumed_from_epoch})" if result.resumed_from_epoch is not None else "")


def run_train(workspace: str, cfg: PipelineConfig, key: str, stage: StageConfig, preprocess: dict,
              progress: bool = True, refresh: bool = False) -> dict:
    """Train one stage (resuming its checkpoints). `refresh` (--refresh train): the stage's previous
    checkpoints are removed first, so the model is really trained again from scratch. With `train.devices: N`
    (N > 1) the stage launches N DDP processes on train_spec.json; a failed rank fails the stage in one line."""
    from unet3d.io import write_text_atomic
    from unet3d.train import ModelFiles, train, train_distributed

    from .champion import keep_served_models

    marker, plan_id = f"train-{stage.name}", plan_id_of(preprocess, stage)
    out, lock = model_folder(workspace, cfg, stage, preprocess)
    spec = _train_spec(workspace, cfg, stage, plan_id, out)
    spec.init_from = warm_start_source(workspace, cfg, stage, preprocess)  # train.init_from resolved (None: cold)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=24 * 3600):  # two runs never write one model
        _remove_leftovers(out)
        if refresh:
            drop_marker(workspace, marker, key)
            if out.exists():
                keep_served_models(workspace, out)  # a model that served stays the one that was promoted
                _set_aside(out)
                log.info("stage %s: --refresh train: previous checkpoints in %s removed, training from scratch",
                         stage.name, out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ModelFiles(out).train_spec, spec.to_json())
        log.info("stage %s: training on %d cases, validating on %d, in %s", stage.name, len(spec.train_cases),
                 len(spec.val_cases), out)
        devices = spec.train["devices"]  # the stage's own setting (train_settings resolved it)
        if devices > 1:
            result = train_distributed(ModelFiles(out).train_spec, devices, progress=progress)
        else:
            result = train(spec, progress=progress)
    _log_training(stage, result)
    return _finish(workspace, marker, key, {
        "stage_name": stage.name, "model_dir": str(out), "plan_id": plan_id, **result.to_dict(),
        # the model's identity for everything downstream (a retrained model is a new run, a new stage-1 cache)
        "checkpoint_sha256": sha256_file(result.best_checkpoint),
        "outputs": [result.model_json, result.best_checkpoint]})


# ---------------------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------------------
def read_run_record(workspace: str, run_id: str) -> dict:
    """A run record with every stage's model_dir resolved inside the workspace (old absolute records too)."""
    ws = Workspace(workspace)
    path = ws.run_record(run_id)
    if not path.exists():
        runs = sorted(p.stem for p in ws.runs_dir.glob("*.json")) if ws.runs_dir.exists() else []
        raise ValueError(f"no run {run_id!r} in {ws.runs_dir}" + (f"; runs: {', '.join(runs)}" if runs else ""))
    record = json.loads(path.read_text())
    for s in record.get("stages", []):
        s["model_dir"] = str(ws.resolve(s["model_dir"], f"run {run_id}: stage {s.get('name')} model_dir"))
    return record


def _write_run_record(ws: Workspace, cfg: PipelineConfig, run_id: str, trains: list[dict], plans: list[dict]) -> Path:
    """runs/RUN_ID.json: the config, and per stage its model folder (relative to the workspace) and plan."""
    from unet3d.io import write_json_atomic

    stages = [s.model_dump(mode="json") for s in cfg.resolved_stages()]
    record = {"run_id": run_id, "cohort": cfg.cohort.name, "config": dict(cfg.model_dump(mode="json"), stages=stages),
              "created_at": datetime.now(timezone.utc).isoformat(),
              "stages": [{"name": s["name"], "model_dir": ws.relative(t["model_dir"]), "plan": p, "classes": s["classes"],
                          "merge": s["merge"], "roi_from": s["roi_from"], "margin_mm": s["margin_mm"],
                          "train_key": t["key"]} for s, t, p in zip(stages, trains, plans)]}
    return write_json_atomic(ws.run_record(run_id), record, indent=1, default=str)


def _model_refs(cfg: PipelineConfig, trains: list[dict]) -> list:
    """Each stage's model (train-stage results, in stage order) as a unet3d.inference.ModelRef: its folder, its
    checkpoint's sha256 as the train stage recorded it, the inference device and the stage's ROI margin."""
    from unet3d.inference import ModelRef

    return [ModelRef.of(t["model_dir"], device=cfg.train.device, margin_mm=s.margin_mm if s.roi_from else None,
                        sha256=t.get("checkpoint_sha256")) for t, s in zip(trains, cfg.resolved_stages())]


def _prediction_jobs(ws: Workspace, cfg: PipelineConfig, run_id: str, plans: list[dict], stage1_cache: str | None):
    """(chosen cases with their split, one PredictionJob per case: its preprocessed folders if every stage's
    plan has them, its prediction files, its stage-1 cache file)."""
    from unet3d.inference import PredictionJob

    store = PreprocessedStore(ws.root, cfg.cohort.name)
    cases = labelled_cases(ws.root, cfg)
    chosen = cases[cases["split"].isin(cfg.infer.splits)]
    jobs = []
    for case in case_records(chosen):
        ready = all(store.has_case(p["plan_id"], case) for p in plans)
        jobs.append(PredictionJob(
            case["case_id"], {s.name: ws.prediction_path(run_id, s.name, case["case_id"]) for s in cfg.resolved_stages()},
            case_dirs=[store.case_dir(p["plan_id"], case) for p in plans] if ready else None,
            stage1_cache=ws.stage1_cache_file(stage1_cache, store.case_dir(plans[0]["plan_id"], case).name)
            if stage1_cache is not None else None))
    return chosen, jobs


def run_infer(workspace: str, cfg: PipelineConfig, key: str, trains: list[dict], preprocess: dict,
              progress: bool = True, refresh: bool = False) -> dict:
    """Predict every chosen case (resuming: a case predicted before an interruption is kept). `refresh`
    (--refresh infer): this run's predictions and the stage-1 cache are removed first and recomputed.
    Cases are predicted on the preprocessing stage's Dask cluster (data_catalog/parallel.py) when more than
    one case is pending and there is more than one worker (or a `dask_address`), else in this process."""
    from data_catalog.parallel import infer_jobs

    ws, run_id, stages = Workspace(workspace), run_id_for(cfg, key), cfg.resolved_stages()
    store = PreprocessedStore(workspace, cfg.cohort.name)
    plans = [store.load_plan(plan_id_of(preprocess, s)) for s in stages]
    cache_id = (stage1_cache_identity(cfg, trains[0], trains[0]["best_checkpoint"], plans[0]["plan_id"])
                if len(stages) > 1 else None)
    cache_root = ws.stage1_cache_dir(cache_id) if cache_id else None
    if refresh:
        drop_marker(workspace, "infer", key)
        for folder in filter(None, (ws.predictions_dir(run_id), cache_root)):
            _set_aside(folder)
        log.info("infer %s: --refresh infer: previous predictions and stage-1 cache removed", run_id)
    record_path = _write_run_record(ws, cfg, run_id, trains, plans)
    chosen, jobs = _prediction_jobs(ws, cfg, run_id, plans, cache_id)
    done = infer_jobs(jobs, _model_refs(cfg, trains), plans, cfg.preprocess, cfg.infer, progress=progress)
    log.info("infer %s: %d cases predicted, %d already predicted, %d warnings -> %s", run_id, done.predicted,
             done.resumed, len(done.warnings), ws.predictions_dir(run_id))
    return _finish(workspace, "infer", key, {
        "run_id": run_id, "n_cases": len(jobs), "predicted": done.predicted, "resumed": done.resumed,
        "warnings": done.warnings, "splits": dict(sorted(zip(chosen["case_id"], chosen["split"]))),
        "predictions_dir": str(ws.predictions_dir(run_id)), "outputs": [str(record_path), str(ws.predictions_dir(run_id))]})


# ---------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------
def serving_models(workspace: str, cfg: PipelineConfig, trains: list[dict]) -> list[dict]:
    """The model chain that segments the unlabelled scans, one train-stage result per stage of the cascade (its
    `key`, `model_dir`, `best_checkpoint`, `checkpoint_sha256`, `plan_id`): the one place that decides which
    models serve: the cohort's champion (flows/champion.py) when it has one, else the models this run trained."""
    from .champion import champion_models

    return champion_models(workspace, cfg) or list(trains)


def _segment_jobs(ws: Workspace, cfg: PipelineConfig, chain: str, models: list[dict], plans: list[dict],
                  scans: list[dict]) -> list[tuple[dict, object, Path]]:
    """Per scan: its catalog record, its PredictionJob (labels under the chain's folder, named by the scan's
    content; a cascade's stage-1 probabilities in the stage-1 cache shared with infer) and the record file whose
    presence says the chain has segmented it."""
    from unet3d.inference import PredictionJob

    store, stages, cohort = PreprocessedStore(ws.root, cfg.cohort.name), cfg.resolved_stages(), cfg.cohort.name
    cache_id = (stage1_cache_identity(cfg, models[0], models[0]["best_checkpoint"], plans[0]["plan_id"])
                if len(stages) > 1 else None)
    items = []
    for case in scans:
        name = store.case_dir(plans[0]["plan_id"], case).name
        ready = all(store.has_case(p["plan_id"], case) for p in plans)
        job = PredictionJob(case["case_id"], {s.name: ws.segmentation_path(cohort, chain, s.name, name) for s in stages},
                            case_dirs=[store.case_dir(p["plan_id"], case) for p in plans] if ready else None,
                            stage1_cache=ws.stage1_cache_file(cache_id, name) if cache_id is not None else None)
        items.append((case, job, ws.segmentation_record(cohort, chain, name)))
    return items


def _record_segmented(items: list, done, chain: str) -> list[str]:
    """A record per scan segmented now (written after its labels: its presence says the chain segmented it);
    returns the scans that could not be segmented (not preprocessed)."""
    from unet3d.io import write_json_atomic

    records = {job.case_id: (case, record) for case, job, record in items}
    for outcome in done.outcomes:
        if outcome.written:
            case, record = records[outcome.case_id]
            write_json_atomic(record, {"case_id": outcome.case_id, "image_sha256": case["image_sha256"], "chain": chain,
                                       "roi_found": outcome.roi_found, "warnings": outcome.warnings}, indent=1)
    return sorted(o.case_id for o in done.outcomes if not o.written)


def _volume_rows(ws: Workspace, cfg: PipelineConfig, chain: str, items: list) -> list[dict]:
    """The volumes table's rows (unet3d.volumes) of every segmented scan, from its written labels, with the QC
    ranges of the training split's reference volumes."""
    from unet3d.volumes import read_scan_rows, read_training_ranges

    stages = cfg.resolved_stages()
    final = stages[-1]
    labelled = labelled_cases(str(ws.root), cfg)
    ranges = read_training_ranges(labelled.loc[labelled["split"] == "train", "label_path"], final.label_map(),
                                  final.classes)
    rows = []
    for case, job, record in items:
        if not record.exists():
            continue
        roi_found = json.loads(record.read_text())["roi_found"]
        roi_file = job.targets[stages[0].name] if len(stages) > 1 else None
        for row in read_scan_rows(case["case_id"], job.targets[final.name], dict(final.classes), roi_file, roi_found,
                                  ranges, cfg.evaluate.lesion_connectivity):
            rows.append({"cohort": cfg.cohort.name, "stage": final.name, "model": chain, **row,
                         "prediction_path": ws.relative(job.targets[final.name])})
    return rows


def run_segment(workspace: str, cfg: PipelineConfig, key: str, models: list[dict], run_id: str,
                progress: bool = True, refresh: bool = False) -> dict:
    """Segment every unlabelled scan that this model chain has not segmented yet (a scan segmented by the same
    models with the same settings is kept, whichever run did it), then write the run's volumes table: one row per
    scan and structure of the final stage, with its QC flags (unet3d.volumes). `refresh` (--refresh segment): the
    chain's segmentations are removed first and every scan is segmented again."""
    from data_catalog.parallel import infer_jobs
    from data_catalog.preprocess import preprocess_under_plans
    from unet3d.report_tables import VOLUMES_SCHEMA, write_partition
    from unet3d.volumes import VOLUME_OUTLIER_RULE

    from .cache_keys import segment_chain_identity, unlabelled_cases

    ws, cohort, stages = Workspace(workspace), cfg.cohort.name, cfg.resolved_stages()
    if len(models) != len(stages):
        raise ValueError(f"segment: {len(models)} serving models for the {len(stages)} stages of the config")
    plans = [PreprocessedStore(workspace, cohort).load_plan(m["plan_id"]) for m in models]
    chain = segment_chain_identity(cfg, models)
    if refresh:
        drop_marker(workspace, "segment", key)
        _set_aside(ws.segmentation_dir(cohort, chain))
        log.info("segment %s: --refresh segment: the segmentations of model chain %s removed", cohort, chain)
    # the serving chain may have been trained under an earlier plan (the champion, before `preprocess` changed):
    # new scans are preprocessed under its plans too (a case that fails is quarantined and left out)
    scans = unlabelled_cases(workspace, cfg)
    failed = preprocess_under_plans(workspace, cohort, [p["plan_id"] for p in plans], list(scans["case_id"]),
                                    cfg.preprocess, progress)
    scans = scans[~scans["case_id"].isin({f["case_id"] for f in failed})]  # quarantined now: left out
    items = _segment_jobs(ws, cfg, chain, models, plans, case_records(scans))
    # a scan is done when its record is written (after its labels) and its labels are still there
    todo = [job for _case, job, record in items
            if not (record.exists() and all(Path(p).exists() for p in job.targets.values()))]
    done = infer_jobs(todo, _model_refs(cfg, models), plans, cfg.preprocess, cfg.infer, resume=False,
                      progress=progress, desc="segment")
    not_preprocessed = _record_segmented(items, done, chain)
    rows = _volume_rows(ws, cfg, chain, items)
    run_date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    volumes_path = write_partition(pd.DataFrame(rows, columns=VOLUMES_SCHEMA.names), ws.volumes_table, run_date,
                                   run_id, VOLUMES_SCHEMA) if items else None
    flagged = sorted({r["case_id"] for r in rows if r["qc_empty"] or r["qc_volume_outlier"] or r["qc_roi_at_border"]})
    log.info("segment %s: %d unlabelled scans, %d segmented now, %d already segmented by model chain %s%s; "
             "%d scans flagged by QC (empty, %s, ROI at the border)%s", cohort, len(items), done.predicted,
             len(items) - len(todo), chain, f", {len(not_preprocessed)} not preprocessed" if not_preprocessed else "",
             len(flagged), VOLUME_OUTLIER_RULE, f" -> {volumes_path}" if volumes_path else "")
    return _finish(workspace, "segment", key, {
        "run_id": run_id, "run_date": run_date, "chain": chain, "n_scans": len(items), "segmented": done.predicted,
        "already_segmented": len(items) - len(todo), "not_preprocessed": not_preprocessed, "warnings": done.warnings,
        "qc_flagged": flagged, "n_rows": len(rows), "segmentations_dir": str(ws.segmentation_dir(cohort, chain)),
        "volumes_path": str(volumes_path) if volumes_path else None,
        "outputs": [str(volumes_path)] if volumes_path else []})


# ---------------------------------------------------------------------------------------------------------
# evaluate, report
# ---------------------------------------------------------------------------------------------------------
def run_evaluate(workspace: str, cfg: PipelineConfig, key: str, infer: dict, progress: bool = True) -> dict:
    """Metric and lesion rows of every case, on the preprocessing stage's Dask cluster when there are several
    cases and workers (the same rows in the same order as in one process)."""
    from data_catalog.parallel import evaluate_jobs
    from unet3d.evaluation import EvaluatedCase, EvaluatedStage
    from unet3d.report_tables import LESIONS_SCHEMA, METRICS_SCHEMA, write_partition

    ws, run_id = Workspace(workspace), infer["run_id"]
    run_date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    references = Catalog(workspace).cases(cohort=cfg.cohort.name).set_index("case_id")["label_path"]
    # each stage's own architecture (stages[i].train.architecture may differ from train.architecture)
    stages = [EvaluatedStage(s.name, dict(s.classes), s.label_map(), train_settings(cfg, s)[1]["architecture"],
                             ignore_value=cfg.ignore_label)
              for s in cfg.resolved_stages()]
    cases = [EvaluatedCase(cid, split, references[cid], {s.name: ws.prediction_path(run_id, s.name, cid) for s in stages})
             for cid, split in sorted(infer["splits"].items())]
    rows, lesion_rows = evaluate_jobs(cases, stages, cfg.cohort.name, cfg.train.architecture, cfg.preprocess,
                                      cfg.evaluate.lesion_connectivity, progress=progress)
    if not rows:
        raise ValueError(f"run {run_id}: no prediction to evaluate in {ws.predictions_dir(run_id)}")
    metrics_path = write_partition(pd.DataFrame(rows), ws.report_table("metrics"), run_date, run_id, METRICS_SCHEMA)
    lesions_path = write_partition(pd.DataFrame(lesion_rows), ws.report_table("lesions"), run_date, run_id, LESIONS_SCHEMA)
    log.info("evaluate %s: %d metric rows (%d cases) -> %s", run_id, len(rows), len(infer["splits"]), metrics_path)
    result = {"run_id": run_id, "run_date": run_date, "n_rows": len(rows), "metrics_path": str(metrics_path),
              "lesions_path": str(lesions_path), "outputs": [str(metrics_path), str(lesions_path)]}
    if cfg.cohort.dense_labels_dir:
        fill_in_path = _evaluate_fill_in(ws, cfg, run_id, run_date, cases, stages)
        result.update(fill_in_path=str(fill_in_path), outputs=[*result["outputs"], str(fill_in_path)])
    return _finish(workspace, "evaluate", key, result)


def _evaluate_fill_in(ws: Workspace, cfg: PipelineConfig, run_id: str, run_date: str, cases: list, stages: list) -> Path:
    """Sparse annotation: the fill_in table, Dice on the unannotated voxels of each predicted case that has a dense
    reference in cohort.dense_labels_dir (matched by case id)."""
    from data_catalog.discover import label_files_by_case_id
    from unet3d.report_tables import FILL_IN_SCHEMA, write_partition
    from unet3d.sparse import fill_in_case_rows

    dense = label_files_by_case_id(cfg.cohort.dense_labels_dir)
    rows = []
    for case in cases:
        if case.case_id in dense:
            rows += fill_in_case_rows(case.case_id, case.split, case.reference, dense[case.case_id], case.predictions,
                                      stages, cfg.cohort.name, cfg.train.architecture, cfg.ignore_label)
    if not rows:
        log.warning("evaluate %s: no predicted case has a dense reference in %s (cohort.dense_labels_dir): the "
                    "fill_in table is empty; infer.splits must name the split of the sparse cases (e.g. train)",
                    run_id, cfg.cohort.dense_labels_dir)
    path = write_partition(pd.DataFrame(rows, columns=FILL_IN_SCHEMA.names), ws.report_table("fill_in"), run_date,
                           run_id, FILL_IN_SCHEMA)
    log.info("evaluate %s: fill-in Dice of %d cases with dense references -> %s", run_id,
             len({r["case_id"] for r in rows}), path)
    return path


def _overlay_cases(ws: Workspace, cfg: PipelineConfig, run_id: str, metrics: pd.DataFrame) -> list[dict]:
    """Per stage, the example cases the report draws (best, median, worst Dice) with their files."""
    from unet3d.report import pick_example_cases

    cases = Catalog(ws.root).cases(cohort=cfg.cohort.name).set_index("case_id")
    overlays = []
    for s in cfg.resolved_stages():
        for example in pick_example_cases(metrics, s.name):
            cid, label = example["case_id"], example["label"]
            case = cases.loc[cid]
            overlays.append({"case_id": cid, "stage": s.name, "label": label, "split": example["split"],
                             "image_path": case["image_path"] if case["source_kind"] != "dicom" else list(case["image_files"]),
                             "reference_path": case["label_path"],
                             "prediction_path": str(ws.prediction_path(run_id, s.name, cid)),
                             "classes": dict(s.classes), "label_map": s.label_map()})
    return overlays


def run_report(workspace: str, cfg: PipelineConfig, key: str, evaluate: dict) -> dict:
    from unet3d.metrics import summarize
    from unet3d.report import format_summary, write_markdown_report
    from unet3d.report_tables import SUMMARY_SCHEMA, write_partition

    ws, run_id, run_date = Workspace(workspace), evaluate["run_id"], evaluate["run_date"]
    read_run_record(workspace, run_id)  # the run's record must exist, its model folders inside the workspace
    metrics = pd.read_parquet(evaluate["metrics_path"])
    lesions = pd.read_parquet(evaluate["lesions_path"])
    # lesion precision/recall/F1 as rows of the same summary (metric lesion_*): the SPEC's schema is kept
    summary = summarize(metrics, n_boot=cfg.evaluate.n_boot, seed=0, lesions=lesions)
    summary_path = write_partition(summary, ws.report_table("summary"), run_date, run_id, SUMMARY_SCHEMA)
    fill_in = pd.read_parquet(evaluate["fill_in_path"]) if evaluate.get("fill_in_path") else None
    md = write_markdown_report(ws.run_report_dir(run_id), run_id, summary, metrics, _overlay_cases(ws, cfg, run_id, metrics),
                               lesions=lesions, title=f"{cfg.cohort.name}: run {run_id}", fill_in=fill_in)
    from .champion import append_report_sections  # (scipy: imported where a report is written, not by every command)

    md = append_report_sections(workspace, cfg, run_id, md)  # the champion / challenger decision, the history PNG
    table = format_summary(summary)
    log.info("report %s:\n%s", run_id, table)
    return _finish(workspace, "report", key, {"run_id": run_id, "run_date": run_date, "summary_path": str(summary_path),
                                              "report_md": str(md), "table": table,
                                              "outputs": [str(summary_path), str(md)]})


# ---------------------------------------------------------------------------------------------------------
# champion / challenger
# ---------------------------------------------------------------------------------------------------------
def run_champion(workspace: str, cfg: PipelineConfig, infer: dict, evaluate: dict, progress: bool = True) -> dict:
    """The run's models against the cohort's champion on the frozen test cases (flows/champion.py): promoted when
    not worse beyond `promote.margin`, else rejected; a decision made before for the same pair is read back."""
    from .champion import challenge

    return to_data(challenge(workspace, cfg, infer, evaluate, progress=progress))
