"""Discovery of a cohort's cases in a source folder, without reading any voxel.

Three kinds of source (SPEC):
- `msd`: an MSD / nnU-Net folder with `dataset.json`, `imagesTr/`, `labelsTr/` (and optional `imagesTs/`);
- `folder`: a plain folder of images, with an optional folder of labels matched by case id;
- `dicom`: a folder searched recursively for DICOM series; every series is one case.

What discovery already knows is wrong with a case (a label without image, a symlink leaving the cohort, ...)
travels with the case as (code, path, message) tuples; data_catalog.validate turns them into issue rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from unet3d.io import dicom_series, is_image_file, read_dicom_tags, strip_image_suffix

from .channels import attach_channels, channel_groups, cohort_channel_count, first_file_per_case


# A case id becomes file and folder names (CASE__<16 hex>, CASE.nii.gz): with their suffixes they must stay under
# the 255-byte limit of common file systems.
MAX_CASE_ID_BYTES = 200


class IngestError(Exception):
    """The source as a whole cannot be ingested (missing folder, unreadable dataset.json ...)."""


@dataclass
class SourceCase:
    case_id: str
    image_files: list[str] | None  # one file, a DICOM series' slices in order, or a case's channel files in order
    label_path: str | None
    patient_id: str | None = None
    source_kind: str = "folder"
    modality: str | None = None
    issues: list[tuple[str, str, str]] = field(default_factory=list)  # (code, path, message) found at discovery
    roots: tuple[str, ...] = ()  # folders the case's files (and the data files their headers name) must stay in
    # a scan given without a label on purpose (MSD imagesTs/ or a dataset.json test entry, cohort.unlabelled_source):
    # segmented, never trained on; an image whose label is missing where labels belong stays label_missing
    unlabelled: bool = False

    @property
    def n_channels(self) -> int:
        """Image files that are channels of the case (data_catalog.channels); a DICOM series is one channel."""
        return 1 if self.source_kind == "dicom" or not self.image_files else len(self.image_files)

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
    _check_case_names(src.cases)
    return src


def _check_case_names(cases: list[SourceCase]) -> None:
    """Names the catalog or the workspace cannot hold. A file name that is not UTF-8 cannot be stored at all
    (Parquet strings are UTF-8): the ingest is refused naming the file. A case id too long for a file name, or
    one differing from another only in letter case (one file on macOS, Windows and SMB shares), is an issue of
    its case."""
    first_of: dict[str, str] = {}  # case-folded id -> the first case id
    for case in cases:
        for name in [*(case.image_files or []), case.label_path or "", *(p for _, p, _ in case.issues), case.case_id]:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(name).decode("utf-8", "backslashreplace")
                raise IngestError(f"{shown}: the file name is not valid UTF-8 and the catalog stores names as UTF-8: "
                                  f"rename the file (e.g. convmv -f latin1 -t utf8)") from None
        where = case.image_path or case.label_path or ""
        if len(case.case_id.encode("utf-8")) > MAX_CASE_ID_BYTES:
            case.issues.append(("case_id_too_long", where, f"case id {case.case_id[:40]}... is "
                                f"{len(case.case_id.encode('utf-8'))} bytes, more than {MAX_CASE_ID_BYTES}: it becomes "
                                f"file names in the workspace (rename the file)"))
        first = first_of.setdefault(case.case_id.casefold(), case.case_id)
        if first != case.case_id:
            case.issues.append(("duplicate_case_id", where, f"case ids {first} and {case.case_id} differ only in "
                                f"letter case: on a case-insensitive file system (macOS, Windows, SMB shares) their "
                                f"files in the workspace are the same files"))


def _case_id_from_file(path: Path) -> str:
    stem = strip_image_suffix(path.name)
    # nnU-Net v2 names the first channel CASE_0000
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    return stem


def _resolve(path: Path) -> Path:
    """path.resolve(), or the path itself for a symlink loop (where resolve raises): the case then holds a file
    that cannot be read and is reported unreadable, instead of ending the ingest."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path


def is_inside(root: Path, path: Path) -> bool:
    """Whether `path`, its symlinks resolved, lies inside the folder `root`."""
    try:
        _resolve(path).relative_to(root)
        return True
    except ValueError:
        return False


def _outside_issue(root: Path, link: Path) -> tuple[str, str, str]:
    return ("path_outside_cohort", str(link), f"{link.relative_to(link.parent.parent)} is a symlink to {_resolve(link)}, "
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
            # JSON is UTF-8 (RFC 8259); the locale's encoding may be ASCII (GDCM sets the C locale)
            meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
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
            case.unlabelled = kind == "test"
            for rel, is_label in ((image_rel, False), (label_rel, True)):
                if rel is None:
                    continue
                path = root / rel
                if not is_inside(root, path):
                    case.issues.append(("path_outside_cohort", str(rel),
                                        f"dataset.json {'label' if is_label else 'image'} entry {rel!r} resolves outside {root}"))
                    continue
                path = _resolve(path)
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
                            seen_images.add(_resolve(v2))
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
    unlisted_images = sorted(p for p in images_dir.glob("*") if is_image_file(p) and _resolve(p) not in seen_images) \
        if images_dir.is_dir() else []
    for link in unlisted_images:
        cid = _case_id_from_file(link)
        if cid in cases and cases[cid].image_files:
            continue
        case = cases.get(cid) or SourceCase(case_id=cid, image_files=None, label_path=None, source_kind="msd", modality=modality)
        cases[cid] = case
        if not is_inside(root, link):
            case.issues.append(_outside_issue(root, link))
            continue
        image = _resolve(link)
        case.image_files = [str(image)]
        label = labels_dir / (cid + file_ending)
        if not label.exists():
            label = labels_by_id.get(cid, label)
        if label.exists():
            seen_labels.add(_resolve(label))
            if is_inside(root, label):
                case.label_path = str(_resolve(label))
            else:
                case.issues.append(_outside_issue(root, label))
        else:
            case.issues.append(("label_missing", str(image), f"image {link.name} has no label in labelsTr/"))
    if labels_dir.is_dir():
        for link in sorted(p for p in labels_dir.glob("*") if is_image_file(p)):
            label = _resolve(link)
            if label in seen_labels:
                continue
            cid = _case_id_from_file(link)
            outside = None if is_inside(root, link) else _outside_issue(root, link)
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
    _add_msd_test_images(root, cases, seen_images, modality)
    groups = channel_groups(p for folder in (images_dir, root / "imagesTs") if folder.is_dir()
                            for p in sorted(folder.glob("*")) if is_image_file(p))
    declared_channels = len(mod) if isinstance(mod, dict) else None
    notes += attach_channels(cases.values(), groups, cohort_channel_count(groups, declared_channels),
                             lambda p: _resolve(p) if is_inside(root, p) else None, lambda p: _outside_issue(root, p))
    return Source("msd", root, sorted(cases.values(), key=lambda c: c.case_id), declared, modality, notes)


def _add_msd_test_images(root: Path, cases: dict[str, SourceCase], seen_images: set[Path], modality) -> None:
    """imagesTs/ files that dataset.json does not list: unlabelled cases (MSD's test images have no labels)."""
    tests_dir = root / "imagesTs"
    if not tests_dir.is_dir():
        return
    for link in sorted(p for p in tests_dir.glob("*") if is_image_file(p) and _resolve(p) not in seen_images):
        cid = _case_id_from_file(link)
        if cid in cases and cases[cid].unlabelled:
            continue  # listed in dataset.json's test entries, or another channel file of the same case
        case = SourceCase(case_id=cid, image_files=None, label_path=None, source_kind="msd", modality=modality,
                          unlabelled=True)
        if cid in cases:
            case.issues.append(("duplicate_case_id", str(link), f"imagesTs/{link.name} has the case id {cid} of a "
                                                                f"training case"))
            case.case_id = f"{cid}__imagesTs"
        if is_inside(root, link):
            case.image_files = [str(_resolve(link))]
        else:
            case.issues.append(_outside_issue(root, link))
        cases[case.case_id] = case


def discover_unlabelled(source: str | Path, n_channels: int = 1) -> Source:
    """A folder of scans without labels (`cohort.unlabelled_source`): each image file, or each DICOM series when the
    folder holds no image file, is an unlabelled case. No file is taken for a mask here, whatever its name.
    `n_channels`: the cohort's channels per case (data_catalog.channels): a scan's files CASE_0000, CASE_0001 ... are
    its channels, and a scan lacking one is channel_missing; in a single-channel cohort only CASE_0000 is read."""
    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        raise IngestError(f"unlabelled source folder {source} does not exist")
    entries = _image_files(root)
    if entries:
        groups = channel_groups(link for link, _target in entries)
        cases: dict[str, SourceCase] = {}
        for link, target, cid in first_file_per_case([(lk, t, _case_id_from_file(lk)) for lk, t in entries], groups):
            case = SourceCase(case_id=cid, image_files=[str(target)] if target else None, label_path=None,
                              source_kind="folder", unlabelled=True,
                              issues=[] if target else [_outside_issue(root, link)])
            if cid in cases:
                case.issues.append(("duplicate_case_id", str(link), f"{link.name} and another file of {root} both "
                                                                    f"give case id {cid}"))
                case.case_id = f"{cid}__{link.name}"
            cases[case.case_id] = case
        notes = [f"{len(cases)} unlabelled scans in {root}"]
        notes += attach_channels(cases.values(), groups, n_channels, dict(entries).get, lambda p: _outside_issue(root, p))
        ignored = sorted(p.name for g in groups.values() for channel, p in g.items() if channel >= 1)
        if n_channels == 1 and ignored:
            notes.append(f"{', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''} ignored: the cohort's cases "
                         f"have one channel (CASE_0000)")
        src = Source("folder", root, sorted(cases.values(), key=lambda c: c.case_id), None, None, notes)
    else:
        src = _discover_dicom(root, None)
        if not src.cases:
            raise IngestError(f"unlabelled source {root}: no image files (.nii.gz .nii .nrrd .mha ...) and no DICOM "
                              f"series found")
        src.notes.append(f"{len(src.cases)} unlabelled DICOM series in {root}")
    for case in src.cases:
        case.unlabelled = True
        case.roots = (str(root),)
    _check_case_names(src.cases)
    return src


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
                try:
                    is_file = entry.is_file()
                except OSError:  # a symlink loop (ELOOP)
                    is_file = False
                if not is_file:  # broken, a loop, or a folder: kept, so that its case is reported unreadable
                    out.append((path, path))
                    continue
                out.append((path, path.resolve() if is_inside(folder, path) else None))
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


def label_files_by_case_id(folder: str | Path) -> dict[str, Path]:
    """{case id: label file} of a folder of label files named as a labels folder's are (CASE.nii.gz, CASE_seg.nrrd,
    CASE_label.mha ...): the dense references of sparsely annotated cases (`cohort.dense_labels_dir`). Symlinks
    leading outside the folder are left out, as ingestion refuses them."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise IngestError(f"dense labels folder {folder} does not exist")
    found: dict[str, Path] = {}
    for link, target in _image_files(root):
        if target is None:
            continue
        stem = strip_image_suffix(link.name)
        found.setdefault(_strip_role(stem, LABEL_NAME_SUFFIXES) or _case_id_from_file(link), target)
    return found


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
    # A case's channel files (X_0000, X_0001, ...) are one case, not duplicates: its first file stands for it here
    groups = channel_groups(link for link, _target, _cid in images)
    n_channels = cohort_channel_count(groups)
    if n_channels > 1:
        images = first_file_per_case(images, groups)
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
    targets = {link: target for link, target, _cid in entries}
    notes += attach_channels(cases.values(), groups, n_channels, targets.get, lambda p: _outside_issue(root, p))
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
        # a file named .dcm that is not DICOM (an error page saved by a download) is a slice that is not there
        broken = sorted(f for f in files if f not in placed and (_dicom_magic(Path(folder) / f)
                                                                 or f.lower().endswith(".dcm")))
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
            escaping = [Path(f) for f in slices if not is_inside(root, Path(f))]
            if escaping:
                case.image_files = None
                case.issues.append(_outside_issue(root, escaping[0]))
            if labels_dir is not None:
                matches = [p for p in labels_dir.iterdir() if is_image_file(p) and _case_id_from_file(p) == cid]
                if matches:
                    case.label_path = str(matches[0].resolve())
            cases[cid] = case
    return Source("dicom", root, sorted(cases.values(), key=lambda c: c.case_id), None, None)
