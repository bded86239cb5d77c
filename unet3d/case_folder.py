"""A preprocessed case folder (`preprocessed/COHORT/PLAN_ID/CASE__KEY/` in a workspace), read in one place.

    image.npy    float32 (C, X, Y, Z), channel first (C = 1, or a multi-channel case's channels), memory-mappable
    label.npy    uint8 (X, Y, Z), only when the case is labelled
    props.json   unet3d.resample.CaseProperties (everything needed to invert each step) plus the case id,
                 content hashes, plan id and the size of every file (a truncated file shows as incomplete)

`data_catalog.case_worker` writes these folders (to a temporary folder renamed into place); the trainer's
sampler, inference and the store read them through `read_case_folder`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .resample import CaseProperties

IMAGE_FILE, LABEL_FILE, PROPS_FILE = "image.npy", "label.npy", "props.json"


def read_props(case_dir: str | Path) -> dict:
    return json.loads((Path(case_dir) / PROPS_FILE).read_text())


def read_case_folder(case_dir: str | Path, mmap: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(image (C, X, Y, Z) float32, label (X, Y, Z) or None, props) of a case folder; `mmap`: the arrays are
    memory-mapped read-only instead of read into memory."""
    d = Path(case_dir)
    mode = "r" if mmap else None
    props = read_props(d)
    image = np.load(d / IMAGE_FILE, mmap_mode=mode)
    label = np.load(d / LABEL_FILE, mmap_mode=mode) if (d / LABEL_FILE).exists() else None
    return image, label, props


def case_properties(props: dict) -> CaseProperties:
    """The CaseProperties part of a props.json (which also holds ids, hashes and file sizes)."""
    return CaseProperties.from_dict({k: props[k] for k in CaseProperties.__dataclass_fields__ if k in props})
