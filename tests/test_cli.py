"""The `unet3d` command line as a new user meets it (issue 11, items 9 and 10): a quiet console, --version,
`unet3d runs`, predict's conventions (-i/-o, the input's format, stage-1 masks apart) and a model export that
predicts without the workspace."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from pipeline_helpers import write_config

REPO = Path(__file__).resolve().parent.parent
PROGRESS_BAR = re.compile(r"\d+%\||\d+/\d+ \[\d+:\d+<")


def unet3d(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # UTF-8 both ways, whatever this process's locale is (GDCM's DICOM reader, run by earlier tests in the same
    # process, can leave it at C/ASCII, and the progress bars are UTF-8)
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, capture_output=True,
                          encoding="utf-8", timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8"))


def console_lines(text: str) -> list[str]:
    """What a terminal would keep on screen: lines without the progress bars' redraws."""
    lines = [part.rstrip() for line in text.split("\n") for part in line.split("\r")]
    return [line for line in lines if line.strip() and not PROGRESS_BAR.search(line)]


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory):
    """A two-stage cascade run by `unet3d run` in a fresh workspace: (workspace, run id, the command's output)."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "c.yaml", tiny_cohort)
    ws = root / "ws"
    # Dask's default HTTP port taken, as by another cluster on the machine (the warning the demo printed)
    with socket.socket() as busy:
        try:
            busy.bind(("0.0.0.0", 8787))
            busy.listen()
        except OSError:
            pass  # already taken
        done = unet3d("--workspace", str(ws), "run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = re.search(r"^run id:\s+(\S+)", done.stdout, re.M).group(1)
    return ws, run_id, done


# ---------------------------------------------------------------------------------------------------------
# item 10: a quiet console, --version, `unet3d runs`
# ---------------------------------------------------------------------------------------------------------
def test_version_prints_the_package_version():
    done = unet3d("--version", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"unet3d {version('unet3d-pipeline')}"


@pytest.mark.slow
def test_a_run_fits_on_one_screen_without_log_noise(trained_run):
    _ws, run_id, done = trained_run
    lines = console_lines(done.stdout + done.stderr)
    assert len(lines) < 60, "\n".join(lines)
    text = done.stdout + done.stderr
    for noise in ("INFO", "Port 8787", "distributed.", "Starting temporary server", "Beginning flow run"):
        assert noise not in text, noise
    assert f"run id:      {run_id}" in done.stdout  # the results are still said


@pytest.mark.slow
def test_verbose_shows_the_pipeline_log(trained_run, tmp_path):
    ws, _run_id, _done = trained_run
    config = next(ws.parent.glob("c.yaml"))
    done = unet3d("--workspace", str(ws), "-v", "run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage train-organ: cache hit" in done.stderr


def test_a_missing_source_is_said_once(tmp_path):
    config = write_config(tmp_path / "c.yaml", tmp_path / "absent")
    done = unet3d("--workspace", str(tmp_path / "ws"), "run", str(config), timeout=300)
    assert done.returncode == 1
    lines = console_lines(done.stdout + done.stderr)
    assert len(lines) == 1 and "absent" in lines[0] and "does not exist" in lines[0], lines


@pytest.mark.slow
def test_runs_lists_the_workspace_runs(trained_run):
    ws, run_id, _done = trained_run
    done = unet3d("--workspace", str(ws), "runs", timeout=300)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split()[:5] == ["run", "id", "date", "cohort", "stages"]
    row = next(r for r in rows if r.startswith(run_id))
    assert " tiny " in row and "organ -> lesion" in row
    assert re.search(r"lesion \d\.\d{3}", row), row  # the final stage's test Dice


def test_runs_in_an_empty_workspace_says_so(tmp_path):
    done = unet3d("--workspace", str(tmp_path / "ws"), "runs", timeout=300)
    assert done.returncode == 1
    assert "no run in" in done.stderr and done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# item 9: predict's conventions and the model export
# ---------------------------------------------------------------------------------------------------------
def _scans(tiny_cohort: Path, folder: Path) -> dict[str, Path]:
    """One phantom scan stored as NIfTI, NRRD and MHA in one folder (nnU-Net's imagesTs habit)."""
    import SimpleITK as sitk

    folder.mkdir()
    source = sorted((tiny_cohort / "imagesTr").glob("*.nii.gz"))[0]
    image = sitk.ReadImage(str(source))
    paths = {"nii.gz": folder / "scan_a_0000.nii.gz", "nrrd": folder / "scan_b.nrrd", "mha": folder / "scan_c.mha"}
    for path in paths.values():
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(path))
    return paths


@pytest.mark.slow
def test_predict_with_i_o_keeps_each_input_format_and_puts_stage1_apart(trained_run, tiny_cohort, tmp_path):
    import SimpleITK as sitk

    ws, run_id, _done = trained_run
    scans = _scans(tiny_cohort, tmp_path / "imagesTs")
    out = tmp_path / "out"
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(tmp_path / "imagesTs"),
                  "-o", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    final = {"scan_a.nii.gz", "scan_b.nrrd", "scan_c.mha"}  # nnU-Net's _0000 channel suffix dropped
    assert {p.name for p in out.iterdir() if p.is_file()} == final  # nothing but final predictions on top
    assert {p.name for p in (out / "stage1").iterdir()} == final  # the organ (roi) stage's masks
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"stage1"}
    source = sitk.ReadImage(str(scans["nrrd"]))
    for name in final:
        pred = sitk.ReadImage(str(out / name))
        assert pred.GetSize() == source.GetSize() and pred.GetSpacing() == pytest.approx(source.GetSpacing())
        assert pred.GetOrigin() == pytest.approx(source.GetOrigin())

    # --format overrides the input's format; the positional form and --out still work
    forced = tmp_path / "forced"
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, str(scans["nii.gz"]), "--out", str(forced),
                  "--format", "nrrd", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in forced.rglob("*") if p.is_file()) == ["scan_a.nrrd", "scan_a.nrrd"]


@pytest.mark.slow
def test_predict_errors_stand_on_their_own_lines_and_all_failed_is_a_failure(trained_run, tmp_path):
    ws, run_id, _done = trained_run
    bad = [tmp_path / "broken.nii.gz", tmp_path / "empty.nrrd"]
    for path in bad:
        path.write_text("not an image")
    out = tmp_path / "out"
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(bad[0]), "-i", str(bad[1]),
                  "-o", str(out), "--device", "cpu")
    assert done.returncode == 1
    assert "predictions of" not in done.stdout
    errors = [line for line in done.stderr.split("\n") if ": error:" in line and "unet3d predict" not in line]
    assert len(errors) == 2 and all(line.startswith("  ") and "\r" not in line for line in errors), done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("unet3d predict: error: every input failed")


@pytest.mark.slow
def test_predict_of_a_dicom_series_writes_nifti_with_a_note(trained_run, dicom_dir, tmp_path):
    ws, run_id, _done = trained_run
    out = tmp_path / "out"
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(dicom_dir), "-o", str(out),
                  "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / f"{dicom_dir.name}.nii.gz").is_file()
    assert "DICOM series written as NIfTI" in done.stderr


@pytest.mark.slow
def test_an_exported_model_predicts_without_the_workspace(trained_run, tiny_cohort, tmp_path):
    import shutil

    import numpy as np
    import SimpleITK as sitk

    ws, run_id, _done = trained_run
    exported = tmp_path / "export"
    done = unet3d("--workspace", str(ws), "export", "--model", run_id, str(exported))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((exported / "unet3d_model.json").read_text())
    assert [s["model_dir"] for s in record["stages"]] == ["organ", "lesion"]
    for stage in ("organ", "lesion"):
        assert {p.name for p in (exported / stage).iterdir()} == {"model.json", "checkpoint_best.pt", "plan.json"}
    assert "unet3d predict --model" in (exported / "README.txt").read_text()

    # another machine: the folder moved, no workspace at all
    elsewhere = tmp_path / "other_machine" / "model"
    shutil.move(str(exported), str(elsewhere.parent.mkdir(parents=True) or elsewhere))
    scans = _scans(tiny_cohort, tmp_path / "scans")
    done = unet3d("--workspace", str(tmp_path / "no_workspace"), "predict", "--model", str(elsewhere),
                  "-i", str(scans["nii.gz"]), "-o", str(tmp_path / "from_export"), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "no_workspace").exists()
    done = unet3d("--workspace", str(ws), "predict", "--model", run_id, "-i", str(scans["nii.gz"]),
                  "-o", str(tmp_path / "from_run"), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    for rel in ("scan_a.nii.gz", "stage1/scan_a.nii.gz"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_export" / rel)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_run" / rel)))
        assert np.array_equal(a, b), rel

    # an export never overwrites a folder that holds something
    done = unet3d("--workspace", str(ws), "export", "--model", run_id, str(elsewhere))
    assert done.returncode == 1 and "not an empty folder" in done.stderr


# ---------------------------------------------------------------------------------------------------------
# item 8: the pipeline's own flow run carries the results
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_pipeline_run_carries_the_summary_artifact_and_the_stage_log(trained_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import pipeline_flow

    ws, run_id, _done = trained_run
    state = pipeline_flow(config_path=str(ws.parent / "c.yaml"), workspace=str(ws), return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # the log worker sends in batches: send what is queued now
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    tables = [a for a in artifacts if a.type == "table"]
    assert len(tables) == 1 and tables[0].key.startswith("summary-")
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    # wide: one row per stage x split x class (2 stages x 2 splits x 1 class), a column per metric
    assert len(rows) == 4
    assert {(r["stage"], r["split"]) for r in rows} == {(s, p) for s in ("organ", "lesion") for p in ("val", "test")}
    assert {"dice", "iou", "hd95_mm", "n"} <= set(rows[0])
    for r in rows:
        assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]|–", r["dice"]), r["dice"]
    assert any(a.type == "markdown" for a in artifacts)
    text = "\n".join(log.message for log in logs)
    assert "stage train-organ: cached" in text and "stage report: cached" in text
    assert f"run {run_id}: summary" in text


# ---------------------------------------------------------------------------------------------------------
# item 12: fixed overhead per command
# ---------------------------------------------------------------------------------------------------------
def test_a_command_does_not_wait_for_prefects_heartbeat_thread_yet_beats(tiny_cohort, tmp_path, monkeypatch):
    """Prefect's heartbeat thread sleeps in whole seconds and is joined when the flow run ends: every command
    waited up to a second after its work. From the command line the pipeline's run has that thread off, and
    the same heartbeat event comes from a thread that stops at once."""
    from contextlib import contextmanager

    import prefect.events
    import prefect.flow_engine as engine

    from flows import cli

    heartbeat_of_runs = []
    prefects_heartbeat = engine._send_heartbeats

    @contextmanager
    def spy(run_engine, *args, **kwargs):
        heartbeat_of_runs.append((run_engine.flow.name, run_engine.heartbeat_seconds))
        with prefects_heartbeat(run_engine, *args, **kwargs):
            yield

    beats = []
    monkeypatch.setattr(engine, "_send_heartbeats", spy)
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: beats.append(event))
    config = write_config(tmp_path / "c.yaml", tiny_cohort)
    assert cli.main(["--workspace", str(tmp_path / "ws"), "preprocess", str(config)]) == 0
    assert ("unet3d-pipeline", None) in heartbeat_of_runs, heartbeat_of_runs  # Prefect's thread is off ...
    assert all(seconds is None for _, seconds in heartbeat_of_runs)
    # ... and the run still beats, as Prefect's engine would (the first beat at the start of the run)
    assert [b["event"] for b in beats] == ["prefect.flow-run.heartbeat"]
    resource, related = beats[0]["resource"], beats[0]["related"]
    assert resource["prefect.resource.id"].startswith("prefect.flow-run.")
    assert [r["prefect.resource.role"] for r in related][:1] == ["flow"]
    assert related[0]["prefect.resource.name"] == "unet3d-pipeline"


def test_the_stages_are_task_runs_of_the_pipelines_own_flow_run(tiny_cohort, tmp_path, monkeypatch):
    """A subflow run per stage cost its own flow run on the server (create, two state changes, reads: 0.2 s
    per stage, 2 s of a fully cached run); each stage is now a cached task run of the pipeline's flow run,
    where a user opening that run in the UI sees them."""
    from prefect.context import FlowRunContext, TaskRunContext

    from flows import cli
    from flows import stages as S

    seen = []
    for name in ("run_ingest", "run_preprocess"):
        original = getattr(S, name)

        def spy(*args, _original=original, **kwargs):
            seen.append((FlowRunContext.get().flow.name, TaskRunContext.get().task_run.name))
            return _original(*args, **kwargs)
        monkeypatch.setattr(S, name, spy)
    config = write_config(tmp_path / "c.yaml", tiny_cohort)
    assert cli.main(["--workspace", str(tmp_path / "ws"), "preprocess", str(config)]) == 0
    assert seen == [("unet3d-pipeline", "ingest"), ("unet3d-pipeline", "preprocess")]


# ---------------------------------------------------------------------------------------------------------
# The command's start: its imports (Prefect, pydantic, pandas) made without collections of the garbage collector
# ---------------------------------------------------------------------------------------------------------
GC_PROBE = """
import gc, json, sys
import flows.cli as cli

seen = {}

def probe(args):
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(), pipeline="flows.pipeline" in sys.modules)
    return 0

cli.COMMANDS[sys.argv[1]] = probe
sys.argv = ["unet3d", "--workspace", sys.argv[2], *sys.argv[1:2], *sys.argv[3:]]
code = cli.console_main()
print(json.dumps(dict(seen, code=code)))
"""


@pytest.mark.parametrize("command, extra", [("preprocess", ["CONFIG"]), ("ingest", ["SRC", "--cohort", "c"]),
                                            ("runs", [])])
def test_the_commands_imports_are_frozen_out_of_the_garbage_collectors_sight(tmp_path, command, extra):
    """Collections during the imports walked the growing heap of Prefect's and pydantic's objects again and
    again: 0.2 s of a command's 1.4 s of imports. The command imports with the collector off, then freezes what
    it imported (objects that live as long as the process) and works with the collector on."""
    done = subprocess.run([sys.executable, "-c", GC_PROBE, command, str(tmp_path), *extra], cwd=REPO,
                          capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0 and seen["enabled"] is True
    assert seen["frozen"] > 50_000, seen  # Prefect alone is about 100,000 objects
    # a command that runs the pipeline has imported it by then; the others import only what they use
    assert seen["pipeline"] is (command == "preprocess"), seen


def test_main_leaves_the_garbage_collector_as_it_was(tmp_path):
    """main() is what tests and notebooks call: only the command line freezes the process's objects."""
    import gc

    from flows.cli import main

    before = gc.get_freeze_count()
    assert main(["--workspace", str(tmp_path), "runs"]) in (0, 1)
    assert gc.isenabled() and gc.get_freeze_count() == before
