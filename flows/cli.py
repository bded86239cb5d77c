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
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

STAGE_COMMANDS = ("preprocess", "split", "train", "infer", "evaluate")
STAGE_NAMES = ("ingest", "preprocess", "split", "train", "infer", "evaluate", "report")

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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="generate the synthetic phantom cohort and run the whole pipeline on it")
    _workspace_arg(p)
    p.add_argument("--cases", type=int, default=24, help="number of synthetic cases (default 24)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per stage (default 20)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("ingest", help="add a cohort to the catalog (only new or changed cases are read)")
    _workspace_arg(p)
    p.add_argument("source", help="MSD/nnU-Net folder, plain image folder, or folder of DICOM series")
    p.add_argument("--cohort", required=True, help="cohort name")
    p.add_argument("--labels", default=None, help="folder of labels matched to images by case id (plain folders)")
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

    p = sub.add_parser("predict", help="segment new scans (files or DICOM folders) with a trained cascade")
    _workspace_arg(p)
    p.add_argument("--model", required=True, metavar="RUN_ID", help="run id (see `unet3d report`)")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="no mirroring test-time augmentation (on by default, as in the pipeline's infer stage)")

    p = sub.add_parser("report", help="print the summary table of a run (default: the latest)")
    _workspace_arg(p)
    p.add_argument("--run", default=None, metavar="RUN_ID")

    p = sub.add_parser("serve", help="serve the pipeline as a scheduled Prefect deployment")
    _workspace_arg(p)
    p.add_argument("config")
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--timezone", default=os.environ.get("TZ", "UTC"), help="IANA timezone of the schedule (default $TZ or UTC)")
    p.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    return parser


class _ShortTracebacks(logging.Formatter):
    """Console log lines without the tracebacks that Prefect logs for a failed stage: the user gets the
    one-line reason at the end (the full traceback stays in the Prefect UI, and `-v` shows it here)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        cut = text.find("Traceback (most recent call last)")
        return text if cut < 0 else text[:cut].rstrip() + " [traceback: run with -v, or see the Prefect UI]"


def _configure_logging(verbose: bool) -> None:
    import prefect  # noqa: F401  (sets up Prefect's console handler on the root logger)

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        root.setLevel(logging.DEBUG)
    else:
        for handler in root.handlers:
            handler.setFormatter(_ShortTracebacks(handler.formatter or logging.Formatter()))
    for name in ("distributed", "tornado", "asyncio", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"unet3d {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `unet3d report | head`: the reader has had enough
        sys.stderr.close()
        return 0
    except Exception as exc:  # one line for the user; -v shows the traceback
        if args.verbose:
            raise
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"unet3d {args.command}: error: {reason}", file=sys.stderr)
        return 1


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
    from flows.pipeline import pipeline_flow
    from unet3d.config import load_config

    from flows.preflight import preflight

    # A bad config fails here, in one line, before Prefect starts and before any stage writes anything.
    preflight(load_config(config).model_dump(mode="json"), ws)

    t0 = time.perf_counter()
    results = pipeline_flow(config_path=str(Path(config).resolve()), workspace=ws, refresh=refresh, until=until)
    _print_run(results, time.perf_counter() - t0)
    return results


def _print_run(results: dict, seconds: float) -> None:
    print("\nstage        status     seconds  key")
    for name in STAGE_NAMES:
        r = results.get(name)
        if r is None:
            continue
        for item in (r if isinstance(r, list) else [r]):
            label = name if name != "train" else f"train-{item.get('stage_name')}"
            status = "cached" if item.get("cached") else "computed"
            print(f"{label:12s} {status:9s} {item.get('stage_seconds', 0):8.1f}  {item.get('key', '')[:12]}")
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
    generate_demo_cohort(source, n_cases=args.cases, seed=args.seed)
    config = ws.demo_config
    text = DEMO_CONFIG.format(source=source, epochs=args.epochs)
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    print(f"config: {config}")
    _run_pipeline(str(config), str(ws.root), [], "report")
    return 0


def cmd_predict(args) -> int:
    from flows.stages import read_run_record
    from unet3d.inference import PredictionJob, StageModel, infer_cases
    from unet3d.io import strip_image_suffix

    ws = _workspace(args)
    try:
        record = read_run_record(ws, args.model)  # a plain run id, its models inside the workspace
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    stages = record["stages"]
    models = [StageModel.load(s["model_dir"], device=args.device, margin_mm=s["margin_mm"] if s.get("roi_from") else None)
              for s in stages]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [s["name"] for s in stages]
    jobs = []
    for inp in args.inputs:  # the last stage's prediction is NAME.nii.gz, an earlier stage's NAME_STAGE.nii.gz
        path = Path(inp)
        name = path.name if path.is_dir() else strip_image_suffix(path.name)
        jobs.append(PredictionJob(inp, {n: out / f"{name}{'' if n == names[-1] else f'_{n}'}.nii.gz" for n in names},
                                  image=path))
    infer = record["config"]["infer"]
    done = infer_cases(jobs, models, [s["plan"] for s in stages], overlap=infer["overlap"], tta=args.tta,
                       batch_size=infer["batch_size"], resume=False, keep_going=True, desc="predict")
    for outcome in done.outcomes:  # one bad scan does not stop the others
        if outcome.error is not None:
            print(f"  {outcome.case_id}: error: {outcome.error}", file=sys.stderr)
        for w in outcome.warnings:
            print(f"  {outcome.case_id}: warning: {w}", file=sys.stderr)
        for target in outcome.written:
            print(f"  {outcome.case_id} -> {target}")
    print(f"predictions of run {args.model} in {out}")
    if done.failed:
        raise RuntimeError(f"{done.failed} of {len(args.inputs)} inputs failed (see above)")
    return 0


def cmd_report(args) -> int:
    from data_catalog.workspace import Workspace
    from unet3d.report import format_summary
    from unet3d.report_tables import latest_run_id, read_table

    ws = Workspace(_workspace(args))
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
            "serve": cmd_serve, **{name: _stage_command(name) for name in STAGE_COMMANDS}}


if __name__ == "__main__":
    sys.exit(main())
