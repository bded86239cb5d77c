"""Inference + evaluation of 200 cases: a real Dask cluster (a `dask scheduler` and 2 single-threaded
`dask worker` processes on loopback) against one process, in the same run, on the same inputs.

Cohort: `data_catalog.demo` phantoms (tiny, 40x40x20 voxels by default), ingested and preprocessed first (not
timed). Model: a small `unet3d` network with seeded random weights (inference needs a network, not a good one).
Both sides run the pipeline's own code: the baseline `unet3d.inference.infer_cases` + `unet3d.evaluation.
evaluate_cases` in a fresh process (torch with its default threads, one per core), ours
`data_catalog.parallel.infer_on_cluster` + `evaluate_on_cluster` over the cluster; the cluster is started before
the clock (an existing cluster, as with `preprocess.dask_address`), and its workers import torch and unet3d
before it, as this process does; connecting to it, shipping the work and loading the model on each worker are
timed. The workers run as data_catalog/parallel.py advises (no Dask sampling profiler). Both write their
predictions to their own folder; the script checks that every array and every metric row is identical before
reporting.

    python benchmarks/distributed_infer.py [--cases 200] [--shape 40x40x20] [--no-tta] [--repeats 2]

Inference settings are the pipeline's defaults (overlap, mirroring TTA, batch size from InferConfig).

Ends with one JSON line: {"benchmark": "distributed_infer_eval_200", "ours": s, "baseline": s, "unit": "s",
"ratio": ours/baseline} (target: ratio <= 0.75 on a 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test clusters' process helper

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pipeline_helpers import start_dask_scheduler, stop_processes  # noqa: E402

CLASSES = {0: "background", 1: "organ", 2: "lesion"}


def _random_model(folder: Path, spacing, features: list[int]) -> Path:
    from unet3d.train import ModelFiles, build_model_from_config

    config = {"architecture": "unet3d", "in_channels": 1, "num_classes": 3, "features": features,
              "strides": [[1, 1, 1]] + [[2, 2, 2]] * (len(features) - 1),
              "kernel_sizes": [[3, 3, 3]] * len(features), "norm": "instance", "dropout": 0.0,
              "deep_supervision": False}
    torch.manual_seed(0)
    network = build_model_from_config(config)
    files = ModelFiles(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict()}, files.best_checkpoint)
    files.model_json.write_text(json.dumps({
        "model": config, "patch_size": [16, 16, 16], "spacing": list(spacing), "classes": CLASSES,
        "label_map": {0: 0, 1: 1, 2: 2}, "roi": None, "stage": "full"}))
    return folder


def _start_cluster(folder: Path, n_workers: int) -> tuple[list[subprocess.Popen], str]:
    """(scheduler and workers, the scheduler's address); the scheduler listens before any worker starts."""
    # Workers set up as data_catalog/parallel.py and deploy/dask/README.md say (no sampling profiler)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="False")
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheduler, address = start_dask_scheduler(folder, env)
    procs = [scheduler]
    procs += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GB"], **quiet)
              for _ in range(n_workers)]
    return procs, address


def _one_process(jobs, model_dir: Path, plan: dict, settings: dict, evaluated, stages):
    """The baseline, timed from loading the model: the pipeline's own single-process loops."""
    from unet3d.evaluation import evaluate_cases
    from unet3d.inference import StageModel, infer_cases

    t0 = time.perf_counter()
    models = [StageModel.load(model_dir, device="cpu")]
    infer_cases(jobs, models, [plan], **settings, progress=False)
    t_infer = time.perf_counter() - t0
    rows, lesion_rows = evaluate_cases(evaluated, stages, "demo", "unet3d", 26, progress=False)
    return time.perf_counter() - t0, t_infer, torch.get_num_threads(), rows, lesion_rows


def _import_inference() -> None:
    import unet3d.inference  # noqa: F401  (and torch with it)


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    from unet3d.io import read_image, to_numpy

    return {p.name: to_numpy(read_image(p)) for p in sorted(folder.glob("*.nii.gz"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--shape", default="40x40x20", help="phantom grid, voxels XxYxZ")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--features", default="8,16", help="network widths per level")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="mirroring test-time augmentation (8x the network work); default: the pipeline's (infer.tta)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, in alternating order (mean)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the cohort and outputs here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from distributed import Client

    from data_catalog.case_worker import case_records
    from data_catalog.demo import generate_demo_cohort
    from data_catalog.ingest import ingest
    from data_catalog.parallel import evaluate_on_cluster, infer_on_cluster
    from data_catalog.preprocess import run_preprocessing
    from data_catalog.store import PreprocessedStore
    from data_catalog.tables import Catalog
    from unet3d.config import InferConfig
    from unet3d.evaluation import EvaluatedCase, EvaluatedStage
    from unet3d.inference import ModelRef, PredictionJob

    root = args.workdir or Path(tempfile.mkdtemp(prefix="distributed_infer_"))
    shape = tuple(int(v) for v in args.shape.split("x"))
    root.mkdir(parents=True, exist_ok=True)
    procs, address = _start_cluster(root, args.workers)
    try:
        t0 = time.perf_counter()
        src = generate_demo_cohort(root / "src", n_cases=args.cases, seed=5, shape=shape, base_spacing=(2.0, 2.0, 4.0))
        ws = root / "ws"
        ingest(src, "demo", ws)
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(args.workers, timeout=120)
            # The same starting line for both sides: this process imported torch and unet3d before its clock,
            # so do the workers (about 3 s each, the cost of a fresh worker's first inference, not of any case).
            client.run(_import_inference)
        pre = run_preprocessing(ws, "demo", {"workers": args.workers, "dask_address": address}, progress=False)
        if pre.failed:
            raise SystemExit(f"preprocessing failed for {len(pre.failed)} cases: {pre.failed[:3]}")
        store = PreprocessedStore(ws, "demo")
        plan = store.load_plan(pre.plan_ids[1.0])
        records = case_records(Catalog(ws).cases(cohort="demo", status="ok"))
        model_dir = _random_model(root / "model", plan["target_spacing"], [int(f) for f in args.features.split(",")])
        print(f"setup (cohort of {len(records)} cases, preprocessing, cluster): {time.perf_counter() - t0:.1f} s",
              flush=True)

        def jobs(out: Path) -> list[PredictionJob]:
            shutil.rmtree(out, ignore_errors=True)
            return [PredictionJob(r["case_id"], {"full": out / f"{r['case_id']}.nii.gz"},
                                  case_dirs=[store.case_dir(plan["plan_id"], r)]) for r in records]

        def evaluated(out: Path) -> list[EvaluatedCase]:
            return [EvaluatedCase(r["case_id"], "test", r["label_path"], {"full": out / f"{r['case_id']}.nii.gz"})
                    for r in records]

        stages = [EvaluatedStage("full", {1: "organ", 2: "lesion"}, {0: 0, 1: 1, 2: 2})]
        # The pipeline's inference settings (unet3d.config.InferConfig) unless --tta/--no-tta says otherwise
        defaults = InferConfig()
        settings = dict(overlap=defaults.overlap, tta=defaults.tta if args.tta is None else args.tta,
                        batch_size=defaults.batch_size)

        # --- baseline: one process -------------------------------------------------------------------------
        # In a fresh process: this one holds a Dask client's event-loop thread (distributed keeps it after the
        # client closes), which a plain single-process run would not have.
        single, spread = root / "single", root / "spread"
        ctx = multiprocessing.get_context("spawn")

        def one_process() -> tuple[float, list, list]:
            with ctx.Pool(1) as pool:
                seconds, t_infer, threads, rows, lesion_rows = pool.apply(
                    _one_process, (jobs(single), model_dir, plan, settings, evaluated(single), stages))
            print(f"one process ({threads} torch threads): {seconds:.2f} s (inference {t_infer:.2f} s, "
                  f"evaluation {seconds - t_infer:.2f} s)", flush=True)
            return seconds, rows, lesion_rows

        # --- ours: the cluster ------------------------------------------------------------------------------
        def on_cluster() -> tuple[float, list, list]:
            spread_jobs = jobs(spread)
            t0 = time.perf_counter()
            with Client(address, timeout="60s") as client:
                infer_on_cluster(client, spread_jobs, [ModelRef.of(model_dir, device="cpu")], [plan], **settings,
                                 progress=False)
                t_infer = time.perf_counter() - t0
                rows, lesion_rows = evaluate_on_cluster(client, evaluated(spread), stages, "demo", "unet3d", 26,
                                                        progress=False)
            seconds = time.perf_counter() - t0
            print(f"Dask, {args.workers} workers x 1 thread: {seconds:.2f} s (inference {t_infer:.2f} s, "
                  f"evaluation {seconds - t_infer:.2f} s)", flush=True)
            return seconds, rows, lesion_rows

        # Alternating order (A B B A ...): this machine's speed drifts by 10-15 % over minutes, and a
        # two-thread process feels it more than two one-thread ones.
        times: dict[str, list[float]] = {"single": [], "cluster": []}
        for r in range(args.repeats):
            for side in (("single", "cluster") if r % 2 == 0 else ("cluster", "single")):
                seconds, got, got_lesions = one_process() if side == "single" else on_cluster()
                times[side].append(seconds)
                if side == "single":
                    rows, lesion_rows = got, got_lesions
                else:
                    rows2, lesion_rows2 = got, got_lesions
        baseline, ours = float(np.mean(times["single"])), float(np.mean(times["cluster"]))

        a, b = _arrays(single), _arrays(spread)
        if a.keys() != b.keys() or len(a) != len(records) or any(not np.array_equal(a[k], b[k]) for k in a):
            raise SystemExit("the cluster's predictions differ from the single process's")
        pd.testing.assert_frame_equal(pd.DataFrame(rows2), pd.DataFrame(rows))
        pd.testing.assert_frame_equal(pd.DataFrame(lesion_rows2), pd.DataFrame(lesion_rows))
        foreground = sum(int((v > 0).sum()) for v in a.values())
        print(f"identical: {len(a)} prediction arrays ({foreground} foreground voxels), {len(rows)} metric rows, "
              f"{len(lesion_rows)} lesion rows", flush=True)
    finally:
        stop_processes(list(reversed(procs)))  # workers before their scheduler
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"benchmark": f"distributed_infer_eval_{args.cases}", "ours": round(ours, 3),
                      "baseline": round(baseline, 3), "unit": "s", "ratio": round(ours / baseline, 3),
                      "tta": settings["tta"], "shape": args.shape, "runs": times}))


if __name__ == "__main__":
    main()
