"""Reorientation, cropping, resampling and their exact inverses."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from unet3d.io import Geometry, from_numpy, to_numpy
from unet3d.resample import (Normalisation, axis_taps, canonical_axes, canonical_geometry, from_canonical,
                             invert_labels, invert_probabilities, nonzero_bbox, preprocess_arrays, resample_labels,
                             resample_to_shape, to_canonical)

PERMUTATION_DIRECTIONS = []
for perm in itertools.permutations(range(3)):
    for signs in [(1, 1, 1), (-1, -1, 1), (1, -1, -1), (-1, 1, -1)]:
        d = np.zeros((3, 3))
        for col, row in enumerate(perm):
            d[row, col] = signs[col]
        PERMUTATION_DIRECTIONS.append(d)


@pytest.mark.parametrize("direction", PERMUTATION_DIRECTIONS[::3])
def test_canonical_orientation_keeps_every_voxel_in_place(direction):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, (5, 7, 9)).astype(np.int16)
    g = Geometry((5, 7, 9), (0.5, 1.0, 2.0), (10.0, -3.0, 4.0), tuple(direction.ravel()))
    perm, flips = canonical_axes(direction)
    canon = np.ascontiguousarray(to_canonical(arr, perm, flips))
    cg = canonical_geometry(g, perm, flips)
    assert np.allclose(np.asarray(cg.direction).reshape(3, 3), np.eye(3))
    original, reoriented = from_numpy(arr, g), from_numpy(canon, cg)
    for index in [(0, 0, 0), (4, 6, 8), (1, 2, 3), (4, 0, 8)]:
        point = original.TransformIndexToPhysicalPoint(index)
        assert original[index] == reoriented[reoriented.TransformPhysicalPointToIndex(point)]
    assert np.array_equal(from_canonical(canon, perm, flips), arr)


def test_oblique_direction_picks_the_nearest_axes():
    angle = np.deg2rad(20)
    d = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    assert canonical_axes(d) == ((0, 1, 2), (False, False, False))
    assert canonical_axes(-d) == ((0, 1, 2), (True, True, True))


def test_numpy_layout_matches_simpleitk():
    image = sitk.Image(4, 5, 6, sitk.sitkInt16)
    image[3, 1, 2] = 7
    arr = to_numpy(image)
    assert arr.shape == (4, 5, 6) and arr[3, 1, 2] == 7


def test_nearest_up_then_down_is_exact():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, (6, 5, 7)).astype(np.uint8)
    up = resample_to_shape(label, (12, 10, 14), 0)
    assert up.dtype == np.uint8
    assert np.array_equal(resample_to_shape(up, label.shape, 0), label)


def test_linear_and_cubic_reproduce_constants_and_ramps():
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4)).copy()
    for order in (1, 3):
        const = resample_to_shape(np.full((5, 6, 7), 3.5, np.float32), (9, 4, 11), order)
        assert np.allclose(const, 3.5, atol=1e-5)
        up = resample_to_shape(ramp, (20, 4, 4), order)
        centres = (np.arange(20) + 0.5) / 2 - 0.5
        margin = 0 if order == 1 else 1  # cubic taps reach one voxel further into the replicated border
        inner = (centres >= margin) & (centres <= 9 - margin)
        assert np.allclose(up[inner, 0, 0], centres[inner], atol=1e-4)


def test_axis_taps_weights_sum_to_one():
    for order in (0, 1, 3):
        idx, w = axis_taps(17, 9, order)
        assert np.allclose(w.sum(axis=0), 1.0, atol=1e-6)
        assert idx.min() >= 0 and idx.max() <= 16


def test_linear_label_resampling_matches_full_argmax():
    label = np.zeros((30, 28, 12), np.uint8)
    label[5:15, 6:17, 3:9] = 1
    label[8:11, 9:12, 4:7] = 2
    label[20:26, 20:25, 2:10] = 255  # ignore behaves like a class
    out_shape = (41, 19, 17)
    fast = resample_labels(label, out_shape, "linear")
    classes = np.unique(label)
    scores = np.stack([resample_to_shape((label == c).astype(np.float32), out_shape, 1) for c in classes])
    assert (fast == classes[np.argmax(scores, 0)]).mean() > 0.999
    assert set(np.unique(fast)) <= set(classes)


def test_bbox_covers_union_of_masks():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[2:4, 3:5, 1:2] = True
    b[7:9, 0:1, 5:9] = True
    assert nonzero_bbox(a, b) == ((2, 9), (0, 5), (1, 9))
    assert nonzero_bbox(np.zeros((3, 4, 5), bool)) == ((0, 3), (0, 4), (0, 5))


def _case(direction, spacing=(0.8, 0.8, 2.4)):
    rng = np.random.default_rng(2)
    image = np.zeros((30, 26, 12), np.float32)
    image[3:27, 2:24, 1:11] = rng.normal(100, 10, (24, 22, 10))
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 8:16, 3:8] = 1
    label[12:15, 9:12, 4:6] = 2
    g = Geometry(image.shape, spacing, (5.0, 6.0, -7.0), tuple(np.asarray(direction, float).ravel()))
    return image, label, g


@pytest.mark.parametrize("direction", [np.eye(3), PERMUTATION_DIRECTIONS[7], PERMUTATION_DIRECTIONS[17]])
def test_preprocess_then_invert_is_exact_for_nearest_integer_factor(direction):
    image, label, g = _case(direction)
    # target = half the spacing on every axis: integer factor, so nearest up- then down-sampling is exact
    canon_spacing = canonical_geometry(g, *canonical_axes(np.asarray(direction))).spacing
    target = [s / 2 for s in canon_spacing]
    pre, pre_label, props = preprocess_arrays(image, label, g, target, Normalisation("zscore"), label_mode="nearest")
    assert pre.dtype == np.float32 and pre_label.dtype == np.uint8
    assert list(pre.shape) == props.resampled_shape
    assert np.array_equal(invert_labels(pre_label, props, "nearest"), label)
    # foreground counts are recorded for the sampler
    assert props.foreground_voxels[1] > 0 and props.foreground_voxels[2] > 0


def test_zscore_and_ct_normalisation():
    image, label, g = _case(np.eye(3))
    pre, _, props = preprocess_arrays(image, label, g, g.spacing, Normalisation("zscore"))
    inside = pre[pre != 0]
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    ct = Normalisation("ct", clip_low=90.0, clip_high=110.0, mean=100.0, std=5.0)
    pre_ct, _, _ = preprocess_arrays(image, label, g, g.spacing, ct)
    assert pre_ct.min() >= (90 - 100) / 5 - 1e-5 and pre_ct.max() <= (110 - 100) / 5 + 1e-5


def test_invert_probabilities_puts_the_argmax_on_the_original_grid():
    image, label, g = _case(PERMUTATION_DIRECTIONS[5])
    canon_spacing = canonical_geometry(g, *canonical_axes(PERMUTATION_DIRECTIONS[5])).spacing
    _, pre_label, props = preprocess_arrays(image, label, g, canon_spacing, Normalisation("zscore"), label_mode="nearest")
    probs = np.stack([(pre_label == k).astype(np.float32) for k in range(3)])
    assert np.array_equal(invert_probabilities(probs, props), label)
