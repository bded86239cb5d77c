"""Hostile inputs (issue 10, acceptance 3): a catalogue of bad input files and folders and of bad configs, each
run through the real entry point (`data_catalog.ingest.ingest`; `unet3d.config.load_config` then
`flows.preflight.preflight`) and classified as

- refused: a one-line error, or an issue row of the catalog, that names the case or the key;
- accepted: the bad thing is used (or dropped) without any issue, note or error (a bug);
- crash: another exception, an error naming neither the case nor the key, a multi-line error, or a hang.

Every kind must be refused. benchmarks/hostile_inputs.py runs the same catalogue and prints the table.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from image_files import write

REPO = Path(__file__).resolve().parent.parent
DICOM_SAMPLE = (REPO.parent / "shared" / "data" / "dicom_hippocampus_crop").resolve()
SHAPE = (8, 8, 8)
TIMEOUT_S = 60.0  # a kind that takes longer is a hang (a tiny file must never take long)

REFUSED, ACCEPTED, CRASH, SKIPPED = "refused", "silently accepted", "crash", "skipped"


class Skip(Exception):
    """This kind cannot be tried here (e.g. permissions when running as root)."""


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def blob(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def mask(shape=SHAPE, value=1, dtype=np.uint8) -> np.ndarray:
    m = np.zeros(shape, dtype)
    m[2:5, 2:6, 3:6] = value
    return m


def plain(tmp: Path, n_good: int = 2) -> tuple[Path, Path]:
    """images/ and labels/ folders with `n_good` fine cases."""
    images, labels = tmp / "images", tmp / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        write(images / f"good{i}.nii.gz", blob(seed=i))
        write(labels / f"good{i}.nii.gz", mask())
    return images, labels


def msd(tmp: Path, meta: object = "default", n_good: int = 2) -> Path:
    """An MSD folder (imagesTr, labelsTr, dataset.json declaring labels 0-2) with `n_good` fine cases."""
    root = tmp / "Task"
    for i in range(n_good):
        write(root / "imagesTr" / f"good{i}.nii.gz", blob(seed=i))
        write(root / "labelsTr" / f"good{i}.nii.gz", mask())
    if meta == "default":
        meta = {"name": "t", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
                "training": [{"image": f"./imagesTr/good{i}.nii.gz", "label": f"./labelsTr/good{i}.nii.gz"}
                             for i in range(n_good)]}
    if isinstance(meta, bytes):
        (root / "dataset.json").write_bytes(meta)
    elif meta is not None:
        (root / "dataset.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return root


def msd_add(root: Path, entry: dict) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(entry)
    (root / "dataset.json").write_text(json.dumps(meta))


def nifti_with_header(path: Path, array: np.ndarray, patch: Callable[[bytearray], None]) -> Path:
    """A .nii (uncompressed) of `array` whose raw header bytes are changed by `patch`."""
    tmp = path.with_name(path.name + ".src.nii")
    write(tmp, array)
    raw = bytearray(tmp.read_bytes())
    tmp.unlink()
    patch(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _set_pixdim(values) -> Callable[[bytearray], None]:
    """pixdim[1..3] (the spacing) and the sform/qform scaling that ITK also reads."""
    def patch(raw: bytearray) -> None:
        pixdim = np.frombuffer(bytes(raw[76:108]), "<f4").copy()
        pixdim[1:4] = values
        raw[76:108] = pixdim.tobytes()
        srow = np.frombuffer(bytes(raw[280:328]), "<f4").copy().reshape(3, 4)
        for axis, v in enumerate(values):
            srow[axis, axis] = v
        raw[280:328] = srow.astype("<f4").tobytes()
    return patch


def _claim_dims(dims) -> Callable[[bytearray], None]:
    def patch(raw: bytearray) -> None:
        d = np.frombuffer(bytes(raw[40:56]), "<i2").copy()
        d[1:4] = dims
        raw[40:56] = d.tobytes()
    return patch


def dicom_series(dest: Path) -> Path:
    if not DICOM_SAMPLE.is_dir():
        raise Skip(f"needs the DICOM sample {DICOM_SAMPLE}")
    shutil.copytree(DICOM_SAMPLE, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


# ---------------------------------------------------------------------------------------------------------
# Input kinds: each builds a source under tmp and says which case (or which words of an IngestError) must
# name the refusal
# ---------------------------------------------------------------------------------------------------------
@dataclass
class InputTrial:
    source: Path
    case: str | None = None  # the case that must get an issue row
    severity: str = "error"  # "error": the case is quarantined; "warning": an issue row is enough
    labels: Path | None = None
    names: tuple[str, ...] = ()  # or: an IngestError whose message contains one of these


@dataclass(frozen=True)
class InputKind:
    id: str
    what: str
    build: Callable[[Path], InputTrial]


def _zero_byte(tmp):
    images, labels = plain(tmp)
    (images / "empty.nii.gz").write_bytes(b"")
    write(labels / "empty.nii.gz", mask())
    return InputTrial(images, "empty", labels=labels)


def _zero_byte_label(tmp):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    (labels / "c.nii.gz").write_bytes(b"")
    return InputTrial(images, "c", labels=labels)


def _truncated_gz(tmp):
    images, labels = plain(tmp)
    data = write(images / "cut.nii.gz", blob()).read_bytes()
    (images / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    write(labels / "cut.nii.gz", mask())
    return InputTrial(images, "cut", labels=labels)


def _truncated_nii(tmp):
    images, labels = plain(tmp)
    data = write(images / "cut.nii", blob()).read_bytes()
    (images / "cut.nii").write_bytes(data[: len(data) - 700])
    write(labels / "cut.nii", mask())
    return InputTrial(images, "cut", labels=labels)


def _not_gzip(tmp):
    images, labels = plain(tmp)
    (images / "junk.nii.gz").write_bytes(os.urandom(3000))
    write(labels / "junk.nii.gz", mask())
    return InputTrial(images, "junk", labels=labels)


def _text_as_nii(tmp):
    images, labels = plain(tmp)
    (images / "notes.nii").write_text("patient notes, not an image\n" * 20)
    write(labels / "notes.nii", mask())
    return InputTrial(images, "notes", labels=labels)


def _unknown_datatype(tmp):
    """A .nii whose header's datatype code (offset 70) is 9999: no NIfTI type."""
    images, labels = plain(tmp)
    nifti_with_header(images / "hdr.nii", blob(),
                      lambda raw: raw.__setitem__(slice(70, 72), (9999).to_bytes(2, "little")))
    write(labels / "hdr.nii", mask())
    return InputTrial(images, "hdr", labels=labels)


def _voxels(tmp, value):
    images, labels = plain(tmp)
    data = blob()
    data[1, 2, 3] = value
    write(images / "bad.nii.gz", data)
    write(labels / "bad.nii.gz", mask())
    return InputTrial(images, "bad", labels=labels)


def _two_d(tmp):
    images, labels = plain(tmp)
    write(images / "flat.nii.gz", blob()[:, :, 0])
    write(labels / "flat.nii.gz", mask()[:, :, 0])
    return InputTrial(images, "flat", labels=labels)


def _four_d(tmp):
    images, labels = plain(tmp)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(blob(seed=i).T) for i in range(3)]),
                    str(images / "movie.nii.gz"))
    write(labels / "movie.nii.gz", mask())
    return InputTrial(images, "movie", labels=labels)


def _vector(tmp):
    images, labels = plain(tmp)
    write(images / "rgb.nrrd", np.random.default_rng(0).random(SHAPE + (3,)).astype(np.float32), vector=True)
    write(labels / "rgb.nrrd", mask())
    return InputTrial(images, "rgb", labels=labels)


def _label_value_undeclared(tmp):
    root = msd(tmp)
    write(root / "imagesTr" / "c.nii.gz", blob())
    write(root / "labelsTr" / "c.nii.gz", mask(value=7))
    msd_add(root, {"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"})
    return InputTrial(root, "c")


def _label_fractional(tmp):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    write(labels / "c.nii.gz", mask(value=0.5, dtype=np.float32))
    return InputTrial(images, "c", labels=labels)


def _label_float_integers(tmp):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    write(labels / "c.nii.gz", mask(dtype=np.float32))
    return InputTrial(images, "c", labels=labels, severity="warning")


def _label_negative(tmp):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    write(labels / "c.nii.gz", mask(value=-3, dtype=np.int16))
    return InputTrial(images, "c", labels=labels)


def _label_nan(tmp):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    m = mask(dtype=np.float32)
    m[0, 0, 0] = np.nan
    write(labels / "c.nii.gz", m)
    return InputTrial(images, "c", labels=labels)


def _label_empty(tmp):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    write(labels / "c.nii.gz", np.zeros(SHAPE, np.uint8))
    return InputTrial(images, "c", labels=labels, severity="warning")


def _mismatch(tmp, **label_kw):
    images, labels = plain(tmp)
    write(images / "c.nii.gz", blob())
    shape = label_kw.pop("shape", SHAPE)
    write(labels / "c.nii.gz", mask(shape=shape), **label_kw)
    return InputTrial(images, "c", labels=labels)


def _spacing(tmp, values):
    images, labels = plain(tmp)
    nifti_with_header(images / "c.nii", blob(), _set_pixdim(values))
    nifti_with_header(labels / "c.nii", mask(), _set_pixdim(values))
    return InputTrial(images, "c", labels=labels)


def _header_bomb(tmp):
    images, labels = plain(tmp)
    nifti_with_header(images / "bomb.nii.gz", np.ones((2, 2, 2), np.uint8), _claim_dims((2000, 2000, 2000)))
    write(labels / "bomb.nii.gz", mask())
    return InputTrial(images, "bomb", labels=labels)


def _header_claims_more_than_stored(tmp):
    """A header claiming 64^3 over 8^3 voxels of data: a truncated read, not zeros."""
    images, labels = plain(tmp)
    nifti_with_header(images / "short.nii", blob(), _claim_dims((64, 64, 64)))
    write(labels / "short.nii", mask())
    return InputTrial(images, "short", labels=labels)


def _symlink_outside(tmp):
    images, labels = plain(tmp)
    secret = write(tmp / "private" / "secret.nii.gz", blob())
    (images / "leak.nii.gz").symlink_to(secret)
    write(labels / "leak.nii.gz", mask())
    return InputTrial(images, "leak", labels=labels)


def _symlink_loop(tmp):
    images, labels = plain(tmp)
    (images / "loop_a.nii.gz").symlink_to("loop_b.nii.gz")
    (images / "loop_b.nii.gz").symlink_to("loop_a.nii.gz")
    write(labels / "loop_a.nii.gz", mask())
    return InputTrial(images, "loop_a", labels=labels)


def _symlink_loop_unlabelled(tmp):
    images, labels = plain(tmp)
    (images / "loop_a.nii.gz").symlink_to("loop_b.nii.gz")
    (images / "loop_b.nii.gz").symlink_to("loop_a.nii.gz")
    return InputTrial(images, "loop_a", labels=labels)


def _symlink_loop_msd(tmp):
    root = msd(tmp)
    (root / "imagesTr" / "loop.nii.gz").symlink_to("loop2.nii.gz")
    (root / "imagesTr" / "loop2.nii.gz").symlink_to("loop.nii.gz")
    write(root / "labelsTr" / "loop.nii.gz", mask())
    return InputTrial(root, "loop")


def _symlink_broken_unlabelled(tmp):
    images = tmp / "scans"
    write(images / "fine.nii.gz", blob())
    (images / "gone.nii.gz").symlink_to(tmp / "deleted.nii.gz")
    return InputTrial(images, "gone")


def _symlink_broken(tmp):
    images, labels = plain(tmp)
    (images / "gone.nii.gz").symlink_to(tmp / "deleted.nii.gz")
    write(labels / "gone.nii.gz", mask())
    return InputTrial(images, "gone", labels=labels)


def _unreadable(tmp):
    if os.geteuid() == 0:
        raise Skip("running as root: file permissions do not stop reading")
    images, labels = plain(tmp)
    write(images / "locked.nii.gz", blob()).chmod(0)
    write(labels / "locked.nii.gz", mask())
    return InputTrial(images, "locked", labels=labels)


def _directory_named_like_an_image(tmp):
    images, labels = plain(tmp)
    (images / "folder.nii.gz").mkdir()
    write(images / "folder.nii.gz" / "inner.nii.gz", blob())
    write(labels / "folder.nii.gz", mask())
    return InputTrial(images, "folder", labels=labels)


_NRRD = ("NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 8\nspacings: 1 1 1\nencoding: raw\nendian: little\n"
         "data file: {}\n\n")


def _nhdr_missing_data(tmp):
    images, labels = plain(tmp)
    (images / "detached.nhdr").write_text(_NRRD.format("detached.raw"))
    write(labels / "detached.nii.gz", mask())
    return InputTrial(images, "detached", labels=labels)


def _nhdr_outside(tmp):
    images, labels = plain(tmp)
    (tmp / "secret.raw").write_bytes(blob().tobytes())
    (images / "detached.nhdr").write_text(_NRRD.format("../secret.raw"))
    write(labels / "detached.nii.gz", mask())
    return InputTrial(images, "detached", labels=labels)


def _mha_bad_header(tmp):
    images, labels = plain(tmp)
    (images / "meta.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 eight 8\nElementType = MET_FLOAT\n"
                                      b"ElementDataFile = LOCAL\n" + blob().tobytes())
    write(labels / "meta.mha", mask())
    return InputTrial(images, "meta", labels=labels)


def _mha_short_data(tmp):
    images, labels = plain(tmp)
    (images / "meta.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementSpacing = 1 1 1\n"
                                      b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + blob().tobytes()[:500])
    write(labels / "meta.mha", mask())
    return InputTrial(images, "meta", labels=labels)


def _dicom_missing_slice(tmp):
    series = dicom_series(tmp / "scans" / "patient1")
    dicom_series(tmp / "scans" / "patient2")
    (series / "16.dcm").unlink()
    return InputTrial(tmp / "scans", "patient1")


def _dicom_corrupt_slice(tmp):
    series = dicom_series(tmp / "scans" / "patient1")
    dicom_series(tmp / "scans" / "patient2")
    data = bytearray((series / "16.dcm").read_bytes())
    data[300:700] = b"\xff" * 400
    (series / "16.dcm").write_bytes(bytes(data))
    return InputTrial(tmp / "scans", "patient1")


def _dicom_two_copies(tmp):
    """The same series twice in one folder (slices at the same positions): not one volume."""
    series = dicom_series(tmp / "scans" / "patient1")
    dicom_series(tmp / "scans" / "patient2")
    for f in sorted(DICOM_SAMPLE.iterdir()):
        shutil.copyfile(f, series / f"copy_{f.name}")
    return InputTrial(tmp / "scans", "patient1")


def _dicom_non_dicom_slice(tmp):
    """A file named like a slice that is not DICOM (a saved error page) among the slices."""
    series = dicom_series(tmp / "scans" / "patient1")
    dicom_series(tmp / "scans" / "patient2")
    (series / "99.dcm").write_text("<html><body>502 Bad Gateway</body></html>\n")
    return InputTrial(tmp / "scans", "patient1")


def _dataset_json(content: str, *words: str):
    def build(tmp):
        return InputTrial(msd(tmp, meta=content), names=("dataset.json",) + words)
    return build


def _msd_missing_files(tmp):
    root = msd(tmp)
    msd_add(root, {"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"})
    return InputTrial(root, "ghost")


def _msd_duplicate_ids(tmp):
    root = msd(tmp)
    msd_add(root, {"image": "./imagesTr/good0.nii.gz", "label": "./labelsTr/good1.nii.gz"})
    return InputTrial(root, "good0")


def _msd_image_without_label(tmp):
    root = msd(tmp)
    write(root / "imagesTr" / "lonely.nii.gz", blob())
    return InputTrial(root, "lonely")


def _msd_label_without_image(tmp):
    root = msd(tmp)
    write(root / "labelsTr" / "orphan.nii.gz", mask())
    return InputTrial(root, "orphan")


def _msd_entry_outside(tmp):
    root = msd(tmp)
    write(tmp / "elsewhere" / "x.nii.gz", blob())
    write(root / "labelsTr" / "x.nii.gz", mask())
    msd_add(root, {"image": "../elsewhere/x.nii.gz", "label": "./labelsTr/x.nii.gz"})
    return InputTrial(root, "x")


def _plain_image_without_label(tmp):
    images, labels = plain(tmp)
    write(images / "lonely.nii.gz", blob())
    return InputTrial(images, "lonely", labels=labels)


def _plain_label_without_image(tmp):
    images, labels = plain(tmp)
    write(labels / "orphan.nii.gz", mask())
    return InputTrial(images, "orphan", labels=labels)


def _plain_duplicate_ids(tmp):
    images, labels = plain(tmp)
    write(images / "twin.nii.gz", blob())
    write(images / "twin.nrrd", blob(seed=3))
    write(labels / "twin.nii.gz", mask())
    return InputTrial(images, "twin", labels=labels)


def _non_utf8_name(tmp):
    images, labels = plain(tmp)
    write(images / "latin.nii.gz", blob())
    os.rename(os.fsencode(images / "latin.nii.gz"), os.fsencode(images) + b"/caf\xe9.nii.gz")
    write(labels / "latin.nii.gz", mask())
    os.rename(os.fsencode(labels / "latin.nii.gz"), os.fsencode(labels) + b"/caf\xe9.nii.gz")
    # refused as a whole: the catalog cannot store the name, not even in an issue row
    return InputTrial(images, labels=labels, names=("caf\\xe9.nii.gz",))


def _ids_differing_by_case(tmp):
    images, labels = plain(tmp)
    for name in ("Brain1", "brain1"):
        write(images / f"{name}.nii.gz", blob())
        write(labels / f"{name}.nii.gz", mask())
    return InputTrial(images, "brain1", labels=labels)


def _very_long_name(tmp):
    images, labels = plain(tmp)
    long = "x" * 240
    write(images / f"{long}.nii.gz", blob())
    write(labels / f"{long}.nii.gz", mask())
    return InputTrial(images, long, labels=labels)


def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    return InputTrial(tmp / "empty", names=("no dataset.json",))


def _missing_folder(tmp):
    return InputTrial(tmp / "nowhere", names=("nowhere",))


def _source_is_a_file(tmp):
    path = write(tmp / "one.nii.gz", blob())
    return InputTrial(path, names=("one.nii.gz",))


def _missing_labels_folder(tmp):
    images, _ = plain(tmp)
    return InputTrial(images, labels=tmp / "no_labels_here", names=("no_labels_here",))


INPUT_KINDS: list[InputKind] = [
    InputKind("zero_byte_image", "0-byte .nii.gz image", _zero_byte),
    InputKind("zero_byte_label", "0-byte .nii.gz label", _zero_byte_label),
    InputKind("truncated_nii_gz", ".nii.gz cut in half", _truncated_gz),
    InputKind("truncated_nii", ".nii missing its last 700 bytes", _truncated_nii),
    InputKind("random_bytes_nii_gz", ".nii.gz of random bytes (not gzip)", _not_gzip),
    InputKind("text_as_nii", "a text file named .nii", _text_as_nii),
    InputKind("unknown_datatype", ".nii whose header datatype code is 9999", _unknown_datatype),
    InputKind("nan_voxels", "NaN voxel in a float image", lambda t: _voxels(t, np.nan)),
    InputKind("inf_voxels", "Inf voxel in a float image", lambda t: _voxels(t, np.inf)),
    InputKind("two_d", "2-D image and label", _two_d),
    InputKind("four_d", "4-D image (3 time points)", _four_d),
    InputKind("vector", "3-component vector image", _vector),
    InputKind("label_undeclared", "label value 7, dataset.json declares 0-2", _label_value_undeclared),
    InputKind("label_fractional", "float label with value 0.5", _label_fractional),
    InputKind("label_float_integers", "float label holding integers (warning)", _label_float_integers),
    InputKind("label_negative", "label value -3", _label_negative),
    InputKind("label_nan", "NaN in a float label", _label_nan),
    InputKind("label_empty", "label of background only (warning)", _label_empty),
    InputKind("size_mismatch", "label 8x8x9, image 8x8x8", lambda t: _mismatch(t, shape=(8, 8, 9))),
    InputKind("spacing_mismatch", "label spacing 1x1x1.5, image 1x1x1", lambda t: _mismatch(t, spacing=(1, 1, 1.5))),
    InputKind("origin_mismatch", "label origin shifted 5 mm", lambda t: _mismatch(t, origin=(0, 0, 5))),
    InputKind("direction_mismatch", "label x axis flipped", lambda t: _mismatch(
        t, direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))),
    # (a negative NIfTI scale is not here: it is a flipped axis, read as spacing 1 with direction -1)
    InputKind("spacing_zero", "NIfTI header spacing 0", lambda t: _spacing(t, (0.0, 1.0, 1.0))),
    InputKind("spacing_huge", "NIfTI header spacing 1000 mm", lambda t: _spacing(t, (1000.0, 1.0, 1.0))),
    InputKind("spacing_tiny", "NIfTI header spacing 0.0001 mm", lambda t: _spacing(t, (1e-4, 1.0, 1.0))),
    InputKind("header_bomb", "2x2x2 .nii.gz whose header claims 2000^3", _header_bomb),
    InputKind("header_claims_more", ".nii header claims 64^3 over 8^3 of data", _header_claims_more_than_stored),
    InputKind("symlink_outside", "symlink to a file outside the cohort", _symlink_outside),
    InputKind("symlink_loop", "two symlinks pointing at each other", _symlink_loop),
    InputKind("symlink_loop_unlabelled", "symlink loop, no label for it", _symlink_loop_unlabelled),
    InputKind("symlink_loop_msd", "symlink loop in imagesTr/", _symlink_loop_msd),
    InputKind("symlink_broken", "symlink to a deleted file", _symlink_broken),
    InputKind("symlink_broken_unlabelled", "symlink to a deleted file, plain folder without labels",
              _symlink_broken_unlabelled),
    InputKind("unreadable_permissions", "image with mode 000", _unreadable),
    InputKind("directory_named_nii_gz", "a folder named folder.nii.gz", _directory_named_like_an_image),
    InputKind("nhdr_data_missing", ".nhdr whose data file is missing", _nhdr_missing_data),
    InputKind("nhdr_data_outside", ".nhdr whose data file is ../secret.raw", _nhdr_outside),
    InputKind("mha_bad_header", ".mha with 'DimSize = 8 eight 8'", _mha_bad_header),
    InputKind("mha_short_data", ".mha with 500 of 2048 data bytes", _mha_short_data),
    InputKind("dicom_missing_slice", "DICOM series with a slice removed", _dicom_missing_slice),
    InputKind("dicom_corrupt_slice", "DICOM series with a slice overwritten", _dicom_corrupt_slice),
    InputKind("dicom_two_copies", "one folder holding the same series twice", _dicom_two_copies),
    InputKind("dicom_non_dicom_file", "an HTML page named 99.dcm among the slices", _dicom_non_dicom_slice),
    InputKind("dataset_json_null", "dataset.json: null", _dataset_json("null", "JSON object")),
    InputKind("dataset_json_list", "dataset.json: a list", _dataset_json("[1, 2]", "JSON object")),
    InputKind("dataset_json_training_5", 'dataset.json: "training": 5', _dataset_json('{"training": 5}', "'training'")),
    InputKind("dataset_json_entry_number", "dataset.json: an entry that is a number",
              _dataset_json('{"training": [5]}', "training[0]")),
    InputKind("dataset_json_image_5", 'dataset.json: "image": 5',
              _dataset_json('{"training": [{"image": 5, "label": "./labelsTr/good0.nii.gz"}]}', "training[0].image")),
    InputKind("dataset_json_labels_list", "dataset.json: labels as a list",
              _dataset_json('{"labels": ["background", "a"], "training": []}', "'labels'")),
    InputKind("dataset_json_not_json", "dataset.json: not JSON", _dataset_json("{training: [", "cannot be parsed")),
    InputKind("dataset_json_latin1", "dataset.json saved as Latin-1 (a label named Leber-\u00f6)", _dataset_json(
        '{"labels": {"0": "background", "1": "Leber-\u00f6"}, "training": []}'.encode("latin-1"), "cannot be parsed")),
    InputKind("dataset_json_modality_string", 'dataset.json: "modality": "CT"',
              _dataset_json('{"modality": "CT", "training": []}', "'modality'")),
    InputKind("msd_missing_files", "dataset.json lists files that do not exist", _msd_missing_files),
    InputKind("msd_duplicate_case_ids", "dataset.json lists one case id twice", _msd_duplicate_ids),
    InputKind("msd_entry_outside", "dataset.json entry ../elsewhere/x.nii.gz", _msd_entry_outside),
    InputKind("msd_image_without_label", "imagesTr file without a label", _msd_image_without_label),
    InputKind("msd_label_without_image", "labelsTr file without an image", _msd_label_without_image),
    InputKind("plain_image_without_label", "image without a label (--labels given)", _plain_image_without_label),
    InputKind("plain_label_without_image", "label without an image", _plain_label_without_image),
    InputKind("plain_duplicate_case_ids", "twin.nii.gz and twin.nrrd", _plain_duplicate_ids),
    InputKind("non_utf8_file_name", "file name with byte 0xE9 (Latin-1)", _non_utf8_name),
    InputKind("ids_differ_only_by_case", "Brain1 and brain1", _ids_differing_by_case),
    InputKind("very_long_name", "a 240-character file name", _very_long_name),
    InputKind("empty_source", "an empty source folder", _empty_folder),
    InputKind("missing_source", "a source folder that does not exist", _missing_folder),
    InputKind("source_is_a_file", "a file given as the source folder", _source_is_a_file),
    InputKind("missing_labels_folder", "--labels folder that does not exist", _missing_labels_folder),
]


# ---------------------------------------------------------------------------------------------------------
# Configs: each is a change to a good config (or raw YAML text) and the key its refusal must name
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigKind:
    id: str
    key: str  # the refusal's message must contain this
    change: dict = field(default_factory=dict)  # top-level sections replaced (None: section removed)
    train: dict | None = None  # merged into the train section
    text: str | None = None  # raw YAML instead ($BASE: the good config without its train section)
    encoding: str = "utf-8"  # of the config file
    ingested: bool = False  # the cohort is in the workspace's catalog first (data-dependent checks)


def _stage(name="s", classes=None, **kw) -> dict:
    return {"name": name, "classes": {1: "a", 2: "b"} if classes is None else classes, **kw}


CONFIG_KINDS: list[ConfigKind] = [
    ConfigKind("unknown_top_level_key", "trian", {"trian": {"max_epochs": 3}}),
    ConfigKind("unknown_train_key", "max_epoch", train={"max_epoch": 10}),
    ConfigKind("wrong_type_epochs", "max_epochs", train={"max_epochs": "ten"}),
    ConfigKind("epochs_zero", "max_epochs", train={"max_epochs": 0}),
    ConfigKind("epochs_negative", "max_epochs", train={"max_epochs": -5}),
    ConfigKind("lr_inf", "lr", text="$BASEtrain: {lr: .inf}\n"),
    ConfigKind("lr_nan", "lr", text="$BASEtrain: {lr: .nan}\n"),
    ConfigKind("lr_zero", "lr", train={"lr": 0}),
    ConfigKind("lr_negative", "lr", train={"lr": -0.01}),
    ConfigKind("time_limit_inf", "time_limit_min", text="$BASEtrain: {time_limit_min: .inf}\n"),
    ConfigKind("patch_zero", "patch_size", train={"patch_size": [0, 0, 0]}),
    ConfigKind("patch_negative", "patch_size", train={"patch_size": [-16, 32, 32]}),
    ConfigKind("patch_two_values", "patch_size", train={"patch_size": [32, 32]}),
    ConfigKind("patch_larger_than_every_image", "train.patch_size", train={"patch_size": [256, 256, 256]},
               ingested=True),
    ConfigKind("batch_zero", "batch_size", train={"batch_size": 0}),
    ConfigKind("oversample_above_one", "foreground_oversample", train={"foreground_oversample": 2}),
    ConfigKind("dropout_one", "dropout", train={"dropout": 1.0}),
    ConfigKind("unknown_architecture", "architecture", train={"architecture": "transformer9000"}),
    ConfigKind("unknown_optimizer", "optimizer", train={"optimizer": "adam"}),
    ConfigKind("unknown_device", "device", train={"device": "tpu"}),
    ConfigKind("features_one_level", "features", train={"features": [16]}),
    ConfigKind("ratios_1_0_0", "infer.splits", {"split": {"ratios": [1, 0, 0]}}),
    ConfigKind("ratios_not_summing_to_1", "ratios", {"split": {"ratios": [0.5, 0.3, 0.1]}}),
    ConfigKind("ratios_two_values", "ratios", {"split": {"ratios": [0.8, 0.2]}}),
    ConfigKind("ratios_negative", "ratios", {"split": {"ratios": [1.2, -0.1, -0.1]}}),
    ConfigKind("infer_splits_empty", "infer.splits", {"infer": {"splits": []}}),
    ConfigKind("infer_splits_duplicate", "infer.splits", {"infer": {"splits": ["test", "test"]}}),
    ConfigKind("infer_splits_unknown", "infer.splits", {"infer": {"splits": ["holdout"]}}),
    ConfigKind("overlap_one", "overlap", {"infer": {"overlap": 1.0}}),
    ConfigKind("overlap_negative", "overlap", {"infer": {"overlap": -0.5}}),
    ConfigKind("classes_empty", "classes", {"stages": [_stage(classes={})]}),
    ConfigKind("labels_empty", "labels", {"labels": {}}),
    ConfigKind("labels_background_listed", "labels", {"labels": {0: "background", 1: "a", 2: "b"}}),
    ConfigKind("labels_negative_value", "labels", {"labels": {-1: "a", 1: "a", 2: "b"}}),
    ConfigKind("no_labels_no_stages", "stages", {"labels": None}),
    ConfigKind("duplicate_yaml_key", "duplicate key 'train'", text="$BASEtrain: {max_epochs: 3}\ntrain: {lr: 0.1}\n"),
    ConfigKind("yaml_is_a_list", "mapping", text="- cohort\n- labels\n"),
    ConfigKind("yaml_is_a_scalar", "mapping", text="just some words\n"),
    ConfigKind("yaml_syntax_error", "line", text="cohort: {name: h\nlabels: [1\n"),
    ConfigKind("yaml_python_tag", "python", text="cohort: !!python/object/apply:os.system [echo hi]\n"),
    ConfigKind("cohort_missing", "cohort", {"cohort": None}),
    ConfigKind("config_latin1", "UTF-8", {"labels": {1: "Leber-\u00f6", 2: "b"}}, encoding="latin-1"),
    ConfigKind("cohort_name_space", "cohort.name", {"cohort": {"name": "my cohort", "source": "$SOURCE"}}),
    ConfigKind("cohort_name_non_ascii", "cohort.name", {"cohort": {"name": "leber-\u00f6", "source": "$SOURCE"}}),
    ConfigKind("cohort_name_dotdot", "cohort.name", {"cohort": {"name": "..", "source": "$SOURCE"}}),
    ConfigKind("cohort_modality_unknown", "modality",
               {"cohort": {"name": "h", "source": "$SOURCE", "modality": "PET"}}),
    ConfigKind("stage_name_escape", "stages.0.name", {"stages": [_stage(name="../../x")]}),
    ConfigKind("roi_from_missing_stage", "roi_from", {"stages": [_stage(name="a"), _stage(name="b", roi_from="nope")]}),
    ConfigKind("roi_from_cycle", "roi_from",
               {"stages": [_stage(name="a", roi_from="b"), _stage(name="b", roi_from="a")]}),
    ConfigKind("stages_three", "stages", {"stages": [_stage(name="a"), _stage(name="b"), _stage(name="c")]}),
    ConfigKind("stages_same_name", "stages", {"stages": [_stage(name="a"), _stage(name="a", roi_from="a")]}),
    ConfigKind("margin_negative", "margin_mm", {"stages": [_stage(margin_mm=-5)]}),
    ConfigKind("spacing_factor_zero", "spacing_factor", {"stages": [_stage(spacing_factor=0)]}),
    ConfigKind("spacing_factor_inf", "spacing_factor", text="$BASEstages: [{name: s, classes: {1: a, 2: b}, "
                                                           "spacing_factor: .inf}]\n"),
    ConfigKind("merge_undeclared_label", "merge", {"stages": [_stage(classes={1: "a"}, merge={1: [1, 9]})]}),
    ConfigKind("target_spacing_zero", "target_spacing", {"preprocess": {"target_spacing": [0, 1, 1]}}),
    ConfigKind("target_spacing_nan", "target_spacing", text="$BASEpreprocess: {target_spacing: [.nan, 1, 1]}\n"),
    ConfigKind("target_spacing_inf", "target_spacing", text="$BASEpreprocess: {target_spacing: [.inf, 1, 1]}\n"),
    ConfigKind("workers_zero", "workers", {"preprocess": {"workers": 0}}),
    ConfigKind("memory_limit_words", "memory_limit", {"preprocess": {"memory_limit": "lots"}}),
    ConfigKind("labels_not_matching_dataset_json", "labels", {"labels": {1: "a", 3: "c"}}),
    ConfigKind("missing_source_folder", "cohort.source", {"cohort": {"name": "h", "source": "$TMP/nowhere"}}),
    ConfigKind("source_is_a_file", "cohort.source", {"cohort": {"name": "h", "source": "$TMP/c.yaml"}}),
    ConfigKind("missing_labels_dir", "cohort.labels_dir", {"cohort": {"name": "h", "source": "$SOURCE",
                                                                      "labels_dir": "$TMP/nowhere"}}),
    ConfigKind("n_boot_negative", "n_boot", {"evaluate": {"n_boot": -1}}),
    ConfigKind("connectivity_5", "lesion_connectivity", {"evaluate": {"lesion_connectivity": 5}}),
]


# ---------------------------------------------------------------------------------------------------------
# Running one kind
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    outcome: str
    message: str


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _with_timeout(fn: Callable[[], object]) -> tuple[object, BaseException | None, bool]:
    """fn() in a thread: (its result, its exception, whether it finished within TIMEOUT_S)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 (classified by the caller)
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    return box.get("result"), box.get("error"), not thread.is_alive()


def _crash(exc: BaseException) -> Outcome:
    return Outcome(CRASH, f"{type(exc).__name__}: {_one_line(exc)[:200]}")


def run_input_kind(kind: InputKind, tmp: Path) -> Outcome:
    from data_catalog.ingest import IngestError, ingest
    from data_catalog.tables import Catalog

    try:
        trial = kind.build(tmp)
    except Skip as exc:
        return Outcome(SKIPPED, str(exc))
    ws = tmp / "ws"
    result, error, finished = _with_timeout(lambda: ingest(trial.source, "h", ws, labels=trial.labels, workers=1))
    if not finished:
        return Outcome(CRASH, f"no answer within {TIMEOUT_S:.0f} s (a hang)")
    if error is not None:
        message = str(error)
        if isinstance(error, IngestError) and "\n" not in message and any(n in message for n in trial.names):
            return Outcome(REFUSED, message)
        if isinstance(error, IngestError):
            return Outcome(CRASH, f"IngestError naming neither the case nor the key: {_one_line(message)[:200]}")
        return _crash(error)
    if trial.case is None:
        return Outcome(ACCEPTED, f"ingested without error ({result.summary().splitlines()[0]})")
    cases = Catalog(ws).cases(cohort="h")
    issues = Catalog(ws).read("issues")
    mine = issues[(issues["cohort"] == "h") & (issues["case_id"].str.lower().str.startswith(trial.case.lower()))] \
        if len(issues) else issues
    rows = mine.to_dict("records") if len(mine) else []
    for row in rows:
        if "\n" in str(row["message"]):
            return Outcome(CRASH, f"multi-line issue message: {_one_line(row['message'])[:200]}")
    wanted = [r for r in rows if r["severity"] == "error" or trial.severity == "warning"]
    if wanted:
        status = cases.set_index("case_id")["status"].to_dict()
        if trial.severity == "error" and not any(status.get(r["case_id"]) == "quarantined" for r in wanted):
            return Outcome(ACCEPTED, f"issue recorded but the case is not quarantined: {wanted[0]['message']}")
        row = wanted[0]
        return Outcome(REFUSED, f"{row['case_id']}: {row['code']}: {_one_line(row['message'])[:200]}")
    notes = [n for n in result.notes if trial.case in n]
    if notes and trial.case not in set(cases["case_id"]):
        return Outcome(REFUSED, f"not a case; ingest note: {_one_line(notes[0])[:200]}")
    if rows:
        return Outcome(ACCEPTED, f"only a warning: {rows[0]['code']}: {_one_line(rows[0]['message'])[:150]}")
    present = [c for c in cases["case_id"] if str(c).lower().startswith(trial.case.lower())]
    if present:
        status = cases.set_index("case_id").loc[present[0], "status"]
        return Outcome(ACCEPTED, f"case {present[0]!r} ingested as {status} with no issue")
    return Outcome(ACCEPTED, "dropped without an issue, a note or an error")


def _base_config(tmp: Path) -> tuple[dict, Path]:
    """A good config over a tiny MSD cohort whose dataset.json declares labels 1 and 2."""
    source = tmp / "cohort"
    if not source.exists():
        msd(source, n_good=1)
    return {"cohort": {"name": "h", "source": str(source / "Task"), "modality": "MRI"},
            "labels": {1: "a", 2: "b"}, "train": {"max_epochs": 1}}, source / "Task"


def config_text(kind: ConfigKind, tmp: Path) -> str:
    base, source = _base_config(tmp)
    if kind.text is not None:
        head = dict(base)
        head.pop("train")
        return kind.text.replace("$BASE", yaml.safe_dump(head))
    data = json.loads(json.dumps(base))
    for section, value in kind.change.items():
        if value is None:
            data.pop(section, None)
        else:
            data[section] = value
    if kind.train:
        data["train"].update(kind.train)
    text = yaml.safe_dump(data, allow_unicode=True)
    return text.replace("$SOURCE", str(source)).replace("$TMP", str(tmp))


def run_config_kind(kind: ConfigKind, tmp: Path) -> Outcome:
    from flows.preflight import preflight
    from unet3d.config import ConfigError, load_config

    path = tmp / "c.yaml"
    path.write_text(config_text(kind, tmp), encoding=kind.encoding)
    ws = tmp / "ws"

    def check():
        cfg = load_config(path)
        if kind.ingested:
            from data_catalog.ingest import ingest
            ingest(cfg.cohort.source, cfg.cohort.name, ws)
        preflight(cfg.model_dump(mode="json"), str(ws))

    _, error, finished = _with_timeout(check)
    if not finished:
        return Outcome(CRASH, f"no answer within {TIMEOUT_S:.0f} s (a hang)")
    if error is None:
        return Outcome(ACCEPTED, "load_config and preflight accepted it")
    message = str(error)
    if isinstance(error, ConfigError):
        if "\n" in message:
            return Outcome(CRASH, f"multi-line ConfigError: {_one_line(message)[:200]}")
        if kind.key not in message:
            return Outcome(CRASH, f"ConfigError not naming {kind.key!r}: {message[:200]}")
        return Outcome(REFUSED, message[:300])
    return _crash(error)


# ---------------------------------------------------------------------------------------------------------
# The tests: every kind refused
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", INPUT_KINDS, ids=[k.id for k in INPUT_KINDS])
def test_a_bad_input_is_refused_naming_the_case(kind, tmp_path):
    outcome = run_input_kind(kind, tmp_path)
    if outcome.outcome == SKIPPED:
        pytest.skip(outcome.message)
    assert outcome.outcome == REFUSED, f"{kind.what}: {outcome.outcome}: {outcome.message}"


@pytest.mark.parametrize("kind", CONFIG_KINDS, ids=[k.id for k in CONFIG_KINDS])
def test_a_bad_config_is_refused_naming_the_key(kind, tmp_path):
    outcome = run_config_kind(kind, tmp_path)
    assert outcome.outcome == REFUSED, f"{kind.id}: {outcome.outcome}: {outcome.message}"


def test_the_good_config_and_the_good_inputs_pass(tmp_path):
    """The baseline every kind changes is itself accepted: a refusal is about the bad part."""
    from data_catalog.ingest import ingest
    from flows.preflight import preflight
    from unet3d.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(config_text(ConfigKind("good", ""), tmp_path))
    preflight(load_config(path).model_dump(mode="json"), str(tmp_path / "ws"))
    images, labels = plain(tmp_path / "plain")
    result = ingest(images, "p", tmp_path / "ws", labels=labels)
    assert result.n_ok == 2 and result.n_issues == 0
    result = ingest(msd(tmp_path / "msd"), "m", tmp_path / "ws")
    assert result.n_ok == 2 and result.n_issues == 0


def test_non_ascii_config_and_dataset_json_are_read_as_utf8_whatever_the_locale(tmp_path):
    """GDCM (DICOM) sets the C locale in-process, after which Python's default text encoding is ASCII: a label
    named Leber-\u00f6 then ended load_config and ingestion with a UnicodeDecodeError."""
    import locale

    from data_catalog.ingest import ingest
    from flows.preflight import preflight
    from unet3d.config import load_config

    root = msd(tmp_path / "msd", meta={"labels": {"0": "background", "1": "Leber-\u00f6", "2": "b"}, "training": []})
    path = tmp_path / "c.yaml"
    path.write_text(config_text(ConfigKind("good", "", {"labels": {1: "Leber-\u00f6", 2: "b"},
                                                        "cohort": {"name": "h", "source": str(root)}}), tmp_path),
                    encoding="utf-8")
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        cfg = load_config(path)
        preflight(cfg.model_dump(mode="json"), str(tmp_path / "ws"))
        assert ingest(root, "m", tmp_path / "ws").n_ok == 2
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert cfg.labels[1] == "Leber-\u00f6"


def test_the_catalogue_holds_at_least_the_issues_kinds():
    assert len(INPUT_KINDS) >= 40 and len(CONFIG_KINDS) >= 32
    assert len({k.id for k in INPUT_KINDS}) == len(INPUT_KINDS)
    assert len({k.id for k in CONFIG_KINDS}) == len(CONFIG_KINDS)
