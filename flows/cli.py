"""The `unet3d` command line (SPEC): demo, ingest, run, per-stage commands, predict, report, serve.

Every command takes --workspace (default $UNET3D_WORKSPACE, else ./workspace), shows progress bars for long
work, and on failure exits non-zero with a one-line reason.
"""
from __future__ import annotations

from flows.settings import apply_defaults

apply_defaults()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

STAGE_COMMANDS = ("preprocess", "split", "train", "infer", "evaluate", "segment")
STAGE_NAMES = ("ingest", "preprocess", "split", "train", "infer", "evaluate", "report", "segment")
# predict's output formats: file suffix by --format name
OUTPUT_FORMATS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
# an input's own format -> the label format written for it by default (a header+raw pair becomes one file)
SAME_FORMAT = {".nii.gz": ".nii.gz", ".nii": ".nii.gz", ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha",
               ".mhd": ".mha"}
EXPORT_RECORD = "unet3d_model.json"  # the run record of a folder written by `unet3d export`

DEMO_CONFIG = """\
# The built-in demo: a synthetic CT phantom cohort (an organ holding 0-3 lesions), a two-stage cascade.
cohort: {{name: demo, source: {source}, modality: CT}}
labels: {{1: organ, 2: lesion}}
preprocess: {{target_spacing: auto, normalisation: auto, workers: 2}}
split: {{ratios: [0.8, 0.1, 0.1], seed: 0, group_by: patient_id}}
stages:
  - {{name: organ, classes: {{1: organ}}, merge: {{1: [1, 2]}}, spacing_factor: 2.0}}
  - {{name: lesion, classes: {{1: lesion}}, merge: {{1: [2]}}, roi_from: organ, margin_mm: 10}}
train: {{architecture: unet3d, features: [8, 16, 32, 64], augment: light, max_epochs: {epochs}, iterations_per_epoch: 25,
        batch_size: 2, foreground_oversample: 0.5}}  # lesions are small: centre half the patches on foreground
infer: {{overlap: 0.5, tta: false, splits: [val, test]}}
evaluate: {{n_boot: 500}}
"""


def _workspace_arg(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # On subcommands the default is SUPPRESS, so that `unet3d --workspace W run ...` is not reset to None.
    parser.add_argument("--workspace", default=None if top else argparse.SUPPRESS,
                        help="workspace folder (default: $UNET3D_WORKSPACE, else ./workspace)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet3d", description="3D U-Net segmentation pipeline: ingest, preprocess, "
                                     "split, train, cascade inference, evaluation, Parquet reports.")
    _workspace_arg(parser, top=True)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show the pipeline's log on the console (-v: INFO, -vv: DEBUG and full tracebacks)")
    parser.add_argument("--version", action="version", version=f"unet3d {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="generate the synthetic phantom cohort and run the whole pipeline on it")
    _workspace_arg(p)
    p.add_argument("--cases", type=int, default=24, help="number of synthetic cases (default 24)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per stage (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=1,
                   help="image channels per case (default 1; 2+: CASE_0000 the CT, CASE_0001 its gradient magnitude)")

    p = sub.add_parser("ingest", help="add a cohort to the catalog (only new or changed cases are read)")
    _workspace_arg(p)
    p.add_argument("source", help="MSD/nnU-Net folder, plain image folder, or folder of DICOM series")
    p.add_argument("--cohort", required=True, help="cohort name")
    p.add_argument("--labels", default=None, help="folder of labels matched to images by case id (plain folders)")
    p.add_argument("--unlabelled", default=None, metavar="DIR",
                   help="folder of scans without labels: ingested as unlabelled cases, segmented, never trained on")
    p.add_argument("--modality", choices=["CT", "MRI", "other"], default=None)

    p = sub.add_parser("run", help="the whole pipeline: ingest -> preprocess -> split -> train -> infer -> evaluate -> report")
    _workspace_arg(p)
    p.add_argument("config", help="YAML config (see README)")
    p.add_argument("--refresh", action="append", choices=STAGE_NAMES, default=[],
                   help="recompute this stage and everything after it (repeatable)")

    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=f"the {name} stage, with the stages it needs (from cache where done)")
        _workspace_arg(p)
        p.add_argument("config")
        p.add_argument("--refresh", action="append", choices=STAGE_NAMES, default=[])

    p = sub.add_parser("predict", help="segment new scans (files, folders of files, DICOM folders) with a trained "
                       "cascade")
    _workspace_arg(p)
    p.add_argument("--model", required=True, metavar="RUN_ID|FOLDER",
                   help="a run id (see `unet3d runs`), `champion` (the serving model; `champion:COHORT` when the "
                        "workspace has several) or a folder written by `unet3d export`")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders of image files, DICOM series folders; for a multi-channel model a "
                        "case is its files CASE_0000, CASE_0001 ... or its files in channel order")
    p.add_argument("-i", "--input", dest="more_inputs", action="append", default=[], metavar="INPUT",
                   help="an input as an option, as nnU-Net's -i (repeatable)")
    p.add_argument("-o", "--output", "--out", dest="out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", choices=sorted(OUTPUT_FORMATS), default=None,
                   help="output format (default: the input's: NRRD -> NRRD, MHA -> MHA, NIfTI and DICOM -> NIfTI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="no mirroring test-time augmentation (on by default, as in the pipeline's infer stage)")

    p = sub.add_parser("export", help="copy a run's trained cascade into one folder that `predict --model` runs "
                       "without the workspace")
    _workspace_arg(p)
    p.add_argument("--model", required=True, metavar="RUN_ID", help="run id (see `unet3d runs`)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) folder")

    p = sub.add_parser("report", help="print the summary table of a run (default: the latest)")
    _workspace_arg(p)
    p.add_argument("--run", default=None, metavar="RUN_ID")
    p.add_argument("--history", action="store_true",
                   help="each class's test Dice (final stage) across the cohort's runs, oldest first")
    p.add_argument("--cohort", default=None, help="with --history: the cohort (needed when there are several)")

    p = sub.add_parser("promote", help="make a run's models the cohort's champion (the serving model), by hand")
    _workspace_arg(p)
    p.add_argument("run_id", metavar="RUN_ID", help="run id (see `unet3d runs`)")
    p.add_argument("--reason", default=None, help="why (kept in the champion's history)")

    p = sub.add_parser("rollback", help="return to the model that served before the current champion")
    _workspace_arg(p)
    p.add_argument("--cohort", default=None, help="the cohort (needed when the workspace has several champions)")
    p.add_argument("--reason", default=None, help="why (kept in the champion's history)")

    p = sub.add_parser("runs", help="list the runs of the workspace (run id, date, cohort, stages, test Dice)")
    _workspace_arg(p)

    p = sub.add_parser("serve", help="serve the pipeline as a scheduled Prefect deployment")
    _workspace_arg(p)
    p.add_argument("config")
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--timezone", default=os.environ.get("TZ", "UTC"), help="IANA timezone of the schedule (default $TZ or UTC)")
    p.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unet3d-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never `pip install`ed
        return "unknown (not installed: run `pip install -e .`)"


class _ShortTracebacks(logging.Formatter):
    """Console log lines without the tracebacks that Prefect logs for a failed stage: the user gets the
    one-line reason at the end (the full traceback stays in the Prefect UI, and `-vv` shows it here)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        cut = text.find("Traceback (most recent call last)")
        return text if cut < 0 else text[:cut].rstrip() + " [traceback: run with -vv, or see the Prefect UI]"


class _Interruption:
    """Ctrl-C during a command. The first press raises KeyboardInterrupt in the main thread (the stage stops
    where it is; every stage resumes from its finished work) and silences the console: Prefect then reports
    the interrupted runs as crashed to its API (the UI keeps that), which on the console is only noise after
    the one line the CLI prints."""

    def __init__(self):
        self.pressed = False

    def handle(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pressed


INTERRUPTION = _Interruption()


def _configure_logging(verbose: int) -> None:
    import prefect  # noqa: F401  (sets up Prefect's console handler on the root logger)

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # The console shows warnings and errors (progress bars show the work); the pipeline's INFO log still goes
    # to the Prefect API (the flow run's log tab), which has its own handler on the loggers. -v shows it here.
    console_level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    if verbose >= 2:
        root.setLevel(logging.DEBUG)
    for name in ("data_catalog", "unet3d", "flows"):  # at INFO for the Prefect UI too (see flows/pipeline.py)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in root.handlers:
        # the console handlers only (Prefect's, or basicConfig's): a test's log capture keeps its own level
        if not (isinstance(handler, PrefectConsoleHandler) or type(handler) is logging.StreamHandler):
            continue
        handler.setLevel(console_level)
        handler.addFilter(INTERRUPTION)
        if verbose < 2:
            handler.setFormatter(_ShortTracebacks(handler.formatter or logging.Formatter()))
    for name in ("distributed", "tornado", "asyncio", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _start_api_server_in_own_session() -> None:
    """Start Prefect's temporary API server (when no PREFECT_API_URL is set) in a session of its own.

    Prefect starts it lazily as a child in our process group, so Ctrl-C in the terminal reached the server
    too: it died first, and the flow's crash reports then retried against a closed port for minutes. Started
    here before any flow, the server is the one instance every Prefect client of this process uses
    (SubprocessASGIServer is one object per port, and the clients ask for the default one); Prefect still
    stops it at exit (its own atexit hook)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import subprocess
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return  # a server from a Prefect profile, or none allowed: Prefect's own rules apply

    from unet3d.io import parent_death_signal

    class OwnSessionPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            # out of the process group, so a killed command (SIGKILL, timeout's SIGTERM) would leave it
            # running: it gets SIGTERM when this process dies
            kwargs.setdefault("preexec_fn", parent_death_signal())
            super().__init__(*args, **kwargs)

    # Popen is replaced only while the server process is created (the main thread, before any flow runs).
    with mock.patch.object(subprocess, "Popen", OwnSessionPopen):
        SubprocessASGIServer().start()


def _interrupted_message() -> str:
    where = ""
    if "flows.pipeline" in sys.modules:  # a flow ran: name the stage it was in
        from flows.pipeline import interrupted_stage
        where = interrupted_stage()
    return f"interrupted{': ' + where if where else ''}; rerun the same command to resume"


def _report_interruption(command: str) -> int:
    """The one line of an interrupted command, and its exit code."""
    INTERRUPTION.pressed = True
    print(f"unet3d {command}: {_interrupted_message()}", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    INTERRUPTION.pressed = False
    previous = signal.getsignal(signal.SIGINT)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if args.command in WORKER_COMMANDS:  # first: it imports the workers' modules while Prefect is imported here
        from data_catalog.parallel import WORKER_SERVER
        WORKER_SERVER.start()
    if in_main_thread:  # before Prefect is imported: a press during the imports is an interruption like any other
        signal.signal(signal.SIGINT, INTERRUPTION.handle)
    try:
        # a served deployment is a service: its console is its log (stage start and end, cache hits, failures)
        _configure_logging(max(args.verbose, 1) if args.command == "serve" else args.verbose)
        if _IMPORT_GC["held"]:
            if args.command in PIPELINE_COMMANDS:
                import flows.pipeline  # noqa: F401  (the pipeline's modules, imported with the collector off)
            _release_gc_after_imports()
        code = COMMANDS[args.command](args)
        if INTERRUPTION.pressed:  # its KeyboardInterrupt was dropped: raised in a destructor, Python ignores it
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        return _report_interruption(args.command)
    except BrokenPipeError:  # `unet3d report | head`: the reader has had enough
        sys.stderr.close()
        return 0
    except Exception as exc:  # one line for the user; -vv shows the traceback
        if INTERRUPTION.pressed:  # Ctrl-C, turned into another error by a library on its way out
            return _report_interruption(args.command)
        if args.verbose >= 2:
            raise
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"unet3d {args.command}: error: {reason}", file=sys.stderr)
        return 1
    finally:
        _release_gc_after_imports()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
        if args.command in WORKER_COMMANDS:
            WORKER_SERVER.stop()


def _workspace(args) -> str:
    # flows.settings, not flows.pipeline: a command that needs no flow (`unet3d ingest`, `report`) does not
    # pay the seconds of importing the flows, the stages and torch
    from flows.settings import resolve_workspace
    return resolve_workspace(args.workspace)


# ---------------------------------------------------------------------------------------------------------
def cmd_ingest(args) -> int:
    from tqdm.auto import tqdm

    from data_catalog.ingest import ingest

    from unet3d.config import safe_name

    try:
        safe_name(args.cohort, "cohort name")  # it becomes a folder name
    except ValueError as exc:
        raise ValueError(f"--cohort: {exc}") from None
    ws = _workspace(args)
    result = ingest(args.source, args.cohort, ws, labels=args.labels, modality=args.modality,
                    unlabelled=args.unlabelled,
                    workers=min(2, os.cpu_count() or 1), progress=lambda it, **kw: tqdm(it, leave=False, **kw))
    print(result.summary())
    from data_catalog.tables import Catalog
    issues = Catalog(ws).read("issues")
    issues = issues[issues["cohort"] == args.cohort]
    for r in issues.sort_values(["severity", "case_id"]).to_dict("records"):
        print(f"  {r['severity']:7s} {r['case_id']}: {r['code']}: {r['message']}")
    print(f"catalog: {result.cases_path}\nissues:  {result.issues_path}")
    return 0


def _run_pipeline(config: str, ws: str, refresh: list[str], until: str) -> dict:
    from flows.pipeline import run_pipeline
    from unet3d.config import load_config

    from flows.preflight import preflight

    # A bad config fails here, in one line, before Prefect starts and before any stage writes anything.
    preflight(load_config(config).model_dump(mode="json"), ws)

    t0 = time.perf_counter()
    _start_api_server_in_own_session()
    results = run_pipeline(config_path=str(Path(config).resolve()), workspace=ws, refresh=refresh, until=until)
    _print_run(results, time.perf_counter() - t0)
    return results


def _print_run(results: dict, seconds: float) -> None:
    print(f"\n{'stage':12s} {'status':22s} seconds  key")
    for name in STAGE_NAMES:
        r = results.get(name)
        if r is None:
            continue
        for item in (r if isinstance(r, list) else [r]):
            label = name if name != "train" else f"train-{item.get('stage_name')}"
            status = "cached" if item.get("cached") else "computed"
            if not item.get("cached") and item.get("resumed_from_epoch") is not None:  # after an interruption
                status = f"resumed after epoch {item['resumed_from_epoch'] + 1}"
            print(f"{label:12s} {status:22s} {item.get('stage_seconds', 0):7.1f}  {item.get('key', '')[:12]}")
    print(f"total {seconds:.1f} s")
    from data_catalog.workspace import Workspace

    ws = Workspace(results["workspace"])
    if "report" in results:
        r = results["report"]
        print(f"\n{r['table']}\n")
        print(f"run id:      {r['run_id']}")
        print(f"metrics:     {ws.report_table('metrics')}   (pandas.read_parquet reads every run)")
        print(f"summary:     {ws.report_table('summary')}")
        print(f"report:      {r['report_md']}")
        print(f"predictions: {ws.predictions_dir(r['run_id'])}")
    else:
        print(f"workspace:   {ws.root}")
    segment = results.get("segment") or {}
    if segment.get("volumes_path"):
        print(f"volumes:     {ws.volumes_table}   ({segment['n_scans']} unlabelled scans, {segment['segmented']} "
              f"segmented now, {len(segment['qc_flagged'])} flagged by QC)")


def cmd_run(args) -> int:
    _run_pipeline(args.config, _workspace(args), args.refresh, "report")
    return 0


def _stage_command(stage: str):
    def run(args) -> int:
        _run_pipeline(args.config, _workspace(args), args.refresh, stage)
        return 0
    return run


def cmd_demo(args) -> int:
    from data_catalog.demo import generate_demo_cohort
    from data_catalog.workspace import Workspace

    ws = Workspace(_workspace(args))
    if args.cases < 10:
        raise ValueError("--cases must be at least 10 (the split needs train, val and test cases)")
    source = ws.demo_cohort_dir
    print(f"generating {args.cases} synthetic phantom cases in {source}")
    generate_demo_cohort(source, n_cases=args.cases, seed=args.seed, channels=args.channels)
    config = ws.demo_config
    text = DEMO_CONFIG.format(source=source, epochs=args.epochs)
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    print(f"config: {config}")
    _run_pipeline(str(config), str(ws.root), [], "report")
    return 0


def _model_record(args) -> dict:
    """The run record that `--model` names: a folder written by `unet3d export` (its stage folders inside it),
    else a run id of the workspace."""
    import json

    from flows.stages import read_run_record

    if args.model == "champion" or args.model.startswith("champion:"):  # the serving model (flows/champion.py)
        from flows.champion import champion_run_id
        args.model = champion_run_id(_workspace(args), args.model.partition(":")[2] or None)
    folder = Path(args.model)
    if (folder / EXPORT_RECORD).is_file():
        record = json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))
        for s in record["stages"]:
            model_dir = (folder / s["model_dir"]).resolve()
            if not model_dir.is_relative_to(folder.resolve()) or not model_dir.is_dir():
                raise ValueError(f"--model: {folder / EXPORT_RECORD}: stage {s.get('name')}: model_dir "
                                 f"{s['model_dir']!r} is not a folder inside {folder}")
            s["model_dir"] = str(model_dir)
        return record
    if folder.is_dir():
        raise ValueError(f"--model: {folder} is a folder without {EXPORT_RECORD} (not written by `unet3d export`)")
    try:
        return read_run_record(_workspace(args), args.model)  # a plain run id, its models inside the workspace
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files as given; a folder holding image files (nnU-Net's -i imagesTs) as its files; any other
    folder as one DICOM series."""
    from unet3d.io import is_image_file

    out = []
    for inp in inputs:
        path = Path(inp)
        files = sorted(f for f in path.iterdir() if f.is_file() and is_image_file(f.name)) if path.is_dir() else []
        out.extend(files or [path])
    return out


def _output_name(path: Path, fmt: str | None) -> tuple[str, str, str | None]:
    """(case name, output suffix, a note for the user) of one input."""
    from unet3d.io import strip_image_suffix

    if path.is_dir():
        suffix = OUTPUT_FORMATS[fmt] if fmt else ".nii.gz"
        note = None if fmt else "DICOM series written as NIfTI (DICOM SEG output is not supported; --format nrrd|mha)"
        return path.name, suffix, note
    name = strip_image_suffix(path.name)
    own = path.name[len(name):].lower()
    if name.endswith("_0000"):  # nnU-Net's channel suffix: the label of CASE_0000.nii.gz is CASE.nii.gz
        name = name[:-len("_0000")]
    if fmt:
        return name, OUTPUT_FORMATS[fmt], None
    if own in SAME_FORMAT:
        return name, SAME_FORMAT[own], None
    return name, ".nii.gz", f"no label format matches {path.name}: written as NIfTI"


def cmd_predict(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from data_catalog.channels import group_channel_inputs
    from unet3d.inference import PredictionJob, StageModel, infer_cases
    from unet3d.resample import plan_channels

    inputs = [*args.inputs, *args.more_inputs]
    if not inputs:
        raise ValueError("no input: give image files, folders or DICOM series (positional or -i)")
    record = _model_record(args)
    stages = record["stages"]
    out = Path(args.out)
    names = [s["name"] for s in stages]
    # The last stage's label maps are OUT/CASE.ext; an earlier stage's (the cascade's region masks) go to
    # OUT/stageK/, so that a tool reading OUT finds only final predictions there.
    folders = {n: out if n == names[-1] else out / f"stage{k}" for k, n in enumerate(names, start=1)}
    jobs, notes, seen = [], [], {}
    # A multi-channel model takes several files per case (CASE_0000, CASE_0001 ... or -i t1 -i t2 in order)
    n_channels = max(plan_channels(s["plan"]) for s in stages)
    for path, channels in group_channel_inputs(_expand_inputs(inputs), n_channels):
        name, suffix, note = _output_name(path, args.format)
        target = folders[names[-1]] / f"{name}{suffix}"
        if target in seen:
            raise ValueError(f"inputs {seen[target]} and {path} would both be written as {target}")
        seen[target] = path
        if note:
            notes.append(f"  {name}: note: {note}")
        jobs.append(PredictionJob(str(path), {n: folders[n] / f"{name}{suffix}" for n in names}, image=path,
                                  channels=channels))
    models = [StageModel.load(s["model_dir"], device=args.device,
                              margin_mm=s["margin_mm"] if s.get("roi_from") else None) for s in stages]
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    infer = record["config"]["infer"]
    # A bar only on a terminal: redrawn into a log file or a pipe, it would glue the next line onto itself.
    with logging_redirect_tqdm():
        done = infer_cases(jobs, models, [s["plan"] for s in stages], overlap=infer["overlap"], tta=args.tta,
                           batch_size=infer["batch_size"], resume=False, keep_going=True, desc="predict",
                           progress=sys.stderr.isatty())
    for line in notes:
        print(line, file=sys.stderr)
    for outcome in done.outcomes:  # one bad scan does not stop the others
        if outcome.error is not None:
            print(f"  {outcome.case_id}: error: {outcome.error}", file=sys.stderr)
        for w in outcome.warnings:
            print(f"  {outcome.case_id}: warning: {w}", file=sys.stderr)
        for target in outcome.written:
            print(f"  {outcome.case_id} -> {target}")
    if done.failed == len(jobs):
        raise RuntimeError(f"every input failed ({len(jobs)}; see above): nothing written")
    earlier = ", ".join(str(folders[n].relative_to(out)) for n in names[:-1])
    print(f"predictions of {record['run_id']} in {out}" + (f" (earlier stages in {earlier})" if earlier else ""))
    if done.failed:
        raise RuntimeError(f"{done.failed} of {len(jobs)} inputs failed (see above)")
    return 0


def cmd_export(args) -> int:
    import json
    import shutil
    from datetime import datetime, timezone

    from data_catalog.hashing import sha256_file
    from flows.stages import read_run_record
    from unet3d.io import write_json_atomic
    from unet3d.train import ModelFiles

    ws = _workspace(args)
    try:
        record = read_run_record(ws, args.model)
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    out = Path(args.out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; export into a new one")
    # built beside the target and renamed into place: an interrupted export leaves no half folder to trust
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for s in record["stages"]:
        files, folder = ModelFiles(s["model_dir"]), partial / s["name"]
        folder.mkdir()
        for src in (files.model_json, files.best_checkpoint):
            if not src.is_file():
                raise ValueError(f"run {args.model}: stage {s['name']}: {src} is missing")
            shutil.copy2(src, folder / src.name)
        write_json_atomic(folder / "plan.json", s["plan"], indent=1)
        s.update(model_dir=s["name"], plan_file=f"{s['name']}/plan.json",
                 checkpoint_sha256=sha256_file(folder / files.best_checkpoint.name))
    record["exported"] = {"from_run": record["run_id"], "from_workspace": ws, "unet3d_version": package_version(),
                          "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(partial / EXPORT_RECORD, record, indent=1, default=str)
    (partial / "README.txt").write_text(
        f"unet3d model export of run {record['run_id']} (cohort {record['cohort']}): a cascade of "
        f"{' -> '.join(s['name'] for s in record['stages'])}.\n"
        f"{EXPORT_RECORD}: the run's config and, per stage, its folder (model.json, checkpoint_best.pt) and "
        f"preprocessing plan (plan.json); paths are relative to this folder.\n"
        f"Use: unet3d predict --model THIS_FOLDER -i SCAN_OR_FOLDER -o OUTPUT_FOLDER\n", encoding="utf-8")
    if out.exists():
        out.rmdir()  # the empty folder checked above
    partial.rename(out)
    print(f"model of run {record['run_id']} exported to {out}")
    return 0


def cmd_report(args) -> int:
    from data_catalog.workspace import Workspace
    from unet3d.report import format_summary
    from unet3d.report_tables import latest_run_id, read_table

    ws = Workspace(_workspace(args))
    if args.history:
        return _print_history(args)
    root = ws.report_table("summary")
    run_id = args.run or latest_run_id(root)
    if run_id is None:
        raise ValueError(f"no run reported yet in {root}; run `unet3d run CONFIG` first")
    summary = read_table(root, run_id)
    if summary.empty:
        raise ValueError(f"no summary for run {run_id!r} in {root}")
    print(f"run {run_id} ({summary['run_date'].iloc[0]})")
    print(format_summary(summary))
    md = ws.run_report_md(run_id)
    if md.exists():
        print(f"report: {md}")
    return 0


def _print_history(args) -> int:
    from flows.champion import history
    from unet3d.history import format_history

    print(format_history(history(_workspace(args), args.cohort)))
    return 0


def _print_registry(registry: dict) -> None:
    last = registry["history"][-1]
    print(f"champion of cohort {registry['cohort']} ({' -> '.join(registry['chain'])}): run {last['run_id']} "
          f"({last['action']} at {last['at']}; before: {last['previous_run_id'] or 'none'})")


def cmd_promote(args) -> int:
    from flows.champion import promote_by_hand

    _print_registry(promote_by_hand(_workspace(args), args.run_id, args.reason))
    return 0


def cmd_rollback(args) -> int:
    from flows.champion import rollback_by_hand

    _print_registry(rollback_by_hand(_workspace(args), args.cohort, args.reason))
    return 0


def cmd_runs(args) -> int:
    import json

    import pandas as pd

    from data_catalog.workspace import Workspace
    from unet3d.report_tables import read_table

    ws = Workspace(_workspace(args))
    records = sorted(ws.runs_dir.glob("*.json")) if ws.runs_dir.exists() else []
    if not records:
        raise ValueError(f"no run in {ws.runs_dir} yet; run `unet3d run CONFIG` first")
    summary = read_table(ws.report_table("summary"))
    test_dice = (summary[(summary["metric"] == "dice") & (summary["split"] == "test")]
                 if "metric" in summary.columns else summary)
    rows = []
    for path in records:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            run_id, stages = record["run_id"], [s["name"] for s in record["stages"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            rows.append({"run id": path.stem, "date": "", "cohort": "", "stages": "",
                         "test Dice": f"unreadable record {path.name}: {type(exc).__name__}"})
            continue
        # the final stage's classes: what the cascade delivers (an earlier stage only finds the region)
        final = test_dice[(test_dice["run_id"] == run_id) & (test_dice["stage"] == stages[-1])]
        dice = ", ".join(f"{r['class_name']} {r['mean']:.3f}"
                         for r in final.sort_values("class_name").to_dict("records"))
        rows.append({"run id": run_id, "date": str(record.get("created_at", ""))[:16].replace("T", " "),
                     "cohort": record.get("cohort", ""), "stages": " -> ".join(stages),
                     "test Dice": dice or "not evaluated"})
    table = pd.DataFrame(rows).sort_values(["date", "run id"])
    print(table.to_string(index=False, justify="left"))
    return 0


def cmd_serve(args) -> int:
    from prefect.schedules import Cron

    from flows.pipeline import pipeline_flow
    from unet3d.config import load_config

    from flows.preflight import preflight

    ws = _workspace(args)
    preflight(load_config(args.config).model_dump(mode="json"), ws)  # fail now, at registration, not at 2 am
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError("serving a schedule needs a Prefect server: start one with `prefect server start` and set "
                           "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api); the ephemeral API never fires schedules")
    print(f"serving deployment unet3d-pipeline/{args.name}: cron '{args.cron}' ({args.timezone}), workspace {ws}")
    pipeline_flow.serve(name=args.name, schedule=Cron(args.cron, timezone=args.timezone),
                        parameters={"config_path": str(Path(args.config).resolve()), "workspace": ws},
                        description="Nightly unet3d pipeline", limit=1)
    return 0


COMMANDS = {"demo": cmd_demo, "ingest": cmd_ingest, "run": cmd_run, "predict": cmd_predict, "report": cmd_report,
            "runs": cmd_runs, "export": cmd_export, "serve": cmd_serve, **{name: _stage_command(name) for name in STAGE_COMMANDS}}
COMMANDS.update(promote=cmd_promote, rollback=cmd_rollback)
# Commands whose stages run on worker processes (ingest's inspection, the Dask cluster's preprocessing,
# inference and evaluation): they start the command's worker server (data_catalog/parallel.py).
WORKER_COMMANDS = {"demo", "ingest", "run", "predict", *STAGE_COMMANDS}
# Commands that run the pipeline flow (flows/pipeline.py)
PIPELINE_COMMANDS = {"demo", "run", *STAGE_COMMANDS}


# The command line's imports (Prefect, pydantic, pandas: about 180,000 objects that live as long as the process)
# run with the garbage collector off. Each collection during them walked the growing heap of these objects again,
# 0.2 s of the 1.4 s of imports; after them the objects are frozen out of its sight (gc.freeze), so that the
# command's own collections do not walk them either, and collection is on again. The imports leave about 6,000
# unreachable objects (1 MB), kept for the process's life. Only console_main does this: main() is also called by
# tests and notebooks, whose processes must keep their collector as it is.
_IMPORT_GC = {"held": False}


def _release_gc_after_imports() -> None:
    import gc

    if _IMPORT_GC["held"]:
        _IMPORT_GC["held"] = False
        gc.freeze()
        gc.enable()


def console_main() -> int:
    """The `unet3d` command: main() with its imports made with the garbage collector off (_IMPORT_GC), and the
    process' objects frozen out of the collector's sight at the end. Why the end: the interpreter's collections at
    exit walk every object Prefect and pydantic made, 0.6 s of every command on a 2-core machine; frozen, the exit
    takes 0.1 s. atexit handlers (Prefect's log and event flushing) still run; nothing is written after main
    returns."""
    import gc

    if gc.isenabled():
        gc.disable()
        _IMPORT_GC["held"] = True
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
