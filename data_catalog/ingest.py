"""Cohort ingestion: find the cases of a source folder, hash and validate them, and record them in the
catalog (cases.parquet, issues.parquet).

Three kinds of source (SPEC):
- `msd`: an MSD / nnU-Net folder with `dataset.json`, `imagesTr/`, `labelsTr/` (and optional `imagesTs/`);
- `folder`: a plain folder of images, with an optional folder of labels matched by case id;
- `dicom`: a folder searched recursively for DICOM series; every series is one case.

A case that fails a check gets one issues row per problem (stable `code`); an `error` quarantines it, a
`warning` does not. The rest of the cohort goes on. Re-ingesting reads only files whose size or mtime
changed (and hashes only those).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from unet3d.io import (ImageTooLarge, detached_data_files, dicom_series, dicom_slice_positions, is_image_file, nifti_nonfinite_voxels,
                       read_dicom_tags, read_image, strip_image_suffix, to_numpy)
from unet3d.resample import canonical_axes

from .hashing import sha256_file, sha256_files, stat_fingerprint
from .tables import Catalog, utc_now

log = logging.getLogger(__name__)

ERROR, WARNING = "error", "warning"

# Stable issue codes. Users filter on these; never rename one.
ISSUE_CODES = {
    "label_missing": (ERROR, "image without label"),
    "image_missing": (ERROR, "label without image"),
    "unreadable": (ERROR, "file cannot be read or is truncated"),
    "not_3d": (ERROR, "image is not a single-channel 3-D volume"),
    "non_finite": (ERROR, "NaN or Inf voxels"),
    "spacing_implausible": (ERROR, "voxel spacing is not a plausible number of millimetres"),
    "size_mismatch": (ERROR, "image and label sizes differ"),
    "spacing_mismatch": (ERROR, "image and label spacings differ"),
    "origin_mismatch": (ERROR, "image and label origins differ"),
    "direction_mismatch": (ERROR, "image and label directions differ"),
    "label_non_integer": (ERROR, "label holds non-integer values"),
    "label_undeclared": (ERROR, "label holds values that the cohort does not declare"),
    "path_outside_cohort": (ERROR, "a dataset.json entry or a symlink resolves outside the cohort folder"),
    "duplicate_case_id": (ERROR, "two sources map to the same case id"),
    "label_empty": (WARNING, "label holds no foreground"),
    "label_float_dtype": (WARNING, "label stored as floating point (values are integers)"),
    "geometry_outlier": (WARNING, "size or spacing far from the cohort's median: likely another dataset"),
    "preprocess_failed": (ERROR, "preprocessing raised an error"),
    "dicom_slices_missing": (ERROR, "a DICOM series' slice positions are not evenly spaced (missing or extra slices)"),
    "too_large": (ERROR, "the header claims more voxels than unet3d.io.MAX_IMAGE_VOXELS: refused before reading"),
    "worker_died": (ERROR, "the process reading the case died (killed, e.g. out of memory); retried on re-ingest"),
}

# Tolerances for image/label geometry agreement.
SPACING_RTOL = 1e-3
ORIGIN_ATOL_FRACTION = 0.1  # of the finest spacing
DIRECTION_ATOL = 1e-3
PLAUSIBLE_SPACING_MM = (0.01, 50.0)
# A case is a geometry outlier when an axis' spacing differs from the cohort median by more than this factor,
# or its physical extent by more than OUTLIER_EXTENT_FACTOR.
OUTLIER_SPACING_FACTOR = 3.0
OUTLIER_EXTENT_FACTOR = 4.0
# A DICOM series' gap between neighbouring slices may differ from its median gap by this fraction at most.
DICOM_SLICE_GAP_TOLERANCE = 0.1


class IngestError(Exception):
    """The source as a whole cannot be ingested (missing folder, unreadable dataset.json ...)."""


@dataclass
class SourceCase:
    case_id: str
    image_files: list[str] | None  # one file, or a DICOM series' slices in order
    label_path: str | None
    patient_id: str | None = None
    source_kind: str = "folder"
    modality: str | None = None
    issues: list[tuple[str, str, str]] = field(default_factory=list)  # (code, path, message) found at discovery
    roots: tuple[str, ...] = ()  # folders the case's files (and the data files their headers name) must stay in

    @property
    def image_path(self) -> str | None:
        if not self.image_files:
            return None
        if self.source_kind == "dicom":
            return str(Path(self.image_files[0]).parent)
        return self.image_files[0]


@dataclass
class Source:
    kind: str
    root: Path
    cases: list[SourceCase]
    declared_labels: dict[int, str] | None
    modality: str | None
    notes: list[str] = field(default_factory=list)  # what discovery found and ignored, for the user


# ---------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------
def normalise_modality(value: str | None) -> str | None:
    if value is None:
        return None
    v = str(value).strip().upper()
    if v in {"CT"}:
        return "CT"
    if v in {"MR", "MRI", "T1", "T2", "FLAIR", "T1W", "T2W", "DWI", "ADC"} or v.startswith("MR"):
        return "MRI"
    return "other"


def discover(source: str | Path, labels: str | Path | None = None) -> Source:
    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        raise IngestError(f"source folder {source} does not exist")
    labels_dir = Path(labels).expanduser().resolve() if labels else None
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        src = _discover_msd(root)
    elif any(is_image_file(p) and p.is_file() for p in root.iterdir()):
        src = _discover_folder(root, labels_dir)
    else:
        src = _discover_dicom(root, labels_dir)
        if not src.cases:
            raise IngestError(f"{root}: no dataset.json or imagesTr/ folder, no image files (.nii.gz .nii .nrrd .mha "
                              f"...) and no DICOM series found")
    roots = (str(root),) + ((str(labels_dir),) if labels_dir is not None and src.kind != "msd" else ())
    for case in src.cases:
        case.roots = roots
    return src


def _case_id_from_file(path: Path) -> str:
    stem = strip_image_suffix(path.name)
    # nnU-Net v2 names the first channel CASE_0000
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    return stem


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _outside_issue(root: Path, link: Path) -> tuple[str, str, str]:
    return ("path_outside_cohort", str(link), f"{link.relative_to(link.parent.parent)} is a symlink to {link.resolve()}, "
                                              f"outside the cohort folder {root}: not read (copy the file into the folder)")


def _check_dataset_json(meta, path: Path) -> None:
    """A dataset.json that is not what MSD / nnU-Net write is refused with one line naming the file and key."""
    def fail(what: str):
        raise IngestError(f"{path}: {what}")

    def kind(value) -> str:
        return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
            type(value), f"a number ({value})" if isinstance(value, (int, float)) else type(value).__name__)

    if not isinstance(meta, dict):
        fail(f"expected a JSON object with 'training' (and 'labels', 'modality' ...), got {kind(meta)}")
    if "labels" in meta and not isinstance(meta["labels"], dict):
        fail(f"'labels' must be an object mapping label values to names, got {kind(meta['labels'])}")
    for key in ("modality", "channel_names"):
        if key in meta and not isinstance(meta[key], dict):
            fail(f"'{key}' must be an object such as {{\"0\": \"CT\"}}, got {kind(meta[key])}")
    if "file_ending" in meta and not isinstance(meta["file_ending"], str):
        fail(f"'file_ending' must be a string such as \".nii.gz\", got {kind(meta['file_ending'])}")
    for key in ("training", "test"):
        entries = meta.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            fail(f"'{key}' must be a list of entries, got {kind(entries)}")
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                continue
            if not isinstance(entry, dict):
                fail(f"{key}[{i}] must be an object {{\"image\": ..., \"label\": ...}} or a path, got {kind(entry)}")
            for field_name in ("image", "label"):
                if entry.get(field_name) is not None and not isinstance(entry[field_name], str):
                    fail(f"{key}[{i}].{field_name} must be a path (a string), got {kind(entry[field_name])}")
            if entry.get("patient_id") is not None and not isinstance(entry["patient_id"], (str, int)):
                fail(f"{key}[{i}].patient_id must be a string, got {kind(entry['patient_id'])}")


def _discover_msd(root: Path) -> Source:
    notes = []
    if (root / "dataset.json").exists():
        try:
            meta = json.loads((root / "dataset.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IngestError(f"{root / 'dataset.json'}: cannot be parsed: {exc}") from exc
    else:
        meta = {}
        notes.append(f"{root.name}: no dataset.json; cases from imagesTr/ and labelsTr/ (label values not declared, "
                     f"modality from the config or 'other')")
    _check_dataset_json(meta, root / "dataset.json")
    declared = None
    if isinstance(meta.get("labels"), dict):
        labels = meta["labels"]
        try:
            # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}
            if all(str(k).lstrip("-").isdigit() for k in labels):
                declared = {int(k): str(v) for k, v in labels.items()}
            else:
                declared = {int(v): str(k) for k, v in labels.items() if not isinstance(v, list)}
        except (TypeError, ValueError):
            raise IngestError(f"{root / 'dataset.json'}: 'labels' must map label values to names ({{\"1\": \"liver\"}}, "
                              f"MSD) or names to values ({{\"liver\": 1}}, nnU-Net v2); got {json.dumps(labels)[:120]}") from None
    modality = None
    mod = meta.get("modality") or meta.get("channel_names")
    if isinstance(mod, dict) and mod:
        modality = normalise_modality(list(mod.values())[0])
    file_ending = meta.get("file_ending", ".nii.gz")

    cases: dict[str, SourceCase] = {}
    seen_images: set[Path] = set()
    seen_labels: set[Path] = set()

    def add(case: SourceCase):
        if case.case_id in cases:
            case.issues.append(("duplicate_case_id", case.image_path or case.label_path or "",
                                f"case id {case.case_id} is listed twice in dataset.json"))
            case.case_id = f"{case.case_id}__dup{len(cases)}"
        cases[case.case_id] = case

    for kind, entries in (("training", meta.get("training")), ("test", meta.get("test"))):
        for entry in entries or []:
            if isinstance(entry, str):
                entry = {"image": entry}
            image_rel = entry.get("image")
            label_rel = entry.get("label") if kind == "training" else None
            if not image_rel:
                continue
            image = (root / image_rel)
            case = SourceCase(case_id=_case_id_from_file(Path(image_rel)), image_files=None, label_path=None,
                              patient_id=None if entry.get("patient_id") is None else str(entry["patient_id"]),
                              source_kind="msd", modality=modality)
            for rel, is_label in ((image_rel, False), (label_rel, True)):
                if rel is None:
                    continue
                path = root / rel
                if not _inside(root, path):
                    case.issues.append(("path_outside_cohort", str(rel),
                                        f"dataset.json {'label' if is_label else 'image'} entry {rel!r} resolves outside {root}"))
                    continue
                path = path.resolve()
                (seen_labels if is_label else seen_images).add(path)
                if is_label:
                    if path.exists():
                        case.label_path = str(path)
                    else:
                        case.issues.append(("label_missing", str(path),
                                            f"dataset.json lists label {rel} but the file does not exist"))
                else:
                    if path.exists():
                        case.image_files = [str(path)]
                        # MSD images may be 4-D multi-channel; nnU-Net v2 splits channels into _0000 files
                    else:
                        v2 = path.parent / (strip_image_suffix(path.name) + "_0000" + file_ending)
                        if v2.exists():
                            case.image_files = [str(v2)]
                            seen_images.add(v2.resolve())
                        else:
                            case.issues.append(("image_missing", str(path),
                                                f"dataset.json lists image {rel} but the file does not exist"))
            if kind == "training" and label_rel is None and not any(c == "label_missing" for c, _, _ in case.issues):
                case.issues.append(("label_missing", str(image), "dataset.json training entry has no label"))
            add(case)

    # Files on disk that dataset.json does not list (nnU-Net v2 lists none): images join as cases,
    # labels without an image are reported.
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    # Case ids come from the names in the folder (a symlink keeps its own name), files from their targets.
    labels_by_id: dict[str, Path] = {}
    if labels_dir.is_dir():
        for p in sorted(labels_dir.glob("*")):
            if is_image_file(p):
                labels_by_id.setdefault(_case_id_from_file(p), p)
    unlisted_images = sorted(p for p in images_dir.glob("*") if is_image_file(p) and p.resolve() not in seen_images) \
        if images_dir.is_dir() else []
    for link in unlisted_images:
        cid = _case_id_from_file(link)
        if cid in cases and cases[cid].image_files:
            continue
        case = cases.get(cid) or SourceCase(case_id=cid, image_files=None, label_path=None, source_kind="msd", modality=modality)
        cases[cid] = case
        if not _inside(root, link):
            case.issues.append(_outside_issue(root, link))
            continue
        image = link.resolve()
        case.image_files = [str(image)]
        label = labels_dir / (cid + file_ending)
        if not label.exists():
            label = labels_by_id.get(cid, label)
        if label.exists():
            seen_labels.add(label.resolve())
            if _inside(root, label):
                case.label_path = str(label.resolve())
            else:
                case.issues.append(_outside_issue(root, label))
        else:
            case.issues.append(("label_missing", str(image), f"image {link.name} has no label in labelsTr/"))
    if labels_dir.is_dir():
        for link in sorted(p for p in labels_dir.glob("*") if is_image_file(p)):
            label = link.resolve()
            if label in seen_labels:
                continue
            cid = _case_id_from_file(link)
            outside = None if _inside(root, link) else _outside_issue(root, link)
            if cid in cases:
                if outside:
                    cases[cid].issues.append(outside)
                elif cases[cid].label_path is None:
                    cases[cid].label_path = str(label)
                    cases[cid].issues = [i for i in cases[cid].issues if i[0] != "label_missing"]
                continue
            cases[cid] = SourceCase(case_id=cid, image_files=None, label_path=None if outside else str(label),
                                    source_kind="msd", modality=modality,
                                    issues=[outside or ("image_missing", str(label), f"label {link.name} has no image in "
                                                                                     f"imagesTr/ and no dataset.json entry")])
    return Source("msd", root, sorted(cases.values(), key=lambda c: c.case_id), declared, modality, notes)


def _image_files(folder: Path) -> list[tuple[Path, Path | None]]:
    """(path in `folder`, resolved target or None when a symlink leads outside `folder`) of its image files,
    sorted by name. `folder` is resolved; only symlinks are resolved again (one scandir, no per-file realpath)."""
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not is_image_file(entry.name):
                continue
            path = folder / entry.name
            if entry.is_symlink():
                if not entry.is_file():  # broken, or a folder
                    continue
                out.append((path, path.resolve() if _inside(folder, path) else None))
            elif entry.is_file(follow_symlinks=False):
                out.append((path, path))
    return sorted(out, key=lambda item: item[0].name)


# A file named like X_label.nrrd beside X.nrrd (or X_image.nrrd) is X's mask (pyradiomics' samples, many lesion
# datasets); with a labels folder, its files may carry the same suffixes.
LABEL_NAME_SUFFIXES = ("_label", "_labels", "_seg", "_segmentation", "_mask", "_gt")
IMAGE_NAME_SUFFIXES = ("_image", "_img")


def _strip_role(case_id: str, suffixes: tuple[str, ...]) -> str | None:
    """`case_id` without a role suffix (case-insensitive), or None when it has none."""
    lower = case_id.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(case_id) > len(suffix):
            return case_id[: -len(suffix)]
    return None


def _discover_folder(root: Path, labels_dir: Path | None) -> Source:
    if labels_dir is not None and not labels_dir.is_dir():
        raise IngestError(f"labels folder {labels_dir} does not exist")
    notes: list[str] = []
    if labels_dir == root:
        notes.append(f"--labels is the source folder itself: its masks are recognised by name "
                     f"({', '.join(LABEL_NAME_SUFFIXES)}), never an image as its own label")
        labels_dir = None
    # Case ids come from the names in the folder (a symlink keeps its own name), files from their targets;
    # a symlink whose target is outside the folder is reported, not read.
    entries = [(link, target, _case_id_from_file(link)) for link, target in _image_files(root)]
    labels: dict[str, tuple[Path, Path | None]] = {}  # case id -> (name in the folder, target or None if outside)
    if labels_dir is None:  # masks beside their images
        images = []
        for link, target, cid in entries:
            base = _strip_role(cid, LABEL_NAME_SUFFIXES)
            if base is None:
                images.append((link, target, cid))
            elif base in labels:
                notes.append(f"{link.name} ignored: {labels[base][0].name} is already the mask of {base}")
            else:
                labels[base] = (link, target)
        side_by_side = bool(labels)
    else:
        images, side_by_side = entries, False
        for link, target in _image_files(labels_dir):
            cid = _case_id_from_file(link)
            for key in (cid, _strip_role(cid, LABEL_NAME_SUFFIXES)):
                if key is not None and key not in labels:
                    labels[key] = (link, target)
    cases: dict[str, SourceCase] = {}
    used: set[Path] = set()  # label files given to a case
    paired = 0
    for link, target, cid in images:
        key = next((k for k in (_strip_role(cid, IMAGE_NAME_SUFFIXES), cid)
                    if k is not None and k in labels and labels[k][0] not in used), None)
        case_id = key if side_by_side and key is not None else cid
        case = SourceCase(case_id=case_id, image_files=[str(target)] if target else None, label_path=None,
                          source_kind="folder", issues=[] if target else [_outside_issue(root, link)])
        if key is not None:
            label_link, label_target = labels[key]
            used.add(label_link)
            if label_target is None:
                case.issues.append(_outside_issue(label_link.parent, label_link))
            elif target is not None and label_target == target:
                case.issues.append(("label_missing", str(link), f"{label_link.name} is the image {link.name} itself: "
                                                                 f"an image is never its own label"))
            else:
                case.label_path = str(label_target)
                paired += 1
        elif labels_dir is not None or side_by_side:
            where = labels_dir if labels_dir is not None else f"beside it in {root}"
            case.issues.append(("label_missing", str(link), f"no label for {link.name} "
                                                            f"(looked for {cid}.* or {cid}_label/_seg/_mask.* {where})"))
        if case_id in cases:
            other = cases[case_id]
            case.issues.append(("duplicate_case_id", str(link), f"{link.name} and "
                                f"{Path(other.image_files[0] if other.image_files else other.issues[0][1]).name} "
                                f"both give case id {case_id}"))
            case.case_id = f"{case_id}__{link.name}"
        cases[case.case_id] = case
    for key, (label_link, label_target) in labels.items():
        if label_link in used or key in cases:
            continue
        used.add(label_link)
        issue = _outside_issue(label_link.parent, label_link) if label_target is None else \
            ("image_missing", str(label_target), f"label {label_link.name} has no image in {root}")
        cases[key] = SourceCase(case_id=key, image_files=None, label_path=str(label_target) if label_target else None,
                                source_kind="folder", issues=[issue])
    if side_by_side:
        notes.append(f"{paired} of {len(images)} images paired with the mask beside them (by name: "
                     f"{', '.join(LABEL_NAME_SUFFIXES)})")
    elif labels_dir is None:
        notes.append(f"no labels: {len(images)} image-only cases (for labels, pass --labels DIR with files named like "
                     f"the images, or put X_label / X_seg / X_mask beside X)")
    return Source("folder", root, sorted(cases.values(), key=lambda c: c.case_id), None, None, notes)


def _dicom_magic(path: Path) -> bool:
    """A file that says it is DICOM (the "DICM" marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _discover_dicom(root: Path, labels_dir: Path | None) -> Source:
    cases: dict[str, SourceCase] = {}
    for folder, _dirs, files in sorted(os.walk(root)):
        if not files:
            continue
        try:
            series = dicom_series(folder)
        except RuntimeError:
            continue
        placed = {Path(f).name for _, slices in series for f in slices}
        broken = sorted(f for f in files if f not in placed and _dicom_magic(Path(folder) / f))
        for uid, slices in series:
            rel = Path(folder).relative_to(root)
            base = root.name if str(rel) == "." else "_".join(rel.parts)
            cid = base if len(series) == 1 else f"{base}_{uid[-8:]}"
            try:
                tags = read_dicom_tags(slices[0])
            except RuntimeError:
                tags = {}
            case = SourceCase(case_id=cid, image_files=slices, label_path=None, source_kind="dicom",
                              patient_id=tags.get("PatientID") or None, modality=normalise_modality(tags.get("Modality")))
            if len(series) == 1 and broken:
                case.issues.append(("unreadable", str(Path(folder)), f"{len(broken)} DICOM file(s) beside the series "
                                    f"cannot be read (truncated or corrupt slices?): {', '.join(broken[:5])}"))
            escaping = [Path(f) for f in slices if not _inside(root, Path(f))]
            if escaping:
                case.image_files = None
                case.issues.append(_outside_issue(root, escaping[0]))
            if labels_dir is not None:
                matches = [p for p in labels_dir.iterdir() if is_image_file(p) and _case_id_from_file(p) == cid]
                if matches:
                    case.label_path = str(matches[0].resolve())
            cases[cid] = case
    return Source("dicom", root, sorted(cases.values(), key=lambda c: c.case_id), None, None)


# ---------------------------------------------------------------------------------------------------------
# Inspection of one case (hash + validation); runs in worker processes for large cohorts
# ---------------------------------------------------------------------------------------------------------
def _issue(code: str, path: str | None, message: str) -> dict:
    severity, _ = ISSUE_CODES[code]
    return {"code": code, "severity": severity, "path": path, "message": message}


def _check_spacing(spacing, path) -> list[dict]:
    lo, hi = PLAUSIBLE_SPACING_MM
    bad = [s for s in spacing if not np.isfinite(s) or s < lo or s > hi]
    if bad:
        return [_issue("spacing_implausible", path, f"spacing {tuple(round(s, 6) for s in spacing)} mm is outside "
                                                    f"[{lo}, {hi}] mm")]
    return []


def inspect_case(case: SourceCase, declared_labels: dict[int, str] | None) -> dict:
    """Hash and validate one case. Returns the case's catalog fields and its issues (never raises)."""
    out: dict = {"case_id": case.case_id, "issues": [_issue(c, p, m) for c, p, m in case.issues]}
    image_geometry = None
    if case.image_files:
        path = case.image_path
        try:
            out["image_sha256"] = sha256_file(case.image_files[0]) if len(case.image_files) == 1 and case.source_kind != "dicom" \
                else sha256_files(case.image_files)
            out["image_stat"] = stat_fingerprint(case.image_files)
        except OSError as exc:
            out["issues"].append(_issue("unreadable", path, f"cannot read file: {exc}"))
        if case.source_kind == "dicom":
            out["issues"] += _check_dicom_slices(case.image_files, path)
        image = _read_checked(case.image_files if case.source_kind == "dicom" else case.image_files[0], "image",
                              path, case.roots, out["issues"])
        if image is not None:
            from unet3d.io import Geometry
            image_geometry = Geometry.of(image)
            out.update(_geometry_fields(image_geometry))
            out["pixel_type"] = image.GetPixelIDTypeAsString()
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                out["issues"].append(_issue("not_3d", path, f"image {_not_3d_description(image)}"))
            else:
                out["issues"] += _check_spacing(image_geometry.spacing, path)
                voxels = to_numpy(image)
                n_bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels))) \
                    if np.issubdtype(voxels.dtype, np.floating) else 0
                if case.source_kind != "dicom":
                    try:  # ITK reads NIfTI NaN as 0 and may accept a truncated .nii.gz: check the raw data
                        n_bad = max(n_bad, nifti_nonfinite_voxels(case.image_files[0]) or 0)
                    except ValueError as exc:
                        out["issues"].append(_issue("unreadable", path, str(exc)))
                if n_bad:
                    out["issues"].append(_issue("non_finite", path, f"{n_bad} NaN/Inf voxels"))
            del image
    if case.label_path:
        path = case.label_path
        try:
            out["label_sha256"] = sha256_file(path)
            out["label_stat"] = stat_fingerprint([path])
        except OSError as exc:
            out["issues"].append(_issue("unreadable", path, f"cannot read file: {exc}"))
        label = _read_checked(path, "label", path, case.roots, out["issues"])
        if label is not None:
            from unet3d.io import Geometry
            lg = Geometry.of(label)
            if image_geometry is None:
                out.update(_geometry_fields(lg))  # an orphan label still gets its geometry reported
                out["pixel_type"] = None
            if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
                out["issues"].append(_issue("not_3d", path, f"label {_not_3d_description(label)}"))
            else:
                if image_geometry is not None and image_geometry.ndim == 3:
                    out["issues"] += _compare_geometry(image_geometry, lg, path)
                out["issues"] += _check_label_values(to_numpy(label), declared_labels, path)
                try:
                    if nifti_nonfinite_voxels(path):
                        out["issues"].append(_issue("label_non_integer", path, "label holds NaN/Inf voxels"))
                except ValueError as exc:
                    out["issues"].append(_issue("unreadable", path, str(exc)))
    return out


def _check_dicom_slices(files: list[str], path: str) -> list[dict]:
    """Slice positions of a DICOM series (from the headers) must be evenly spaced: a missing or unreadable
    slice makes ITK read the series with a wrong spacing and only warn on stderr."""
    try:
        positions = np.sort(dicom_slice_positions(files))
    except ValueError as exc:
        return [_issue("unreadable", path, str(exc))]
    if len(positions) < 2:
        return []
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    if spacing <= 0:
        return [_issue("dicom_slices_missing", path, f"{int((gaps == 0).sum())} slices share a position: "
                                                     f"duplicated slices, not one volume")]
    bad = np.flatnonzero(np.abs(gaps - spacing) > DICOM_SLICE_GAP_TOLERANCE * spacing)
    if not len(bad):
        return []
    missing = int(round(float(np.sum(gaps[bad] / spacing - 1))))
    i = int(bad[0])
    return [_issue("dicom_slices_missing", path,
                   f"slice positions are not evenly spaced: a gap of {gaps[i]:.4g} mm after {positions[i]:.4g} mm "
                   f"where the series' spacing is {spacing:.4g} mm ({len(bad)} uneven gap(s), about {max(missing, 0)} "
                   f"slice(s) missing); read as one volume its spacing would be wrong")]


def _read_checked(source, what: str, path: str, roots: tuple[str, ...], issues: list[dict]):
    """read_image, or None with an issue: a header naming a data file outside the cohort (path_outside_cohort,
    not read), a header claiming too many voxels (too_large, refused before reading), or a read error."""
    if roots and not isinstance(source, (list, tuple)):
        try:
            escaping = [f for f in detached_data_files(source) if not any(_inside(Path(r), f) for r in roots)]
        except OSError:
            escaping = []  # the read below reports it
        if escaping:
            issues.append(_issue("path_outside_cohort", path, f"the {what}'s header reads its voxels from "
                                                              f"{escaping[0]}, outside the cohort folder: not read"))
            return None
    try:
        return read_image(source)
    except ImageTooLarge as exc:  # refused from the header, before any voxel is read
        issues.append(_issue("too_large", path, f"{what} {_first_line(exc)}"))
    except Exception as exc:  # SimpleITK raises RuntimeError with ITK's message
        issues.append(_issue("unreadable", path, f"SimpleITK cannot read the {what}: {_first_line(exc)}"))
    return None


def _not_3d_description(image) -> str:
    """"is 4-D (35x50x36x2: ...)": what a user calls the image's dimensionality. ITK reads the 4th axis of many
    4-D files (NIfTI with a vector intent, arrays saved from numpy) as components per voxel; to the user those
    are still a 4th dimension (time points or channels)."""
    size = [int(s) for s in image.GetSize()]
    components = int(image.GetNumberOfComponentsPerPixel())
    shape = size + ([components] if components > 1 else [])
    what = f"is {len(shape)}-D ({'x'.join(str(s) for s in shape)}"
    if len(shape) > 3:
        what += f": {shape[3]} time points or channels of {'x'.join(str(s) for s in shape[:3])}"
    return what + "); expected a single 3-D volume (one channel)"


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with file:line noise; the last non-empty line is usually the reason
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _geometry_fields(g) -> dict:
    return {"size": list(g.size), "spacing_mm": list(g.spacing), "origin_mm": list(g.origin), "direction": list(g.direction)}


def _compare_geometry(image, label, path) -> list[dict]:
    issues = []
    if tuple(image.size) != tuple(label.size):
        issues.append(_issue("size_mismatch", path, f"label size {label.size} != image size {image.size}"))
    if not np.allclose(image.spacing, label.spacing, rtol=SPACING_RTOL, atol=0):
        issues.append(_issue("spacing_mismatch", path, f"label spacing {tuple(round(s, 5) for s in label.spacing)} != "
                                                       f"image spacing {tuple(round(s, 5) for s in image.spacing)}"))
    atol = ORIGIN_ATOL_FRACTION * min(image.spacing)
    if not np.allclose(image.origin, label.origin, rtol=0, atol=atol):
        issues.append(_issue("origin_mismatch", path, f"label origin {tuple(round(o, 3) for o in label.origin)} != "
                                                      f"image origin {tuple(round(o, 3) for o in image.origin)} "
                                                      f"(tolerance {atol:.3g} mm)"))
    if not np.allclose(image.direction, label.direction, rtol=0, atol=DIRECTION_ATOL):
        issues.append(_issue("direction_mismatch", path, f"label direction {tuple(round(d, 4) for d in label.direction)} "
                                                         f"!= image direction {tuple(round(d, 4) for d in image.direction)}"))
    return issues


def _few(values: list, n: int = 8) -> str:
    """A short list for a one-line message: the first n values and how many more."""
    return str(values) if len(values) <= n else f"[{', '.join(str(v) for v in values[:n])}, ... ({len(values)} values)]"


def _check_label_values(values: np.ndarray, declared: dict[int, str] | None, path: str) -> list[dict]:
    issues = []
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all() or not np.array_equal(values[finite], np.round(values[finite])):
            bad = values[~finite] if not finite.all() else values[values != np.round(values)]
            return [_issue("label_non_integer", path, f"{bad.size} label voxels are not integers "
                                                      f"(e.g. {float(bad.ravel()[0]):.4g})")]
        issues.append(_issue("label_float_dtype", path, f"label stored as {values.dtype}; its values are integers"))
        values = values.astype(np.int64)
    present = np.unique(values)
    allowed = set(declared) if declared else None
    if allowed is not None:
        allowed.add(0)
        undeclared = [int(v) for v in present if int(v) not in allowed]
        if undeclared:
            issues.append(_issue("label_undeclared", path, f"label values {_few(undeclared)} are not declared "
                                                           f"(declared: {sorted(allowed)})"))
    elif (present < 0).any():
        issues.append(_issue("label_undeclared", path, f"negative label values {_few([int(v) for v in present if v < 0])}"
                                                       f" (an image, not a mask?)"))
    if not (present != 0).any():
        issues.append(_issue("label_empty", path, "label holds only background (0)"))
    return issues


# ---------------------------------------------------------------------------------------------------------
# Cohort-level checks
# ---------------------------------------------------------------------------------------------------------
def geometry_outliers(rows: list[dict]) -> dict[str, str]:
    """Cases whose canonical spacing or physical extent is far from the cohort median -> message."""
    canon = {}
    for row in rows:
        spacing, direction = row.get("spacing_mm"), row.get("direction")
        if spacing is None or direction is None or len(spacing) != 3 or len(direction) != 9:
            continue
        perm, _ = canonical_axes(np.asarray(row["direction"]).reshape(3, 3))
        spacing = np.asarray(row["spacing_mm"])[list(perm)]
        extent = spacing * np.asarray(row["size"])[list(perm)]
        canon[row["case_id"]] = (spacing, extent, row)
    if len(canon) < 5:
        return {}
    med_spacing = np.median([s for s, _, _ in canon.values()], axis=0)
    med_extent = np.median([e for _, e, _ in canon.values()], axis=0)
    out = {}
    for cid, (spacing, extent, row) in canon.items():
        sr = np.maximum(spacing / med_spacing, med_spacing / spacing)
        er = np.maximum(extent / med_extent, med_extent / extent)
        if (sr > OUTLIER_SPACING_FACTOR).any() or (er > OUTLIER_EXTENT_FACTOR).any():
            out[cid] = (f"size {tuple(row['size'])} at spacing {tuple(round(s, 3) for s in row['spacing_mm'])} mm, "
                        f"extent {tuple(round(float(e)) for e in extent)} mm, vs the cohort's median spacing "
                        f"{tuple(round(float(s), 3) for s in med_spacing)} mm and extent "
                        f"{tuple(round(float(e)) for e in med_extent)} mm")
    return out


# ---------------------------------------------------------------------------------------------------------
# Ingestion into the catalog
# ---------------------------------------------------------------------------------------------------------
@dataclass
class IngestResult:
    cohort: str
    n_cases: int
    n_ok: int
    n_quarantined: int
    new: int
    changed: int
    unchanged: int
    removed: int
    n_issues: int
    cases_path: str
    issues_path: str
    notes: list[str] = field(default_factory=list)  # what discovery found and ignored

    def summary(self) -> str:
        line = (f"cohort {self.cohort}: {self.n_cases} cases ({self.n_ok} ok, {self.n_quarantined} quarantined); "
                f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged, {self.removed} removed; "
                f"{self.n_issues} issues")
        return "\n".join([line] + [f"  {note}" for note in self.notes])


def _clean(value):
    """Parquet round trips give NaN for missing strings and numpy arrays for lists; compare plain values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _previous_rows(previous: pd.DataFrame) -> dict[str, dict]:
    return {r["case_id"]: {k: _clean(v) for k, v in r.items()} for r in previous.to_dict("records")}


def _unchanged(case: SourceCase, prev: dict | None) -> bool:
    if prev is None:
        return False
    if (prev.get("image_path") or None) != case.image_path or (prev.get("label_path") or None) != case.label_path:
        return False
    try:
        image_stat = stat_fingerprint(case.image_files) if case.image_files else None
        label_stat = stat_fingerprint([case.label_path]) if case.label_path else None
    except OSError:
        return False
    return image_stat == (prev.get("image_stat") or None) and label_stat == (prev.get("label_stat") or None)


def ingest(
    source: str | Path,
    cohort: str,
    workspace: str | Path,
    labels: str | Path | None = None,
    modality: str | None = None,
    declared_labels: dict[int, str] | None = None,
    workers: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> IngestResult:
    """Add or refresh a cohort in the catalog. Only new or changed cases are read."""
    src = discover(source, labels)
    declared = declared_labels or src.declared_labels
    catalog = Catalog(workspace)
    cohort_modality = normalise_modality(modality) or src.modality

    with catalog.lock():
        all_cases = catalog.read("cases")
        all_issues = catalog.read("issues")
        previous = _previous_rows(all_cases[all_cases["cohort"] == cohort])
        prev_issues = all_issues[(all_issues["cohort"] == cohort)]
        # One pass over the previous issues, grouped by case: no per-case DataFrame filtering (O(cases x issues))
        prev_issue_records = prev_issues.to_dict("records")
        issues_of: dict[str, list[dict]] = {}
        for r in prev_issue_records:
            issues_of.setdefault(r["case_id"], []).append(r)
        now = utc_now()

        # a case whose reading killed its process last time is read again (the machine may have had less memory)
        retry = set(prev_issues.loc[prev_issues["code"] == "worker_died", "case_id"])
        todo, reused = [], []
        for case in src.cases:
            unchanged = case.case_id not in retry and _unchanged(case, previous.get(case.case_id))
            (reused if unchanged else todo).append(case)
        log.info("cohort %s: %d cases found in %s, %d to read, %d unchanged", cohort, len(src.cases), src.root,
                 len(todo), len(reused))
        for note in src.notes:
            log.info("cohort %s: %s", cohort, note)

        inspected = _inspect_all(todo, declared, workers, progress)

        rows, issue_rows = [], []
        new = changed = 0
        for case in reused:
            prev = dict(previous[case.case_id])
            rows.append(prev)
            issue_rows += [r for r in issues_of.get(case.case_id, ())
                           if r["stage"] == "ingest" and r["code"] != "geometry_outlier"]
        for case, result in zip(todo, inspected):
            prev = previous.get(case.case_id)
            same_content = prev is not None and prev.get("image_sha256") == result.get("image_sha256") \
                and prev.get("label_sha256") == result.get("label_sha256")
            if prev is None:
                new += 1
            elif not same_content:
                changed += 1
            rows.append({
                "cohort": cohort,
                "case_id": case.case_id,
                "patient_id": case.patient_id or case.case_id,
                "image_path": case.image_path,
                "label_path": case.label_path,
                "image_sha256": result.get("image_sha256"),
                "label_sha256": result.get("label_sha256"),
                "modality": cohort_modality or case.modality or "other",
                "size": result.get("size"),
                "spacing_mm": result.get("spacing_mm"),
                "status": None,
                "ingested_at": prev["ingested_at"] if same_content else now,
                "source_kind": src.kind,
                "origin_mm": result.get("origin_mm"),
                "direction": result.get("direction"),
                "pixel_type": result.get("pixel_type"),
                "image_files": case.image_files,
                "image_stat": result.get("image_stat"),
                "label_stat": result.get("label_stat"),
            })
            old_found = {}
            if same_content:
                old_found = {(r["code"], r["message"]): r["found_at"] for r in issues_of.get(case.case_id, ())}
            for issue in result["issues"]:
                issue_rows.append({"cohort": cohort, "case_id": case.case_id, "stage": "ingest",
                                   "found_at": old_found.get((issue["code"], issue["message"]), now), **issue})

        prev_outliers = {(r["case_id"], r["message"]): r["found_at"]
                         for r in prev_issue_records if r["code"] == "geometry_outlier"}
        for cid, message in geometry_outliers(rows).items():
            issue_rows.append({"cohort": cohort, "case_id": cid, "stage": "ingest", "code": "geometry_outlier",
                               "severity": WARNING, "path": None, "message": message,
                               "found_at": prev_outliers.get((cid, message), now)})
        # Problems found later (preprocessing) stay recorded while the case's content is unchanged.
        current = {(r["case_id"], r.get("image_sha256"), r.get("label_sha256")) for r in rows}
        for r in (r for r in prev_issue_records if r["stage"] != "ingest"):
            prev = previous.get(r["case_id"])
            if prev is not None and (r["case_id"], prev.get("image_sha256"), prev.get("label_sha256")) in current:
                issue_rows.append(r)

        errors = {r["case_id"] for r in issue_rows if r["severity"] == ERROR}
        for row in rows:
            row["status"] = "quarantined" if row["case_id"] in errors else "ok"
        removed = len(set(previous) - {c.case_id for c in src.cases})

        cases_df = pd.DataFrame(rows)
        issues_df = pd.DataFrame(issue_rows)
        other_cases = all_cases[all_cases["cohort"] != cohort]
        other_issues = all_issues[all_issues["cohort"] != cohort]
        catalog.write("cases", _concat(other_cases, cases_df).sort_values(["cohort", "case_id"]))
        catalog.write("issues", _concat(other_issues, issues_df))

    n_ok = int((cases_df["status"] == "ok").sum()) if len(cases_df) else 0
    return IngestResult(cohort, len(cases_df), n_ok, len(cases_df) - n_ok, new, changed,
                        len(reused) + (len(todo) - new - changed), removed, len(issues_df),
                        str(catalog.cases_path), str(catalog.issues_path), list(src.notes))


def _concat(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    frames = [f for f in (a, b) if len(f)]
    if not frames:
        return b if len(b.columns) else a
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


def _inspect_all(cases: list[SourceCase], declared, workers: int, progress) -> list[dict]:
    wrap = progress or (lambda it, **_: it)
    if workers > 1 and len(cases) > 16:
        return _inspect_in_processes(cases, declared, workers, wrap)
    return [inspect_case(c, declared) for c in wrap(cases, total=len(cases), desc="ingest")]


def _inspect_in_processes(cases: list[SourceCase], declared, workers: int, wrap) -> list[dict]:
    """inspect_case over worker processes. A worker that dies (an out-of-memory kill, a crash in a reader)
    breaks the pool: the cases in flight are then inspected one process each, the one whose process dies
    gets a `worker_died` issue, and the rest of the cohort goes on in a fresh pool."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    results: list[dict | None] = [None] * len(cases)
    todo = list(range(len(cases)))[::-1]  # a stack: pop() takes cases in order
    window = 2 * workers  # cases in flight: a dead worker makes only these suspects
    # spawn, not fork: the caller may be a multi-threaded Prefect process
    ctx = multiprocessing.get_context("spawn")
    bar = iter(wrap(_Ticks(len(cases)), total=len(cases), desc="ingest"))
    while todo:
        suspects: list[int] = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            running: dict = {}
            try:
                while todo or running:
                    while todo and len(running) < window:
                        i = todo.pop()
                        running[pool.submit(inspect_case, cases[i], declared)] = i
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[running[future]] = future.result()  # BrokenProcessPool: still in `running`
                        del running[future]
                        next(bar, None)
            except BrokenProcessPool:
                suspects = sorted(running.values())
        for i in suspects:  # one process each: the case that kills its process is found and recorded
            results[i] = _inspect_isolated(cases[i], declared, ctx)
            next(bar, None)
    for _ in bar:
        pass
    return results  # type: ignore[return-value]


class _Ticks:
    """An iterable of n ticks for the progress wrapper (which wants an iterable and a total)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _inspect_child(conn, inspect, case: SourceCase, declared) -> None:
    conn.send(inspect(case, declared))
    conn.close()


def _inspect_isolated(case: SourceCase, declared, ctx) -> dict:
    """inspect_case in a process of its own; its death becomes the case's `worker_died` issue."""
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_inspect_child, args=(sender, inspect_case, case, declared), daemon=True)
    process.start()
    sender.close()
    try:
        result = receiver.recv()  # EOFError when the child dies without answering
    except EOFError:
        result = None
    finally:
        receiver.close()
        process.join()
    if result is not None:
        return result
    code = process.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    hint = " (SIGKILL: usually the out-of-memory killer)" if code == -9 else ""
    return {"case_id": case.case_id,
            "issues": [_issue(c, p, m) for c, p, m in case.issues] +
                      [_issue("worker_died", case.image_path or case.label_path,
                              f"the process reading this case died ({how}{hint}); the case is read again on the "
                              f"next ingest")]}
