"""Sparse to dense (Çiçek et al.'s semi-automatic setting) on the real hippocampus cohort: a model trained on 3
annotated slices per axis per training volume against a model trained on the dense labels, same iteration budget.

Both arms train our engine (unet3d.train) on the preprocessed store of the cohort with one fixed recipe (network,
patch, batch, iterations, seed: nothing planned, so the arms differ only in their labels). The sparse arm's labels
are the dense ones with every voxel off 3 slices per axis set to the ignore value (255); the slices are spread
evenly through the hippocampus' extent along each axis (unet3d.sparse.evenly_spaced_slices, deterministic). Its
validation cases are sparse too (a user of the semi-automatic setting has no dense label anywhere).

Then both models densify the training volumes (sliding window, no test-time augmentation, the post-processing each
model chose on its own validation) and are scored on the unannotated voxels of those volumes only, against the
dense labels (unet3d.sparse.fill_in_dice, the evaluate stage's fill-in Dice): "ours" is the sparse model's mean
Dice (cases x classes), "baseline" the dense model's on the same voxels; acceptance (issue 13): ratio >= 0.9.
The held-out test split's Dice of both models is printed too (densifying new volumes).

Temporary files (workspace, sparse case folders, checkpoints) go under --workspace (default: a new folder in /tmp).
Usage:
    python benchmarks/sparse_to_dense.py [--iterations 400] [--slices 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLASSES = {1: "anterior", 2: "posterior"}


def sparse_case_folder(case_dir: Path, out_root: Path, per_axis: int) -> tuple[Path, float]:
    """A copy of a preprocessed case folder whose label is sparse (the image is linked, not copied); returns the
    folder and the share of its voxels left annotated."""
    import numpy as np

    from unet3d.case_folder import IMAGE_FILE, LABEL_FILE, PROPS_FILE
    from unet3d.labels import IGNORE_LABEL
    from unet3d.sparse import evenly_spaced_slices, sparsify

    out = out_root / case_dir.name
    out.mkdir(parents=True, exist_ok=True)
    dense = np.load(case_dir / LABEL_FILE)
    sparse = sparsify(dense, evenly_spaced_slices(dense, per_axis), IGNORE_LABEL)
    np.save(out / LABEL_FILE, sparse)
    (out / IMAGE_FILE).unlink(missing_ok=True)
    (out / IMAGE_FILE).symlink_to(case_dir / IMAGE_FILE)
    shutil.copy2(case_dir / PROPS_FILE, out / PROPS_FILE)
    return out, float((sparse != IGNORE_LABEL).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--workspace", default=None, help="temporary folder (default: a new one in /tmp)")
    parser.add_argument("--iterations", type=int, default=400, help="training iterations of each arm")
    parser.add_argument("--slices", type=int, default=3, help="annotated slices per axis per volume")
    parser.add_argument("--features", default="16,32,64,128")
    parser.add_argument("--patch", default="40,56,40")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for noisy in ("distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not Path(args.data).is_dir():
        print(f"no hippocampus cohort at {args.data}")
        return 2

    import numpy as np

    from data_catalog.case_worker import case_records
    from data_catalog.ingest import ingest
    from data_catalog.preprocess import run_preprocessing
    from data_catalog.splits import split_table, update_splits
    from data_catalog.store import PreprocessedStore
    from unet3d.config import PreprocessConfig, TrainConfig
    from unet3d.inference import StageModel
    from unet3d.labels import IGNORE_LABEL
    from unet3d.postprocess import apply_postprocessing
    from unet3d.sampling import load_case
    from unet3d.sparse import fill_in_dice
    from unet3d.train import TrainSpec, mean_dice, predict_cases, train

    root = Path(args.workspace or tempfile.mkdtemp(prefix="sparse_to_dense_", dir="/tmp"))
    ws = root / "workspace"
    t_start = time.perf_counter()
    ingest(args.data, "hippocampus", ws)
    pre = run_preprocessing(ws, "hippocampus", PreprocessConfig().model_dump(), spacing_factors=(1.0,), progress=False)
    update_splits(ws, "hippocampus", seed=0)
    store = PreprocessedStore(ws, "hippocampus")
    plan_id = pre.plan_ids[1.0]
    cases = split_table(ws, "hippocampus")
    cases = cases[cases["label_path"].notna()]
    records = {r["case_id"]: r for r in case_records(cases)}
    dirs = {s: [store.case_dir(plan_id, records[c]) for c in sorted(cases.loc[cases["split"] == s, "case_id"])
                if store.has_case(plan_id, records[c])] for s in ("train", "val", "test")}
    sparse_dirs, shares = {}, []
    for split in ("train", "val"):
        made = [sparse_case_folder(d, root / "sparse" / split, args.slices) for d in dirs[split]]
        sparse_dirs[split] = [m[0] for m in made]
        shares += [m[1] for m in made]
    print(f"hippocampus: {len(dirs['train'])} train, {len(dirs['val'])} val, {len(dirs['test'])} test cases; "
          f"sparse labels: {args.slices} slices per axis, {100 * np.mean(shares):.1f} % of the voxels annotated "
          f"(mean over train and val volumes); prepared in {time.perf_counter() - t_start:.0f} s")

    epochs, per_epoch = max(1, args.iterations // 50), min(50, args.iterations)
    train_cfg = TrainConfig(features=[int(f) for f in args.features.split(",")], stem_stride=[1, 1, 1],
                            patch_size=[int(p) for p in args.patch.split(",")], batch_size=args.batch,
                            max_epochs=epochs, iterations_per_epoch=per_epoch, val_every=max(1, epochs // 2),
                            val_max_cases=12, augment="light", device="cpu", threads=args.threads,
                            seed=0).model_dump()
    arms = {"sparse": (sparse_dirs["train"], sparse_dirs["val"]), "dense": (dirs["train"], dirs["val"])}
    results, seconds = {}, {}
    for arm, (train_dirs, val_dirs) in arms.items():
        spec = TrainSpec(out_dir=str(root / "models" / arm), train_cases=[str(d) for d in train_dirs],
                         val_cases=[str(d) for d in val_dirs], classes=dict(CLASSES), label_map={1: 1, 2: 2},
                         train=train_cfg, stage="final", spacing=store.load_plan(plan_id)["target_spacing"])
        t0 = time.perf_counter()
        result = train(spec, progress=False)
        seconds[arm] = time.perf_counter() - t0
        print(f"{arm}: trained {epochs * per_epoch} iterations ({result.epochs} epochs) in {seconds[arm]:.0f} s "
              f"(wall, machine shared); best val Dice {result.best_val_dice}")
        results[arm] = StageModel.load(root / "models" / arm, device="cpu")

    # Densify the training volumes; score on the voxels the sparse labels leave unannotated.
    dense_train = [load_case(d, {1: 1, 2: 2}) for d in dirs["train"]]
    sparse_train = [load_case(d, None) for d in sparse_dirs["train"]]  # raw labels: the ignore value kept
    fill_in, test_dice = {}, {}
    for arm, model in results.items():
        preds = predict_cases(model.network, dense_train, model.patch_size, 3, model.device, overlap=0.5)
        preds = [apply_postprocessing(p, model.postprocess) for p in preds]
        scores = [fill_in_dice(p, d.label, s.label, list(CLASSES), IGNORE_LABEL)
                  for p, d, s in zip(preds, dense_train, sparse_train)]
        fill_in[arm] = {c: float(np.mean([s[c]["dice"] for s in scores if s[c]["dice"] is not None]))
                        for c in CLASSES}
        test = [load_case(d, {1: 1, 2: 2}) for d in dirs["test"]]
        test_preds = [apply_postprocessing(p, model.postprocess)
                      for p in predict_cases(model.network, test, model.patch_size, 3, model.device, overlap=0.5)]
        test_dice[arm] = mean_dice(test_preds, test, 3)

    print("\nDice on the unannotated voxels of the training volumes (the filled-in part), mean over volumes:")
    print("arm     anterior  posterior  mean    | test split (new volumes): anterior  posterior  mean")
    means = {}
    for arm in ("sparse", "dense"):
        f, t = fill_in[arm], test_dice[arm]
        means[arm] = float(np.mean(list(f.values())))
        print(f"{arm:6s}  {f[1]:.4f}    {f[2]:.4f}     {means[arm]:.4f}  |                           "
              f"{t[1]:.4f}    {t[2]:.4f}     {np.mean(list(t.values())):.4f}")
    ratio = means["sparse"] / means["dense"]
    print(f"ratio sparse / dense: {ratio:.3f} (acceptance: >= 0.9); {epochs * per_epoch} iterations each; "
          f"total wall {time.perf_counter() - t_start:.0f} s")
    if not args.keep and args.workspace is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"benchmark": f"sparse_to_dense_hippocampus_{args.slices}_slices_per_axis",
                      "ours": round(means["sparse"], 4), "baseline": round(means["dense"], 4),
                      "unit": "mean Dice on unannotated voxels of the training volumes (sparse-trained vs "
                              "dense-trained, equal iterations)",
                      "ratio": round(ratio, 4), "iterations": epochs * per_epoch,
                      "annotated_fraction": round(float(np.mean(shares)), 4),
                      "test_dice_sparse": round(float(np.mean(list(test_dice["sparse"].values()))), 4),
                      "test_dice_dense": round(float(np.mean(list(test_dice["dense"].values()))), 4),
                      "train_seconds_sparse": round(seconds["sparse"], 1),
                      "train_seconds_dense": round(seconds["dense"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
