"""The CUDA path, checked in one prepared run (a GPU machine is lent now and then, for minutes).

Runs, each step in its own process with its own time limit, in this order (cheapest to lose last):
  1. throughput  benchmarks/train_throughput.py: training iterations of our U-Net against MONAI's `UNet` and
                 `BasicUNet` on the same GPU, bf16 autocast, channels-last (MONAI needs the `bench` extra);
  2. inference   benchmarks/inference.py: sliding-window inference against MONAI's sliding_window_inference
                 (fp32, and our bf16 default);
  3. train       benchmarks/train_hippocampus.py --minutes 5: Dice on the real hippocampus cohort after five
                 minutes of training with the planned recipe (GPU-resident training set, on-device
                 augmentation, bf16 autocast, channels-last: the trainer's CUDA defaults);
  4. tests       the test files whose tests switch to CUDA when it is present (the sliding window's AMP test,
                 the augmentation on the device, the recipe's CUDA ladder, models and trainer).
Every step's last JSON line, return code, time and output tail go into one JSON file (--out, default
$OUT/gpu_check.json when $OUT is set, else .bench/gpu_check.json), written after each step so a run cut
short by the machine's time limit still leaves what it measured.

    python benchmarks/gpu_check.py                 # on a GPU machine: about 9 minutes
    python benchmarks/gpu_check.py --dry-run       # CPU, tiny sizes, about a minute: the script cannot rot (CI)

Ends with one JSON line: our training throughput against MONAI BasicUNet's (train_throughput.py's baseline), measured in the
same run, with the other steps' headline numbers as extra fields.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"
GPU_TEST_FILES = ["tests/test_sliding_window.py", "tests/test_augment.py", "tests/test_recipe.py",
                  "tests/test_models.py", "tests/test_train.py"]
DRY_RUN_TESTS = ["tests/test_sliding_window.py", "-k", "cuda or seams"]


def steps(dry_run: bool, device: str, train_minutes: float, workspace: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each step; the dry run uses tiny sizes on the CPU."""
    py = sys.executable
    if dry_run:
        return [
            ("throughput", [py, "benchmarks/train_throughput.py", "--device", "cpu", "--widths", "small",
                            "--patch", "32", "32", "32", "--batch", "1", "--iters", "1", "--warmup", "1"], 180),
            ("inference", [py, "benchmarks/inference.py", "--device", "cpu", "--quick", "--no-real",
                           "--sizes", "24x24x24", "--patch", "16x16x16", "--repeats", "1",
                           "--features", "4,8"], 180),
            ("train", [py, "benchmarks/train_hippocampus.py", "--device", "cpu", "--minutes", "0.05",
                       "--features", "4,8", "--stem", "1", "--batch", "1", "--iterations", "2",
                       "--augment", "none", "--workspace", str(workspace / "hippocampus"), "--fresh"], 300),
            ("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DRY_RUN_TESTS], 180),
        ]
    return [
        ("throughput", [py, "benchmarks/train_throughput.py", "--device", device, "--iters", "20",
                        "--warmup", "5"], 150),
        ("inference", [py, "benchmarks/inference.py", "--device", device, "--repeats", "3"], 150),
        ("train", [py, "benchmarks/train_hippocampus.py", "--device", device, "--minutes", f"{train_minutes:g}",
                   "--workspace", str(workspace / "hippocampus"), "--fresh"], int(train_minutes * 60) + 150),
        ("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES], 240),
    ]


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def run_step(command: list[str], limit_s: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, encoding="utf-8", timeout=limit_s,
                              env=dict(os.environ, PYTHONUTF8="1"))
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        output = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or "") + \
                 ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or "")
        output += f"\n[gpu_check] step stopped after its {limit_s} s limit"
    return {"command": " ".join(command[1:]), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "result": last_json_line(output), "tail": output[-3000:]}


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "host": platform.node()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file of results")
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument("--only", default=None, help="comma-separated steps to run (throughput,inference,train,tests)")
    args = parser.parse_args()
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                       else REPO / ".bench" / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    if not args.dry_run and not env["cuda_available"]:
        print("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    if not DATA.is_dir():
        print(f"gpu_check: the hippocampus cohort is not at {DATA}; the train step will fail", file=sys.stderr)
    wanted = set(args.only.split(",")) if args.only else None
    report = {"dry_run": args.dry_run, "environment": env, "steps": {}}
    for name, command, limit_s in steps(args.dry_run, "cuda", args.train_minutes, out.parent / "gpu_check_work"):
        if wanted is not None and name not in wanted:
            continue
        print(f"[gpu_check] {name}: {' '.join(command[1:])} (limit {limit_s} s)", flush=True)
        report["steps"][name] = result = run_step(command, limit_s)
        print(f"[gpu_check] {name}: rc {result['rc']}, {result['seconds']} s, {json.dumps(result['result'])}", flush=True)
        out.write_text(json.dumps(report, indent=1))
    results = {name: s["result"] or {} for name, s in report["steps"].items()}
    failed = sorted(name for name, s in report["steps"].items() if s["rc"] != 0)
    throughput = results.get("throughput", {})
    print(f"results: {out}" + (f"; failed steps: {', '.join(failed)}" if failed else ""))
    print(json.dumps({"benchmark": "gpu_check_train_throughput" + ("_dry_run" if args.dry_run else ""),
                      "ours": throughput.get("ours"), "baseline": throughput.get("baseline"),
                      "unit": throughput.get("unit", "voxels/s"), "ratio": throughput.get("ratio"),
                      "inference_ratio_vs_monai": results.get("inference", {}).get("ratio"),
                      "val_dice_after_train_minutes": results.get("train", {}).get("ours"),
                      "test_dice_after_train_minutes": results.get("train", {}).get("test_dice"),
                      "failed_steps": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
