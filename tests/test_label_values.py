"""One rule for reading label files: every reader (preprocessing, evaluation, volumes, overlays) gets the same
integer values from a float label file, as ingestion's check (values are integers) assumes."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from unet3d.evaluation import read_reference
from unet3d.io import read_label_image
from unet3d.labels import as_label_values
from unet3d.overlays import reference_classes


def test_as_label_values_rounds_floats_and_picks_the_smallest_type():
    assert as_label_values(np.array([0.0, 0.9999999, 2.0000002], np.float32)).tolist() == [0, 1, 2]
    assert as_label_values(np.array([0.0, 1.0], np.float32)).dtype == np.uint8
    assert as_label_values(np.array([0, 300], np.float64)).dtype == np.uint16
    assert as_label_values(np.array([-1, 2], np.float64)).dtype == np.int64  # kept, for validation to name it
    assert as_label_values(np.array([1, 2], np.int16), np.int64).dtype == np.int64
    ints = np.array([3, 4], np.uint8)
    assert as_label_values(ints) is ints  # integer arrays are not copied


def test_readers_agree_on_a_float_label_file(tmp_path):
    values = np.zeros((6, 5, 4), np.float32)
    values[1:3, 1:3, 1:3] = 0.99999994  # float32 noise around integer labels, as some MSD label files carry
    values[3:5, 2:4, 1:3] = 2.0000002
    image = sitk.GetImageFromArray(np.transpose(values, (2, 1, 0)))
    image.SetSpacing((1.0, 1.5, 2.0))
    path = tmp_path / "label.nii.gz"
    sitk.WriteImage(image, str(path))
    expected = np.rint(values).astype(np.int64)
    read, _ = read_label_image(path)
    reference, spacing = read_reference(path)
    assert np.array_equal(read, expected) and read.dtype == np.uint8
    assert np.array_equal(reference, expected) and spacing == (1.0, 1.5, 2.0)
    assert np.array_equal(reference_classes(values, {1: 1, 2: 2}), expected)
