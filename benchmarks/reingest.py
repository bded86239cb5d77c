"""Re-ingesting an unchanged cohort of 10,000 cases (issue 10 item 10): the nightly run's `ingest` when nothing
is new must cost seconds, not minutes.

Generates a plain cohort of N tiny NIfTI images with N matching labels (4x4x4 voxels each, a few hundred
bytes; every 10th label empty, so that N/10 `label_empty` warnings are carried over) in a temporary folder,
ingests it once (not timed), then times the re-ingest of the unchanged folder:

* `--mode cli` (the acceptance criterion, "in the command"): the real `unet3d ingest SOURCE --cohort bench
  --labels LABELS` run as a child process (`python -m flows.cli`, the console script's entry point), timed
  from its start to its exit. What belongs to Python and Prefect starting, not to the re-ingest, is measured
  separately as the same child importing the CLI module and configuring its logging (which imports Prefect),
  then exiting (median of 3); "ours" is the command's wall time less that start. Peak memory is the child's
  own (os.wait4's ru_maxrss of that one process, not of this parent).
* `--mode inprocess`: `data_catalog.ingest.ingest` called in this process (the catalog work alone); peak
  memory is this process' ru_maxrss, which includes the first ingest.
* `--mode both` (default): both; the last line is the CLI's.

The first ingest uses --workers processes (in the CLI mode it is the command itself, with its own default).

    nice -n 19 python benchmarks/reingest.py                 # 10,000 cases, both modes
    python benchmarks/reingest.py --cases 500 --mode cli
    python benchmarks/reingest.py --code /path/to/old/checkout   # the same run against other code

Baseline: the code before this change (commit fa54097), measured with `--code` on a checkout of that commit on
the shared 2-core development machine (`git archive fa54097 | tar -x -C /tmp/old/main`): 10,000 unchanged cases
re-ingested in 19.7 s (three runs: 19.7, 28.6 and 46.0 s under other load; the lowest is cited): per-case
pandas filtering of the previous issues and a realpath per file. Scaled linearly for other --cases (the old
code grows faster than linearly, so the ratio is understated for larger cohorts).

Measured on the shared 2-core development machine under other load (commit 2f2f068, `nice -n 19 python
benchmarks/reingest.py --cases 10000`): the command took 6.09 s, of which 1.81 s Python + CLI imports +
Prefect start, so 4.28 s of re-ingest (limit 5 s), peak RSS 385 MB (limit 1 GB); in process 3.00 s, 350 MB.
Before 2f2f068 the command also imported the flows, the stages and torch only to resolve the workspace path
(3-5 s more).

CLI baseline: the issue's measurement before the change, 500 unchanged cases re-ingested in 18 s from the
command (Prefect start included), scaled linearly to --cases (understated: the old per-case filtering grows
faster than linearly).

The last line is JSON: {"benchmark", "ours", "baseline", "unit", "ratio" (baseline / ours), ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE_SECONDS = 19.7  # 10,000 cases, commit fa54097 (see the docstring)
CLI_BASELINE_SECONDS_PER_CASE = 18.0 / 500  # issue 10 item 10: 500 cases, 18 s from the CLI
LIMIT_SECONDS, LIMIT_MB = 5.0, 1024  # issue 10 acceptance 4
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


def _run_child(args: list[str], code: Path, stdout_path: Path) -> tuple[float, float, int]:
    """Run `python ARGS` in `code`; (wall seconds, the child's own peak RSS in MB, exit status)."""
    env = dict(os.environ, PYTHONPATH=str(code) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(stdout_path, "wb") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, child.returncode


# The part of every `unet3d` command that is not its work: the interpreter, the CLI module's imports and its
# logging set-up (which imports Prefect), as `main()` does before dispatching.
_START_ONLY = "import flows.cli as c; c._configure_logging(False)"


def measure_cli(images: Path, labels: Path, ws: Path, code: Path, log: Path) -> dict:
    command = ["-m", "flows.cli", "--workspace", str(ws), "ingest", str(images), "--cohort", "bench",
               "--labels", str(labels)]
    t_first, _, rc = _run_child(command, code, log)
    if rc != 0:
        raise RuntimeError(f"first `unet3d ingest` failed (exit {rc}): {log.read_text()[-2000:]}")
    seconds, peak_mb, rc = _run_child(command, code, log)
    output = log.read_text()
    if rc != 0:
        raise RuntimeError(f"`unet3d ingest` failed (exit {rc}): {output[-2000:]}")
    n = int(images.parent.joinpath("n").read_text())
    if f"{n} unchanged" not in output:
        raise RuntimeError(f"the re-ingest did not find {n} unchanged cases: {output[:2000]}")
    starts = [_run_child(["-c", _START_ONLY], code, log)[0] for _ in range(3)]
    start = statistics.median(starts)
    return {"command_s": seconds, "start_s": start, "reingest_s": seconds - start, "peak_mb": peak_mb,
            "first_s": t_first, "summary": next((line for line in output.splitlines() if "unchanged" in line), "")}


def measure_inprocess(images: Path, labels: Path, ws: Path, workers: int, n: int) -> dict:
    from data_catalog.ingest import ingest

    t0 = time.perf_counter()
    first = ingest(images, "bench", ws, labels=labels, workers=workers)
    t_first = time.perf_counter() - t0
    assert first.n_ok == n, first.summary()
    t0 = time.perf_counter()
    again = ingest(images, "bench", ws, labels=labels, workers=workers)
    seconds = time.perf_counter() - t0
    assert again.unchanged == n and again.new == 0 and again.changed == 0, again.summary()
    return {"reingest_s": seconds, "first_s": t_first, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--mode", choices=["cli", "inprocess", "both"], default="both",
                        help="time the `unet3d ingest` command (cli), ingest() in this process, or both (default)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the first (untimed) in-process ingest")
    parser.add_argument("--code", default=str(REPO), help="checkout whose data_catalog (and flows) is benchmarked")
    parser.add_argument("--dir", default=None, help="folder for the cohort and workspace (default: a temporary one)")
    args = parser.parse_args(argv)
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code))

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="reingest-"))
    results: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        images, labels = generate(root / "cohort", args.cases)
        (root / "cohort" / "n").write_text(str(args.cases))
        t_generate = time.perf_counter() - t0
        print(f"generated {args.cases} cases in {t_generate:.1f} s (code: {code})", file=sys.stderr)
        if args.mode in ("inprocess", "both"):
            r = results["inprocess"] = measure_inprocess(images, labels, root / "ws_inprocess", args.workers, args.cases)
            print(f"in process: first ingest {r['first_s']:.1f} s; re-ingest of the unchanged cohort "
                  f"{r['reingest_s']:.2f} s; peak RSS {r['peak_mb']:.0f} MB", file=sys.stderr)
        if args.mode in ("cli", "both"):
            r = results["cli"] = measure_cli(images, labels, root / "ws_cli", code, root / "command.log")
            print(f"command: first `unet3d ingest` {r['first_s']:.1f} s; re-ingest {r['command_s']:.2f} s, of which "
                  f"Python + CLI imports + Prefect start {r['start_s']:.2f} s -> {r['reingest_s']:.2f} s of "
                  f"re-ingest; the command's peak RSS {r['peak_mb']:.0f} MB; it said: {r['summary'].strip()}",
                  file=sys.stderr)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    if "inprocess" in results:
        r = results["inprocess"]
        baseline = BASELINE_SECONDS * args.cases / 10_000
        print(json.dumps({"benchmark": f"reingest_unchanged_{args.cases}_cases", "ours": round(r["reingest_s"], 3),
                          "baseline": round(baseline, 3), "unit": "s", "ratio": round(baseline / r["reingest_s"], 2),
                          "peak_rss_mb": round(r["peak_mb"]), "first_ingest_s": round(r["first_s"], 1)}))
    if "cli" in results:
        r = results["cli"]
        baseline = CLI_BASELINE_SECONDS_PER_CASE * args.cases
        print(json.dumps({"benchmark": f"reingest_unchanged_{args.cases}_cases_cli", "ours": round(r["reingest_s"], 3),
                          "baseline": round(baseline, 3), "unit": "s", "ratio": round(baseline / r["reingest_s"], 2),
                          "command_s": round(r["command_s"], 3), "start_s": round(r["start_s"], 3),
                          "peak_rss_mb": round(r["peak_mb"]), "first_ingest_s": round(r["first_s"], 1),
                          "within_limits": r["reingest_s"] < LIMIT_SECONDS and r["peak_mb"] < LIMIT_MB}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
