"""A metric across runs: each class's test-split mean (with its bootstrap interval) run after run, as a table
for the console and as a PNG for the report. Pure: the summary table (unet3d.report_tables) in, text and files out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from .io import atomic_path


def metric_history(summary: pd.DataFrame, run_order: Sequence[str], stage: str, metric: str = "dice",
                   split: str = "test") -> pd.DataFrame:
    """One row per run (in `run_order`, runs without such rows left out) x class: run_id, run_date, class_name,
    n_cases, mean, ci_low, ci_high of `metric` on `split` for `stage`."""
    if summary.empty or "metric" not in summary.columns:
        return pd.DataFrame(columns=["run_id", "run_date", "class_name", "n_cases", "mean", "ci_low", "ci_high"])
    rows = summary[(summary["metric"] == metric) & (summary["split"] == split) & (summary["stage"] == stage)]
    order = {run_id: i for i, run_id in enumerate(run_order)}
    rows = rows[rows["run_id"].isin(order)].assign(_order=lambda f: f["run_id"].map(order))
    columns = ["run_id", "run_date", "class_name", "n_cases", "mean", "ci_low", "ci_high"]
    return rows.sort_values(["_order", "class_name"])[columns].reset_index(drop=True)


def format_history(history: pd.DataFrame, metric: str = "dice") -> str:
    """Runs as rows, classes as columns: 'mean [ci_low, ci_high]' with 3 decimals."""
    if history.empty:
        return "no run with test-split metrics yet"

    def cell(r) -> str:
        text = f"{r['mean']:.3f}"
        if pd.notna(r["ci_low"]) and pd.notna(r["ci_high"]):
            text += f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        return text

    frame = history.assign(cell=history.apply(cell, axis=1))
    runs = list(dict.fromkeys(frame["run_id"]))
    table = frame.pivot_table(index="run_id", columns="class_name", values="cell", aggfunc="first").reindex(runs)
    dates = frame.drop_duplicates("run_id").set_index("run_id")["run_date"]
    table.insert(0, "date", dates.reindex(runs))
    table.columns.name = None
    return f"test {metric} per class, mean [95 % CI] over cases, oldest run first\n" + table.reset_index().to_string(index=False)


def plot_history(history: pd.DataFrame, path: str | Path, title: str, metric: str = "dice",
                 marks: dict[str, str] | None = None) -> Path:
    """Each class's mean (interval as a band) against the run, written atomically as PNG. `marks`: run id ->
    a short note drawn under its tick (e.g. 'champion', 'rejected')."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(history["run_id"]))
    x_of = {r: i for i, r in enumerate(runs)}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(runs) + 2), 3.8), dpi=100)
    for class_name, rows in history.groupby("class_name", sort=True):
        xs = [x_of[r] for r in rows["run_id"]]
        ax.plot(xs, rows["mean"], marker="o", label=str(class_name))
        if rows["ci_low"].notna().all() and rows["ci_high"].notna().all():
            ax.fill_between(xs, rows["ci_low"], rows["ci_high"], alpha=0.2)
    labels = [f"{r}\n{(marks or {}).get(r, '')}".rstrip() for r in runs]
    ax.set_xticks(range(len(runs)), labels, fontsize=7, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"test {metric} (mean, 95 % CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
