"""Where a stage is cached: the one place that says what a stage's cache key is made of.

A stage's key = hash(the content of its inputs, its config section, its code version):
- inputs are content hashes read from the catalog (case file sha256s, statuses, split assignments) and the
  keys of the upstream stages, never run ids or timestamps — so a nightly re-run with nothing new hits the
  cache (Prefect's DEFAULT policy includes the run id and would recompute everything);
- the config section is the validated section as JSON (runtime-only knobs such as worker counts are left out);
- the code version is a hash of the source files that implement the stage, so changing the trainer
  retrains, but editing the CLI does not.

Prefect persists each stage's (small) result inside the workspace (`WORKSPACE/.prefect/results`), keyed by
this key, as plain JSON; a result file there that is not plain JSON of ours is never deserialized, only
recomputed (flows/results.py). Each stage also writes a marker `WORKSPACE/.stages/STAGE/KEY.json` when it completes; a cache
entry whose marker or outputs are gone (a deleted model folder) is refreshed instead of trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from data_catalog.hashing import stable_hash
from data_catalog.tables import Catalog

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

STAGES = ("ingest", "preprocess", "split", "train", "infer", "evaluate", "report")
DOWNSTREAM = {s: STAGES[i:] for i, s in enumerate(STAGES)}

# The code that defines each stage's behaviour: whole library files, and from the wiring layer only the
# functions of that stage (renaming a helper in flows/ must not retrain every model).
STAGE_SOURCES = {
    "ingest": ["data_catalog/ingest.py", "data_catalog/tables.py", "data_catalog/hashing.py", "unet3d/io.py"],
    "preprocess": ["data_catalog/preprocess.py", "data_catalog/plan.py", "data_catalog/case_worker.py",
                   "data_catalog/store.py", "unet3d/resample.py", "unet3d/io.py"],
    "split": ["data_catalog/splits.py"],
    "train": ["unet3d/train.py", "unet3d/recipe.py", "unet3d/models.py", "unet3d/losses.py", "unet3d/augment.py",
              "unet3d/sampling.py", "unet3d/postprocess.py", "unet3d/sliding_window.py", "flows.stages:run_train",
              "flows.stages:_stage_settings"],
    "infer": ["unet3d/inference.py", "unet3d/postprocess.py", "unet3d/sliding_window.py", "unet3d/resample.py",
              "flows.stages:run_infer"],
    "evaluate": ["unet3d/metrics.py", "flows.stages:run_evaluate"],
    "report": ["unet3d/report.py", "unet3d/report_tables.py", "unet3d/overlays.py", "unet3d/metrics.py", "flows.stages:run_report"],
}

# Config keys that change how fast a stage runs, not what it produces.
RUNTIME_ONLY = {"preprocess": {"workers", "dask_address", "memory_limit"}, "train": {"threads", "device"},
                "infer": {"batch_size"}}


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    import importlib
    import inspect

    h = hashlib.sha256()
    for ref in STAGE_SOURCES[stage]:
        h.update(ref.encode())
        if ":" in ref:
            module, name = ref.split(":")
            h.update(inspect.getsource(getattr(importlib.import_module(module), name)).encode())
        else:
            path = PACKAGE_ROOT / ref
            h.update(path.read_bytes() if path.exists() else b"missing")
    return h.hexdigest()[:12]


def config_part(stage: str, section: dict | list | None) -> Any:
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in RUNTIME_ONLY.get(stage, set())}
    return section


def stage_key(stage: str, *parts: Any) -> str:
    return stable_hash({"stage": stage, "code": code_version(stage), "parts": parts}, 20)


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


# ---------------------------------------------------------------------------------------------------------
# Completion markers
# ---------------------------------------------------------------------------------------------------------
def marker_path(workspace: str | Path, stage: str, key: str) -> Path:
    return Path(workspace) / ".stages" / stage / f"{key}.json"


def write_marker(workspace: str | Path, stage: str, key: str, result: dict) -> None:
    path = marker_path(workspace, stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def drop_marker(workspace: str | Path, stage: str, key: str) -> None:
    """Forget that the stage completed with this key (before a --refresh rewrites its outputs in place: an
    interrupted refresh must not leave a valid-looking cache entry over half-rewritten outputs)."""
    marker_path(workspace, stage, key).unlink(missing_ok=True)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def marker_valid(workspace: str | Path, stage: str, key: str) -> bool:
    """The stage completed with this key and the files it listed as outputs still exist."""
    path = marker_path(workspace, stage, key)
    if not path.exists():
        return False
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return False
    return all(Path(p).exists() for p in result.get("outputs", []))


def to_data(obj: Any) -> Any:
    """`obj` as the JSON data it will be when read back from the cache (a fresh result and a cached one are
    then identical): tuples become lists, keys strings, numpy scalars and paths plain values."""
    def default(o):
        if hasattr(o, "item") and callable(o.item):  # numpy scalar
            return o.item()
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"stage result holds a {type(o).__name__}, which is not JSON data")
    return json.loads(json.dumps(obj, default=default, allow_nan=True))


def results_dir(workspace: str | Path) -> Path:
    return Path(workspace) / ".prefect" / "results"


def frame_digest(frame: pd.DataFrame) -> str:
    return stable_hash(frame.astype(str).to_numpy().tolist(), 20)
