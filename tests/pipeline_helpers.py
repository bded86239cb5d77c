"""Test helpers shared by the pipeline tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

TINY_TRAIN = {"architecture": "unet3d", "features": [4, 8, 16], "max_epochs": 2, "iterations_per_epoch": 2,
              "batch_size": 2, "device": "cpu", "threads": 2, "deep_supervision": True}


def write_config(path: Path, source: Path, **overrides) -> Path:
    cfg = {
        "cohort": {"name": "tiny", "source": str(source), "modality": "CT"},
        "labels": {1: "organ", 2: "lesion"},
        "preprocess": {"workers": 1},
        "split": {"ratios": [0.6, 0.2, 0.2], "seed": 0},
        "stages": [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}, "spacing_factor": 2.0},
                   {"name": "lesion", "classes": {1: "lesion"}, "merge": {1: [2]}, "roi_from": "organ",
                    "margin_mm": 10}],
        "train": dict(TINY_TRAIN),
        "infer": {"overlap": 0.5, "splits": ["val", "test"]},
        "evaluate": {"n_boot": 50},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Terminate helper processes (Dask workers before their scheduler: give them in that order), killing any
    that has not exited 30 s later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
