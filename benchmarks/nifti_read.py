"""Reading NIfTI files: unet3d.io.read_nifti_direct (zlib + numpy, geometry from the header) against
SimpleITK's reader (`sitk.ReadImage`), on the same files in the same run.

Why the hand-written reader is kept: validation and preprocessing read every file of a cohort, and on a cohort
of small scans ITK's reader was most of an ingest. The two are checked to agree first (voxels, pixel type,
spacing, origin and direction, on every file); files the direct reader leaves to ITK (see its docstring) are
counted and not timed. Files are read `--repeats` times in alternating order (ITK, ours, ITK, ours ...), after
one untimed pass that warms the page cache.

    python benchmarks/nifti_read.py [--data ../shared/data/msd_hippocampus] [--repeats 3]

Ends with one JSON line: ours and baseline in milliseconds per file; ratio baseline / ours (the speed-up).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unet3d.io import read_nifti_direct  # noqa: E402


def same(ours: sitk.Image, itk: sitk.Image) -> bool:
    return (ours.GetSize() == itk.GetSize() and ours.GetPixelID() == itk.GetPixelID()
            and np.allclose(ours.GetSpacing(), itk.GetSpacing(), rtol=0, atol=1e-12)
            and np.allclose(ours.GetOrigin(), itk.GetOrigin(), rtol=0, atol=1e-9)
            and np.allclose(ours.GetDirection(), itk.GetDirection(), rtol=0, atol=1e-12)
            and np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(itk)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    files, left_to_itk, unreadable = [], 0, 0
    for path in sorted(Path(args.data).rglob("*.nii*")):
        try:
            itk = sitk.ReadImage(str(path))
        except RuntimeError:
            unreadable += 1
            continue
        direct = read_nifti_direct(path)
        if direct is None:
            left_to_itk += 1
            continue
        if not same(direct, itk):
            raise SystemExit(f"{path}: the direct reader disagrees with SimpleITK")
        files.append(str(path))
    if not files:
        raise SystemExit(f"no NIfTI file under {args.data} is read by the direct reader")

    itk_s, ours_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for f in files:
            sitk.ReadImage(f)
        itk_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for f in files:
            read_nifti_direct(f)
        ours_s.append(time.perf_counter() - t)
    ours = 1e3 * min(ours_s) / len(files)
    baseline = 1e3 * min(itk_s) / len(files)
    print(f"{len(files)} files agree with SimpleITK ({left_to_itk} left to ITK, {unreadable} unreadable by ITK)")
    print(f"read_nifti_direct {ours:.2f} ms/file, sitk.ReadImage {baseline:.2f} ms/file "
          f"(best of {args.repeats}): {baseline / ours:.1f}x")
    print(json.dumps({"benchmark": "nifti_read_ms_per_file", "ours": round(ours, 3), "baseline": round(baseline, 3),
                      "unit": "ms/file", "ratio": round(baseline / ours, 2), "files": len(files),
                      "left_to_itk": left_to_itk}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
