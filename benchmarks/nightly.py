"""Two nights of the pipeline on the real hippocampus cohort (issue 12, acceptance 1): does a night with a few
new cases fine-tune from the champion in a fraction of the first night's time, at equal or better test Dice,
and segment only the new unlabelled scans?

Night 1: 150 labelled cases of ../shared/data/msd_hippocampus plus 30 of its images given without labels; the
cascade of configs/hippocampus.yaml trained from scratch with `--night1-minutes` per stage (the champion).
Night 2: 20 more labelled cases and 10 more unlabelled scans; `train.init_from: champion` with the shorter
budget `--night2-minutes` (a nightly fine-tune). The cohort folders are copies in a temporary folder (the
shared data is never written; a symlink out of a cohort folder would be refused by ingestion). Each night is
a fresh `unet3d run` process (Prefect's start included). Prints both nights' wall times, their ratio, the test
Dice of the final stage, the decision and the counts of scans segmented, then one JSON line.

    python benchmarks/nightly.py [--night1-minutes 6] [--night2-minutes 1.5] [--night2-lr 3e-4] [--workspace DIR]

Baseline: night 1 (training from scratch on the cohort of that night), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = (REPO.parent / "shared" / "data" / "msd_hippocampus").resolve()


def complete_pairs() -> list[str]:
    """Case ids with both an image and a label (the cohort's known defects left out), sorted."""
    images = {p.name.removesuffix(".nii.gz") for p in (DATA / "imagesTr").glob("*.nii.gz")}
    labels = {p.name.removesuffix(".nii.gz") for p in (DATA / "labelsTr").glob("*.nii.gz")}
    return sorted(images & labels)


def add_cases(root: Path, labelled: list[str], unlabelled: list[str]) -> None:
    """Copy labelled cases into ROOT/cohort/{imagesTr,labelsTr} and scans (images only) into ROOT/unlabelled."""
    for sub in ("cohort/imagesTr", "cohort/labelsTr", "unlabelled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for cid in labelled:
        shutil.copy2(DATA / "imagesTr" / f"{cid}.nii.gz", root / "cohort" / "imagesTr")
        shutil.copy2(DATA / "labelsTr" / f"{cid}.nii.gz", root / "cohort" / "labelsTr")
    for cid in unlabelled:
        shutil.copy2(DATA / "imagesTr" / f"{cid}.nii.gz", root / "unlabelled")


def write_night_config(root: Path, name: str, minutes: float, warm: bool, lr: float | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "hippocampus.yaml").read_text())
    cfg["cohort"] = {"name": "hippocampus", "source": str(root / "cohort"), "modality": "MRI",
                     "unlabelled_source": str(root / "unlabelled")}
    for stage in cfg["stages"]:
        stage.pop("max_epochs", None)  # the nights' budgets are time budgets per stage
    cfg["train"] = dict(cfg["train"], time_limit_min=minutes, max_epochs=1000)
    if warm:  # a fine-tune: the champion's weights, a lower learning rate (the poly schedule starts again)
        cfg["train"]["init_from"] = "champion"
        cfg["train"]["lr"] = lr
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_night(config: Path, workspace: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "unet3d", "run", str(config), "--workspace", str(workspace)],
                          cwd=REPO, capture_output=True, encoding="utf-8")
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"unet3d run {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def _number(frame, column: str):
    if not len(frame) or column not in frame.columns or frame[column].isna().iloc[-1]:
        return None
    value = frame[column].iloc[-1]
    return round(float(value), 4) if isinstance(value, float) else int(value)


def night_numbers(workspace: Path) -> dict:
    """The latest run's final-stage test Dice per class, its decision and its segment stage's counts."""
    import pandas as pd

    from flows.champion import run_order
    from data_catalog.workspace import Workspace
    from unet3d.report_tables import read_table

    ws = Workspace(workspace)
    run_id = run_order(ws, "hippocampus")[-1]
    summary = read_table(ws.report_table("summary"), run_id)
    final = summary[(summary["stage"] == "final") & (summary["split"] == "test") & (summary["metric"] == "dice")]
    decision = read_table(ws.decisions_table, run_id)
    segment = sorted((ws.root / ".stages" / "segment").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1]
    seg = json.loads(segment.read_text())
    volumes = pd.read_parquet(seg["volumes_path"]) if seg.get("volumes_path") else pd.DataFrame()
    return {"run_id": run_id, "test_dice": {r["class_name"]: round(float(r["mean"]), 4) for r in final.to_dict("records")},
            "test_dice_mean": round(float(final["mean"].mean()), 4), "n_test": int(final["n_cases"].max()),
            "decision": decision["decision"].iloc[-1] if len(decision) else None,
            "reason": decision["reason"].iloc[-1] if len(decision) else None,
            # both models on the same frozen test cases (the fair comparison: night 2's test split is larger)
            "frozen_cases": _number(decision, "n_cases"), "challenger_mean": _number(decision, "challenger_mean"),
            "champion_mean": _number(decision, "champion_mean"), "ci": [_number(decision, "ci_low"),
                                                                        _number(decision, "ci_high")],
            "scans": seg["n_scans"], "segmented": seg["segmented"], "already_segmented": seg["already_segmented"],
            "volume_rows_per_structure": volumes.groupby("structure").size().to_dict() if len(volumes) else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--night1-minutes", type=float, default=6.0, help="training budget per stage, night 1")
    parser.add_argument("--night2-minutes", type=float, default=1.5, help="fine-tune budget per stage, night 2")
    parser.add_argument("--night2-lr", type=float, default=3e-4,
                        help="fine-tune learning rate (AdamW; a from-scratch run starts at 3e-3)")
    parser.add_argument("--workspace", default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"real data not available: {DATA} is absent")
    root = Path(tempfile.mkdtemp(prefix="unet3d-nightly-"))
    workspace = Path(args.workspace) if args.workspace else root / "ws"
    pairs = complete_pairs()
    labelled1, labelled2 = pairs[:150], pairs[150:170]
    unlabelled1, unlabelled2 = pairs[170:200], pairs[200:210]
    try:
        add_cases(root, labelled1, unlabelled1)
        seconds1, _ = run_night(write_night_config(root, "night1", args.night1_minutes, warm=False), workspace)
        night1 = night_numbers(workspace)
        print(f"night 1: {len(labelled1)} labelled + {len(unlabelled1)} unlabelled, {seconds1:.0f} s, test Dice "
              f"{night1['test_dice']} ({night1['n_test']} cases), {night1['decision']}, segmented "
              f"{night1['segmented']} of {night1['scans']} scans")
        add_cases(root, labelled2, unlabelled2)
        seconds2, _ = run_night(write_night_config(root, "night2", args.night2_minutes, warm=True, lr=args.night2_lr), workspace)
        night2 = night_numbers(workspace)
        print(f"night 2: +{len(labelled2)} labelled + {len(unlabelled2)} unlabelled, fine-tuned from the champion, "
              f"{seconds2:.0f} s, test Dice {night2['test_dice']} ({night2['n_test']} cases), {night2['decision']}: "
              f"{night2['reason']}; segmented {night2['segmented']} of {night2['scans']} scans "
              f"({night2['already_segmented']} already segmented); volume rows per structure "
              f"{night2['volume_rows_per_structure']}")
        print(json.dumps({"benchmark": "nightly_night2_vs_night1", "ours": round(seconds2, 1),
                          "baseline": round(seconds1, 1), "unit": "s", "ratio": round(seconds2 / seconds1, 3),
                          "night1": night1, "night2": night2,
                          "budgets_min": [args.night1_minutes, args.night2_minutes], "night2_lr": args.night2_lr}))
    finally:
        if not args.keep and not args.workspace:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
