"""The report's architecture comparison on the real hippocampus cohort at an equal iteration budget: slice-wise
2D U-Net vs 3D U-Net vs residual vs attention-gated vs nested (UNet++) vs the light backbone (MobileNetV2-style
inverted residuals).

Every architecture trains with our real engine (unet3d.train) on the same preprocessed store, the same split,
the same widths, batch, optimiser, augmentation and seed, for the same number of iterations (an iteration budget,
not a wall-time one: the machine may be shared, and a wall-time budget would reward whichever arm ran when it was
quiet). The 3D networks train on the planned 3D patch; unet2d on its planned slice-wise patch (whole slices
stacked along the slice axis, every slice one 2D sample: about as many voxels per iteration as the 3D patch).
Each architecture runs in its own process, which reports its peak resident memory (getrusage ru_maxrss: the
whole training process, Python and torch included; the same process's RSS before training is shown beside it).
After training, each model (the last checkpoint; no validation during training, no post-processing) predicts
the test cases (or the first --cases of them) with the inference sliding window (no test-time augmentation) and
is scored with unet3d.metrics.case_metrics: Dice per class and mean, HD95 (mm) mean over classes and cases.

The JSON line: ours = 3D U-Net mean Dice, baseline = slice-wise 2D U-Net mean Dice (the report's comparison);
every architecture's row is in "rows".
Usage:
    python benchmarks/architectures.py [--iterations 200] [--parallel 2] [--cases 20]
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = ["unet2d", "unet3d", "residual_unet3d", "attention_unet3d", "unet3d_plusplus", "mobile_unet3d"]
CLASSES = {1: "anterior", 2: "posterior"}


def prepare(data: str, workspace: Path) -> dict[str, list[str]]:
    """Ingest, preprocess and split the cohort (cached in the workspace: the same one train_hippocampus.py
    uses); the preprocessed case folders per split, and the store's spacing."""
    from data_catalog.case_worker import case_records
    from data_catalog.ingest import ingest
    from data_catalog.preprocess import run_preprocessing
    from data_catalog.splits import split_table, update_splits
    from data_catalog.store import PreprocessedStore
    from unet3d.config import PreprocessConfig

    ingest(data, "hippocampus", workspace)
    pre = run_preprocessing(workspace, "hippocampus", PreprocessConfig().model_dump(), spacing_factors=(1.0,),
                            progress=False)
    update_splits(workspace, "hippocampus", seed=0)
    store = PreprocessedStore(workspace, "hippocampus")
    plan_id = pre.plan_ids[1.0]
    cases = split_table(workspace, "hippocampus")
    records = {r["case_id"]: r for r in case_records(cases)}
    dirs = {s: [str(store.case_dir(plan_id, records[c])) for c in cases.loc[cases["split"] == s, "case_id"]]
            for s in ("train", "val", "test")}
    return {**dirs, "spacing": store.load_plan(plan_id)["target_spacing"]}


def run_one(args) -> dict:
    """Train one architecture in this process and score it; a dict (one row of the table)."""
    import numpy as np
    import pandas as pd
    import torch

    from unet3d.config import TrainConfig
    from unet3d.inference import StageModel
    from unet3d.metrics import case_metrics
    from unet3d.sampling import load_case
    from unet3d.train import TrainSpec, train

    torch.set_num_threads(args.threads)
    cohort = json.loads(Path(args.cohort).read_text())
    out = Path(args.workspace) / "architectures" / f"{args.one}-{args.iterations}it"
    if out.exists():
        import shutil
        shutil.rmtree(out)  # a fresh run: a resumed one would report another process's memory and time
    train_cfg = TrainConfig(architecture=args.one, features=[int(f) for f in args.features.split(",")],
                            stem_stride=[1, 1, 1], batch_size=2, max_epochs=args.iterations // 50,
                            iterations_per_epoch=50, augment="light", device="cpu", threads=args.threads,
                            postprocess="none", seed=0).model_dump()
    spec = TrainSpec(out_dir=str(out), train_cases=cohort["train"], val_cases=[], classes=CLASSES,
                     label_map={1: 1, 2: 2}, train=train_cfg, stage="final", spacing=cohort["spacing"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    result = train(spec, progress=False)
    wall = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training is the peak: nothing after it
    log = pd.read_parquet(result.log_path)
    meta = json.loads((out / "model.json").read_text())

    model = StageModel.load(out, device="cpu")
    rows = []
    for case_dir in cohort["test"][: args.cases]:
        case = load_case(case_dir, {1: 1, 2: 2})
        pred = model.predict(case.image, overlap=0.5, tta=False).argmax(0).astype(np.uint8)
        rows += case_metrics(pred, np.asarray(case.label), case.spacing, CLASSES)
    scores = pd.DataFrame(rows)
    dice = scores.groupby("class_name")["dice"].mean()
    return {"architecture": args.one, "parameters": meta["parameters"], "patch": meta["patch_size"],
            "slice_axis": meta["model"].get("slice_axis"),
            "dice_anterior": round(float(dice["anterior"]), 4), "dice_posterior": round(float(dice["posterior"]), 4),
            "dice_mean": round(float(scores["dice"].mean()), 4), "hd95_mm": round(float(scores["hd95_mm"].mean()), 3),
            "peak_rss_mb": round(rss_peak), "rss_before_training_mb": round(rss_before),
            "seconds_per_iteration": round(float(log["train_seconds"].sum() / log["iterations"].sum()), 3),
            "iterations": int(log["iterations"].sum()), "train_wall_s": round(wall, 1),
            "test_cases": len(scores) // len(CLASSES), "final_loss": round(float(log["loss"].iloc[-1]), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--workspace", default=str(REPO / ".bench" / "hippocampus"))
    parser.add_argument("--iterations", type=int, default=200, help="per architecture (a multiple of 50)")
    parser.add_argument("--features", default="8,16,32,64", help="the same widths for every architecture")
    parser.add_argument("--cases", type=int, default=20, help="test cases scored per architecture")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per architecture's process")
    parser.add_argument("--parallel", type=int, default=2, help="architectures trained at the same time")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: train this architecture in this process
    parser.add_argument("--cohort", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 50 or args.iterations % 50:
        parser.error("--iterations must be a positive multiple of 50 (epochs of 50 iterations)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.one:
        print(json.dumps(run_one(args)))
        return 0

    if not Path(args.data).exists():
        print(f"the hippocampus cohort is not at {args.data} (see ../shared/data/README.md)")
        return 1
    workspace = Path(args.workspace)
    cohort_file = workspace / "architectures" / "cohort.json"
    cohort_file.parent.mkdir(parents=True, exist_ok=True)
    cohort_file.write_text(json.dumps(prepare(args.data, workspace)))
    cohort = json.loads(cohort_file.read_text())
    print(f"{len(cohort['train'])} train, {len(cohort['test'])} test cases (scored: {min(args.cases, len(cohort['test']))}); "
          f"{args.iterations} iterations each, widths {args.features}, batch 2, {args.threads} thread(s) per "
          f"architecture, {args.parallel} at a time")
    t0 = time.perf_counter()
    pending = [a for a in args.arms.split(",") if a]
    running: list[tuple[str, subprocess.Popen]] = []
    rows: dict[str, dict] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            arm = pending.pop(0)
            command = [sys.executable, __file__, "--one", arm, "--cohort", str(cohort_file), "--workspace",
                       str(workspace), "--iterations", str(args.iterations), "--features", args.features,
                       "--cases", str(args.cases), "--threads", str(args.threads)]
            running.append((arm, subprocess.Popen(command, stdout=subprocess.PIPE, encoding="utf-8")))
        time.sleep(1)
        for arm, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((arm, proc))
            output = proc.stdout.read().strip().splitlines()
            if proc.returncode != 0 or not output:
                raise SystemExit(f"{arm}: training process exited with code {proc.returncode}")
            rows[arm] = json.loads(output[-1])
            print(f"  {arm}: done after {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\nall architectures in {time.perf_counter() - t0:.0f} s (wall, machine shared)\n")
    header = ("architecture", "params", "Dice ant.", "Dice post.", "Dice mean", "HD95 mm", "peak RSS MB",
              "s/iter", "patch")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for arm in [a for a in args.arms.split(",") if a in rows]:
        r = rows[arm]
        print(" | ".join(str(v) for v in (arm, f"{r['parameters']:,}", f"{r['dice_anterior']:.3f}",
                                          f"{r['dice_posterior']:.3f}", f"{r['dice_mean']:.3f}", f"{r['hd95_mm']:.2f}",
                                          f"{r['peak_rss_mb']} ({r['rss_before_training_mb']} before)",
                                          f"{r['seconds_per_iteration']:.2f}", "x".join(map(str, r["patch"])))))
    ours, baseline = rows.get("unet3d", {}).get("dice_mean"), rows.get("unet2d", {}).get("dice_mean")
    print(json.dumps({"benchmark": f"hippocampus_architectures_{args.iterations}it_cpu", "ours": ours,
                      "baseline": baseline, "unit": "mean test Dice (3D U-Net vs slice-wise 2D U-Net)",
                      "ratio": round(ours / baseline, 4) if ours and baseline else None,
                      "rows": [rows[a] for a in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
