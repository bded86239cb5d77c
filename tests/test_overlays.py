"""Tests of unet3d.overlays' orientation: volumes are reoriented to LPS voxel order from their geometry, so one
scan stored with identity, flipped or permuted directions gives the same overlay PNG, and the three planes are
laid out in the radiological convention."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from unet3d import overlays
from unet3d.overlays import PLANES, overlay_png, plane_view, read_overlay_case, read_overlay_volume

SHAPE = (12, 10, 8)
SPACING = (0.8, 1.0, 2.5)
ORIGIN = (-20.0, 35.0, 10.0)


def _scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, reference and prediction (X, Y, Z) in LPS order with an L-shaped structure and a gradient along
    every axis, so that any flip or transposition of a plane changes its picture."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    reference = np.zeros(SHAPE, dtype=np.uint8)
    reference[2:6, 2:8, 2:6] = 1
    reference[6:10, 2:4, 2:4] = 1
    reference[3:5, 6:9, 5:7] = 2
    prediction = np.roll(reference, 1, axis=1)
    image = (0.05 * x + 0.03 * y + 0.02 * z + (reference > 0)).astype(np.float32)
    return image, reference, prediction


def _write(array: np.ndarray, path: Path, direction: np.ndarray, origin, spacing) -> str:
    volume = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    volume.SetSpacing(tuple(float(s) for s in spacing))
    volume.SetOrigin(tuple(float(o) for o in origin))
    volume.SetDirection(tuple(float(d) for d in np.asarray(direction, np.float64).ravel()))
    sitk.WriteImage(volume, str(path))
    return str(path)


def _store(array: np.ndarray, path: Path, layout: str) -> str:
    """Write an LPS-ordered array so that every voxel keeps its world position, in one of three layouts."""
    if layout == "identity":
        return _write(array, path, np.eye(3), ORIGIN, SPACING)
    if layout == "flipped":  # x stored from the patient's left to right: the origin is the last voxel's position
        origin = (ORIGIN[0] + (SHAPE[0] - 1) * SPACING[0], ORIGIN[1], ORIGIN[2])
        return _write(array[::-1], path, np.diag([-1.0, 1.0, 1.0]), origin, SPACING)
    if layout == "permuted":  # stored axis a is the LPS axis perm[a]: direction column a is that axis
        perm = (2, 0, 1)
        direction = np.zeros((3, 3))
        for stored_axis, lps_axis in enumerate(perm):
            direction[lps_axis, stored_axis] = 1.0
        return _write(array.transpose(perm), path, direction, ORIGIN, [SPACING[a] for a in perm])
    raise ValueError(layout)


def _render(tmp_path: Path, layout: str) -> np.ndarray:
    folder = tmp_path / layout
    folder.mkdir()
    image, reference, prediction = _scan()
    paths = [_store(a, folder / f"{name}.nii.gz", layout)
             for a, name in ((image, "image"), (reference, "reference"), (prediction, "prediction"))]
    volume, reference_voxels, prediction_voxels = read_overlay_case(paths[0], paths[2], paths[1])
    png = overlay_png(volume.voxels, reference_voxels, prediction_voxels, volume.spacing, folder / "overlay.png",
                      title="case", classes={1: "organ", 2: "lesion"}, origin_mm=volume.origin,
                      direction=volume.direction)
    return matplotlib.image.imread(png)


def test_overlays_of_one_scan_stored_in_three_orientations_are_identical(tmp_path):
    identity = _render(tmp_path, "identity")
    assert identity[..., :3].std() > 0.05
    for layout in ("flipped", "permuted"):
        pixels = _render(tmp_path, layout)
        assert pixels.shape == identity.shape, layout
        assert np.array_equal(pixels, identity), f"{layout}: {np.mean(np.any(pixels != identity, axis=-1)):.1%} " \
                                                 "of the pixels differ"


def test_reading_reorients_to_lps_without_resampling(tmp_path):
    image, _, _ = _scan()
    for layout in ("identity", "flipped", "permuted"):
        volume = read_overlay_volume(_store(image, tmp_path / f"{layout}.nii.gz", layout))
        np.testing.assert_array_equal(volume.voxels, image, err_msg=layout)
        np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
        np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)
        np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-6)


def test_planes_are_drawn_in_the_radiological_convention():
    # One bright voxel at the patient's right (x = 0 in LPS), anterior (y = 0) and superior (z = last) corner.
    volume = np.zeros(SHAPE)
    volume[0, 0, SHAPE[2] - 1] = 1.0
    views = {plane.name: plane_view(volume, plane, index)
             for plane, index in zip(PLANES, (SHAPE[2] - 1, 0, 0))}
    # Axial from the feet: right on the left, anterior at the top. Coronal from the front: right on the left,
    # superior at the top. Sagittal: anterior on the left, superior at the top.
    for name, view in views.items():
        assert view[0, 0] == 1.0 and view.sum() == 1.0, name
    assert views["axial"].shape == (SHAPE[1], SHAPE[0])
    assert views["coronal"].shape == (SHAPE[2], SHAPE[0])
    assert views["sagittal"].shape == (SHAPE[2], SHAPE[1])
    assert [p.edge_letters for p in PLANES] == [("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I")]


def test_slice_positions_are_named_in_patient_coordinates():
    axial, coronal, sagittal = PLANES
    position = overlays._slice_position
    assert position(axial, 3, SHAPE, SPACING, ORIGIN, np.eye(3)) == "S 17.5 mm"
    assert position(axial, 0, SHAPE, SPACING, (0.0, 0.0, -12.0), np.eye(3)) == "I 12.0 mm"
    assert position(coronal, 2, SHAPE, SPACING, ORIGIN, np.eye(3)) == "P 37.0 mm"
    assert position(sagittal, 5, SHAPE, SPACING, ORIGIN, np.eye(3)) == "R 16.0 mm"
    assert position(sagittal, 0, SHAPE, SPACING, (-0.04, 0.0, 0.0), np.eye(3)) == "L 0.0 mm"


def test_a_mask_on_another_voxel_grid_is_refused_by_name(tmp_path):
    image, reference, _ = _scan()
    image_path = _store(image, tmp_path / "image.nii.gz", "identity")
    shifted = _write(reference, tmp_path / "shifted_mask.nii.gz", np.eye(3), (0.0, 35.0, 10.0), SPACING)
    with pytest.raises(ValueError, match=r"prediction .*shifted_mask\.nii\.gz.* not on the voxel grid"):
        read_overlay_case(image_path, shifted)
    cropped = _write(reference[:, :, :4], tmp_path / "cropped_ref.nii.gz", np.eye(3), ORIGIN, SPACING)
    with pytest.raises(ValueError, match=r"reference .*cropped_ref\.nii\.gz"):
        read_overlay_case(image_path, image_path, cropped)
