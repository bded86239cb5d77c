"""Preprocessing throughput: our fingerprint + plan + preprocess on Dask vs a plain SimpleITK loop.

Two cohorts:
- the real MSD hippocampus cohort (220 ok cases, tiny volumes: per-case overhead dominates);
- 40 synthetic CT-sized volumes (about 512x512x120 at 0.7x0.7x2.5 mm, spacing jittered per case, so every
  case is resampled to the plan: resampling dominates).
For each: our chain with 1 and 2 worker processes (each from an empty store, cluster start included), peak
RSS per worker, and in the same run the baseline: one process, SimpleITK reading, `sitk.Resample` (linear
image, nearest label) to the same target spacing, z-score, `np.save`.

Reference figures from issue #2 (one of these 2-core machines, 260 hippocampus cases, 2 processes): nnU-Net
v2 fingerprint + plan + preprocess 4.4 cases/s (preprocess alone 11.3); MONAI Spacingd + NormalizeIntensityd +
CropForegroundd 20.5 cases/s; a plain SimpleITK loop 34-42 cases/s. Goal: >= 3x nnU-Net's whole chain.

    python benchmarks/preprocess.py [--cohorts hippocampus,ct] [--ct-cases 40]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NNUNET_HIPPOCAMPUS_CASES_PER_S = 4.4


def baseline_loop(cases, target_spacing, out_dir: Path) -> float:
    """Plain single-process SimpleITK: read, resample (linear / nearest), z-score, save. Returns seconds."""
    import numpy as np
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for case in cases:
        image = sitk.ReadImage(case["image_path"], sitk.sitkFloat32)
        label = sitk.ReadImage(case["label_path"])
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), target_spacing)]
        resampler = sitk.ResampleImageFilter()
        resampler.SetOutputSpacing([float(t) for t in target_spacing])
        resampler.SetSize(size)
        resampler.SetOutputOrigin(image.GetOrigin())
        resampler.SetOutputDirection(image.GetDirection())
        resampler.SetInterpolator(sitk.sitkLinear)
        image_r = resampler.Execute(image)
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        label_r = resampler.Execute(label)
        arr = sitk.GetArrayFromImage(image_r)
        arr = (arr - arr.mean()) / max(float(arr.std()), 1e-8)
        np.save(out_dir / f"{case['case_id']}_image.npy", arr.astype(np.float32))
        np.save(out_dir / f"{case['case_id']}_label.npy", sitk.GetArrayFromImage(label_r))
    return time.perf_counter() - t0


def nnunet_chain(nnunet_bin: Path, ws: Path, name: str, cases, labels: dict, modality: str, workers: int,
                 dataset_id: int) -> dict:
    """nnU-Net v2's own fingerprint + plan + preprocess (3d_fullres) on the same files, same process count.

    Needs an environment with nnunetv2 installed (kept out of this project's dependencies); the files are
    linked, not copied, into a throwaway nnUNet_raw."""
    import os
    import resource
    import subprocess

    root = ws / "nnunet" / name
    shutil.rmtree(root, ignore_errors=True)
    raw = root / "raw" / f"Dataset{dataset_id}_{name}"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for case in cases:
        os.symlink(case["image_path"], raw / "imagesTr" / f"{case['case_id']}_0000.nii.gz")
        os.symlink(case["label_path"], raw / "labelsTr" / f"{case['case_id']}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": modality}, "labels": labels,
                                                  "numTraining": len(cases), "file_ending": ".nii.gz"}))
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "results"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([str(nnunet_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
                           "-np", str(workers), "-npfp", str(workers)], env=env, capture_output=True, encoding="utf-8")
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nnU-Net failed: {proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(root, ignore_errors=True)
    return {"workers": workers, "seconds": seconds, "cases_per_s": len(cases) / seconds,
            "peak_rss_mb": max(peak, before) / 1024}


def measure(ws: Path, cohort: str, workers: int) -> dict:
    from data_catalog.preprocess import run_preprocessing
    from unet3d.config import PreprocessConfig

    shutil.rmtree(ws / "preprocessed" / cohort, ignore_errors=True)  # cold: fingerprint, plan, every case
    cfg = PreprocessConfig(workers=workers).model_dump()
    t0 = time.perf_counter()
    result = run_preprocessing(ws, cohort, cfg, spacing_factors=(1.0,), progress=False)
    seconds = time.perf_counter() - t0
    assert not result.failed, result.failed[:3]
    peaks = sorted(m["peak_rss_mb"] for m in result.worker_memory.values())
    return {"workers": workers, "seconds": seconds, "cases": result.processed, "cases_per_s": result.processed / seconds,
            "peak_rss_mb": peaks, "plan_id": result.plan_ids[1.0]}


def run_cohort(name: str, source: Path, ws: Path, modality: str | None, worker_counts, nnunet_bin: Path | None,
               nnunet_labels: dict, dataset_id: int) -> dict:
    import numpy as np

    from data_catalog.ingest import ingest
    from data_catalog.case_worker import case_records
    from data_catalog.store import PreprocessedStore
    from data_catalog.tables import Catalog

    shutil.rmtree(ws / "catalog", ignore_errors=True)
    t0 = time.perf_counter()
    ingest(source, name, ws, modality=modality, workers=2)  # hashes and validates every voxel of every case
    ingest_seconds = time.perf_counter() - t0
    cases = case_records(Catalog(ws).cases(cohort=name, status="ok"))
    largest_mb = max(int(np.prod(r["size"])) for r in Catalog(ws).cases(cohort=name, status="ok").to_dict("records"))
    largest_mb = largest_mb * (4 + 1) / 2**20  # float32 image + uint8 label, as a worker holds them
    ours = [measure(ws, name, w) for w in worker_counts]
    plan = PreprocessedStore(ws, name).load_plan(ours[-1]["plan_id"])
    base_seconds = baseline_loop(cases, plan["target_spacing"], ws / "baseline_out")
    shutil.rmtree(ws / "baseline_out", ignore_errors=True)
    baseline = {"seconds": base_seconds, "cases_per_s": len(cases) / base_seconds}
    nnunet = None
    if nnunet_bin is not None:
        nnunet = nnunet_chain(nnunet_bin, ws, name, cases, nnunet_labels, plan["modality"] if plan["modality"] in
                              ("CT", "MRI") else "MRI", max(worker_counts), dataset_id)
    print(f"\n== {name}: {len(cases)} cases, target spacing {plan['target_spacing']} mm, "
          f"largest case in memory {largest_mb:.1f} MB (float32 image + uint8 label)")
    print("pipeline                              seconds  cases/s  peak RSS per worker (MB)")
    for r in ours:
        print(f"ours, {r['workers']} worker(s) (fp+plan+prep)     {r['seconds']:7.1f}  {r['cases_per_s']:7.1f}  "
              f"{', '.join(f'{p:.0f}' for p in r['peak_rss_mb'])} "
              f"(max {max(r['peak_rss_mb']) / largest_mb:.1f}x the largest case)")
    print(f"baseline: plain SimpleITK loop, 1 proc  {baseline['seconds']:7.1f}  {baseline['cases_per_s']:7.1f}")
    if nnunet:
        print(f"baseline: nnU-Net v2 chain, {nnunet['workers']} procs     {nnunet['seconds']:7.1f}  "
              f"{nnunet['cases_per_s']:7.2f}  {nnunet['peak_rss_mb']:.0f} (largest process)")
    best = max(ours, key=lambda r: r["workers"])
    print(f"(ingestion before it, hashing and validating every case with 2 processes: {ingest_seconds:.1f} s; "
          f"ingest + preprocess: {len(cases) / (ingest_seconds + best['seconds']):.1f} cases/s)")
    return {"cohort": name, "n_cases": len(cases), "largest_case_mb": largest_mb, "ours": ours, "baseline": baseline,
            "ingest_seconds": ingest_seconds, "nnunet": nnunet}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", default="hippocampus,ct")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--workspace", default=str(REPO / ".bench" / "preprocess"))
    parser.add_argument("--ct-cases", type=int, default=40)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--nnunet-bin", default=None,
                        help="bin/ folder of an environment with nnunetv2 installed: also time nnU-Net's own chain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    workers = [int(w) for w in args.workers.split(",")]
    nnunet_bin = Path(args.nnunet_bin) if args.nnunet_bin else None
    ws = Path(args.workspace)
    results = []
    if "hippocampus" in args.cohorts:
        results.append(run_cohort("hippocampus", Path(args.data), ws, None, workers, nnunet_bin,
                                  {"background": 0, "anterior": 1, "posterior": 2}, 504))
    if "ct" in args.cohorts:
        from data_catalog.demo import generate_ct_sized_cohort

        source = ws.parent / f"ct_sized_{args.ct_cases}"
        t0 = time.perf_counter()
        generate_ct_sized_cohort(source, n_cases=args.ct_cases, seed=0)
        print(f"CT-sized cohort ready in {time.perf_counter() - t0:.0f} s at {source}")
        results.append(run_cohort("ctsized", source, ws, "CT", workers, nnunet_bin,
                                  {"background": 0, "organ": 1, "lesion": 2}, 505))

    print("\nnnU-Net v2 reference (issue #2, 2 processes, hippocampus): fingerprint + plan + preprocess "
          f"{NNUNET_HIPPOCAMPUS_CASES_PER_S} cases/s")
    headline = results[0]
    two = max(headline["ours"], key=lambda r: r["workers"])
    for r in results:
        best = max(r["ours"], key=lambda x: x["workers"])
        nn = r["nnunet"]
        vs_nnunet = (f", {best['cases_per_s'] / nn['cases_per_s']:.1f}x nnU-Net's chain measured in this run"
                     if nn else (f", {best['cases_per_s'] / NNUNET_HIPPOCAMPUS_CASES_PER_S:.1f}x nnU-Net's reference"
                                 if r["cohort"] == "hippocampus" else ""))
        print(f"{r['cohort']}: ours {best['cases_per_s']:.2f} cases/s with {best['workers']} workers = "
              f"{best['cases_per_s'] / r['baseline']['cases_per_s']:.2f}x the plain SimpleITK loop{vs_nnunet}")
    print(json.dumps({"benchmark": f"preprocess_{headline['cohort']}_{two['workers']}workers",
                      "ours": round(two["cases_per_s"], 2), "baseline": round(headline["baseline"]["cases_per_s"], 2),
                      "unit": "cases/s", "ratio": round(two["cases_per_s"] / headline["baseline"]["cases_per_s"], 3),
                      "details": [{"cohort": r["cohort"], "ours": [{k: (round(v, 2) if isinstance(v, float) else v)
                                                                    for k, v in o.items() if k != "plan_id"}
                                                                   for o in r["ours"]],
                                   "baseline_cases_per_s": round(r["baseline"]["cases_per_s"], 2),
                                   "ingest_seconds": round(r["ingest_seconds"], 2),
                                   "nnunet": r["nnunet"],
                                   "largest_case_mb": round(r["largest_case_mb"], 1)} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
