"""Evaluation reports as text: the console summary table and the Markdown report of one run, with its
overlay images (drawn by unet3d.overlays) beside it. The tables a report is made from are stored by
unet3d.report_tables.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from unet3d.io import write_text_atomic
from unet3d.metrics import LESION_SUMMARY_METRICS, lesion_scores
from unet3d.overlays import mean_dice_per_case, overlay_png, read_overlay_case, reference_classes

#: Metrics shown by default in the console table and the Markdown report, in column order.
REPORT_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "specificity", "hd95_mm")
_ROW_KEYS: tuple[str, ...] = ("stage", "split", "class_name")
_DISTANCE_METRICS = frozenset({"hd95_mm", "assd_mm"})
_MISSING = "–"


# ---------------------------------------------------------------------------------------------------------------
# Summary tables (console and Markdown)
# ---------------------------------------------------------------------------------------------------------------
def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _format_cell(metric: str, mean, ci_low, ci_high) -> str:
    """'0.873 [0.850, 0.890]' for scores in [0, 1]; '4.21 [3.10, 5.60]' for distances in mm.

    The interval has the mean's decimals: with fewer, a narrow interval around 0.998 reads '[1.00, 1.00]'.
    """
    if _is_missing(mean):
        return _MISSING
    digits = 2 if metric in _DISTANCE_METRICS else 3
    text = f"{float(mean):.{digits}f}"
    if not _is_missing(ci_low) and not _is_missing(ci_high):
        text += f" [{float(ci_low):.{digits}f}, {float(ci_high):.{digits}f}]"
    return text


def _summary_rows(
    summary: pd.DataFrame, metrics: Sequence[str]
) -> tuple[list[str], list[str], list[list[str]]]:
    """(key column names, metric column names, rows of cells) with one row per stage x split x class.

    run_id and cohort lead the keys when the summary holds several of them, so that rows never collide.
    """
    keys = [k for k in ("run_id", "cohort") if k in summary.columns and summary[k].nunique(dropna=False) > 1]
    keys += [k for k in _ROW_KEYS if k in summary.columns]
    shown = [m for m in metrics if (summary["metric"] == m).any()] if "metric" in summary.columns else []
    rows = []
    if summary.empty:
        return keys, shown, rows
    grouped = summary.groupby(keys, dropna=False, sort=False, observed=True) if keys else [((), summary)]
    for key_values, group in grouped:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        by_metric = {row["metric"]: row for _, row in group.iterrows()}
        n_cases = pd.to_numeric(group["n_cases"], errors="coerce").max() if "n_cases" in group else None
        cells = [_MISSING if _is_missing(v) else str(v) for v in key_values]
        cells.append(_MISSING if _is_missing(n_cases) else str(int(n_cases)))
        for metric in shown:
            row = by_metric.get(metric)
            if row is None:
                cells.append(_MISSING)
            else:
                cells.append(_format_cell(metric, row.get("mean"), row.get("ci_low"), row.get("ci_high")))
        rows.append(cells)
    return keys, shown, rows


def format_summary(
    summary: pd.DataFrame, metrics: Sequence[str] = REPORT_METRICS, width: int = 120
) -> str:
    """A console table of a summary (unet3d.metrics.summarize's output): one row per stage x split x class with
    n_cases and "mean [95 % CI]" per metric. Metric columns that do not fit in `width` characters continue in a
    further block below, which repeats the row keys.
    """
    keys, shown, rows = _summary_rows(summary, metrics)
    if not rows:
        return "(no summary rows)"
    key_headers = [("class" if k == "class_name" else k) for k in keys] + ["n"]
    headers = key_headers + list(shown)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    n_keys = len(key_headers)
    gap = "  "

    blocks: list[list[int]] = []
    key_width = sum(widths[:n_keys]) + len(gap) * (n_keys - 1)
    used = key_width
    for column in range(n_keys, len(headers)):
        needed = len(gap) + widths[column]
        if not blocks or used + needed > width and blocks[-1]:
            blocks.append([])
            used = key_width
        blocks[-1].append(column)
        used += needed

    def line(cells: Sequence[str], columns: Sequence[int]) -> str:
        parts = [cells[i].ljust(widths[i]) for i in range(n_keys)]
        parts += [cells[i].ljust(widths[i]) for i in columns]
        return gap.join(parts).rstrip()

    out = []
    for columns in blocks or [[]]:
        header = line(headers, columns)
        out += [header, "-" * len(header)] + [line(r, columns) for r in rows] + [""]
    out.append("mean [95 % bootstrap CI] over cases; distances in mm")
    return "\n".join(out)


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub Markdown table (DataFrame.to_markdown) of cells already formatted as text."""
    frame = pd.DataFrame([[_markdown_escape(c) for c in row] for row in rows],
                         columns=[_markdown_escape(h) for h in headers])
    # disable_numparse: the cells are final text ('4', '0.873 [0.850, 0.890]'), not numbers to re-format.
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True).splitlines()


# ---------------------------------------------------------------------------------------------------------------
# Writing the Markdown report
# ---------------------------------------------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "case"


#: Splits the report's example cases come from, in order of preference.
EXAMPLE_SPLITS: tuple[str, ...] = ("test", "val")


def pick_example_cases(metrics: pd.DataFrame, stage: str) -> list[dict]:
    """The report's example cases of a stage: [{"label", "case_id", "split"}] for best, median and worst mean dice.

    The cases come from the first split of EXAMPLE_SPLITS with at least three cases with a dice value, else from
    every evaluated split together, so that best, median and worst are three different cases whenever the stage
    has three. Cases are ranked by mean dice over the stage's classes (ties: the smaller case_id ranks better);
    the median is the middle of that ranking (the worse one of an even count's two). With two cases there is
    no median, with one case it is labelled "only". Raises ValueError when the stage has no case with a dice
    value.
    """
    rows = metrics[metrics["stage"].astype(str) == stage]
    per_case = mean_dice_per_case(rows, stage)
    if per_case.empty:
        raise ValueError(f"no case with a dice value for stage {stage!r}")
    split_of = rows.assign(case_id=rows["case_id"].astype(str)).drop_duplicates("case_id").set_index("case_id")
    split_of = split_of["split"].astype(str)
    chosen = per_case
    for split in EXAMPLE_SPLITS:
        in_split = per_case[split_of.reindex(per_case.index).eq(split).to_numpy()]
        if len(in_split) >= 3:
            chosen = in_split
            break
    ranked = [case for case, _ in sorted(chosen.items(), key=lambda item: (-item[1], item[0]))]  # best first
    if len(ranked) == 1:
        positions = [("only", 0)]
    elif len(ranked) == 2:
        positions = [("best", 0), ("worst", 1)]
    else:
        positions = [("best", 0), ("median", len(ranked) // 2), ("worst", len(ranked) - 1)]
    return [{"label": label, "case_id": ranked[i], "split": split_of[ranked[i]]} for label, i in positions]


def lesion_like_classes(lesions: pd.DataFrame) -> pd.DataFrame:
    """The rows of the (stage, class) pairs for which lesion-level detection means something.

    Rule: a class is lesion-like when its reference has more than one connected component in at least one case.
    An organ (liver, hippocampus, a kidney) is one structure per case, so counting its "lesions" only restates
    whether the case was segmented at all; tumours, metastases and nodules come in varying numbers.
    """
    keys = [k for k in ("stage", "class_name") if k in lesions.columns]
    if lesions.empty or "n_ref_lesions" not in lesions.columns:
        return lesions.iloc[0:0]
    most = pd.to_numeric(lesions["n_ref_lesions"], errors="coerce")
    if not keys:
        return lesions if most.max() > 1 else lesions.iloc[0:0]
    most = most.groupby([lesions[k].astype(str) for k in keys]).transform("max")
    return lesions[most > 1]


def _lesion_intervals(summary: pd.DataFrame | None, keys: Sequence[str]) -> dict[tuple, dict[str, pd.Series]]:
    """The summary's lesion rows (unet3d.metrics.summarize with lesions), by (key values as text) and metric."""
    if summary is None or summary.empty or "metric" not in summary.columns or \
            not set(keys) <= set(summary.columns):
        return {}
    found: dict[tuple, dict[str, pd.Series]] = {}
    for _, row in summary[summary["metric"].isin(LESION_SUMMARY_METRICS)].iterrows():
        found.setdefault(tuple(str(row[k]) for k in keys), {})[row["metric"]] = row
    return found


def _lesion_rows(lesions: pd.DataFrame, summary: pd.DataFrame | None = None) -> tuple[list[str], list[list[str]]]:
    """Per stage x split x class: summed lesion counts; lesion precision, recall and F1 as the mean over cases
    [95 % bootstrap interval] from the summary's lesion rows (the mean alone when the summary has none); and the
    detection precision/recall of the summed counts, with the empty policy of unet3d.metrics.lesion_metrics."""
    keys = [k for k in _ROW_KEYS if k in lesions.columns]
    headers = [("class" if k == "class_name" else k) for k in keys] + [
        "cases", "reference lesions", "predicted lesions", "detected", "missed", "false lesions",
        "lesion precision", "lesion recall", "lesion F1", "pooled precision", "pooled recall",
    ]
    intervals = _lesion_intervals(summary, keys)
    rows = []
    grouped = lesions.groupby(keys, dropna=False, sort=False, observed=True) if keys else [((), lesions)]
    for key_values, group in grouped:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        total = {c: int(pd.to_numeric(group[c]).sum()) for c in
                 ("n_ref_lesions", "n_pred_lesions", "detected", "missed", "false_lesions")}
        n_ref, n_pred = total["n_ref_lesions"], total["n_pred_lesions"]
        pooled = lesion_scores(n_ref, n_pred, total["detected"], n_pred - total["false_lesions"])
        summarised = intervals.get(tuple(str(v) for v in key_values), {})
        per_case = []
        for metric in LESION_SUMMARY_METRICS:
            row = summarised.get(metric)
            if row is not None:
                per_case.append(_format_cell(metric, row.get("mean"), row.get("ci_low"), row.get("ci_high")))
            else:
                per_case.append(_format_cell(metric, pd.to_numeric(group[metric], errors="coerce").mean(), None, None))
        cases = group["case_id"].nunique() if "case_id" in group else len(group)
        rows.append(
            [_MISSING if _is_missing(v) else str(v) for v in key_values]
            + [str(cases), str(n_ref), str(n_pred), str(total["detected"]), str(total["missed"]),
               str(total["false_lesions"])]
            + per_case
            + [_MISSING if _is_missing(v) else f"{v:.3f}" for v in (pooled["lesion_precision"], pooled["lesion_recall"])]
        )
    return headers, rows


def _fill_in_rows(fill_in: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The report's fill-in table: per stage, split and class, the mean Dice [min, max] over cases."""
    headers = ["stage", "split", "class", "cases", "fill-in dice", "unannotated voxels"]
    rows = []
    for (stage, split, name), group in fill_in.groupby(["stage", "split", "class_name"], sort=True, observed=True):
        dice = pd.to_numeric(group["dice"], errors="coerce").dropna()
        cell = f"{dice.mean():.3f} [{dice.min():.3f}, {dice.max():.3f}]" if len(dice) else "n/a"
        rows.append([str(stage), str(split), str(name), str(group["case_id"].nunique()), cell,
                     f"{int(group.drop_duplicates('case_id')['n_unannotated'].sum()):,}"])
    return headers, rows


def _only_run(frame: pd.DataFrame | None, run_id: str) -> pd.DataFrame | None:
    if frame is None or "run_id" not in frame.columns:
        return frame
    return frame[frame["run_id"].astype(str) == run_id]


def write_markdown_report(
    out_dir: str | Path,
    run_id: str,
    summary: pd.DataFrame,
    metrics: pd.DataFrame,
    overlay_cases: Sequence[dict],
    lesions: pd.DataFrame | None = None,
    title: str | None = None,
    fill_in: pd.DataFrame | None = None,
) -> Path:
    """Write out_dir/report.md for one run, and one overlay PNG per example case beside it.

    summary: unet3d.metrics.summarize output; metrics: the per case x class table (for the example cases' dice);
    rows of other runs, when the frames carry a run_id column, are left out. overlay_cases: dicts with case_id,
    stage, label ("best" | "median" | "worst" | "only", see pick_example_cases), optional split, image_path,
    reference_path (None if unlabelled), prediction_path, classes {class_index: name} and label_map {source
    label: stage class}, applied to the reference before drawing (unmapped values -> 0). lesions: optional per
    case x class lesion table (LESIONS_SCHEMA columns); only its lesion-like classes (lesion_like_classes) get
    the lesion table. fill_in: optional sparse-annotation table (FILL_IN_SCHEMA columns): Dice on the voxels
    the sparse labels leave unannotated, against dense references. Returns the report's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = _only_run(summary, run_id)
    metrics = _only_run(metrics, run_id)
    lesions = _only_run(lesions, run_id)
    fill_in = _only_run(fill_in, run_id)

    lines = [f"# {title or f'Segmentation report: run {run_id}'}", "", f"- Run: `{run_id}`"]
    if "cohort" in metrics.columns and metrics["cohort"].notna().any():
        lines.append("- Cohort: " + ", ".join(sorted(metrics["cohort"].dropna().astype(str).unique())))
    if {"stage", "split", "case_id"} <= set(metrics.columns) and len(metrics):
        counts = metrics.groupby(["stage", "split"], sort=True, observed=True)["case_id"].nunique()
        lines.append("- Cases: " + "; ".join(f"{stage} {split}: {n}" for (stage, split), n in counts.items()))
    lines.append(f"- Written: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")

    keys, shown, rows = _summary_rows(summary, REPORT_METRICS)
    lines += ["", "## Summary", ""]
    if rows:
        headers = [("class" if k == "class_name" else k) for k in keys] + ["n"]
        headers += [("hd95 (mm)" if m == "hd95_mm" else m) for m in shown]
        lines += ["Mean over cases [95 % bootstrap confidence interval].", ""]
        lines += _markdown_table(headers, rows)
    else:
        lines.append("No summary rows.")

    if lesions is not None and len(lesions):
        lesion_like = lesion_like_classes(lesions)
        left_out = sorted(set(lesions["class_name"].astype(str)) - set(lesion_like["class_name"].astype(str))) \
            if "class_name" in lesions.columns else []
        if len(lesion_like):
            headers, rows = _lesion_rows(lesion_like, summary)
            lines += ["", "## Lesion-level detection", "",
                      "Counts summed over cases; lesion precision, recall and F1: mean over cases [95 % bootstrap "
                      "confidence interval]; pooled: precision and recall of the summed counts. Shown for classes "
                      "whose reference has more than one connected component in some case.", ""]
            lines += _markdown_table(headers, rows)
            if left_out:
                lines += ["", "Single-structure classes left out: " + ", ".join(left_out) + "."]

    if fill_in is not None and len(fill_in):
        lines += ["", "## Filled-in voxels (sparse annotation)", "",
                  "Dice on the voxels the sparse labels leave unannotated (set to the ignore value), against the "
                  "dense references of cohort.dense_labels_dir: how well the network filled in the unannotated "
                  "slices. Mean over cases [min, max]; unannotated voxels: summed over the cases.", ""]
        lines += _markdown_table(*_fill_in_rows(fill_in))

    if overlay_cases:
        lines += ["", "## Example cases", "",
                  "Axial, coronal and sagittal slices in radiological orientation (the patient's right on the "
                  "image's left); reference contours gold, predicted contours blue; line style per class.", ""]
    for case in overlay_cases:
        case_id, stage, label = str(case["case_id"]), str(case["stage"]), str(case["label"])
        if case.get("split") is not None:
            label = f"{label} ({case['split']})"
        classes = {int(k): str(v) for k, v in (case.get("classes") or {}).items()}
        image, reference, prediction = read_overlay_case(case["image_path"], case["prediction_path"],
                                                         case.get("reference_path"))
        if reference is not None:
            reference = reference_classes(reference, case.get("label_map"))
        png_name = f"overlay_{_safe_name(stage)}_{_safe_name(label)}_{_safe_name(case_id)}.png"
        per_case = mean_dice_per_case(metrics, stage) if {"stage", "case_id", "dice"} <= set(metrics.columns) else None
        dice_note = ""
        if per_case is not None and case_id in per_case.index:
            dice_note = f" (mean dice {per_case[case_id]:.3f})"
        heading = f"{stage}, {label}: {case_id}{dice_note}"
        overlay_png(image.voxels, reference, prediction, image.spacing, out_dir / png_name, title=heading,
                    classes=classes, origin_mm=image.origin, direction=image.direction)
        lines += [f"### {stage}, {label}: `{case_id}`{dice_note}", "", f"![{heading}]({png_name})", ""]

    text = "\n".join(lines).rstrip() + "\n"
    return write_text_atomic(out_dir / "report.md", text)
