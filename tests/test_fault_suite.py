"""Fault injection, issue 10 acceptance 2: a full disk during training and during inference. The write fails
with ENOSPC (injected at the third-party write itself: torch.save, SimpleITK.WriteImage, numpy.save), the run
fails with one line that says "disk full" and names the file being written, nothing is quarantined, no
temporary file stays behind; after space is freed the rerun gives exactly the results of an uninterrupted run
(the same checkpoint tensors, prediction arrays and metric rows).

The full disk during preprocessing is in tests/test_faults.py."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import write_config

pytestmark = pytest.mark.slow

# Three epochs, so that the second epoch's checkpoint write fails after a complete first epoch.
TRAIN = {"max_epochs": 3}


@pytest.fixture(scope="module")
def pipeline():
    from flows.pipeline import pipeline_flow
    return pipeline_flow


@pytest.fixture(scope="module")
def reference(pipeline, tiny_cohort, tmp_path_factory) -> dict:
    """The uninterrupted run every faulty run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "c.yaml", tiny_cohort, train=TRAIN)
    results = pipeline(config_path=str(config), workspace=str(root / "ws"))
    return {"ws": root / "ws", "results": results}


def _full_disk(target: str | Path) -> OSError:
    """A full disk as the write meets it: half a file on disk, then ENOSPC."""
    Path(target).write_bytes(b"\x00" * 100)
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _temporaries(ws: Path) -> list[str]:
    """Half-written files of atomic writes (".NAME.*.tmp" and the like) anywhere in the workspace."""
    return sorted(str(p.relative_to(ws)) for p in ws.rglob(".*") if p.is_file() and ".tmp" in p.name)


def _checkpoints(results: dict) -> dict[str, dict]:
    import torch

    out = {}
    for t in results["train"]:
        for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
            state = torch.load(Path(t["model_dir"]) / name, map_location="cpu", weights_only=True)
            out[f"{t['stage_name']}/{name}"] = state["model"]
    return out


def _predictions(ws: Path, run_id: str) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    root = ws / "predictions" / run_id
    return {str(p.relative_to(root)): sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            for p in sorted(root.rglob("*.nii.gz"))}


def _metric_rows(ws: Path) -> pd.DataFrame:
    rows = pd.read_parquet(ws / "reports" / "metrics")
    rows = rows.drop(columns=[c for c in ("run_id", "run_date") if c in rows.columns])
    rows = rows.astype({c: str for c in rows.columns if isinstance(rows[c].dtype, pd.CategoricalDtype)})
    return rows.sort_values(["stage", "case_id", "class_index"]).reset_index(drop=True)


def _assert_nothing_quarantined(ws: Path, reference_ws: Path) -> None:
    from data_catalog.tables import Catalog

    ours, theirs = Catalog(ws), Catalog(reference_ws)
    assert (ours.cases(cohort="tiny")["status"] == "ok").all()
    issues = ours.read("issues")
    assert issues.query("severity == 'error'").empty, issues
    assert sorted(issues["code"]) == sorted(theirs.read("issues")["code"])


def _full_disk_at(write, nth: int, path_arg: int, concerns):
    """`write` (a third-party writer) that raises a full disk on its `nth` call whose path argument (positional
    `path_arg`) `concerns(path)` holds, and writes normally otherwise."""
    seen = {"n": 0}

    def writer(*args, **kwargs):
        path = args[path_arg]
        if isinstance(path, (str, os.PathLike)) and concerns(Path(path)):
            seen["n"] += 1
            if seen["n"] == nth:
                raise _full_disk(path)
        return write(*args, **kwargs)
    return writer


def _assert_same_predictions_and_metrics(ws: Path, rerun: dict, reference: dict) -> None:
    ours_pred = _predictions(ws, rerun["report"]["run_id"])
    theirs_pred = _predictions(reference["ws"], reference["results"]["report"]["run_id"])
    assert sorted(ours_pred) == sorted(theirs_pred) and ours_pred
    for name, array in ours_pred.items():
        assert np.array_equal(array, theirs_pred[name]), name
    pd.testing.assert_frame_equal(_metric_rows(ws), _metric_rows(reference["ws"]))


def _assert_disk_full_message(exc: BaseException, what: str) -> None:
    message = str(exc)
    assert "disk full" in message and "\n" not in message and what in message, message


def test_full_disk_during_training_then_inference_loses_nothing(pipeline, reference, tiny_cohort, tmp_path,
                                                                 monkeypatch):
    import SimpleITK as sitk
    import torch

    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", tiny_cohort, train=TRAIN)

    # 1. The disk fills up at the second epoch's checkpoint write of the first stage.
    real_save = torch.save
    monkeypatch.setattr(torch, "save", _full_disk_at(real_save, 2, 1, lambda p: "checkpoint_latest" in p.name))
    with pytest.raises(OSError) as info:
        pipeline(config_path=str(config), workspace=str(ws))
    _assert_disk_full_message(info.value, "checkpoint_latest.pt")
    assert _temporaries(ws) == []
    _assert_nothing_quarantined(ws, reference["ws"])
    monkeypatch.setattr(torch, "save", real_save)  # space freed

    # 2. Training resumes and completes; the disk fills up at the third prediction written.
    real_write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", _full_disk_at(real_write, 3, 1, lambda p: "predictions" in p.parts))
    with pytest.raises(OSError) as info:
        pipeline(config_path=str(config), workspace=str(ws))
    _assert_disk_full_message(info.value, ".nii.gz")
    assert _temporaries(ws) == []
    _assert_nothing_quarantined(ws, reference["ws"])
    monkeypatch.setattr(sitk, "WriteImage", real_write)  # space freed

    # 3. The rerun: exactly the uninterrupted run's results.
    rerun = pipeline(config_path=str(config), workspace=str(ws))
    expected = reference["results"]
    assert rerun["train"][0]["resumed_from_epoch"] == 0  # the first epoch was kept, not redone
    assert rerun["infer"]["resumed"] == 1  # the case fully predicted before the disk filled up was kept
    theirs, ours = _checkpoints(expected), _checkpoints(rerun)
    assert sorted(ours) == sorted(theirs)
    for name, state in ours.items():
        assert state.keys() == theirs[name].keys(), name
        for k, tensor in state.items():
            assert torch.equal(tensor, theirs[name][k]), f"{name}: {k}"
    # (not the run ids: they carry the checkpoint file's digest, and torch.save writes a new random
    # serialization id into every file, so equal tensors saved twice are different files)
    _assert_same_predictions_and_metrics(ws, rerun, reference)
    assert _temporaries(ws) == []
    _assert_nothing_quarantined(ws, reference["ws"])


def test_full_disk_while_caching_stage1_probabilities_leaves_no_temporary(pipeline, reference, tiny_cohort,
                                                                        tmp_path, monkeypatch):
    """The cascade's stage-1 probability cache (numpy.save) fills the disk: no half-written cache file is left
    (neither as a temporary nor as a cache entry a rerun would trust), and the rerun is identical."""
    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", tiny_cohort, train=TRAIN)
    pipeline(config_path=str(config), workspace=str(ws), until="train")
    real_save = np.save
    monkeypatch.setattr(np, "save", _full_disk_at(real_save, 2, 0, lambda p: "stage1" in p.parts))
    with pytest.raises(OSError) as info:
        pipeline(config_path=str(config), workspace=str(ws))
    _assert_disk_full_message(info.value, ".npy")
    assert _temporaries(ws) == []
    monkeypatch.setattr(np, "save", real_save)

    rerun = pipeline(config_path=str(config), workspace=str(ws))
    _assert_same_predictions_and_metrics(ws, rerun, reference)
    assert _temporaries(ws) == []
