"""Re-ingesting an unchanged cohort of 10,000 cases (issue 10 item 10): the nightly run's `ingest` when nothing
is new must cost seconds, not minutes.

Generates a plain cohort of N tiny NIfTI images with N matching labels (4x4x4 voxels each, a few hundred
bytes; every 10th label empty, so that N/10 `label_empty` warnings are carried over) in a temporary folder,
ingests it once (not timed), then times `data_catalog.ingest.ingest` on the unchanged folder in this process
(Prefect start excluded, as in the acceptance criterion) and reports the peak memory of the process
(ru_maxrss, which includes the first ingest). The first ingest uses --workers processes.

    python benchmarks/reingest.py                 # 10,000 cases
    python benchmarks/reingest.py --cases 500
    python benchmarks/reingest.py --code /path/to/old/checkout   # the same run against other code

Baseline: the code before this change (commit fa54097), measured with `--code` on a checkout of that commit on
the shared 2-core development machine (`git archive fa54097 | tar -x -C /tmp/old/main`): 10,000 unchanged cases
re-ingested in 19.7 s (three runs: 19.7, 28.6 and 46.0 s under other load; the lowest is cited): per-case
pandas filtering of the previous issues and a realpath per file. Scaled linearly for other --cases (the old
code grows faster than linearly, so the ratio is understated for larger cohorts).

The last line is JSON: {"benchmark", "ours", "baseline", "unit", "ratio" (baseline / ours), ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

BASELINE_SECONDS = 19.7  # 10,000 cases, commit fa54097 (see the docstring)
REPO = Path(__file__).resolve().parent.parent


def _nifti_bytes(value: int, label: bool) -> bytes:
    """An uncompressed NIfTI-1 file of 4x4x4 uint8 voxels, 1 mm, whose voxels hold `value` (a label: a cube)."""
    import numpy as np

    header = np.zeros(348, dtype=np.uint8).tobytes()
    h = bytearray(header)
    h[0:4] = np.int32(348).tobytes()
    h[40:56] = np.array([3, 4, 4, 4, 1, 1, 1, 1], dtype=np.int16).tobytes()
    h[70:72] = np.int16(2).tobytes()  # uint8
    h[72:74] = np.int16(8).tobytes()  # bitpix
    h[76:108] = np.array([1, 1, 1, 1, 1, 1, 1, 1], dtype=np.float32).tobytes()
    h[108:112] = np.float32(352).tobytes()  # vox_offset
    h[252:254] = np.int16(1).tobytes()  # qform_code
    h[254:256] = np.int16(1).tobytes()  # sform_code
    h[280:292] = np.array([1, 0, 0, 0], dtype=np.float32).tobytes()[:12]  # srow_x
    h[296:300] = np.float32(1).tobytes()  # srow_y[1]
    h[316:320] = np.float32(1).tobytes()  # srow_z[2]
    h[344:348] = b"n+1\0"
    voxels = np.zeros((4, 4, 4), dtype=np.uint8)
    if label:
        voxels[1:3, 1:3, 1:3] = 1
    else:
        voxels[:] = value % 200 + 10
        voxels[0, 0, 0] = value % 251
    return bytes(h) + b"\0\0\0\0" + voxels.tobytes()


def generate(root: Path, n: int) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    label, empty = _nifti_bytes(0, True), _nifti_bytes(0, False)[:352] + bytes(64)
    for i in range(n):
        (images / f"case_{i:05d}.nii").write_bytes(_nifti_bytes(i, False))
        # every 10th label is empty: a `label_empty` warning, so that the catalog has issues rows to carry over
        (labels / f"case_{i:05d}.nii").write_bytes(empty if i % 10 == 0 else label)
    return images, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="processes for the first (untimed) ingest")
    parser.add_argument("--code", default=str(REPO), help="checkout whose data_catalog is benchmarked")
    parser.add_argument("--dir", default=None, help="folder for the cohort and workspace (default: a temporary one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(args.code).resolve()))
    from data_catalog.ingest import ingest

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="reingest-"))
    try:
        t0 = time.perf_counter()
        images, labels = generate(root / "cohort", args.cases)
        t_generate = time.perf_counter() - t0
        ws = root / "ws"
        t0 = time.perf_counter()
        first = ingest(images, "bench", ws, labels=labels, workers=args.workers)
        t_first = time.perf_counter() - t0
        assert first.n_ok == args.cases, first.summary()
        t0 = time.perf_counter()
        again = ingest(images, "bench", ws, labels=labels, workers=args.workers)
        seconds = time.perf_counter() - t0
        assert again.unchanged == args.cases and again.new == 0 and again.changed == 0, again.summary()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"generated {args.cases} cases in {t_generate:.1f} s; first ingest {t_first:.1f} s; "
          f"re-ingest of the unchanged cohort {seconds:.2f} s; peak RSS {peak_mb:.0f} MB (code: {args.code})",
          file=sys.stderr)
    baseline = BASELINE_SECONDS * args.cases / 10_000 if BASELINE_SECONDS else None
    print(json.dumps({"benchmark": f"reingest_unchanged_{args.cases}_cases", "ours": round(seconds, 3),
                      "baseline": round(baseline, 3) if baseline else None, "unit": "s",
                      "ratio": round(baseline / seconds, 2) if baseline else None,
                      "peak_rss_mb": round(peak_mb), "first_ingest_s": round(t_first, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
