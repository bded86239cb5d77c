"""Hippocampus val Dice after a fixed wall-time budget of training (default 15 minutes, CPU, 2 threads).

Baseline (measured on one of these 2-core machines, issue #3): a plain MONAI `UNet` (1.2 M parameters, AdamW
with poly decay, 32x48x32 patches, batch 2, flips) reaches a mean foreground Dice of 0.87 on held-out cases in
15 minutes (0.84 after 2), with sliding-window inference at the patch size. Goal: 0.89 (nnU-Net's level).

Runs our real engine (unet3d.train) on the preprocessed store of the real cohort, single stage (anterior,
posterior), validation with the same sliding window as inference; prints Dice per class on the val split
(model selection) and on the test split (untouched), the Dice reached after 2 minutes, and the learning
curve's path. Usage:
    python benchmarks/train_hippocampus.py [--minutes 15] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASELINE_DICE = 0.87  # MONAI UNet, 15 min CPU, measured on this machine class (issue #3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--workspace", default=str(REPO / ".bench" / "hippocampus"))
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--architecture", default="unet3d")
    parser.add_argument("--features", default="16,32,64,128")
    parser.add_argument("--patch", default=None, help="X,Y,Z (default: planned, 40x56x40)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    parser.add_argument("--val-every", type=int, default=2)
    parser.add_argument("--augment", default="full", choices=["full", "light", "none"])
    parser.add_argument("--fresh", action="store_true", help="discard earlier checkpoints of this benchmark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import numpy as np
    import pandas as pd

    from data_catalog.ingest import ingest
    from data_catalog.splits import split_table, update_splits
    from data_catalog.store import PreprocessedStore, case_records, run_preprocessing
    from unet3d.config import PreprocessConfig, TrainConfig
    from unet3d.inference import StageModel
    from unet3d.sampling import load_case
    from unet3d.train import TrainSpec, train, validate

    ws = Path(args.workspace)
    ingest(args.data, "hippocampus", ws)
    pre = run_preprocessing(ws, "hippocampus", PreprocessConfig().model_dump(), spacing_factors=(1.0,), progress=False)
    update_splits(ws, "hippocampus", seed=0)
    store = PreprocessedStore(ws, "hippocampus")
    plan_id = pre.plan_ids[1.0]
    cases = split_table(ws, "hippocampus")
    records = {r["case_id"]: r for r in case_records(cases)}
    dirs = {s: [str(store.case_dir(plan_id, records[c])) for c in cases.loc[cases["split"] == s, "case_id"]]
            for s in ("train", "val", "test")}
    tag = (f"{args.architecture}-{args.features.replace(',', '_')}-{args.optimizer}-b{args.batch}-{args.augment}-"
           f"{args.device}")
    out = ws / "runs" / tag
    if args.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    train_cfg = TrainConfig(architecture=args.architecture, features=[int(f) for f in args.features.split(",")],
                            max_epochs=100_000, iterations_per_epoch=args.iterations, time_limit_min=args.minutes,
                            device=args.device, batch_size=args.batch, optimizer=args.optimizer, lr=args.lr,
                            threads=args.threads, val_every=args.val_every, augment=args.augment,
                            patch_size=[int(p) for p in args.patch.split(",")] if args.patch else None).model_dump()
    spec = TrainSpec(out_dir=str(out), train_cases=dirs["train"], val_cases=dirs["val"],
                     classes={1: "anterior", 2: "posterior"}, label_map={1: 1, 2: 2}, train=train_cfg,
                     stage="final", spacing=store.load_plan(plan_id)["target_spacing"])
    print(f"training {tag}: {len(dirs['train'])} train, {len(dirs['val'])} val, {len(dirs['test'])} test cases, "
          f"{args.minutes} min budget, {args.threads} threads, device {args.device}")
    t0 = time.perf_counter()
    result = train(spec, progress=True)
    print(f"trained {result.epochs} epochs in {result.seconds:.0f} s ({result.stopped_by}); "
          f"wall {time.perf_counter() - t0:.0f} s")

    model = StageModel.load(out, device=args.device)
    scores = {}
    for split in ("val", "test"):
        data = [load_case(d, {1: 1, 2: 2}) for d in dirs[split]]
        scores[split] = validate(model.network, data, model.patch_size, 3, model.device, overlap=0.5)
    log = pd.read_parquet(result.log_path)
    early = log[(log["elapsed"] <= 120) & log["val_dice_mean"].notna()]
    at_2min = float(early["val_dice_mean"].iloc[-1]) if len(early) else float("nan")
    print("\nsplit  anterior  posterior  mean")
    for split, s in scores.items():
        print(f"{split:5s}  {s[1]:.4f}    {s[2]:.4f}     {np.mean([s[1], s[2]]):.4f}")
    print(f"val Dice (mean) at <= 2 min: {at_2min:.4f}; best epoch {result.best_epoch}; "
          f"parameters {json.loads((out / 'model.json').read_text())['parameters']:,}")
    print("baseline: MONAI UNet 0.87 after 15 min (0.84 after 2), this machine class; goal 0.89")
    print(f"learning curve: {result.curve_path}\ntraining log: {result.log_path}")
    ours = float(np.mean([scores["val"][1], scores["val"][2]]))
    print(json.dumps({"benchmark": f"hippocampus_val_dice_{args.minutes:g}min_{args.device}", "ours": round(ours, 4),
                      "baseline": BASELINE_DICE, "unit": "mean foreground Dice (val)",
                      "ratio": round(ours / BASELINE_DICE, 4),
                      "test_dice": round(float(np.mean([scores["test"][1], scores["test"][2]])), 4),
                      "val_dice_at_2min": round(at_2min, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
