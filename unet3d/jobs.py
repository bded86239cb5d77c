"""What is sent to the processes that predict: a case's prediction job and a model named by value.

Kept free of torch on purpose. Dask's scheduler unpickles the arguments of every task, and a class defined in
unet3d.inference made the scheduler of an existing cluster import torch to read them (2.3 s before the first
case could start, and torch's memory in a process that never computes). tests/test_import_cost.py checks it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PredictionJob:
    """One case to predict and where each stage's label map goes. The input is either the case's preprocessed
    folders, one per stage (`case_dirs`, the pipeline), or a raw image file or DICOM folder (`image`,
    `unet3d predict`); neither means the case was not preprocessed (quarantined) and it is skipped."""

    case_id: str
    targets: dict[str, Path]  # stage name -> output image file
    case_dirs: list[Path] | None = None
    image: str | Path | None = None
    stage1_cache: Path | None = None  # cascade: stage 1's probabilities, read if present, else written
    channels: list[str] | None = None  # a multi-channel case's image files in channel order (`image` is the first)


@dataclass(frozen=True)
class ModelRef:
    """A stage model named by value, to be loaded by the process that predicts (StageModel.load's arguments);
    `sha256` of the checkpoint makes a retrained model in the same folder a different cache entry."""

    model_dir: str
    sha256: str
    device: str = "auto"
    checkpoint: str | None = None
    margin_mm: float | None = None

    @classmethod
    def of(cls, model_dir: str | Path, device: str = "auto", checkpoint: str | None = None,
           margin_mm: float | None = None, sha256: str | None = None) -> "ModelRef":
        """The reference of a model folder; the checkpoint's sha256 is computed unless the caller knows it."""
        from .train import ModelFiles  # here: this module is read by Dask's scheduler, which needs no torch

        folder = ModelFiles(model_dir).folder.resolve()
        if sha256 is None:
            path = folder / checkpoint if checkpoint else ModelFiles(folder).best_checkpoint
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            sha256 = digest.hexdigest()
        return cls(str(folder), sha256, device, checkpoint, margin_mm)
