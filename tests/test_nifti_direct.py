"""The NIfTI reader without ITK (unet3d.io.read_nifti_direct) gives exactly what SimpleITK's reader gives, and
leaves every file it does not handle the same way to ITK (None)."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from unet3d.io import Geometry, read_case_voxels, read_image, read_label_voxels, read_nifti_direct, to_numpy
from unet3d.labels import as_label_values

SHARED_HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"


def assert_reads_as_itk(path: Path) -> None:
    direct = read_nifti_direct(path)
    assert direct is not None, f"{path.name} was left to ITK"
    image, reference = direct, sitk.ReadImage(str(path))
    assert image.GetSize() == reference.GetSize()
    assert image.GetPixelID() == reference.GetPixelID()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


def write_oriented(path: Path, seed: int, dtype) -> Path:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random((5 + seed % 4, 6, 7 + seed % 3)) * 100).astype(dtype))
    rotation = Rotation.random(random_state=seed).as_matrix()
    if seed % 2:
        rotation[:, 1] *= -1  # a left-handed frame: the qform's qfac is -1
    if seed % 5 == 0:
        rotation = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)  # permuted and flipped axes
    image.SetDirection(tuple(rotation.ravel()))
    image.SetSpacing(tuple(rng.uniform(0.3, 3, 3)))
    image.SetOrigin(tuple(rng.uniform(-200, 200, 3)))
    sitk.WriteImage(image, str(path))
    return path


DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64]


@pytest.mark.parametrize("seed", range(24))
def test_an_oriented_file_reads_as_itk_reads_it(tmp_path, seed):
    suffix = ".nii.gz" if seed % 3 else ".nii"
    assert_reads_as_itk(write_oriented(tmp_path / f"scan{suffix}", seed, DTYPES[seed % len(DTYPES)]))


def patch_header(path: Path, edits: dict[int, bytes]) -> Path:
    """The file with bytes of its (decompressed) header replaced; written back compressed when it was."""
    packed = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if packed else path.read_bytes())
    for offset, value in edits.items():
        raw[offset:offset + len(value)] = value
    path.write_bytes(gzip.compress(bytes(raw)) if packed else bytes(raw))
    return path


def test_a_big_endian_file_reads_as_itk_reads_it(tmp_path):
    path = write_oriented(tmp_path / "little.nii", 3, np.int16)
    raw = bytearray(path.read_bytes())
    swapped = bytearray(raw)
    # every header field this reader uses, and the voxels, in the other byte order
    for offset, kind, count in [(0, "i", 1), (40, "h", 8), (70, "h", 2), (76, "f", 8), (108, "f", 3),
                                (252, "h", 2), (256, "f", 6), (280, "f", 12)]:
        values = struct.unpack_from(f"<{count}{kind}", raw, offset)
        struct.pack_into(f">{count}{kind}", swapped, offset, *values)
    offset = int(struct.unpack_from("<f", raw, 108)[0])
    voxels = np.frombuffer(bytes(raw[offset:]), dtype="<i2")
    swapped[offset:] = voxels.astype(">i2").tobytes()
    big = tmp_path / "big.nii"
    big.write_bytes(bytes(swapped))
    assert_reads_as_itk(big)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read_nifti_direct(big)),
                                  sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))))


@pytest.mark.parametrize("what, edits", [
    ("no qform", {252: struct.pack("<h", 0)}),
    ("no sform (ITK's rotation from the qform alone rounds differently)", {254: struct.pack("<h", 0)}),
    ("an sform rotated against the qform", {256: struct.pack("<f", 0.3)}),
    ("an sform that is not the qform", {292: struct.pack("<f", 55.5)}),
    ("intensity scaling", {112: struct.pack("<f", 2.0)}),
    ("an intensity offset", {116: struct.pack("<f", 10.0)}),
    ("axes in metres", {123: bytes([1])}),
    ("a zero voxel size", {80: struct.pack("<f", 0.0)}),
    ("four dimensions", {40: struct.pack("<h", 4), 48: struct.pack("<h", 1)}),
    ("a separate .img file", {344: b"ni1\x00"}),
    ("a complex data type", {70: struct.pack("<h", 32)}),
])
def test_what_it_does_not_handle_as_itk_does_is_left_to_itk(tmp_path, what, edits):
    path = patch_header(write_oriented(tmp_path / "scan.nii.gz", 1, np.float32), edits)
    assert read_nifti_direct(path) is None, what


def test_nan_voxels_truncated_data_and_an_oversized_claim_are_left_to_itk(tmp_path):
    values = np.ones((6, 7, 8), np.float32)
    values[2, 3, 4] = np.nan
    nan_file = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(nan_file))
    assert read_nifti_direct(nan_file) is None  # ITK reads NaN as 0; the raw-data check counts them

    whole = write_oriented(tmp_path / "whole.nii", 2, np.int16)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(whole.read_bytes())[:-40])
    assert read_nifti_direct(truncated) is None
    short = tmp_path / "short.nii"
    short.write_bytes(whole.read_bytes()[:-10])
    assert read_nifti_direct(short) is None

    assert read_nifti_direct(whole, max_voxels=10) is None
    assert read_nifti_direct(tmp_path / "absent.nii.gz") is None


def test_read_image_reads_a_plain_nifti_file_without_itk(tmp_path, monkeypatch):
    path = write_oriented(tmp_path / "scan.nii.gz", 4, np.int16)
    reference = sitk.ReadImage(str(path))

    def no_itk(*_args, **_kwargs):
        raise AssertionError("ITK's file reader was used")

    monkeypatch.setattr(sitk, "ImageFileReader", no_itk)
    image = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


@pytest.mark.skipif(not SHARED_HIPPOCAMPUS.is_dir(), reason="the shared MSD hippocampus cohort is absent")
def test_every_file_of_the_real_cohort_reads_as_itk_reads_it():
    files = sorted(SHARED_HIPPOCAMPUS.glob("*Tr/*.nii.gz"))
    readable = []
    for path in files:
        try:
            sitk.ReadImage(str(path))
            readable.append(path)
        except RuntimeError:
            assert read_nifti_direct(path) is None  # what ITK cannot read is not read here either
    assert len(readable) > 400
    for path in readable:
        assert_reads_as_itk(path)


def assert_voxels_as_itk(path: Path, label: bool = False) -> None:
    """read_case_voxels / read_label_voxels give what to_numpy of read_image's SimpleITK image gives (the route
    preprocessing took before): the same values, dtype and (x, y, z) layout, a writable array, and the geometry
    Geometry.of that image gives, to the sign of its zeros (props.json records it: the preprocessed store's bytes
    must not change)."""
    reference = read_image(path)
    expected = as_label_values(to_numpy(reference)) if label else to_numpy(reference)
    voxels, geometry = read_label_voxels(path) if label else read_case_voxels([path], dicom=False)
    assert voxels.dtype == expected.dtype and voxels.shape == expected.shape
    assert voxels.flags.f_contiguous == expected.flags.f_contiguous and voxels.flags.writeable
    np.testing.assert_array_equal(voxels, expected)
    assert json.dumps(geometry.to_dict()) == json.dumps(Geometry.of(reference).to_dict())


@pytest.mark.parametrize("seed", range(12))
def test_case_voxels_read_without_itk_are_what_itk_gives(tmp_path, seed):
    suffix = ".nii.gz" if seed % 3 else ".nii"
    assert_voxels_as_itk(write_oriented(tmp_path / f"scan{suffix}", seed, DTYPES[seed % len(DTYPES)]))


def test_label_voxels_and_files_left_to_itk_read_as_itk_gives(tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, (6, 7, 8)).astype(np.float32)  # a float label file
    image = sitk.GetImageFromArray(labels)
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # RAS <-> LPS: zeros of both signs
    sitk.WriteImage(image, str(tmp_path / "label.nii.gz"))
    assert_voxels_as_itk(tmp_path / "label.nii.gz", label=True)
    sitk.WriteImage(image, str(tmp_path / "label.nrrd"))  # not NIfTI: read through ITK
    assert_voxels_as_itk(tmp_path / "label.nrrd", label=True)
    scaled = patch_header(write_oriented(tmp_path / "scaled.nii.gz", 1, np.float32), {112: struct.pack("<f", 2.0)})
    assert_voxels_as_itk(scaled)  # intensity scaling: left to ITK


@pytest.mark.skipif(not SHARED_HIPPOCAMPUS.is_dir(), reason="the shared MSD hippocampus cohort is absent")
def test_case_voxels_of_the_real_cohort_are_what_itk_gives():
    for path in sorted(SHARED_HIPPOCAMPUS.glob("imagesTr/*.nii.gz"))[:40]:
        assert_voxels_as_itk(path)
        assert_voxels_as_itk(path.parent.parent / "labelsTr" / path.name, label=True)
