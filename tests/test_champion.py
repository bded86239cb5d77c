"""Champion and challenger: the paired bootstrap decision, the registry, and nights of the pipeline: the first
run promotes itself, a worse challenger is rejected (table, report, the flow run's state message and a Prefect
event on a real server), a warm start from the champion, promotion and rollback by hand, the history, and a
night with nothing new that recomputes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline_helpers import cached_stages, prefect_server_env, write_config
from unet3d.champion import champion_drift, current_champion, decide, promote, read_registry, rollback

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# The decision and the registry (pure)
# ---------------------------------------------------------------------------------------------------------
def _scores(values, prefix="c"):
    return pd.Series(values, index=[f"{prefix}{i:02d}" for i in range(len(values))], dtype=float)


def test_an_equal_challenger_is_promoted_and_a_worse_one_rejected():
    rng = np.random.default_rng(0)
    champion = _scores(rng.uniform(0.75, 0.9, 20))
    same = decide(champion + rng.normal(0, 0.002, 20), champion, margin=0.01, n_boot=2000, confidence=0.95)
    assert same.promoted and same.ci_low >= -0.01 and "not worse beyond the margin 0.01" in same.reason
    worse = decide(champion - 0.1 + rng.normal(0, 0.01, 20), champion, margin=0.01, n_boot=2000, confidence=0.95)
    assert not worse.promoted and worse.ci_high < -0.05
    assert worse.reason.startswith("worse than the champion beyond the margin 0.01")
    assert f"{worse.difference:+.4f}" in worse.reason and worse.n_cases == 20
    # slightly worse on average but within the margin with confidence: promoted
    near = decide(champion - 0.004 + rng.normal(0, 0.001, 20), champion, margin=0.01)
    assert near.promoted and near.difference < 0
    # the same small loss with a wide interval (few, noisy cases): not shown to be within the margin
    noisy = decide(_scores([0.9, 0.5, 0.95]), _scores([0.85, 0.7, 0.86]), margin=0.01)
    assert not noisy.promoted and noisy.ci_low < -0.01


def test_decision_needs_the_same_cases():
    with pytest.raises(ValueError, match="same cases"):
        decide(_scores([0.8, 0.9]), _scores([0.8, 0.9], prefix="x"))


def test_champion_drift_compares_new_cases_with_its_own_interval():
    own = _scores([0.85, 0.86, 0.84, 0.87, 0.85, 0.86])
    dropped = champion_drift(own, _scores([0.6, 0.62], prefix="n"), n_boot=1000, confidence=0.95)
    assert dropped.dropped and "below its own 95% interval" in dropped.reason
    assert not champion_drift(own, _scores([0.86, 0.85], prefix="n")).dropped
    assert champion_drift(own, _scores([], prefix="n")) is None


def test_registry_promote_and_rollback_keep_the_history(tmp_path):
    path = tmp_path / "champions" / "c" / "roi__final.json"
    assert read_registry(path) is None
    with pytest.raises(ValueError, match="no champion to roll back"):
        rollback(path)
    for run_id, how in (("r1", "first"), ("r2", "challenge"), ("r3", "manual")):
        promote(path, "c", ["roi", "final"], {"run_id": run_id, "stages": []}, how, f"because {run_id}")
    assert current_champion(read_registry(path))["run_id"] == "r3"
    registry = rollback(path, "r3 was bad")
    assert current_champion(registry)["run_id"] == "r2"
    registry = rollback(path)
    assert current_champion(registry)["run_id"] == "r1"
    with pytest.raises(ValueError, match="only model that has served"):
        rollback(path)
    actions = [(h["action"], h["run_id"], h["previous_run_id"]) for h in read_registry(path)["history"]]
    assert actions == [("promote", "r1", None), ("promote", "r2", "r1"), ("promote", "r3", "r2"),
                       ("rollback", "r2", "r3"), ("rollback", "r1", "r2")]
    assert not list(path.parent.glob(".*"))  # written atomically: no temporary left


# ---------------------------------------------------------------------------------------------------------
# Nights of the pipeline
# ---------------------------------------------------------------------------------------------------------
ONE_STAGE = [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}}]


def _config(tmp_path: Path, cohort: Path, name: str, **train) -> Path:
    base = {"max_epochs": 5, "iterations_per_epoch": 4, "val_every": 5, "postprocess": "none", "deterministic": True}
    path = write_config(tmp_path / f"{name}.yaml", cohort, stages=ONE_STAGE, train=dict(base, **train),
                        infer={"tta": False})
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(dict(cfg, promote={"margin": 0.01, "n_boot": 500})))
    return path


def _cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "unet3d", *args], cwd=REPO, env=env or dict(os.environ),
                         capture_output=True, encoding="utf-8", timeout=1200)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _server(tmp_path: Path):
    from test_schedule import _free_port, _wait_http

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env, server_env = prefect_server_env(tmp_path, port)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_http(f"{api}/health", 240)
    return proc, env


def _read_back(env: dict) -> dict:
    """The pipeline's latest flow run (state and message) and the unet3d events, read from the server's API."""
    script = textwrap.dedent("""
        import json, time
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.events.filters import EventFilter, EventNameFilter
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["unet3d-pipeline"])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)
            deadline, events = time.time() + 60, []
            while time.time() < deadline and not events:  # the server stores events asynchronously
                page = client.read_events(filter=EventFilter(event=EventNameFilter(prefix=["unet3d."])), limit=50)
                events = page.events
                time.sleep(0 if events else 2)
            print(json.dumps({"state": runs[0].state.type.value, "message": runs[0].state.message,
                              "events": [{"event": e.event, "resource": dict(e.resource), "payload": e.payload,
                                          "related": [dict(r) for r in e.related]} for e in events]}))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _model_json(result: dict) -> dict:
    return json.loads(Path(result["train"][0]["model_json"]).read_text())


@pytest.mark.slow
def test_nights_champion_challenger_warm_start_and_history(tiny_cohort, tmp_path, capsys):
    from flows.cli import main as cli
    from flows.pipeline import pipeline_flow
    from unet3d.report_tables import read_table

    ws = tmp_path / "ws"
    registry_path = ws / "champions" / "tiny" / "organ.json"

    # night 1: the first model of the cohort promotes itself
    night1 = pipeline_flow(config_path=str(_config(tmp_path, tiny_cohort, "champion")), workspace=str(ws))
    run1 = night1["report"]["run_id"]
    assert night1["champion"]["decision"] == "promoted" and "first model" in night1["champion"]["reason"]
    assert current_champion(read_registry(registry_path))["run_id"] == run1

    # night 2: a deliberately worse challenger (one iteration of training), against a real Prefect server
    proc, env = _server(tmp_path)
    try:
        worse = _config(tmp_path, tiny_cohort, "worse", max_epochs=1, iterations_per_epoch=1, seed=5)
        _cli("run", str(worse), "--workspace", str(ws), env=env)
        seen = _read_back(env)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    decisions = read_table(ws / "reports" / "decisions")
    row = decisions[decisions["decision"] == "rejected"].iloc[0]
    run2 = row["challenger_run_id"]
    assert run2 != run1 and row["champion_run_id"] == run1
    assert row["reason"].startswith("worse than the champion beyond the margin 0.01")
    assert row["ci_low"] < -0.01 and row["challenger_mean"] < row["champion_mean"] and row["n_cases"] >= 2
    assert current_champion(read_registry(registry_path))["run_id"] == run1  # the champion stays
    assert seen["state"] == "COMPLETED"
    assert seen["message"].startswith(f"challenger {run2} rejected, champion {run1} stays: worse than the champion")
    rejected = [e for e in seen["events"] if e["event"] == "unet3d.challenger.rejected"]
    assert len(rejected) == 1, seen["events"]
    assert rejected[0]["resource"]["prefect.resource.id"] == "unet3d.cohort.tiny"
    payload = rejected[0]["payload"]
    assert payload["challenger_run_id"] == run2 and payload["champion_run_id"] == run1
    assert payload["margin"] == 0.01 and payload["ci_low"] == pytest.approx(row["ci_low"])
    report2 = (ws / "reports" / "runs" / run2 / "report.md").read_text()
    assert "**rejected** against champion" in report2 and (ws / "reports" / "runs" / run2 / "history.png").exists()

    # the same night again, nothing new: every stage cached, the decision read back (not made again), still said
    again = pipeline_flow(config_path=str(worse), workspace=str(ws), return_state=True)
    assert again.is_completed() and again.message.startswith(f"challenger {run2} rejected, champion {run1} stays")
    assert all(cached_stages(again.result()).values()), cached_stages(again.result())
    assert len(read_table(ws / "reports" / "decisions")) == 2

    # night 3: a fine-tune from the champion with a short budget and a small learning rate
    tune = _config(tmp_path, tiny_cohort, "tune", init_from="champion", max_epochs=1, iterations_per_epoch=2,
                   lr=1e-5)
    night3 = pipeline_flow(config_path=str(tune), workspace=str(ws))
    run3 = night3["report"]["run_id"]
    source = _model_json(night3)["init_from"]
    assert source["init_from"] == "champion" and source["run_id"] == run1
    assert source["sha256"] == read_registry(registry_path)["served"][0]["stages"][0]["checkpoint_sha256"]
    assert night3["champion"]["decision"] == "promoted", night3["champion"]
    assert current_champion(read_registry(registry_path))["run_id"] == run3

    # night 4: nothing new; the champion is now the fine-tuned model, which is this night's model: nothing is
    # recomputed, no decision is made again
    night4 = pipeline_flow(config_path=str(tune), workspace=str(ws))
    assert all(cached_stages(night4).values()), cached_stages(night4)
    assert night4["report"]["run_id"] == run3 and night4["champion"]["decision"] == "champion"
    assert len(read_table(ws / "reports" / "decisions")) == 3

    # history: every night's test Dice, oldest first, in the console and in the report's PNG
    capsys.readouterr()

    def command(*args: str, code: int = 0) -> str:  # in this process: the commands after a run need no new one
        assert cli([*args, "--workspace", str(ws)]) == code
        return capsys.readouterr().out

    out = command("report", "--history")
    lines = [line for line in out.splitlines() if line.startswith("tiny-")]
    assert [line.split()[0] for line in lines] == [run1, run2, run3], out
    assert "![history](history.png)" in (ws / "reports" / "runs" / run3 / "report.md").read_text()

    # promotion and rollback by hand, one command each; predict with the champion
    out = command("promote", run2, "--reason", "chosen by the radiologist")
    assert f"run {run2}" in out and current_champion(read_registry(registry_path))["run_id"] == run2
    command("rollback")
    registry = read_registry(registry_path)
    assert current_champion(registry)["run_id"] == run3
    assert [(h["action"], h["how"], h["run_id"]) for h in registry["history"]] == [
        ("promote", "first", run1), ("promote", "challenge", run3), ("promote", "manual", run2),
        ("rollback", "manual", run3)]
    command("promote", run3, code=1)
    image = sorted((tiny_cohort / "imagesTr").glob("*.nii.gz"))[0]
    out = command("predict", "--model", "champion", "-i", str(image), "-o", str(tmp_path / "pred"))
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1, out


def test_the_champion_is_scored_with_the_configs_ignore_value(tmp_path, monkeypatch):
    """The champion's metrics on new cases are computed as run_evaluate computes the challenger's: with the
    config's `ignore_label`. Without it, a sparse cohort's unannotated voxels counted as a class for the champion
    only, and the paired decision compared two different scorings."""
    import data_catalog.parallel as parallel
    import flows.stages as stages
    import unet3d.inference as inference
    from data_catalog.workspace import Workspace
    from flows.champion import _champion_metrics
    from unet3d.config import parse_config

    cfg = parse_config({"cohort": {"name": "c", "source": str(tmp_path)}, "labels": {1: "organ"}, "ignore_label": 7})
    record = {"stages": [{"name": "final", "plan": {"plan_id": "p"}, "model_dir": str(tmp_path / "m"),
                          "margin_mm": None}], "config": {}}
    scored = {}
    monkeypatch.setattr(stages, "read_run_record", lambda ws, run_id: record)
    monkeypatch.setattr(inference.ModelRef, "of", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(parallel, "infer_jobs", lambda *a, **k: None)
    monkeypatch.setattr(parallel, "evaluate_jobs", lambda cases, stage_list, *a, **k: (
        scored.update(ignore=[s.ignore_value for s in stage_list]), ([], []))[1])
    cases = pd.DataFrame([{"case_id": "c01", "patient_id": "c01", "image_path": "i.nii.gz", "label_path": "l.nii.gz",
                           "image_files": None, "image_sha256": "a", "label_sha256": "b", "source_kind": "file"}])
    _champion_metrics(Workspace(tmp_path / "ws"), cfg, "run-1", cases, progress=False)
    assert scored["ignore"] == [7]
