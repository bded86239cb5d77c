"""The pipeline flow: one Prefect flow whose task runs are the stages.

ingest -> preprocess (Dask) -> split -> train (one task per cascade stage) -> infer -> evaluate -> report

Every stage is a Prefect task run of the pipeline's flow run, whose cache key is the stage key of
flows/cache_keys.py and whose result (small: paths, hashes, counts) is persisted in the workspace. A stage is
called with `refresh_cache` when the user asked for it (`--refresh STAGE` refreshes that stage and everything
downstream) or when its completion marker or outputs are missing. Inside a stage the work is resumable on its
own (preprocessing per case, training from the last checkpoint, inference per case), so whatever stopped a run,
running it again recomputes nothing that completed.
"""
# No `from __future__ import annotations` here: a served deployment loads this file as a module of Prefect's own
# (not as flows.pipeline), where Prefect cannot resolve string annotations such as "PipelineConfig" when it
# validates a flow's parameters; real annotations need no lookup.
from flows.settings import apply_defaults, resolve_workspace  # noqa: F401  (resolve_workspace: re-exported)

apply_defaults()

import contextlib  # noqa: E402
import contextvars  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from prefect import __version__ as prefect_version  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402

from data_catalog.workspace import Workspace  # noqa: E402
from unet3d.config import PipelineConfig, StageConfig, load_config  # noqa: E402

from . import cache_keys as K  # noqa: E402
from . import stages as S  # noqa: E402
from .cache_keys import DOWNSTREAM, STAGES  # noqa: E402
from .caching import marker_valid, to_data  # noqa: E402
from .preflight import check_patch_fits_cohort, preflight  # noqa: E402
from .results import DataOnlyJSON, result_storage  # noqa: E402

# The project's loggers at INFO (unless set otherwise): Prefect sends them to the flow run's log (the UI),
# whose handler they would otherwise never reach, as they inherit the root logger's WARNING. What the console
# shows is the console handler's choice (the CLI: warnings unless -v).
for _name in ("data_catalog", "unet3d", "flows"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)

# ---------------------------------------------------------------------------------------------------------
# Caching and retry policy, for every stage task
# ---------------------------------------------------------------------------------------------------------
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ESTALE, errno.EBUSY}


def is_transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (network file systems, busy files); a bug or bad data fails at once."""
    try:
        state.result()
    except (TimeoutError, ConnectionError):
        return True
    except OSError as exc:
        return exc.errno in TRANSIENT_ERRNOS
    except BaseException:
        return False
    return False


def _key_from_parameters(context, parameters: dict[str, Any]) -> str:
    return parameters["key"]


# Results are stored as plain JSON and only plain JSON is ever read back (flows/results.py): a result file
# in the workspace that names another serializer (pickle) is a cache miss, never deserialized.
STAGE_TASK_OPTIONS = dict(cache_key_fn=_key_from_parameters, persist_result=True, retries=2, retry_delay_seconds=10,
                          retry_condition_fn=is_transient, cache_result_in_memory=False,
                          result_serializer=DataOnlyJSON())


@task(name="ingest", **STAGE_TASK_OPTIONS)
def ingest_task(key: str, workspace: str, cfg: PipelineConfig) -> dict:
    return S.run_ingest(workspace, cfg, key)


@task(name="preprocess", **STAGE_TASK_OPTIONS)
def preprocess_task(key: str, workspace: str, cfg: PipelineConfig, replan: bool = False) -> dict:
    return S.run_preprocess(workspace, cfg, key, refresh=replan)


@task(name="split", **STAGE_TASK_OPTIONS)
def split_task(key: str, workspace: str, cfg: PipelineConfig) -> dict:
    return S.run_split(workspace, cfg, key)


@task(name="train", **STAGE_TASK_OPTIONS)
def train_task(key: str, workspace: str, cfg: PipelineConfig, stage: StageConfig, preprocess: dict, refresh: bool = False) -> dict:
    return S.run_train(workspace, cfg, key, stage, preprocess, refresh=refresh)


@task(name="infer", **STAGE_TASK_OPTIONS)
def infer_task(key: str, workspace: str, cfg: PipelineConfig, trains: list[dict], preprocess: dict, refresh: bool = False) -> dict:
    return S.run_infer(workspace, cfg, key, trains, preprocess, refresh=refresh)


@task(name="evaluate", **STAGE_TASK_OPTIONS)
def evaluate_task(key: str, workspace: str, cfg: PipelineConfig, infer: dict) -> dict:
    return S.run_evaluate(workspace, cfg, key, infer)


@task(name="report", **STAGE_TASK_OPTIONS)
def report_task(key: str, workspace: str, cfg: PipelineConfig, evaluate: dict) -> dict:
    return S.run_report(workspace, cfg, key, evaluate)


@task(name="segment", **STAGE_TASK_OPTIONS)
def segment_task(key: str, workspace: str, cfg: PipelineConfig, models: list[dict], run_id: str,
                 refresh: bool = False) -> dict:
    return S.run_segment(workspace, cfg, key, models, run_id, refresh=refresh)


# The stage this process is running (for the command line's message when Ctrl-C stops it).
_RUNNING: dict[str, Any] = {}


def interrupted_stage() -> str:
    """What the stage running in this process had done when it was interrupted, for one line:
    'stage train-organ stopped after epoch 3' (epochs read from the model folder's training log)."""
    stage, model_dir = _RUNNING.get("stage"), _RUNNING.get("model_dir")
    if stage is None:
        return ""
    if model_dir is None:
        return f"stage {stage} stopped (its finished cases are kept)"
    from unet3d.train import ModelFiles

    log_path = ModelFiles(model_dir).train_log
    try:
        import pandas as pd
        epochs = len(pd.read_parquet(log_path, columns=["epoch"])) if log_path.exists() else 0
    except Exception:  # a log being written at the moment of the interrupt: say what is sure
        epochs = 0
    return f"stage {stage} stopped " + (f"after epoch {epochs}" if epochs else "before its first epoch ended")


def _call(stage: str, marker_name: str, task_fn, key: str, workspace: str, refresh_stages: set[str],
          task_kwargs: dict[str, Any], model_dir: str | None = None) -> dict:
    """Run a stage task through the cache; log hit or miss, start and end."""
    logger = get_run_logger()
    _RUNNING.clear()
    _RUNNING.update(stage=marker_name, model_dir=model_dir)
    forced = stage in refresh_stages
    stale = not marker_valid(workspace, marker_name, key)
    t0 = time.perf_counter()
    logger.info("stage %s: start (key %s)", marker_name, key[:12])
    configured = task_fn.with_options(refresh_cache=forced or stale, task_run_name=marker_name)
    # Prefect's constructor accepts only server-saved storage blocks; a local block set on the task copy is
    # used as is at run time (as the Path form would be), and it reads only data-only records.
    configured.result_storage = result_storage(Workspace(workspace).results_dir)
    state = configured(key=key, workspace=workspace, return_state=True, **task_kwargs)
    result = to_data(state.result())  # raises the stage's exception if it failed
    cached = state.name == "Cached"
    seconds = time.perf_counter() - t0
    logger.info("stage %s: %s in %.1f s", marker_name, "cache hit" if cached else
                ("recomputed (--refresh)" if forced else "cache miss, computed"), seconds)
    _RUNNING.clear()
    return dict(result, cached=cached, stage_seconds=round(seconds, 2))


# ---------------------------------------------------------------------------------------------------------
# The stages, each a cached task run of the pipeline's own flow run
# ---------------------------------------------------------------------------------------------------------
# Plain functions, not subflows: a subflow run costs its own flow run on the server (create, two state changes,
# reads: 0.2 s per stage on a 2-core machine, 2 s of a fully cached 9-stage run), and the stages' task runs
# and their logs then sit on the flow run a user opens in the UI.
def ingest_stage(workspace: str, cfg: PipelineConfig, refresh: set[str]) -> dict:
    return _call("ingest", "ingest", ingest_task, K.key_ingest(workspace, cfg), workspace, refresh, dict(cfg=cfg))


def preprocess_stage(workspace: str, cfg: PipelineConfig, refresh: set[str]) -> dict:
    return _call("preprocess", "preprocess", preprocess_task, K.key_preprocess(workspace, cfg), workspace, refresh,
                 dict(cfg=cfg, replan="preprocess" in refresh))


def split_stage(workspace: str, cfg: PipelineConfig, refresh: set[str]) -> dict:
    return _call("split", "split", split_task, K.key_split(workspace, cfg), workspace, refresh, dict(cfg=cfg))


def train_stage(workspace: str, cfg: PipelineConfig, preprocess: dict, refresh: set[str]) -> list[dict]:
    out = []
    for stage in cfg.resolved_stages():
        key = K.key_train(workspace, cfg, stage, preprocess)
        # --refresh train retrains from scratch (the stage's old checkpoints are removed, not resumed)
        out.append(_call("train", f"train-{stage.name}", train_task, key, workspace, refresh,
                         dict(cfg=cfg, stage=stage, preprocess=preprocess, refresh="train" in refresh),
                         model_dir=str(S.model_folder(workspace, cfg, stage, preprocess)[0])))
    return out


def infer_stage(workspace: str, cfg: PipelineConfig, trains: list[dict], preprocess: dict, refresh: set[str]) -> dict:
    return _call("infer", "infer", infer_task, K.key_infer(workspace, cfg, trains, preprocess), workspace,
                 refresh, dict(cfg=cfg, trains=trains, preprocess=preprocess, refresh="infer" in refresh))


def evaluate_stage(workspace: str, cfg: PipelineConfig, infer: dict, refresh: set[str]) -> dict:
    return _call("evaluate", "evaluate", evaluate_task, K.key_evaluate(cfg, infer), workspace, refresh,
                 dict(cfg=cfg, infer=infer))


def report_stage(workspace: str, cfg: PipelineConfig, evaluate: dict, refresh: set[str]) -> dict:
    return _call("report", "report", report_task, K.key_report(cfg, evaluate), workspace, refresh,
                 dict(cfg=cfg, evaluate=evaluate))


def segment_stage(workspace: str, cfg: PipelineConfig, trains: list[dict], preprocess: dict,
                  refresh: set[str]) -> dict:
    """The unlabelled scans with the serving models (flows.stages.serving_models); its volumes table is the
    partition of this run (the run id of infer's key)."""
    models = S.serving_models(workspace, cfg, trains)
    run_id = K.run_id_for(cfg, K.key_infer(workspace, cfg, trains, preprocess))
    return _call("segment", "segment", segment_task, K.key_segment(workspace, cfg, models, run_id), workspace,
                 refresh, dict(cfg=cfg, models=models, run_id=run_id, refresh="segment" in refresh))


ARTIFACT_METRICS = ("dice", "iou", "precision", "recall", "specificity", "hd95_mm")


def summary_artifact_rows(summary) -> list[dict]:
    """The summary as the UI's table: one row per stage x split x class, one column per metric holding
    'mean [95 % CI]' (3 decimals, distances in mm with 2, as on the console)."""
    import math

    def cell(metric: str, row) -> str:
        if row is None or row["mean"] is None or math.isnan(row["mean"]):
            return "–"
        digits = 2 if metric.endswith("_mm") else 3
        text = f"{row['mean']:.{digits}f}"
        if row["ci_low"] is not None and row["ci_high"] is not None and not (
                math.isnan(row["ci_low"]) or math.isnan(row["ci_high"])):
            text += f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
        return text

    frame = summary[summary["metric"].isin(ARTIFACT_METRICS)].astype(object)
    frame = frame.where(frame.notna(), None)
    rows = []
    for (stage, split, class_name), group in frame.groupby(["stage", "split", "class_name"], sort=True):
        by_metric = {r["metric"]: r for r in group.to_dict("records")}
        n_cases = [n for n in group["n_cases"] if n is not None]
        row = {"stage": stage, "split": split, "class": class_name, "n": int(max(n_cases)) if n_cases else None}
        row.update({m: cell(m, by_metric.get(m)) for m in ARTIFACT_METRICS if m in set(frame["metric"])})
        rows.append(row)
    return rows


def _publish_artifacts(result: dict) -> None:
    """The summary table as Prefect artifacts of the calling flow run (the pipeline's own run, the one a user
    opens in the UI)."""
    import pandas as pd

    summary = pd.read_parquet(result["summary_path"])
    key = "".join(c if c.isalnum() else "-" for c in result["run_id"].lower())
    create_table_artifact(summary_artifact_rows(summary), key=f"summary-{key}"[:100],
                          description=f"Metric summary of run {result['run_id']}: mean [95 % bootstrap CI] over cases")
    create_markdown_artifact(f"```\n{result['table']}\n```\n\nFull report: `{result['report_md']}`",
                             key=f"report-{key}"[:100], description=f"Run {result['run_id']}")


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------
def expand_refresh(refresh: list[str] | None) -> list[str]:
    """--refresh STAGE recomputes that stage and every stage after it."""
    out: set[str] = set()
    for stage in refresh or []:
        if stage not in DOWNSTREAM:
            raise ValueError(f"--refresh: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        out.update(DOWNSTREAM[stage])
    return sorted(out, key=STAGES.index)


@flow(name="unet3d-pipeline", log_prints=True)
def pipeline_flow(config_path: str, workspace: str | None = None, refresh: list[str] | None = None,
                  until: str = "report") -> dict:
    """ingest -> preprocess -> split -> train -> infer -> evaluate -> report, each stage from cache when done.

    config_path: the YAML config (SPEC); workspace: default $UNET3D_WORKSPACE, else ./workspace;
    refresh: stages to recompute (with everything downstream); until: the last stage to run.
    """
    logger = get_run_logger()
    ws = resolve_workspace(workspace)
    cfg = load_config(config_path)  # validated once; the typed config travels down to every stage
    # folders, the data's labels, the catalog: refused before any stage writes anything
    preflight(cfg, ws)
    refresh_list = expand_refresh(refresh)
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    # `until` segment: the stages it needs (up to train), then segment
    last = STAGES.index(until) if until != "segment" else STAGES.index("train")
    logger.info("pipeline %s on cohort %s, workspace %s%s", config_path, cfg.cohort.name, ws,
                f", refreshing {', '.join(refresh_list)}" if refresh_list else "")
    results: dict[str, Any] = {"workspace": ws}
    refresh_set = set(refresh_list)
    with _flow_run_heartbeat(_OWN_HEARTBEAT["seconds"]):
        results["ingest"] = ingest_stage(ws, cfg, refresh_set)
        # a cohort's first run: its image sizes are known only now, still before preprocessing or training
        check_patch_fits_cohort(cfg, ws)
        if last >= 1:
            results["preprocess"] = preprocess_stage(ws, cfg, refresh_set)
        if last >= 2:
            results["split"] = split_stage(ws, cfg, refresh_set)
        if last >= 3:
            results["train"] = train_stage(ws, cfg, results["preprocess"], refresh_set)
        if last >= 4:
            results["infer"] = infer_stage(ws, cfg, results["train"], results["preprocess"], refresh_set)
        if last >= 5:
            results["evaluate"] = evaluate_stage(ws, cfg, results["infer"], refresh_set)
            results["champion"] = champion_task(ws, cfg, results["infer"], results["evaluate"])
        if last >= 6:
            results["report"] = report_stage(ws, cfg, results["evaluate"], refresh_set)
        if until in ("report", "segment"):  # after train, last: it feeds no stage
            results["segment"] = segment_stage(ws, cfg, results["train"], results["preprocess"], refresh_set)
    _log_outcome(results)
    if "report" in results:
        _publish_artifacts(results["report"])
    return _final_state(results)


# ---------------------------------------------------------------------------------------------------------
# The pipeline from a command line: a heartbeat that stops at once
# ---------------------------------------------------------------------------------------------------------
# Prefect's heartbeat thread sleeps in whole seconds and is joined when the flow run ends: every command waited
# up to a second (half on average) after its work was done. A command line runs the pipeline with that thread
# off and beats from _flow_run_heartbeat instead: the same event at the same interval, stopped without a wait.
# A plain dict, not a ContextVar: a served deployment's runner pickles pipeline_flow with the globals it uses.
_OWN_HEARTBEAT: dict[str, Optional[int]] = {"seconds": None}


def run_pipeline(config_path: str, workspace: Optional[str] = None, refresh: Optional[list[str]] = None,
                 until: str = "report") -> dict:
    """pipeline_flow for the command line, with the heartbeat of _flow_run_heartbeat in place of Prefect's."""
    from prefect.settings import get_current_settings

    previous = _OWN_HEARTBEAT["seconds"]
    _OWN_HEARTBEAT["seconds"] = get_current_settings().flows.heartbeat_frequency
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return pipeline_flow(config_path=config_path, workspace=workspace, refresh=refresh, until=until)
    finally:
        _OWN_HEARTBEAT["seconds"] = previous


@contextlib.contextmanager
def _flow_run_heartbeat(seconds: Optional[int]):
    """Emit `prefect.flow-run.heartbeat` for the current flow run every `seconds` (Prefect's event: what a
    zombie-run automation watches), from a thread that ends as soon as the block does; nothing when None."""
    if not seconds:
        yield
        return
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.events.related import tags_as_related_resources
    from prefect.events.schemas.events import RelatedResource

    context = FlowRunContext.get()
    run = context.flow_run
    resource = {"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name or "",
                "prefect.version": prefect_version}
    related = [RelatedResource.model_validate({"prefect.resource.id": f"prefect.flow.{run.flow_id}",
                                               "prefect.resource.role": "flow",
                                               "prefect.resource.name": context.flow.name})]
    if run.deployment_id:
        related.append(RelatedResource.model_validate({"prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                                                       "prefect.resource.role": "deployment"}))
    related += tags_as_related_resources(set(run.tags or []))
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
            except Exception:  # a missed beat is not the run's failure
                logging.getLogger("flows").debug("heartbeat not sent", exc_info=True)
            stop.wait(max(seconds, 30))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name="unet3d-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


@task(name="champion", cache_policy=NO_CACHE)
def champion_task(workspace: str, cfg: PipelineConfig, infer: dict, evaluate: dict) -> dict:
    """The run's models against the cohort's champion (flows/champion.py); not a cached stage: a decision made
    before for the same pair is read back from the decisions table, so a run with nothing new decides nothing."""
    result = S.run_champion(workspace, cfg, infer, evaluate)
    get_run_logger().info("champion: %s (%s)", result["decision"], result.get("reason", ""))
    return result


def _final_state(results: dict[str, Any]):
    """The pipeline run's result; when its challenger was rejected or the champion dropped on new cases, a
    Completed state whose message says so (the run's state message in the UI), and, for a decision made by this
    run, a Prefect event per alert with the numbers in its payload (`unet3d.challenger.rejected`,
    `unet3d.champion.dropped`, resource `unet3d.cohort.COHORT`) that an automation can notify on."""
    from prefect.events import emit_event
    from prefect.states import Completed

    from .champion import alerts, event_payload

    decision = results.get("champion") or {}
    found = alerts(decision)
    if not found:
        return results
    logger = get_run_logger()
    for event, message in found:
        logger.warning("%s", message)
        if decision.get("new"):
            emit_event(event=event, resource={"prefect.resource.id": f"unet3d.cohort.{decision['cohort']}",
                                              "prefect.resource.name": decision["cohort"]},
                       payload=dict(event_payload(decision), message=message))
    return Completed(message="; ".join(message for _, message in found), data=results)


def _log_outcome(results: dict[str, Any]) -> None:
    """Each stage's outcome, and the summary table, at the end of the pipeline's log (each stage's details are
    logged by its task run, in the same flow run's log)."""
    logger = get_run_logger()
    for name in STAGES:
        for item in (results[name] if isinstance(results.get(name), list) else [results.get(name)]):
            if item is None:
                continue
            label = f"train-{item['stage_name']}" if name == "train" else name
            how = "cached" if item.get("cached") else "computed"
            if not item.get("cached") and item.get("resumed_from_epoch") is not None:
                how = f"resumed after epoch {item['resumed_from_epoch'] + 1}"
            logger.info("stage %s: %s in %.1f s (key %s)", label, how, item.get("stage_seconds", 0.0),
                        item.get("key", "")[:12])
    if "report" in results:
        r = results["report"]
        logger.info("run %s: summary (mean [95 %% CI] over cases)\n%s\nreport: %s", r["run_id"], r["table"],
                    r["report_md"])
