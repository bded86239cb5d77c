"""Stage results on disk as data only: JSON written by us, and nothing else ever read back.

A workspace is shared data (a network drive, a copied folder), so nothing read from it may execute code.
Prefect's default result serializer is pickle, and Prefect honours the serializer that each stored result
file names in its own metadata (`metadata.serializer`): configuring a JSON serializer for writing is not
enough, a planted file saying `{"type": "pickle"}` would still be unpickled on the next cache hit (even the
existence check deserializes the record). Prefect's own JSON serializer is not data-only either: its stored
settings name the JSON library and the object hook to import and call.

So:
- `DataOnlyJSON` writes plain JSON (no object hooks, nothing imported) under its own serializer type;
- `WorkspaceResults` (the result storage of every stage task) checks each file's raw bytes before Prefect
  parses them: a record whose metadata names any other serializer, or carries anything beyond a plain JSON
  payload, is refused with a one-line warning and never deserialized. Prefect's existence check then
  reports a miss, so the stage recomputes and overwrites the file: the same behaviour as a cache miss.
  Files are written atomically (a killed run leaves the old record or the new one, never half of one).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from pydantic import Field

from unet3d.io import atomic_path

log = logging.getLogger("flows.results")

SERIALIZER_TYPE = "unet3d-json"
_RECORD_KEYS = {"metadata", "result"}
_METADATA_KEYS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}


class UnsafeResultError(ValueError):
    """A stored stage result that is not data-only JSON written by this project: never deserialized."""


class DataOnlyJSON(Serializer):
    """Plain JSON, without object hooks or configurable libraries: loading it can only build data."""

    type: Literal["unet3d-json"] = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True, allow_nan=True).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob)


def check_record(content: bytes, where: str = "") -> bytes:
    """The raw bytes of a stored result if they are a data-only record of ours; else UnsafeResultError."""
    def refuse(why: str):
        raise UnsafeResultError(f"stage result {where or '(unnamed)'} refused, never deserialized: {why}")

    try:
        record = json.loads(content)
    except (ValueError, TypeError):
        refuse("not a JSON record")
    if not isinstance(record, dict) or set(record) != _RECORD_KEYS:
        refuse("not a result record of this project")
    metadata = record["metadata"]
    if not isinstance(metadata, dict) or not set(metadata) <= _METADATA_KEYS:
        refuse("unexpected metadata")
    serializer = metadata.get("serializer")
    if serializer != {"type": SERIALIZER_TYPE}:
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        refuse(f"its metadata names serializer {named!r}, only {SERIALIZER_TYPE!r} (plain JSON) is read")
    if metadata.get("storage_block_id") is not None:
        refuse("it points to another storage block")
    if not isinstance(record["result"], str):
        refuse("the payload is not a JSON text")
    try:
        json.loads(record["result"])
    except ValueError:
        refuse("the payload is not JSON")
    return content


class WorkspaceResults(LocalFileSystem):
    """Local result storage that reads only data-only records (see the module docstring) and writes
    atomically."""

    _block_type_name = "unet3d workspace results"

    def _checked(self, path: str, content: bytes) -> bytes:
        try:
            return check_record(content, where=str(self._resolve_path(path)))
        except UnsafeResultError as exc:
            log.warning("%s; the stage is recomputed", exc)
            raise

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # Prefect calls it with _sync=True
        target: Path = self._resolve_path(path)
        if not target.is_file():
            raise ValueError(f"result {target} does not exist or is not a file")
        return self._checked(path, target.read_bytes())

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        target: Path = self._resolve_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_file():
            raise ValueError(f"result path {target} exists and is not a file")
        with atomic_path(target) as tmp:
            tmp.write_bytes(content)
        return str(target)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def result_storage(results_dir: str | Path) -> WorkspaceResults:
    return WorkspaceResults(basepath=str(results_dir))
