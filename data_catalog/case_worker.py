"""Per-case work of the preprocessing stage: fingerprint one case, preprocess one case into the store, and
the case folder's name and completeness check that the store shares with it.

These functions run inside Dask workers: they take and return small picklable dicts, import only numpy and
SimpleITK (no torch, no pandas), never raise for a bad case (a failure is returned and becomes an
issues row), and write each case through a temporary folder that is renamed into place at the end, so
that a worker killed midway leaves nothing that looks complete.

A problem of the machine rather than of the case (a full disk, an I/O error, no memory) is not a case
failure: it raises `EnvironmentFault`, the stage fails with one line that names the problem, nothing is
quarantined, and the rerun after the problem is fixed processes the cases normally.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import traceback
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from unet3d.case_folder import IMAGE_FILE, LABEL_FILE, PROPS_FILE, read_props
from unet3d.io import Geometry, read_case_voxels, read_label_voxels, save_array, write_json_atomic
from unet3d.resample import (canonical_axes, canonical_geometry, label_counts, nonzero_bbox,
                             plan_channel_normalisations, plan_normalisation, preprocess_consuming)

from .channels import record_channels

# Bump when the preprocessing code changes what it writes: every plan id (and so every cached case) changes.
PREPROCESS_VERSION = 3
FOREGROUND_SAMPLE_PER_CASE = 10_000
TMP_PREFIX = ".tmp-"

# The catalog columns a worker reads from a case (case_records).
CASE_COLUMNS = ["case_id", "patient_id", "image_path", "label_path", "image_files", "image_sha256", "label_sha256",
                "source_kind"]


class EnvironmentFault(OSError):
    """The environment failed (disk full, I/O error, out of memory, a dead worker), not the case's data.

    An OSError with the original errno (so that a retry policy keyed on errno still applies); its str() is
    one line that names the problem, e.g. "disk full (No space left on device) while writing case X: ...".
    """

    def __str__(self) -> str:
        return str(self.strerror if self.strerror is not None else super().__str__())


# errno -> what the user is told. These are the machine's problems whatever the file.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only file system",
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files",
    errno.ESTALE: "stale network file handle",
    errno.ETIMEDOUT: "I/O timed out",
    errno.EAGAIN: "resource temporarily unavailable",
    errno.EBUSY: "device or resource busy",
}


_ALLOCATION_FAILURES = ("Failed to allocate memory", "std::bad_alloc")


def environment_problem(exc: BaseException, writing: bool = False) -> str | None:
    """What went wrong with the machine, or None when `exc` is the case's own problem (bad data).

    `writing`: the exception came from writing the workspace, where any OSError is the machine's (a short
    write such as numpy's "53760 requested and 6112 written" carries no errno but means a full disk).
    """
    if isinstance(exc, EnvironmentFault):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ALLOCATION_FAILURES):
        return "out of memory"  # ITK's allocation failure comes as a RuntimeError
    if not isinstance(exc, OSError):
        return None
    if exc.errno in ENVIRONMENT_ERRNOS:
        return ENVIRONMENT_ERRNOS[exc.errno]
    if exc.errno is None and "requested and" in str(exc) and "written" in str(exc):
        return "disk full (short write)"
    if writing:
        return "cannot write the workspace"
    return None


def as_environment_fault(exc: BaseException, what: str, writing: bool = False) -> EnvironmentFault | None:
    """`exc` as an EnvironmentFault whose one-line message says `problem while what: exc`, or None."""
    problem = environment_problem(exc, writing)
    if problem is None:
        return None
    if isinstance(exc, EnvironmentFault):
        return exc
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    code = getattr(exc, "errno", None)
    if code is None and problem.startswith("disk full"):
        code = errno.ENOSPC
    return EnvironmentFault(code, f"{problem} while {what}: {type(exc).__name__}: {detail}")


def _single_thread_itk() -> None:
    import SimpleITK as sitk
    # One Dask worker = one core: ITK's own thread pool would oversubscribe the machine.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _read_case(case: dict) -> tuple[np.ndarray | list[np.ndarray], np.ndarray | None, Geometry]:
    """(image, label, geometry); the image of a multi-channel case is a list of (x, y, z) arrays, one per channel
    (ingestion checked that they share channel 0's geometry)."""
    files = list(case["image_files"]) if case.get("image_files") is not None else [case["image_path"]]
    if record_channels(case) > 1:
        read = [read_case_voxels([f], dicom=False) for f in files]
        voxels, geometry = [v for v, _ in read], read[0][1]
        del read
    else:
        voxels, geometry = read_case_voxels(files, dicom=case.get("source_kind") == "dicom")
    label = None
    if case.get("label_path"):
        label = read_label_voxels(case["label_path"])[0]
    return voxels, label, geometry


def case_records(cases) -> list[dict]:
    """Catalog rows (a pandas DataFrame of the cases table) as the small picklable dicts the workers take."""
    out = []
    for row in cases[CASE_COLUMNS].to_dict("records"):
        files = row.get("image_files")
        row["image_files"] = list(files) if files is not None and len(files) else None
        row["label_path"] = row["label_path"] if isinstance(row.get("label_path"), str) else None
        row["label_sha256"] = row["label_sha256"] if isinstance(row.get("label_sha256"), str) else None
        out.append(row)
    return out


def content_key(case: dict) -> str:
    text = f"{case.get('image_sha256')}|{case.get('label_sha256')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def case_dirname(case: dict) -> str:
    return f"{case['case_id']}__{content_key(case)}"


def fingerprint_path(fingerprint_dir: str | Path, case: dict, ignore_label: int | None = None) -> Path:
    """fingerprints/CASE__KEY.json: a case's fingerprint, under the store's fingerprint folder
    (CASE__KEY__ignoreV.json where the labels' value V marks unannotated voxels: other foreground statistics)."""
    suffix = "" if ignore_label is None else f"__ignore{int(ignore_label)}"
    return Path(fingerprint_dir) / f"{case_dirname(case)}{suffix}.json"


def _raise_if_environment(exc: BaseException, what: str, writing: bool = False) -> None:
    fault = as_environment_fault(exc, what, writing)
    if fault is not None:
        raise fault from exc


# ---------------------------------------------------------------------------------------------------------
def fingerprint_case(case: dict, out_dir: str, seed: int = 0, ignore_label: int | None = None) -> dict:
    """Per-case statistics for planning: canonical spacing and shapes, and a foreground intensity sample.
    `ignore_label`: the label value of unannotated voxels (sparse labels), which are not foreground."""
    _single_thread_itk()
    path = fingerprint_path(out_dir, case, ignore_label)
    if path.exists():
        return {"case_id": case["case_id"], "status": "cached", "path": str(path)}
    try:
        image, label, geometry = _read_case(case)
        # the annotated foreground: labelled above 0, and not the unannotated voxels of sparse labels
        annotated = None
        if label is not None:
            annotated = label > 0 if ignore_label is None else (label > 0) & (label != ignore_label)
        channels = image if isinstance(image, list) else None
        image = channels[0] if channels is not None else image
        perm, flips = canonical_axes(geometry.direction_matrix())
        canon = canonical_geometry(geometry, perm, flips)
        # The crop box is computed on the original axes and permuted: same box, no reoriented copies.
        nonzero = image != 0
        for other in (channels or [])[1:]:
            nonzero |= other != 0
        if label is not None:
            nonzero |= label > 0
        channel_samples = None
        if channels is not None:  # each channel's intensities at the same voxels, for its own ct normalisation
            where = annotated if annotated is not None and annotated.any() else nonzero if nonzero.any() else None
            channel_rng = np.random.default_rng([seed, int(content_key(case)[:8], 16), 1])
            channel_samples = []
            for voxels in channels:
                values = voxels[where] if where is not None else voxels.ravel()
                if values.size > FOREGROUND_SAMPLE_PER_CASE:
                    values = values[channel_rng.integers(0, values.size, FOREGROUND_SAMPLE_PER_CASE)]
                channel_samples.append([float(v) for v in values.astype(np.float64)])
        raw_box = nonzero_bbox(nonzero)
        bbox = [raw_box[p] for p in perm]
        # Both arrays share one memory layout: ravel("K") walks them in the same order without copying.
        flat_image = image.ravel(order="K")
        if annotated is not None and annotated.any():
            foreground = flat_image[annotated.ravel(order="K")]
        else:
            foreground = flat_image[nonzero.ravel(order="K")] if nonzero.any() else flat_image
        del nonzero
        rng = np.random.default_rng([seed, int(content_key(case)[:8], 16)])
        # A sample with replacement is as good for percentiles and far cheaper than a permutation.
        sample = foreground if foreground.size <= FOREGROUND_SAMPLE_PER_CASE else \
            foreground[rng.integers(0, foreground.size, FOREGROUND_SAMPLE_PER_CASE)]
        sample = sample.astype(np.float64)
        classes = {}
        if label is not None:
            values, counts = label_counts(label)
            classes = {int(v): int(c) for v, c in zip(values, counts) if v != 0 and v != ignore_label}
        record = {
            "case_id": case["case_id"],
            "canonical_spacing": list(canon.spacing),
            "canonical_shape": list(canon.size),
            "cropped_shape": [b - a for a, b in bbox],
            "crop_fraction": float(np.prod([b - a for a, b in bbox]) / max(np.prod(canon.size), 1)),
            "foreground_sample": [float(v) for v in sample],
            "foreground_mean": float(foreground.mean(dtype=np.float64)) if foreground.size else 0.0,
            "foreground_std": float(foreground.std(dtype=np.float64)) if foreground.size else 1.0,
            "class_voxels": classes,
            "labelled": label is not None,
        }
        if channel_samples is not None:
            record["channel_foreground_samples"] = channel_samples
    except Exception as exc:  # a bad case must not stop the cohort; a full disk or no memory must
        _raise_if_environment(exc, f"fingerprinting case {case['case_id']}")
        return {"case_id": case["case_id"], "status": "failed", "error": _describe(exc)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record, indent=1, sort_keys=True)
    except Exception as exc:
        _raise_if_environment(exc, f"writing the fingerprint of case {case['case_id']} in {path.parent}", writing=True)
        return {"case_id": case["case_id"], "status": "failed", "error": _describe(exc)}
    return {"case_id": case["case_id"], "status": "done", "path": str(path)}


def preprocess_case(case: dict, plan: dict, plan_dir: str) -> dict:
    """Preprocess one case with `plan` into `plan_dir/<case_id>__<content key>/`; skip it if already there.

    Returns {"status": "failed"} for a case whose data cannot be preprocessed; raises EnvironmentFault when
    the machine fails (full disk, I/O error, out of memory), leaving no partial folder behind.
    """
    _single_thread_itk()
    final = Path(plan_dir) / case_dirname(case)
    if case_complete(final):
        return {"case_id": case["case_id"], "status": "cached", "dir": str(final)}
    tmp = Path(plan_dir) / f"{TMP_PREFIX}{case_dirname(case)}-{uuid.uuid4().hex[:8]}"
    try:
        image, label, geometry = _read_case(case)
        normalisation = plan_channel_normalisations(plan) or plan_normalisation(plan)
        arrays = [image, label]
        del image, label  # handed over: the raw volume is freed as soon as it has been resampled
        image, label, props = preprocess_consuming(
            arrays, geometry, plan["target_spacing"], normalisation,
            image_order=plan["image_order"], label_mode=plan["label_mode"])
    except Exception as exc:  # the case's data; a full disk or no memory is raised instead
        _raise_if_environment(exc, f"preprocessing case {case['case_id']}")
        return {"case_id": case["case_id"], "status": "failed", "error": _describe(exc)}
    try:
        if final.exists():  # left incomplete by a crash of the machine
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
        # (C, X, Y, Z): channel first, C = 1 for a single-channel case
        save_array(tmp / IMAGE_FILE, (image if image.ndim == 4 else image[None]).astype(np.float32, copy=False))
        if label is not None:
            save_array(tmp / LABEL_FILE, label)
        meta = props.to_dict()
        meta.update(case_id=case["case_id"], image_sha256=case.get("image_sha256"),
                    label_sha256=case.get("label_sha256"), plan_id=plan["plan_id"])
        # Sizes let a reader recognise files truncated by a crash of the machine (no fsync: it would double
        # the cost of a small case; a truncated case is simply preprocessed again).
        meta["files"] = {f.name: f.stat().st_size for f in tmp.iterdir()}
        (tmp / PROPS_FILE).write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)  # atomic: the case appears complete or not at all
        except OSError:
            if case_complete(final):  # another worker finished the same case first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_environment(exc, f"writing case {case['case_id']} to {plan_dir}", writing=True)
        return {"case_id": case["case_id"], "status": "failed", "error": _describe(exc)}
    return {"case_id": case["case_id"], "status": "done", "dir": str(final),
            "shape": list(image.shape), "peak_rss_mb": _peak_rss_mb()}


def case_complete(case_dir: Path) -> bool:
    """A case folder is complete when its props.json parses and every file has the size it records."""
    try:
        meta = read_props(case_dir)
        return all((case_dir / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def remove_stale_versions(plan_dir: str | Path, cases: Iterable[dict]) -> int:
    """Remove the older versions of `cases` (their content changed since) from a plan's folder; returns how many.
    Once per stage, not per case: one listing of the folder whatever the cohort's size (a listing per case made
    preprocessing quadratic in the cohort). A folder is CASE__<16 hex digits>: its case is the name before the
    last "__", so case "X"'s versions are never confused with case "X_"'s ("X___<key>")."""
    current = {case["case_id"]: case_dirname(case) for case in cases}
    removed = 0
    try:
        entries = list(os.scandir(plan_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        case_id, sep, key = entry.name.rpartition("__")
        if (sep and case_id in current and entry.name != current[case_id] and len(key) == 16
                and all(c in "0123456789abcdef" for c in key)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def _describe(exc: Exception) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    msg = " ".join(str(exc).split())[:400]
    return f"{type(exc).__name__}: {msg}{where}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
