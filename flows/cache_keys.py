"""What each stage's cache key is made of: the one place to look it up (`key_ingest` ... `key_report`).

A stage's key = hash(the content of its inputs, its config section, its code version):
- inputs are content hashes read from the catalog (case file sha256s, statuses, split assignments) and the
  keys of the upstream stages, never run ids or timestamps — so a nightly re-run with nothing new hits the
  cache (Prefect's DEFAULT policy includes the run id and would recompute everything);
- the config section is the validated section as JSON (runtime-only knobs such as worker counts are left out,
  `RUNTIME_ONLY`);
- the code version is a hash of the source files that implement the stage (`STAGE_SOURCES`), so changing the
  trainer retrains, but editing the CLI does not. A listed file or function that does not exist is an error:
  a renamed file must not silently stop invalidating the cache.

Also here, because they are identities of the same kind: the folder identity of a stage's checkpoints (the
train key without the budgets) and the identity of the stage-1 probability cache.
How a cached result is trusted (completion markers, data-only results) is in flows/caching.py.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_catalog.hashing import sha256_file, stable_hash
from data_catalog.splits import split_table
from data_catalog.tables import Catalog
from unet3d.config import ConfigError, PipelineConfig, StageConfig, model_train_settings
from unet3d.recipe import stage_time_budgets

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# segment (unlabelled scans, with the serving models) runs after train and feeds no other stage: it comes last, so
# that `until` keeps the other stages' order, and refreshing it (or infer, evaluate, report) refreshes it alone.
STAGES = ("ingest", "preprocess", "split", "train", "infer", "evaluate", "report", "segment")
DOWNSTREAM = {s: STAGES[i:] for i, s in enumerate(STAGES)}
for _stage in ("infer", "evaluate", "report"):  # segment reads none of their results
    DOWNSTREAM[_stage] = tuple(t for t in DOWNSTREAM[_stage] if t != "segment")

# The code that defines each stage's output: whole library files, and from the wiring layer only the
# functions of that stage (renaming a helper in flows/ must not retrain every model).
STAGE_SOURCES = {
    "ingest": ["data_catalog/ingest.py", "data_catalog/discover.py", "data_catalog/validate.py",
               "data_catalog/channels.py", "data_catalog/tables.py", "data_catalog/hashing.py", "unet3d/io.py"],
    "preprocess": ["data_catalog/preprocess.py", "data_catalog/plan.py", "data_catalog/case_worker.py",
                   "data_catalog/channels.py", "data_catalog/store.py", "unet3d/case_folder.py", "unet3d/resample.py",
                   "unet3d/io.py"],
    "split": ["data_catalog/splits.py"],
    "train": ["unet3d/train.py", "unet3d/recipe.py", "unet3d/models.py", "unet3d/losses.py", "unet3d/augment.py",
              "unet3d/sampling.py", "unet3d/case_folder.py", "unet3d/labels.py", "unet3d/postprocess.py",
              "unet3d/sliding_window.py",
              "flows.stages:run_train", "flows.stages:_train_spec", "flows.cache_keys:train_settings"],
    "infer": ["unet3d/inference.py", "unet3d/case_folder.py", "unet3d/models.py", "unet3d/postprocess.py",
              "unet3d/sliding_window.py", "unet3d/resample.py", "unet3d/io.py", "flows.stages:run_infer", "flows.stages:_prediction_jobs",
              "flows.stages:_model_refs", "flows.stages:_write_run_record"],
    "evaluate": ["unet3d/evaluation.py", "unet3d/metrics.py", "unet3d/labels.py", "unet3d/io.py",
                 "unet3d/report_tables.py", "unet3d/sparse.py", "flows.stages:run_evaluate",
                 "flows.stages:_evaluate_fill_in"],
    "report": ["unet3d/report.py", "unet3d/report_tables.py", "unet3d/overlays.py", "unet3d/metrics.py",
               "unet3d/labels.py", "unet3d/io.py", "flows.stages:run_report", "flows.stages:_overlay_cases",
               "unet3d/history.py", "flows.champion:report_sections", "flows.champion:append_report_sections"],
}

# The segment stage: its wiring and its table. What makes a segmentation (the inference code) is in the model
# chain's identity (SEGMENTATION_SOURCES), so a change to the volumes table recomputes the table, not the scans.
STAGE_SOURCES["segment"] = ["unet3d/volumes.py", "unet3d/report_tables.py", "unet3d/labels.py", "unet3d/io.py",
                            "flows.stages:run_segment", "flows.stages:serving_models", "flows.stages:_segment_jobs",
                            "flows.stages:_model_refs", "flows.stages:_record_segmented", "flows.stages:_volume_rows", "flows.cache_keys:unlabelled_cases"]
SEGMENTATION_SOURCES = ["unet3d/inference.py", "unet3d/case_folder.py", "unet3d/models.py", "unet3d/postprocess.py",
                        "unet3d/sliding_window.py", "unet3d/resample.py", "unet3d/io.py"]

# Config keys that change how fast a stage runs, not what it produces. train.devices is not one of them: the
# batch is per DDP process and each process samples its own patches, so the world size changes the weights (it
# is in the train key and in the checkpoint folder's identity, model_identity).
RUNTIME_ONLY = {"preprocess": {"workers", "dask_address", "memory_limit"}, "train": {"threads", "device"},
                "infer": {"batch_size"}}

# What a stage's training budget is: part of the train key (a longer budget is a different model), not of
# the checkpoint folder (raising max_epochs continues the run instead of starting over).
BUDGET_KEYS = ("max_epochs", "time_limit_min")


class MissingStageSource(LookupError):
    """A file or function listed in STAGE_SOURCES does not exist (renamed or moved: update the list)."""


def _source_bytes(stage: str, ref: str) -> bytes:
    if ":" in ref:
        module, name = ref.split(":")
        try:
            return inspect.getsource(getattr(importlib.import_module(module), name)).encode()
        except (ImportError, AttributeError):
            raise MissingStageSource(f"STAGE_SOURCES[{stage!r}] lists {ref}, which does not exist: update the "
                                     f"list in flows/cache_keys.py") from None
    path = PACKAGE_ROOT / ref
    if not path.is_file():
        raise MissingStageSource(f"STAGE_SOURCES[{stage!r}] lists {ref}, which does not exist: update the list in "
                                 f"flows/cache_keys.py")
    return path.read_bytes()


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    h = hashlib.sha256()
    for ref in STAGE_SOURCES[stage]:
        h.update(ref.encode())
        h.update(_source_bytes(stage, ref))
    return h.hexdigest()[:12]


def config_part(stage: str, section: dict | list | None) -> Any:
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in RUNTIME_ONLY.get(stage, set())}
    return section


def stage_key(stage: str, *parts: Any) -> str:
    return stable_hash({"stage": stage, "code": code_version(stage), "parts": parts}, 20)


def _json(section) -> Any:
    """A config section as the JSON data the keys have always been computed from."""
    return section.model_dump(mode="json") if section is not None else None


# ---------------------------------------------------------------------------------------------------------
# Content fingerprints read from the catalog
# ---------------------------------------------------------------------------------------------------------
def source_fingerprint(source: str | None, labels_dir: str | None = None) -> str:
    """Names, sizes and mtimes of every file under the source (and labels) folder: cheap, and any added,
    removed or rewritten file changes it."""
    h = hashlib.sha256()
    for root in (source, labels_dir):
        if not root:
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cohort_fingerprint(workspace: str | Path, cohort: str) -> str:
    """The cohort's cases as the catalog sees them: ids, content hashes, statuses, patients."""
    cases = Catalog(workspace).cases(cohort=cohort)
    cols = ["case_id", "patient_id", "image_sha256", "label_sha256", "status"]
    rows = cases[cols].astype(str).sort_values("case_id").to_numpy().tolist() if len(cases) else []
    return stable_hash(rows, 20)


def split_fingerprint(workspace: str | Path, cohort: str) -> str:
    splits = Catalog(workspace).read("splits")
    splits = splits[splits["cohort"] == cohort]
    rows = splits[["case_id", "split"]].sort_values("case_id").to_numpy().tolist() if len(splits) else []
    return stable_hash(rows, 20)


def content_rows(workspace: str | Path, cohort: str) -> list:
    """Case contents (not statuses, which preprocessing itself may change) of the cohort's cases."""
    cases = Catalog(workspace).cases(cohort=cohort)
    cols = ["case_id", "image_sha256", "label_sha256"]
    return cases[cols].astype(str).sort_values("case_id").to_numpy().tolist() if len(cases) else []


def labelled_cases(workspace: str | Path, cfg: PipelineConfig):
    """The cohort's labelled cases with their split, sorted by case id (what training and inference see)."""
    df = split_table(workspace, cfg.cohort.name)
    return df[df["label_path"].notna()].sort_values("case_id").reset_index(drop=True)


def spacing_factors(cfg: PipelineConfig) -> tuple[float, ...]:
    return tuple(sorted({float(s.spacing_factor) for s in cfg.resolved_stages()}))


def plan_id_of(preprocess: dict, stage: StageConfig) -> str:
    return preprocess["plan_ids"][str(float(stage.spacing_factor))]


# ---------------------------------------------------------------------------------------------------------
# ingest, preprocess, split
# ---------------------------------------------------------------------------------------------------------
def key_ingest(workspace: str, cfg: PipelineConfig) -> str:
    c = cfg.cohort
    if not c.source:
        return stage_key("ingest", c.name, "catalog", cohort_fingerprint(workspace, c.name))
    if c.unlabelled_source:  # its files count too; a config without one keeps the key it had before the key existed
        labelled = cfg.model_copy(update={"cohort": c.model_copy(update={"unlabelled_source": None})})
        return stage_key("ingest", key_ingest(workspace, labelled),
                         {"unlabelled": source_fingerprint(c.unlabelled_source)})
    return stage_key("ingest", c.name, source_fingerprint(c.source, c.labels_dir), c.modality,
                     cfg.model_dump(mode="json")["labels"], *_sparse_part(cfg))


def _sparse_part(cfg: PipelineConfig) -> list:
    """The ignore value in a key only when the config sets one, so that the keys of configs without sparse labels
    are those they had before `ignore_label` existed."""
    return [] if cfg.ignore_label is None else [{"ignore_label": cfg.ignore_label}]


def key_preprocess(workspace: str, cfg: PipelineConfig) -> str:
    return stage_key("preprocess", content_rows(workspace, cfg.cohort.name),
                     config_part("preprocess", _json(cfg.preprocess)), spacing_factors(cfg), cfg.cohort.modality,
                     *_sparse_part(cfg))


def key_split(workspace: str, cfg: PipelineConfig) -> str:
    return stage_key("split", cohort_fingerprint(workspace, cfg.cohort.name), _json(cfg.split))


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def train_settings(cfg: PipelineConfig, stage: StageConfig) -> tuple[dict | None, dict]:
    """(roi settings for a cascade's second stage, train config with the stage's overrides).

    The one place a stage's training settings are made: the top-level train section, then every key the stage
    overrides (StageConfig.train_overrides: its `train` keys and its direct max_epochs, patch_size and
    time_limit_min), then the stage's share of the time budget. The train key, the checkpoint folder's identity
    and the TrainSpec all read this result, so a per-stage architecture changes that stage's model only."""
    stages = cfg.resolved_stages()
    roi = None
    if stage.roi_from:
        first = next(s for s in stages if s.name == stage.roi_from)
        roi = {"label_values": sorted(first.label_map()), "margin_mm": stage.margin_mm}
    train = {**_json(cfg.train), **stage.train_overrides()}
    index = [s.name for s in stages].index(stage.name)
    own_budgets = [s.train_overrides().get("time_limit_min") for s in stages]
    train["time_limit_min"] = stage_time_budgets(cfg.train.time_limit_min, own_budgets)[index]
    return roi, train


def _stage_part(stage: StageConfig) -> dict:
    """The stage's section as the keys see it, less its train overrides (they are in train_settings' result)."""
    return {k: v for k, v in _json(stage).items() if k != "train"}


def training_members(workspace: str, cfg: PipelineConfig) -> list:
    """The (case, split, content hashes) rows the stages train and validate on."""
    cases = labelled_cases(workspace, cfg)
    members = cases[cases["split"].isin(["train", "val"])][["case_id", "split", "image_sha256", "label_sha256"]]
    return members.astype(str).to_numpy().tolist()


def key_train(workspace: str, cfg: PipelineConfig, stage: StageConfig, preprocess: dict) -> str:
    roi, train = train_settings(cfg, stage)
    # Budgets (epochs, time) are part of the key: a longer budget is a different model. The trainer resumes
    # a shorter run's checkpoints when only the budget grew (see TrainSpec.identity).
    return stage_key("train", _stage_part(stage), config_part("train", train), plan_id_of(preprocess, stage), roi,
                     training_members(workspace, cfg), *_sparse_part(cfg),
                     *_warm_start_part(warm_start_source(workspace, cfg, stage, preprocess)))


def model_identity(workspace: str, cfg: PipelineConfig, stage: StageConfig, preprocess: dict,
                   source: dict | None | bool = True) -> str:
    """The name tail of a stage's checkpoint folder: its data + stage + model config and its warm-start source
    (`source`: True = resolved here, else the given source), not the budget."""
    if source is True:
        source = warm_start_source(workspace, cfg, stage, preprocess)
    _roi, train = train_settings(cfg, stage)
    identity = {k: v for k, v in config_part("train", model_train_settings(train)).items() if k not in BUDGET_KEYS}
    stage_identity = {k: v for k, v in _stage_part(stage).items() if k not in BUDGET_KEYS}
    return stable_hash([stage_identity, identity, plan_id_of(preprocess, stage), training_members(workspace, cfg),
                        *_sparse_part(cfg), *_warm_start_part(source)], 12)


def _warm_start_part(source: dict | None) -> list:
    """A warm start's source by content (what the config says and the weights' sha256), only when there is one:
    the keys of cold starts are those they had before warm starts existed."""
    return [] if source is None else [{"init_from": source["init_from"], "sha256": source["sha256"]}]


def warm_start_source(workspace: str, cfg: PipelineConfig, stage: StageConfig, preprocess: dict) -> dict | None:
    """The weights `train.init_from` names for this stage, as unet3d.train.TrainSpec.init_from (None: a cold start).

    A path: its model folder's best checkpoint, or the checkpoint file itself. `champion`: the cohort's serving
    model's stage of the same name (unet3d.champion; none yet: a cold start). When the champion itself was trained
    from exactly this data and config, its own source is returned: the stage then is the champion (same key), so a
    night with nothing new retrains nothing, however often the champion is the source."""
    given = train_settings(cfg, stage)[1].get("init_from")
    if given is None:
        return None
    from unet3d.train import ModelFiles  # torch, only for warm starts (cache keys otherwise need no torch)

    if given != "champion":
        path = Path(given).expanduser()
        checkpoint = path if path.is_file() else ModelFiles(path).best_checkpoint
        if not checkpoint.is_file():
            raise ConfigError(f"stages.{stage.name}: train.init_from {given!r}: no checkpoint there (give a model "
                              f"folder with checkpoint_best.pt, a checkpoint file, or 'champion')")
        return {"init_from": given, "checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                "run_id": None}
    from data_catalog.workspace import Workspace
    from unet3d.champion import current_champion, read_registry

    ws = Workspace(workspace)
    champion = current_champion(read_registry(ws.champion_file(cfg.cohort.name, [s.name for s in cfg.resolved_stages()])))
    served = next((s for s in (champion or {}).get("stages", []) if s["name"] == stage.name), None)
    if served is None:
        return None  # a cohort's first model starts from scratch
    folder = ws.resolve(served["model_dir"], f"champion {champion['run_id']}: stage {stage.name} model_dir")
    own = json.loads(ModelFiles(folder).model_json.read_text()).get("init_from")
    if folder.name == f"{stage.name}-{model_identity(workspace, cfg, stage, preprocess, own)}":
        return own
    checkpoint = ModelFiles(folder).best_checkpoint
    return {"init_from": "champion", "checkpoint": str(checkpoint), "sha256": served.get("checkpoint_sha256")
            or sha256_file(checkpoint), "run_id": champion["run_id"]}


# ---------------------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------------------
def key_infer(workspace: str, cfg: PipelineConfig, trains: list[dict], preprocess: dict) -> str:
    cases = labelled_cases(workspace, cfg)
    chosen = cases[cases["split"].isin(cfg.infer.splits)][["case_id", "split", "image_sha256"]]
    # the trained models by content too: `--refresh train` retrains under the same training key
    models = [[t["key"], t.get("checkpoint_sha256")] for t in trains]
    return stage_key("infer", models, config_part("infer", _json(cfg.infer)), preprocess["plan_ids"],
                     [s.margin_mm for s in cfg.resolved_stages()], chosen.astype(str).to_numpy().tolist())


def run_id_for(cfg: PipelineConfig, infer_key: str) -> str:
    return f"{cfg.cohort.name}-{infer_key[:10]}"


def stage1_cache_identity(cfg: PipelineConfig, first_model: dict, checkpoint: str | Path, plan_id: str) -> str:
    """What changes stage 1's probabilities: the model (training key and checkpoint content), its plan, the
    inference settings that change outputs (overlap, TTA) and the inference code."""
    infer = {k: v for k, v in _json(cfg.infer).items() if k != "splits"}
    return stable_hash({"train_key": first_model["key"], "checkpoint": sha256_file(checkpoint), "plan": plan_id,
                        "infer": config_part("infer", infer), "code": code_version("infer")}, 16)


# ---------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------
def unlabelled_cases(workspace: str | Path, cfg: PipelineConfig):
    """The cohort's unlabelled scans that can be segmented (status ok), sorted by case id."""
    cases = Catalog(workspace).cases(cohort=cfg.cohort.name, status="ok")
    return cases[cases["unlabelled"].eq(True)].sort_values("case_id").reset_index(drop=True)


def segment_chain_identity(cfg: PipelineConfig, models: list[dict]) -> str:
    """What a scan's segmentation depends on besides the scan: each stage model (training key and checkpoint
    content), its plan, the cascade margins, the inference settings that change outputs (overlap, TTA) and the
    inference code. A scan segmented under the same identity is not segmented again."""
    infer = {k: v for k, v in _json(cfg.infer).items() if k != "splits"}
    code = hashlib.sha256(b"".join(ref.encode() + _source_bytes("segment", ref) for ref in SEGMENTATION_SOURCES))
    return stable_hash({"models": [[m["key"], m.get("checkpoint_sha256"), m["plan_id"]] for m in models],
                        "margins": [s.margin_mm if s.roi_from else None for s in cfg.resolved_stages()],
                        "infer": config_part("infer", infer), "code": code.hexdigest()[:12]}, 16)


def key_segment(workspace: str, cfg: PipelineConfig, models: list[dict], run_id: str) -> str:
    """The scans (ids and content), the model chain, the training references whose volumes the QC compares with
    (the train split's labels), the final stage's classes, the component connectivity, and the run whose
    volumes table it writes."""
    scans = unlabelled_cases(workspace, cfg)[["case_id", "image_sha256"]].astype(str).to_numpy().tolist()
    cases = labelled_cases(workspace, cfg)
    references = cases[cases["split"] == "train"][["case_id", "label_sha256"]].astype(str).to_numpy().tolist()
    final = cfg.resolved_stages()[-1]
    return stage_key("segment", segment_chain_identity(cfg, models), scans, references,
                     [final.name, dict(final.classes), final.label_map()], cfg.evaluate.lesion_connectivity, run_id)


# ---------------------------------------------------------------------------------------------------------
# evaluate, report
# ---------------------------------------------------------------------------------------------------------
def key_evaluate(cfg: PipelineConfig, infer: dict) -> str:
    # dense references of sparse cases (the fill-in table) only when given: other configs keep their keys
    dense = cfg.cohort.dense_labels_dir
    dense_part = [] if dense is None else [{"dense_labels": source_fingerprint(dense)}]
    return stage_key("evaluate", infer["key"], _json(cfg.evaluate), *_sparse_part(cfg), *dense_part)


def key_report(cfg: PipelineConfig, evaluate: dict) -> str:
    return stage_key("report", evaluate["key"], _json(cfg.evaluate))
