"""Validation of one case (hash, read, check) and of the cohort as a whole (geometry outliers), as issue rows
with stable codes (ISSUE_CODES). An `error` quarantines its case, a `warning` does not.

inspect_case never raises for a bad case: every problem it finds becomes an issue row, so the rest of the
cohort goes on. It runs in worker processes for large cohorts (data_catalog.ingest).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from unet3d.io import (Geometry, ImageTooLarge, detached_data_files, dicom_slice_positions, nifti_nonfinite_voxels,
                       read_case_image, read_nifti_direct, to_numpy)
from unet3d.resample import canonical_axes, label_counts

from .channels import sha256_channels
from .discover import SourceCase, is_inside
from .hashing import sha256_file, sha256_files, stat_fingerprint


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
    "case_id_too_long": (ERROR, "the case id is too long to become a file name in the workspace"),
    "channel_missing": (ERROR, "a multi-channel case lacks one of its channel files (CASE_0000, CASE_0001, ...)"),
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


def issue_row(code: str, path: str | None, message: str) -> dict:
    """A row of the issues table for `code` (its severity from ISSUE_CODES), less cohort, case and time."""
    severity, _ = ISSUE_CODES[code]
    return {"code": code, "severity": severity, "path": path, "message": message}


def _check_spacing(spacing, path) -> list[dict]:
    lo, hi = PLAUSIBLE_SPACING_MM
    bad = [s for s in spacing if not np.isfinite(s) or s < lo or s > hi]
    if bad:
        return [issue_row("spacing_implausible", path, f"spacing {tuple(round(s, 6) for s in spacing)} mm is outside "
                                                       f"[{lo}, {hi}] mm")]
    return []


def _check_nifti_pixdim(file: str, path: str) -> list[dict]:
    """A NIfTI-1 header whose voxel size (pixdim) is 0 or not finite on an axis: ITK reads that axis as 1 mm,
    silently, so the spacing the pipeline would use is made up."""
    import gzip
    import zlib

    if not file.lower().endswith((".nii", ".nii.gz")):
        return []
    try:
        with (gzip.open if file.lower().endswith(".gz") else open)(file, "rb") as f:
            raw = f.read(348)
    except (OSError, EOFError, zlib.error):
        return []  # reading the voxels reports it
    for order in ("<", ">"):
        if len(raw) == 348 and int(np.frombuffer(raw[:4], f"{order}i4")[0]) == 348:
            ndim = int(np.frombuffer(raw[40:42], f"{order}i2")[0])
            pixdim = np.frombuffer(raw[76:108], f"{order}f4")[1:1 + min(max(ndim, 0), 3)]
            if (pixdim == 0).any() or not np.isfinite(pixdim).all():
                return [issue_row("spacing_implausible", path, f"the NIfTI header's voxel size (pixdim) "
                                                               f"{tuple(float(p) for p in pixdim)} has a zero or "
                                                               f"non-finite axis: read as 1 mm, the spacing would be "
                                                               f"made up")]
    return []


def inspect_case(case: SourceCase, declared_labels: dict[int, str] | None) -> dict:
    """Hash and validate one case. Returns the case's catalog fields and its issues (never raises)."""
    out: dict = {"case_id": case.case_id, "issues": [issue_row(c, p, m) for c, p, m in case.issues]}
    image_geometry = None
    if case.image_files:
        path = case.image_path
        try:
            out["image_sha256"] = sha256_channels(case.image_files) if case.n_channels > 1 else \
                sha256_file(case.image_files[0]) if len(case.image_files) == 1 and case.source_kind != "dicom" \
                else sha256_files(case.image_files)
            out["image_stat"] = stat_fingerprint(case.image_files)
        except OSError as exc:
            out["issues"].append(issue_row("unreadable", path, f"cannot read file: {exc}"))
        if case.source_kind == "dicom":
            out["issues"] += _check_dicom_slices(case.image_files, path)
        image, raw_checked = _read_checked(case.image_files, case.source_kind == "dicom", "image", path, case.roots,
                                           out["issues"])
        if image is not None:
            image_geometry = Geometry.of(image)
            out.update(_geometry_fields(image_geometry))
            out["pixel_type"] = image.GetPixelIDTypeAsString()
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                out["issues"].append(issue_row("not_3d", path, f"image {_not_3d_description(image)}"))
            else:
                out["issues"] += _check_spacing(image_geometry.spacing, path) or \
                    (_check_nifti_pixdim(case.image_files[0], path) if case.source_kind != "dicom" and not raw_checked
                     else [])
                voxels = to_numpy(image)
                n_bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels))) \
                    if np.issubdtype(voxels.dtype, np.floating) else 0
                if case.source_kind != "dicom" and not raw_checked:
                    try:  # ITK reads NIfTI NaN as 0 and may accept a truncated .nii.gz: check the raw data
                        n_bad = max(n_bad, nifti_nonfinite_voxels(case.image_files[0]) or 0)
                    except ValueError as exc:
                        out["issues"].append(issue_row("unreadable", path, str(exc)))
                if n_bad:
                    out["issues"].append(issue_row("non_finite", path, f"{n_bad} NaN/Inf voxels"))
            del image
        if case.n_channels > 1:
            out["issues"] += _check_channels(case, image_geometry)
    if case.label_path:
        path = case.label_path
        try:
            out["label_sha256"] = sha256_file(path)
            out["label_stat"] = stat_fingerprint([path])
        except OSError as exc:
            out["issues"].append(issue_row("unreadable", path, f"cannot read file: {exc}"))
        label, raw_checked = _read_checked([path], False, "label", path, case.roots, out["issues"])
        if label is not None:
            lg = Geometry.of(label)
            if image_geometry is None:
                out.update(_geometry_fields(lg))  # an orphan label still gets its geometry reported
                out["pixel_type"] = None
            if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
                out["issues"].append(issue_row("not_3d", path, f"label {_not_3d_description(label)}"))
            else:
                if image_geometry is not None and image_geometry.ndim == 3:
                    out["issues"] += _compare_geometry(image_geometry, lg, path)
                out["issues"] += _check_label_values(to_numpy(label), declared_labels, path)
                try:
                    if not raw_checked and nifti_nonfinite_voxels(path):
                        out["issues"].append(issue_row("label_non_integer", path, "label holds NaN/Inf voxels"))
                except ValueError as exc:
                    out["issues"].append(issue_row("unreadable", path, str(exc)))
    return out


def inspect_cases(inspect, cases: list[SourceCase], declared_labels: dict[int, str] | None) -> list[dict]:
    """`inspect` (inspect_case, or a test's stand-in) of each case: one task of ingest's worker pool. It lives
    here, beside inspect_case, because a worker imports the module of the function it runs, and this one is
    light (the ingest module imports pandas: 0.3 s more per worker process)."""
    return [inspect(case, declared_labels) for case in cases]


def _check_dicom_slices(files: list[str], path: str) -> list[dict]:
    """Slice positions of a DICOM series (from the headers) must be evenly spaced: a missing or unreadable
    slice makes ITK read the series with a wrong spacing and only warn on stderr."""
    try:
        positions = np.sort(dicom_slice_positions(files))
    except ValueError as exc:
        return [issue_row("unreadable", path, str(exc))]
    if len(positions) < 2:
        return []
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    if spacing <= 0:
        return [issue_row("dicom_slices_missing", path, f"{int((gaps == 0).sum())} slices share a position: "
                                                        f"duplicated slices, not one volume")]
    bad = np.flatnonzero(np.abs(gaps - spacing) > DICOM_SLICE_GAP_TOLERANCE * spacing)
    if not len(bad):
        return []
    missing = int(round(float(np.sum(gaps[bad] / spacing - 1))))
    i = int(bad[0])
    return [issue_row("dicom_slices_missing", path,
                      f"slice positions are not evenly spaced: a gap of {gaps[i]:.4g} mm after {positions[i]:.4g} mm "
                      f"where the series' spacing is {spacing:.4g} mm ({len(bad)} uneven gap(s), about {max(missing, 0)} "
                      f"slice(s) missing); read as one volume its spacing would be wrong")]


def _read_checked(files: list[str], dicom: bool, what: str, path: str, roots: tuple[str, ...],
                  issues: list[dict]) -> tuple[object | None, bool]:
    """(read_case_image, whether its raw data was checked): None with an issue for a header naming a data file
    outside the cohort (path_outside_cohort, not read), a header claiming too many voxels (too_large, refused
    before reading), or a read error. The raw data is checked when a NIfTI file was read without ITK
    (read_nifti_direct): it was then whole, finite and of a valid voxel size, so it needs no second read."""
    if roots and not dicom:
        try:
            escaping = [f for f in detached_data_files(files[0]) if not any(is_inside(Path(r), f) for r in roots)]
        except OSError:
            escaping = []  # the read below reports it
        if escaping:
            issues.append(issue_row("path_outside_cohort", path, f"the {what}'s header reads its voxels from "
                                                                 f"{escaping[0]}, outside the cohort folder: not read"))
            return None, False
    if not dicom and len(files) == 1:
        direct = read_nifti_direct(files[0])
        if direct is not None:
            return direct, True
    try:
        return read_case_image(files, dicom), False
    except ImageTooLarge as exc:  # refused from the header, before any voxel is read
        issues.append(issue_row("too_large", path, f"{what} {_first_line(exc)}"))
    except Exception as exc:  # SimpleITK raises RuntimeError with ITK's message
        issues.append(issue_row("unreadable", path, f"SimpleITK cannot read the {what}: {_first_line(exc)}"))
    return None, False


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
    return what + ("); expected a single 3-D volume (one channel): a multi-channel case is one file per channel, "
                   "CASE_0000, CASE_0001, ..." if len(shape) > 3 else "); expected a single 3-D volume (one channel)")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with file:line noise; the last non-empty line is usually the reason
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _geometry_fields(g) -> dict:
    return {"size": list(g.size), "spacing_mm": list(g.spacing), "origin_mm": list(g.origin), "direction": list(g.direction)}


def _compare_geometry(image, label, path, what: str = "label", reference: str = "image") -> list[dict]:
    """Geometry of `label` (or of another image: `what`) against `image` (`reference`), within the tolerances."""
    issues = []
    if tuple(image.size) != tuple(label.size):
        issues.append(issue_row("size_mismatch", path, f"{what} size {label.size} != {reference} size {image.size}"))
    if not np.allclose(image.spacing, label.spacing, rtol=SPACING_RTOL, atol=0):
        issues.append(issue_row("spacing_mismatch", path, f"{what} spacing {tuple(round(s, 5) for s in label.spacing)} != "
                                                          f"{reference} spacing {tuple(round(s, 5) for s in image.spacing)}"))
    atol = ORIGIN_ATOL_FRACTION * min(image.spacing)
    if not np.allclose(image.origin, label.origin, rtol=0, atol=atol):
        issues.append(issue_row("origin_mismatch", path, f"{what} origin {tuple(round(o, 3) for o in label.origin)} != "
                                                         f"{reference} origin {tuple(round(o, 3) for o in image.origin)} "
                                                         f"(tolerance {atol:.3g} mm)"))
    if not np.allclose(image.direction, label.direction, rtol=0, atol=DIRECTION_ATOL):
        issues.append(issue_row("direction_mismatch", path, f"{what} direction {tuple(round(d, 4) for d in label.direction)} "
                                                            f"!= {reference} direction {tuple(round(d, 4) for d in image.direction)}"))
    return issues


def _check_channels(case: SourceCase, first: Geometry | None) -> list[dict]:
    """The image checks for channels 1, 2, ... of a multi-channel case (channel 0 is checked as the case's image),
    and their geometry against channel 0: co-registered channels share size, spacing, origin and direction."""
    issues: list[dict] = []
    for channel, file in enumerate(case.image_files[1:], start=1):
        name = f"case {case.case_id}: channel {channel} ({Path(file).name})"
        image, raw_checked = _read_checked([file], False, f"channel {channel}", file, case.roots, issues)
        if image is None:
            continue
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            issues.append(issue_row("not_3d", file, f"{name} {_not_3d_description(image)}"))
            continue
        geometry = Geometry.of(image)
        issues += _check_spacing(geometry.spacing, file) or ([] if raw_checked else _check_nifti_pixdim(file, file))
        if first is not None and first.ndim == 3:
            issues += _compare_geometry(first, geometry, file, what=name, reference="channel 0")
        voxels = to_numpy(image)
        n_bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels))) if np.issubdtype(voxels.dtype, np.floating) else 0
        try:
            n_bad = max(n_bad, 0 if raw_checked else nifti_nonfinite_voxels(file) or 0)
        except ValueError as exc:
            issues.append(issue_row("unreadable", file, f"{name}: {exc}"))
        if n_bad:
            issues.append(issue_row("non_finite", file, f"{name}: {n_bad} NaN/Inf voxels"))
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
            return [issue_row("label_non_integer", path, f"{bad.size} label voxels are not integers "
                                                         f"(e.g. {float(bad.ravel()[0]):.4g})")]
        issues.append(issue_row("label_float_dtype", path, f"label stored as {values.dtype}; its values are integers"))
        values = values.astype(np.int64)
    present = label_counts(values)[0]  # sorted values; a histogram, far cheaper than np.unique on a volume
    allowed = set(declared) if declared else None
    if allowed is not None:
        allowed.add(0)
        undeclared = [int(v) for v in present if int(v) not in allowed]
        if undeclared:
            issues.append(issue_row("label_undeclared", path, f"label values {_few(undeclared)} are not declared "
                                                              f"(declared: {sorted(allowed)})"))
    elif (present < 0).any():
        issues.append(issue_row("label_undeclared", path, f"negative label values {_few([int(v) for v in present if v < 0])}"
                                                          f" (an image, not a mask?)"))
    if not (present != 0).any():
        issues.append(issue_row("label_empty", path, "label holds only background (0)"))
    return issues


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
