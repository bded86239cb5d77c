"""Hostile and unlucky inputs at the pipeline level (issue 10, issue 11): nothing read from the workspace runs
code, caches keyed by everything that changes an output, refresh that really recomputes, names that cannot
leave their folders, configs refused before any stage writes anything."""
from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import pytest
from pipeline_helpers import write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline():
    from flows.pipeline import pipeline_flow
    return pipeline_flow


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_record(payload: object, storage_key: str) -> bytes:
    """A result file in Prefect's own format whose metadata says it is a pickle."""
    import cloudpickle
    import prefect

    return json.dumps({
        "metadata": {"storage_key": storage_key, "expiration": None,
                     "serializer": {"type": "pickle", "picklelib": "cloudpickle",
                                    "picklelib_version": cloudpickle.__version__},
                     "prefect_version": prefect.__version__, "storage_block_id": None},
        "result": base64.b64encode(pickle.dumps(payload)).decode(),
    }).encode()


# ---------------------------------------------------------------------------------------------------------
# issue 10 item 1: stage results are data, never code
# ---------------------------------------------------------------------------------------------------------
def test_planted_pickle_in_a_cached_stage_result_is_never_unpickled(pipeline, tiny_cohort, tmp_path, caplog):
    from data_catalog.workspace import Workspace

    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", tiny_cohort)
    first = pipeline(config_path=str(config), workspace=str(ws), until="split")
    marker = tmp_path / "pwned"
    for stage in ("ingest", "split"):
        path = Workspace(ws).results_dir / first[stage]["key"]
        path.write_bytes(_pickle_record(_Exploit(marker), str(path)))

    with caplog.at_level("WARNING"):
        second = pipeline(config_path=str(config), workspace=str(ws), until="split")
    assert not marker.exists(), "a pickle from the workspace was deserialized"
    assert not second["split"]["cached"] and not second["ingest"]["cached"]  # a refused record is a cache miss
    assert second["split"]["counts"] == first["split"]["counts"]
    assert any("names serializer 'pickle'" in r.getMessage() for r in caplog.records)
    # recomputed and stored again as plain JSON data: the next run is a plain cache hit
    record = json.loads(Workspace(ws).results_dir.joinpath(first["split"]["key"]).read_bytes())
    assert record["metadata"]["serializer"] == {"type": "unet3d-json"}
    assert json.loads(record["result"])["key"] == first["split"]["key"]
    third = pipeline(config_path=str(config), workspace=str(ws), until="split")
    assert third["split"]["cached"] and third["split"] == dict(second["split"], cached=True,
                                                                stage_seconds=third["split"]["stage_seconds"])
    assert not marker.exists()


@pytest.mark.parametrize("serializer", [
    {"type": "pickle", "picklelib": "cloudpickle"},
    {"type": "json", "jsonlib": "json", "object_decoder": "os.system"},  # Prefect's JSON names a callable
    {"type": "compressed/pickle"},
    {"type": "unet3d-json", "extra": "os.system"},
])
def test_result_records_naming_another_serializer_are_refused_before_parsing(serializer):
    from flows.results import UnsafeResultError, check_record

    content = json.dumps({"metadata": {"serializer": serializer, "storage_key": "k"}, "result": "{}"}).encode()
    with pytest.raises(UnsafeResultError, match="never deserialized"):
        check_record(content, "k")
    good = json.dumps({"metadata": {"serializer": {"type": "unet3d-json"}, "storage_key": "k"}, "result": "{}"})
    assert check_record(good.encode(), "k") == good.encode()


# ---------------------------------------------------------------------------------------------------------
# One trained tiny cascade shared by the tests below (each leaves the workspace valid for the next)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(pipeline, tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    ws = root / "ws"
    config = write_config(root / "c.yaml", tiny_cohort)
    first = pipeline(config_path=str(config), workspace=str(ws))
    return {"ws": ws, "root": root, "config": config, "first": first}


def _read(path: Path):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# issue 10 item 3: --refresh infer really rewrites the predictions
def test_refresh_infer_rewrites_a_tampered_prediction(pipeline, trained):
    import SimpleITK as sitk

    ws, first = trained["ws"], trained["first"]
    run_id = first["report"]["run_id"]
    case = sorted(first["infer"]["splits"])[0]
    paths = {s: ws / "predictions" / run_id / s / f"{case}.nii.gz" for s in ("organ", "lesion")}
    original = {s: _read(p) for s, p in paths.items()}
    for p in paths.values():  # a damaged prediction: every voxel foreground
        image = sitk.ReadImage(str(p))
        tampered = sitk.GetImageFromArray(original["organ"] * 0 + 1)
        tampered.CopyInformation(image)
        sitk.WriteImage(tampered, str(p))

    again = pipeline(config_path=str(trained["config"]), workspace=str(ws), refresh=["infer"])
    assert again["report"]["run_id"] == run_id and not again["infer"]["cached"]
    assert again["infer"]["predicted"] == len(first["infer"]["splits"]) and again["infer"]["resumed"] == 0
    for s, p in paths.items():
        assert (_read(p) == original[s]).all(), f"--refresh infer kept the tampered {s} prediction"
    metrics = pd_read_run(ws, run_id)
    assert len(metrics) == len(first["infer"]["splits"]) * 2


def pd_read_run(ws: Path, run_id: str):
    import pandas as pd
    metrics = pd.read_parquet(ws / "reports" / "metrics")
    return metrics[metrics["run_id"].astype(str) == run_id]


# issue 10 item 3: the stage-1 probability cache is keyed by what changes stage 1's output
@pytest.mark.parametrize("setting", ["overlap", "tta"])
def test_stage1_cache_is_not_reused_when_overlap_or_tta_change(pipeline, trained, tiny_cohort, monkeypatch, setting):
    import unet3d.inference as inference
    from unet3d.config import load_config

    before = load_config(trained["config"]).infer
    infer = {"overlap": 0.25} if setting == "overlap" else {"tta": not before.tta}
    assert getattr(before, setting) != infer[setting]

    calls = []
    real = inference.cascade

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stage1_probs") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "cascade", spy)
    config = write_config(trained["root"] / f"c-{sorted(infer)[0]}.yaml", tiny_cohort, infer=infer)
    result = pipeline(config_path=str(config), workspace=str(trained["ws"]))
    assert result["infer"]["run_id"] != trained["first"]["infer"]["run_id"]
    assert calls and not any(calls), f"stage-1 probabilities of another {sorted(infer)[0]} were reused"
    calls.clear()  # --refresh infer recomputes stage 1 too (its cache is part of the infer stage)
    pipeline(config_path=str(config), workspace=str(trained["ws"]), refresh=["infer"])
    assert calls and not any(calls)


# issue 10 items 5 and 9: run records relative to the workspace; predict reads nothing from outside it
def _predict(ws: Path, model: str, image: Path, out: Path) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--workspace", str(ws), "predict", "--model", model,
                           str(image), "--out", str(out), "--device", "cpu"], capture_output=True,
                          encoding="utf-8", timeout=300, cwd=Path(__file__).resolve().parent.parent)
    return proc.returncode, proc.stderr.strip()


def test_run_records_are_relative_and_predict_stays_inside_the_workspace(trained, tiny_cohort, tmp_path):
    import shutil

    ws, run_id = trained["ws"], trained["first"]["report"]["run_id"]
    image = sorted((tiny_cohort / "imagesTr").glob("*.nii.gz"))[0]
    record_path = ws / "runs" / f"{run_id}.json"
    record = json.loads(record_path.read_text())
    assert all(not Path(s["model_dir"]).is_absolute() for s in record["stages"]), record["stages"]

    # a record planted outside the workspace is never read
    (ws.parent / "outside_run.json").write_text(record_path.read_text())
    rc, err = _predict(ws, "../../outside_run", image, tmp_path / "out0")  # = ws.parent/outside_run.json
    assert rc == 1 and "--model" in err and "run id" in err and not (tmp_path / "out0").exists(), err

    # the workspace moved: a relative record predicts, and so does an old absolute one
    moved = tmp_path / "moved" / "ws"
    shutil.copytree(ws, moved)
    rc, err = _predict(moved, run_id, image, tmp_path / "out1")
    assert rc == 0, err
    old_style = dict(record, stages=[dict(s, model_dir=f"/old/place/ws/{s['model_dir']}") for s in record["stages"]])
    (moved / "runs" / f"{run_id}.json").write_text(json.dumps(old_style))
    rc, err = _predict(moved, run_id, image, tmp_path / "out2")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == sorted(p.name for p in (tmp_path / "out2").iterdir())

    # a record whose model folder lies outside the workspace is refused
    escaping = dict(record, stages=[dict(s, model_dir=f"../../elsewhere/{Path(s['model_dir']).name}")
                                    for s in record["stages"]])
    (moved / "runs" / f"{run_id}.json").write_text(json.dumps(escaping))
    rc, err = _predict(moved, run_id, image, tmp_path / "out3")
    assert rc == 1 and "outside the workspace" in err, err


# issue 11 item 1: --refresh train really retrains
def _sha256(path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_refresh_train_retrains_from_scratch(pipeline, trained, caplog):
    ws = trained["ws"]
    before = pipeline(config_path=str(trained["config"]), workspace=str(ws))
    assert all(t["cached"] for t in before["train"])
    digests = {t["stage_name"]: _sha256(t["latest_checkpoint"]) for t in before["train"]}
    # the first run is the cohort's champion, and its models live in the folders the refresh retrains into
    registry_path = ws / "champions" / "tiny" / "organ__lesion.json"
    champion = json.loads(registry_path.read_text())["served"][-1]
    served_files = {s["name"]: (ws / s["model_dir"] / "checkpoint_best.pt").stat().st_mtime_ns
                    for s in champion["stages"]}
    with caplog.at_level("INFO"):
        after = pipeline(config_path=str(trained["config"]), workspace=str(ws), refresh=["train"])
    # the champion's models were kept (the refresh used to delete them, leaving the registry and the champion's
    # run record pointing at the retrained models): every model that served is still the one that served
    registry = json.loads(registry_path.read_text())
    kept = next(e for e in registry["served"] if e["run_id"] == champion["run_id"])
    record = json.loads((ws / "runs" / f"{champion['run_id']}.json").read_text())
    for stage, recorded in zip(kept["stages"], record["stages"]):
        checkpoint = ws / stage["model_dir"] / "checkpoint_best.pt"
        assert _sha256(checkpoint) == stage["checkpoint_sha256"]
        assert checkpoint.stat().st_mtime_ns == served_files[stage["name"]]  # the very files, not a retrained model
        assert recorded["model_dir"] == stage["model_dir"]
    for t in after["train"]:
        assert not t["cached"]
        assert t["resumed_from_epoch"] is None and t["epochs"] == 2, t  # all epochs trained again, none resumed
        assert _sha256(t["latest_checkpoint"]) != digests[t["stage_name"]]
        assert Path(t["best_checkpoint"]).exists()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "--refresh train: previous checkpoints" in text and "training from scratch" in text
    assert not list((ws / "models").rglob(".*.replaced-*"))  # nothing left aside
    # the retrained models are a new run (their predictions are not filed under the old models' run id)
    assert after["report"]["run_id"] != before["report"]["run_id"]
    again = pipeline(config_path=str(trained["config"]), workspace=str(ws))
    assert all(t["cached"] for t in again["train"]) and again["report"]["run_id"] == after["report"]["run_id"]
