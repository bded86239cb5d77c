"""The serving model of a cohort in the workspace: the challenge after each run's evaluation, promotion and
rollback by hand, the champion's model chain for `predict --model champion` and the segment stage, and the
report's champion and history sections. The decision and the registry are unet3d.champion's; this module finds
the files, predicts and scores the champion on the frozen cases, and writes the decisions table."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from data_catalog.store import PreprocessedStore
from data_catalog.tables import Catalog
from data_catalog.workspace import Workspace
from unet3d.champion import (case_scores, champion_drift, current_champion, decide, promote, read_registry,
                             rollback)
from unet3d.config import PipelineConfig
from unet3d.report_tables import DECISIONS_SCHEMA, read_table, write_partition

log = logging.getLogger("flows.champion")

METRIC = "dice"


def chain_of(cfg: PipelineConfig) -> list[str]:
    return [s.name for s in cfg.resolved_stages()]


def registry_file(workspace: str, cfg: PipelineConfig) -> Path:
    return Workspace(workspace).champion_file(cfg.cohort.name, chain_of(cfg))


def run_entry(workspace: str, run_id: str) -> dict:
    """A run as a registry entry: per stage its model folder (relative to the workspace), checkpoint sha256,
    training key and plan id (what the segment stage and `predict` need to run the chain)."""
    from data_catalog.hashing import sha256_file

    from .stages import read_run_record

    ws, record = Workspace(workspace), read_run_record(workspace, run_id)
    stages = [{"name": s["name"], "model_dir": ws.relative(s["model_dir"]), "train_key": s.get("train_key"),
               "plan_id": s["plan"]["plan_id"],
               "checkpoint_sha256": sha256_file(Path(s["model_dir"]) / "checkpoint_best.pt")}
              for s in record["stages"]]
    return {"run_id": run_id, "cohort": record["cohort"], "stages": stages}


def keep_served_models(workspace: str, folder: Path) -> list[str]:
    """Before `--refresh train` retrains `folder`: every model that has served from it (any registry entry, the
    champion or one a rollback returns to) is copied to its own folder under champions/, and its registry entry
    and run record point there, so that the served model stays the one that was promoted. Returns the run ids."""
    import shutil

    from unet3d.io import write_json_atomic

    ws, folder, kept = Workspace(workspace), Path(folder).resolve(), []
    for path in ws.champion_files():
        registry = read_registry(path)
        changed = False
        for entry in registry["served"]:
            for stage in entry["stages"]:
                if ws.resolve(stage["model_dir"], f"champion {entry['run_id']}: stage {stage['name']}") != folder:
                    continue
                target = ws.champion_model_dir(registry["cohort"], entry["run_id"], stage["name"])
                if not target.exists():
                    partial = target.with_name(f".{target.name}.partial")
                    shutil.rmtree(partial, ignore_errors=True)
                    shutil.copytree(folder, partial)  # copy2: the files keep their times
                    partial.rename(target)
                _repoint_run_record(ws, entry["run_id"], stage["name"], ws.relative(target))
                stage["model_dir"], changed = ws.relative(target), True
                kept.append(entry["run_id"])
                log.info("champion %s: stage %s's model kept in %s before %s is retrained", entry["run_id"],
                         stage["name"], target, folder)
        if changed:
            write_json_atomic(path, registry, indent=1)
    return sorted(set(kept))


def _repoint_run_record(ws: Workspace, run_id: str, stage: str, model_dir: str) -> None:
    from unet3d.io import write_json_atomic

    path = ws.run_record(run_id)
    if not path.exists():
        return
    record = json.loads(path.read_text())
    for s in record.get("stages", []):
        if s.get("name") == stage:
            s["model_dir"] = model_dir
    write_json_atomic(path, record, indent=1)


def _registry_for_cohort(workspace: str, cohort: str | None) -> Path:
    """The one registry of `cohort` (or of the workspace, when it has only one); refused when ambiguous."""
    files = Workspace(workspace).champion_files()
    if cohort is not None:
        files = [f for f in files if f.parent.name == cohort]
    if len(files) == 1:
        return files[0]
    names = ", ".join(f"{f.parent.name} ({f.stem.replace('__', ' -> ')})" for f in files)
    if not files:
        raise ValueError(f"no champion in {Workspace(workspace).root}" + (f" for cohort {cohort!r}" if cohort else "")
                         + ": a model is promoted by the first `unet3d run`, or by `unet3d promote RUN_ID`")
    raise ValueError(f"several champions ({names}): name the cohort, e.g. --model champion:{files[0].parent.name}")


def champion_run_id(workspace: str, cohort: str | None = None) -> str:
    """The run id of the serving model (`unet3d predict --model champion[:COHORT]`)."""
    return current_champion(read_registry(_registry_for_cohort(workspace, cohort)))["run_id"]


def champion_models(workspace: str, cfg: PipelineConfig) -> list[dict] | None:
    """The champion's model chain as train-stage results (key, model_dir, best_checkpoint, checkpoint_sha256,
    plan_id), or None when the cohort has no champion yet."""
    entry = current_champion(read_registry(registry_file(workspace, cfg)))
    if entry is None:
        return None
    ws = Workspace(workspace)
    models = []
    for s in entry["stages"]:
        folder = ws.resolve(s["model_dir"], f"champion {entry['run_id']}: stage {s['name']} model_dir")
        models.append({"stage_name": s["name"], "key": s["train_key"], "model_dir": str(folder),
                       "best_checkpoint": str(folder / "checkpoint_best.pt"),
                       "checkpoint_sha256": s["checkpoint_sha256"], "plan_id": s["plan_id"]})
    return models


# ---------------------------------------------------------------------------------------------------------
# Promotion and rollback by hand
# ---------------------------------------------------------------------------------------------------------
def promote_by_hand(workspace: str, run_id: str, reason: str | None = None) -> dict:
    entry = run_entry(workspace, run_id)
    chain = [s["name"] for s in entry["stages"]]
    path = Workspace(workspace).champion_file(entry["cohort"], chain)
    current = current_champion(read_registry(path))
    if current is not None and current["run_id"] == run_id:
        raise ValueError(f"run {run_id} is already the champion of cohort {entry['cohort']}")
    return promote(path, entry["cohort"], chain, entry, "manual", reason or "promoted by hand")


def rollback_by_hand(workspace: str, cohort: str | None = None, reason: str | None = None) -> dict:
    return rollback(_registry_for_cohort(workspace, cohort), reason or "rolled back by hand")


# ---------------------------------------------------------------------------------------------------------
# The challenge
# ---------------------------------------------------------------------------------------------------------
def _earlier_decision(ws: Workspace, run_id: str, champion_id: str | None) -> dict | None:
    rows = read_table(ws.decisions_table, run_id)
    if rows.empty:
        return None
    same = rows[rows["champion_run_id"].fillna("") == (champion_id or "")]
    return same.iloc[-1].to_dict() if len(same) else None


def _write_decision(ws: Workspace, run_id: str, run_date: str, row: dict) -> Path:
    earlier = read_table(ws.decisions_table, run_id).drop(columns=["run_id", "run_date"], errors="ignore")
    frame = pd.concat([earlier, pd.DataFrame([row])], ignore_index=True) if len(earlier) else pd.DataFrame([row])
    return write_partition(frame.reindex(columns=DECISIONS_SCHEMA.names), ws.decisions_table, run_date, run_id,
                           DECISIONS_SCHEMA)


def _champion_metrics(ws: Workspace, cfg: PipelineConfig, champion_id: str, cases: pd.DataFrame,
                      progress: bool) -> pd.DataFrame:
    """The champion's final-stage metric rows on `cases`: its predictions under its own run (those it made
    before are kept; new cases are predicted now with its models, plans and inference settings)."""
    from data_catalog.parallel import evaluate_jobs, infer_jobs
    from data_catalog.preprocess import preprocess_under_plans
    from unet3d.evaluation import EvaluatedCase, EvaluatedStage
    from unet3d.inference import ModelRef, PredictionJob

    from data_catalog.case_worker import case_records
    from .stages import read_run_record

    record = read_run_record(str(ws.root), champion_id)
    plans = [s["plan"] for s in record["stages"]]
    # cases that arrived after the champion's plan stopped being the current one: preprocessed under it now
    preprocess_under_plans(ws.root, cfg.cohort.name, [p["plan_id"] for p in plans], list(cases["case_id"]),
                           cfg.preprocess, progress)
    store = PreprocessedStore(ws.root, cfg.cohort.name)
    jobs = []
    for case in case_records(cases):
        ready = all(store.has_case(p["plan_id"], case) for p in plans)
        jobs.append(PredictionJob(case["case_id"], {s["name"]: ws.prediction_path(champion_id, s["name"], case["case_id"])
                                                    for s in record["stages"]},
                                  case_dirs=[store.case_dir(p["plan_id"], case) for p in plans] if ready else None))
    # the champion's own overlap and TTA (what its predictions were made with), this run's batch size
    own = record["config"].get("infer", {})
    infer = cfg.infer.model_copy(update={k: own[k] for k in ("overlap", "tta") if k in own})
    refs = [ModelRef.of(s["model_dir"], device=cfg.train.device, margin_mm=s["margin_mm"] if s.get("roi_from") else None)
            for s in record["stages"]]
    infer_jobs(jobs, refs, plans, cfg.preprocess, infer, progress=progress, desc="champion")
    final = cfg.resolved_stages()[-1]
    # scored as run_evaluate scores the challenger (the same ignore value), so that the two are comparable
    stage = EvaluatedStage(final.name, dict(final.classes), final.label_map(), ignore_value=cfg.ignore_label)
    evaluated = [EvaluatedCase(c["case_id"], "test", c["label_path"], {final.name: j.targets[final.name]})
                 for c, j in zip(case_records(cases), jobs)]
    rows, _ = evaluate_jobs(evaluated, [stage], cfg.cohort.name, "champion", cfg.preprocess,
                            cfg.evaluate.lesion_connectivity, progress=progress)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["stage", "case_id", "class_name", METRIC])


def challenge(workspace: str, cfg: PipelineConfig, infer: dict, evaluate: dict, progress: bool = True) -> dict:
    """The run's model against the champion (see unet3d.champion): promoted or rejected, recorded in the registry
    and the decisions table. A decision made before for the same pair is read back, not made again."""
    ws, run_id, chain = Workspace(workspace), infer["run_id"], chain_of(cfg)
    path, cohort, final = registry_file(workspace, cfg), cfg.cohort.name, chain[-1]
    champion = current_champion(read_registry(path))
    champion_id = champion["run_id"] if champion else None
    base = {"run_id": run_id, "champion_run_id": champion_id, "chain": " -> ".join(chain), "cohort": cohort}
    if champion_id == run_id:
        return dict(base, decision="champion", new=False, cached=True, reason=f"run {run_id} is the champion")
    earlier = _earlier_decision(ws, run_id, champion_id)
    if earlier is not None:
        return dict(base, **{k: v for k, v in earlier.items() if k in DECISIONS_SCHEMA.names}, new=False, cached=True)
    row = dict(base, challenger_run_id=run_id, metric=f"mean {METRIC} over {final}'s classes, per case",
               decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    del row["run_id"]
    if champion is None:
        row.update(decision="promoted", reason=f"first model of cohort {cohort} ({row['chain']}): no champion to "
                                               f"compare with")
        promote(path, cohort, chain, run_entry(workspace, run_id), "first", row["reason"])
    elif not _test_cases(evaluate):
        reason = (f"not compared: run {run_id} evaluated no test case (infer.splits {cfg.infer.splits}); the champion "
                  f"{champion_id} stays")
        log.warning("champion %s: %s", cohort, reason)
        return dict(base, decision="not compared", reason=reason, new=False, cached=True)
    else:
        row.update(_compare(ws, cfg, run_id, champion_id, evaluate, progress))
        if row["decision"] == "promoted":
            promote(path, cohort, chain, run_entry(workspace, run_id), "challenge", row["reason"])
    table = _write_decision(ws, run_id, evaluate["run_date"], row)
    log.info("champion %s: run %s %s: %s", cohort, run_id, row["decision"], row["reason"])
    return dict(base, **row, new=True, cached=False, table=str(table))


def _test_cases(evaluate: dict) -> list[str]:
    metrics = pd.read_parquet(evaluate["metrics_path"], columns=["case_id", "split"])
    return sorted(metrics.loc[metrics["split"] == "test", "case_id"].unique())


def _compare(ws: Workspace, cfg: PipelineConfig, run_id: str, champion_id: str, evaluate: dict,
             progress: bool) -> dict:
    """Both models on the frozen cases (the current test split: the champion's test cases plus new ones)."""
    from flows.cache_keys import labelled_cases

    final = cfg.resolved_stages()[-1].name
    metrics = pd.read_parquet(evaluate["metrics_path"])
    frozen = _test_cases(evaluate)
    cases = labelled_cases(str(ws.root), cfg)
    champion_rows = _champion_metrics(ws, cfg, champion_id, cases[cases["case_id"].isin(frozen)], progress)
    champion = case_scores(champion_rows, final)
    frozen = [c for c in frozen if c in champion.index]  # a case the champion's plan cannot read is left out
    challenger, champion = case_scores(metrics, final, frozen), champion.loc[frozen]
    p = cfg.promote
    decision = decide(challenger, champion, p.margin, p.n_boot, p.confidence)
    own = read_table(Workspace(ws.root).report_table("metrics"), champion_id)
    own_cases = set(own.loc[own["split"] == "test", "case_id"]) if len(own) else set()
    drift = champion_drift(champion[champion.index.isin(own_cases)], champion[~champion.index.isin(own_cases)],
                           p.n_boot, p.confidence)
    out = {k: v for k, v in decision.to_dict().items() if k != "promoted"}
    out.update(decision="promoted" if decision.promoted else "rejected", metric=f"mean {METRIC} over {final}'s "
               f"classes, per case", n_new_cases=int((~champion.index.isin(own_cases)).sum()))
    if drift is not None:
        out.update(champion_new_mean=drift.new_mean, champion_ci_low=drift.ci_low, champion_ci_high=drift.ci_high,
                   champion_dropped=drift.dropped, drift_reason=drift.reason)
    return out


def alerts(result: dict) -> list[tuple[str, str]]:
    """(event name, message) for each alert of a new decision: a rejected challenger, a champion that dropped."""
    out = []
    if result.get("decision") == "rejected":
        out.append(("unet3d.challenger.rejected", f"challenger {result['challenger_run_id']} rejected, champion "
                                                  f"{result['champion_run_id']} stays: {result['reason']}"))
    if result.get("champion_dropped"):
        out.append(("unet3d.champion.dropped", result.get("drift_reason") or "the champion's metric on new cases "
                                                                             "dropped below its own interval"))
    return out


def event_payload(result: dict) -> dict:
    """The numbers of a decision, JSON-safe, for an event's payload."""
    keys = ("cohort", "chain", "challenger_run_id", "champion_run_id", "decision", "reason", "n_cases", "n_new_cases",
            "challenger_mean", "champion_mean", "difference", "ci_low", "ci_high", "margin", "confidence",
            "champion_new_mean", "champion_ci_low", "champion_ci_high", "champion_dropped")
    payload = {}
    for k in keys:
        v = result.get(k)
        payload[k] = None if v is None or (isinstance(v, float) and v != v) else (v.item() if hasattr(v, "item") else v)
    return payload


# ---------------------------------------------------------------------------------------------------------
# History and the report's sections
# ---------------------------------------------------------------------------------------------------------
def run_order(ws: Workspace, cohort: str) -> list[str]:
    """The cohort's run ids, oldest first (by their run record's creation time)."""
    records = []
    for p in sorted(ws.runs_dir.glob("*.json")) if ws.runs_dir.exists() else []:
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("cohort") == cohort:
            records.append((str(record.get("created_at", "")), record["run_id"]))
    return [run_id for _, run_id in sorted(records)]


def history(workspace: str, cohort: str | None = None, stage: str | None = None) -> pd.DataFrame:
    """The final stage's test metric per class across the cohort's runs (unet3d.history.metric_history)."""
    from unet3d.history import metric_history

    ws = Workspace(workspace)
    summary = read_table(ws.report_table("summary"))
    if summary.empty:
        raise ValueError(f"no run reported yet in {ws.report_table('summary')}; run `unet3d run CONFIG` first")
    cohorts = sorted(summary["cohort"].dropna().unique())
    if cohort is None and len(cohorts) > 1:
        raise ValueError(f"several cohorts ({', '.join(cohorts)}): name one with --cohort")
    cohort = cohort or cohorts[0]
    order = run_order(ws, cohort)
    rows = summary[summary["cohort"] == cohort]
    if stage is None:  # the final stage: the last one of the latest run's chain
        latest = json.loads(ws.run_record(order[-1]).read_text()) if order else None
        stage = latest["stages"][-1]["name"] if latest else sorted(rows["stage"].unique())[-1]
    return metric_history(rows, order, stage, METRIC)


def report_sections(workspace: str, cfg: PipelineConfig, run_id: str, report_dir: Path) -> list[str]:
    """Markdown for the run's report: its champion / challenger decision and the history PNG (written beside)."""
    from unet3d.history import plot_history

    ws = Workspace(workspace)
    lines = ["", "## Champion and challenger", ""]
    decisions = read_table(ws.decisions_table, run_id)
    if decisions.empty:
        lines.append("No decision recorded for this run.")
    for r in decisions.to_dict("records"):
        lines.append(f"- **{r['decision']}** against champion `{r['champion_run_id'] or 'none'}`: {r['reason']}")
        if r.get("champion_dropped"):
            lines.append(f"- **alert**: the champion's mean Dice on {r['n_new_cases']} new test cases is "
                         f"{r['champion_new_mean']:.4f}, below its own interval [{r['champion_ci_low']:.4f}, "
                         f"{r['champion_ci_high']:.4f}]")
    order = run_order(ws, cfg.cohort.name)
    frame = history(workspace, cfg.cohort.name, chain_of(cfg)[-1])
    if run_id in order:  # this run and those before it (a report written again later does not change)
        frame = frame[frame["run_id"].isin(order[: order.index(run_id) + 1])]
    if not frame.empty:
        png = plot_history(frame, report_dir / "history.png", f"{cfg.cohort.name}: test {METRIC} across runs")
        lines += ["", "## History", "", f"Test {METRIC} of the final stage per class, run after run (mean and 95 % "
                  f"bootstrap interval over cases).", "", f"![history]({png.name})"]
    return lines


def append_report_sections(workspace: str, cfg: PipelineConfig, run_id: str, md: str | Path) -> Path:
    """report.md with the champion and history sections appended (rewritten atomically)."""
    from unet3d.io import write_text_atomic

    md = Path(md)
    lines = report_sections(workspace, cfg, run_id, md.parent)
    return write_text_atomic(md, md.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(lines) + "\n")
