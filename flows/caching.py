"""When a cached stage result is trusted: completion markers, and results as plain JSON data.

What goes into each stage's cache key is in flows/cache_keys.py. Prefect persists each stage's (small)
result inside the workspace (`WORKSPACE/.prefect/results`), keyed by that key, as plain JSON; a result file
there that is not plain JSON of ours is never deserialized, only recomputed (flows/results.py). Each stage also
writes a marker `WORKSPACE/.stages/STAGE/KEY.json` when it completes; a cache entry whose marker or outputs are
gone (a deleted model folder) is refreshed instead of trusted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data_catalog.workspace import Workspace
from unet3d.io import write_json_atomic


def write_marker(workspace: str | Path, stage: str, key: str, result: dict) -> None:
    write_json_atomic(Workspace(workspace).marker(stage, key), result, indent=1, sort_keys=True, default=str)


def drop_marker(workspace: str | Path, stage: str, key: str) -> None:
    """Forget that the stage completed with this key (before a --refresh rewrites its outputs in place: an
    interrupted refresh must not leave a valid-looking cache entry over half-rewritten outputs)."""
    Workspace(workspace).marker(stage, key).unlink(missing_ok=True)


def marker_valid(workspace: str | Path, stage: str, key: str) -> bool:
    """The stage completed with this key and the files it listed as outputs still exist."""
    path = Workspace(workspace).marker(stage, key)
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
