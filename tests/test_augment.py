"""Tests for unet3d.augment: batched on-device augmentation of (image, label) patches."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from unet3d.augment import AugmentConfig, BatchAugmenter, rotation_matrices, warp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def all_off(**enabled) -> AugmentConfig:
    """A config with every probability 0, then the given fields set."""
    zeros = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}
    return AugmentConfig(**{**zeros, **enabled})


def everything_on(**overrides) -> AugmentConfig:
    ones = {f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}
    return AugmentConfig(**{**ones, **overrides})


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_batch(shape=(2, 1, 16, 20, 12), device="cpu", label_dtype=torch.uint8, seed=0):
    """Smooth random image and a label with classes 0..3 and an ignore (255) block, all in the middle."""
    g = torch.Generator().manual_seed(seed)
    b, c, x, y, z = shape
    image = torch.nn.functional.interpolate(
        torch.randn(b, c, 4, 4, 4, generator=g), size=(x, y, z), mode="trilinear", align_corners=True
    )
    label = torch.zeros(b, 1, x, y, z, dtype=label_dtype)
    label[:, :, x // 4 : 3 * x // 4, y // 4 : 3 * y // 4, z // 4 : 3 * z // 4] = 1
    label[:, :, x // 4 : x // 2, y // 4 : y // 2, z // 4 : 3 * z // 4] = 2
    label[:, :, x // 2 : 3 * x // 4, y // 2 : 3 * y // 4, z // 4 : z // 2] = 3
    label[:, :, 3 * x // 8 : 5 * x // 8, 3 * y // 8 : 5 * y // 8, 3 * z // 8 : 5 * z // 8] = 255
    return image.to(device), label.to(device)


def ball_label(size: int, radius: float) -> torch.Tensor:
    centre = (size - 1) / 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    inside = ((grid - centre) ** 2).sum(0) <= radius**2
    return inside.to(torch.uint8)[None, None]


# ---- identity and flips ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_all_probabilities_zero_is_identity(device, label_dtype):
    image, label = make_batch(device=device, label_dtype=label_dtype)
    out_image, out_label = BatchAugmenter(all_off())(image, label, generator(0, device))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)
    assert (out_image.dtype, out_label.dtype) == (image.dtype, label_dtype)
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert out_image.device == image.device and out_label.device == label.device


def test_inputs_are_not_modified():
    image, label = make_batch(shape=(3, 2, 12, 12, 10))
    image_before, label_before = image.clone(), label.clone()
    BatchAugmenter(everything_on())(image, label, generator(1))
    assert torch.equal(image, image_before) and torch.equal(label, label_before)


def test_flip_all_axes_equals_torch_flip_and_twice_restores():
    image, label = make_batch()
    augment = BatchAugmenter(all_off(p_flip=1.0))
    once_image, once_label = augment(image, label, generator(0))
    assert torch.equal(once_image, image.flip((2, 3, 4)))
    assert torch.equal(once_label, label.flip((2, 3, 4)))
    twice_image, twice_label = augment(once_image, once_label, generator(1))
    assert torch.equal(twice_image, image) and torch.equal(twice_label, label)


def test_flip_axes_restricts_flipping():
    image, label = make_batch()
    out_image, out_label = BatchAugmenter(all_off(p_flip=1.0, flip_axes=(1,)))(image, label, generator(0))
    assert torch.equal(out_image, image.flip(3)) and torch.equal(out_label, label.flip(3))


def test_random_flips_are_per_sample_and_exact():
    image, label = make_batch(shape=(8, 1, 6, 8, 5))
    image = image + torch.arange(8.0).view(8, 1, 1, 1, 1)  # samples distinguishable
    out_image, out_label = BatchAugmenter(all_off(p_flip=0.5))(image, label, generator(3))
    patterns = []
    for b in range(8):
        matches = [
            dims
            for r in range(4)
            for dims in itertools.combinations((1, 2, 3), r)
            if torch.equal(out_image[b], image[b].flip(dims) if dims else image[b])
        ]
        assert matches, f"sample {b} is not a flip of its input"
        dims = matches[0]
        assert torch.equal(out_label[b], label[b].flip(dims) if dims else label[b])
        patterns.append(dims)
    assert len(set(patterns)) > 1, "with p=0.5 on 8 samples the flip patterns should differ"


# ---- rotation, scale, elastic ---------------------------------------------------------------------


def test_rotation_matrix_quarter_turn_matches_rot90():
    image, label = make_batch(shape=(2, 2, 12, 12, 7))
    matrix = rotation_matrices(torch.tensor([[0.0, 0.0, math.pi / 2]] * 2))
    out_image, out_label = warp(image, label, matrix)
    assert torch.equal(out_label, torch.rot90(label, k=1, dims=(3, 2)))
    torch.testing.assert_close(out_image, torch.rot90(image, k=1, dims=(3, 2)), atol=1e-5, rtol=0)
    # About x the same convention: output (y, z) reads input (-z, y).
    cube_image, cube_label = make_batch(shape=(1, 1, 5, 10, 10))
    x_matrix = rotation_matrices(torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    assert torch.equal(warp(cube_image, cube_label, x_matrix)[1], torch.rot90(cube_label, k=1, dims=(4, 3)))


def test_quarter_turn_on_non_square_plane_lands_on_voxel_centres():
    """X != Y catches mixing up normalised and voxel units: output (i, j) reads input (19 - j, i + 4)."""
    x_size, y_size, z_size = 16, 24, 3
    label = torch.randint(1, 200, (1, 1, x_size, y_size, z_size), generator=generator(0), dtype=torch.int64)
    matrix = rotation_matrices(torch.tensor([[0.0, 0.0, math.pi / 2]]))
    _, out_label = warp(label.float(), label, matrix)
    expected = torch.zeros_like(label)
    for i in range(x_size):
        for j in range(y_size):
            source_x, source_y = (x_size - 1) / 2 - (j - (y_size - 1) / 2), (y_size - 1) / 2 + (i - (x_size - 1) / 2)
            if 0 <= source_x < x_size and 0 <= source_y < y_size:
                expected[0, 0, i, j] = label[0, 0, int(source_x), int(source_y)]
    assert torch.equal(out_label, expected)


def test_displacement_is_in_voxels_and_xyz_order():
    """A constant displacement of +2 voxels along y reads input (x, y + 2, z): a shift, 0 at the far end."""
    image, label = make_batch(shape=(1, 1, 8, 10, 6))
    shift = torch.zeros(1, 3, 8, 10, 6)
    shift[:, 1] = 2.0
    out_image, out_label = warp(image, label, torch.eye(3)[None], shift)
    assert torch.equal(out_label[:, :, :, :-2], label[:, :, :, 2:])
    assert (out_label[:, :, :, -2:] == 0).all()
    torch.testing.assert_close(out_image[:, :, :, :-2], image[:, :, :, 2:], atol=1e-5, rtol=0)


def test_zero_rotation_unit_scale_through_the_augmenter_is_identity_on_labels():
    """The hot path builds its own grid: a null rotation must sample voxel centres exactly."""
    image, label = make_batch(shape=(2, 1, 9, 14, 6))
    augment = BatchAugmenter(all_off(p_rotate=1.0, max_rotation_deg=0.0, p_scale=1.0, scale_range=(1.0, 1.0)))
    out_image, out_label = augment(image, label, generator(0))
    assert torch.equal(out_label, label)
    torch.testing.assert_close(out_image, image, atol=1e-5, rtol=0)


def test_flips_are_composed_into_the_warp():
    """Samples that also resample get their flips from the grid, which must match torch.flip on labels."""
    image, label = make_batch(shape=(2, 1, 9, 14, 6))
    config = all_off(p_flip=1.0, p_rotate=1.0, max_rotation_deg=0.0)
    out_image, out_label = BatchAugmenter(config)(image, label, generator(0))
    assert torch.equal(out_label, label.flip((2, 3, 4)))
    torch.testing.assert_close(out_image, image.flip((2, 3, 4)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_and_elastic_keep_label_values(device):
    image, label = make_batch(shape=(4, 1, 20, 20, 16), device=device)
    config = all_off(p_rotate=1.0, max_rotation_deg=40.0, p_elastic=1.0, p_scale=1.0, p_flip=0.5)
    out_image, out_label = BatchAugmenter(config)(image, label, generator(5, device))
    values = set(out_label.unique().tolist())
    assert values <= set(label.unique().tolist()) | {0}
    assert 255 in values, "the ignore label must survive nearest resampling"
    assert not torch.equal(out_label, label)
    assert out_label.dtype == label.dtype and out_image.isfinite().all()


@pytest.mark.parametrize("scale", [0.8, 1.3])
def test_scale_changes_foreground_volume_by_cube(scale):
    label = ball_label(32, radius=6.0).repeat(2, 1, 1, 1, 1)
    image = label.float()
    augment = BatchAugmenter(all_off(p_scale=1.0, scale_range=(scale, scale)))
    out_image, out_label = augment(image, label, generator(0))
    ratio = (out_label == 1).sum().item() / (label == 1).sum().item()
    assert ratio == pytest.approx(scale**3, rel=0.12)
    assert out_image.sum().item() / image.sum().item() == pytest.approx(scale**3, rel=0.12)


def test_in_plane_scale_changes_volume_by_square():
    label = ball_label(32, radius=6.0)
    augment = BatchAugmenter(all_off(p_scale=1.0, scale_range=(1.3, 1.3), in_plane_only=True), thick_axis=2)
    _, out_label = augment(label.float(), label, generator(0))
    ratio = (out_label == 1).sum().item() / (label == 1).sum().item()
    assert ratio == pytest.approx(1.3**2, rel=0.12)


def test_in_plane_only_never_mixes_slices_along_the_thick_axis():
    x, y, z = 18, 18, 6
    label = torch.zeros(3, 1, x, y, z, dtype=torch.uint8)
    for k in range(z):
        label[:, :, 3:15, 4:14, k] = k + 1  # each z slice its own class
    config = all_off(
        p_rotate=1.0, max_rotation_deg=90.0, p_scale=1.0, p_elastic=1.0, elastic_alpha_vox=2.0, in_plane_only=True
    )
    out_image, out_label = BatchAugmenter(config, thick_axis=2)(label.float(), label, generator(2))
    for k in range(z):
        assert set(out_label[..., k].unique().tolist()) == {0, k + 1}
        # Bilinear image values stay between the slice's own two values (up to float rounding).
        assert out_image[..., k].min() >= -1e-4 and out_image[..., k].max() <= k + 1 + 1e-4
    assert not torch.equal(out_label, label)


def test_for_spacing_detects_anisotropy():
    isotropic = AugmentConfig.for_spacing((1.0, 1.0, 1.2))
    assert not isotropic.in_plane_only and isotropic.thick_axis is None
    thick_x = AugmentConfig.for_spacing((5.0, 0.7, 0.7), p_rotate=0.5)
    assert thick_x.in_plane_only and thick_x.thick_axis == 0 and thick_x.p_rotate == 0.5
    augment = BatchAugmenter(thick_x)
    assert augment.thick_axis == 0 and augment.fine_axes == (1, 2)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="p_gamma"):
        AugmentConfig(p_gamma=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(1.4, 0.7))
    with pytest.raises(ValueError, match="thick_axis"):
        BatchAugmenter(AugmentConfig(in_plane_only=True))
    image, label = make_batch()
    with pytest.raises(TypeError):
        BatchAugmenter(all_off())(image, label.float(), generator(0))


# ---- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_output_different_seed_different_output(device):
    image, label = make_batch(shape=(4, 2, 16, 16, 12), device=device)
    augment = BatchAugmenter(AugmentConfig(**{f: 0.6 for f in ("p_rotate", "p_scale", "p_elastic", "p_noise")}))
    first = augment(image, label, generator(7, device))
    second = augment(image, label, generator(7, device))
    other = augment(image, label, generator(8, device))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


# ---- intensity ------------------------------------------------------------------------------------

INTENSITY = ("p_noise", "p_blur", "p_brightness", "p_contrast", "p_lowres", "p_gamma")


@pytest.mark.parametrize("name", INTENSITY + ("all",))
def test_intensity_transforms_leave_label_alone_and_stay_finite(name):
    image, label = make_batch(shape=(3, 2, 12, 14, 10))
    image[1, 1] = 0.7  # a constant channel: gamma/contrast must not divide by a zero range
    enabled = {n: 1.0 for n in INTENSITY} if name == "all" else {name: 1.0}
    out_image, out_label = BatchAugmenter(all_off(**enabled))(image, label, generator(4))
    assert torch.equal(out_label, label)
    assert out_image.isfinite().all()
    assert not torch.equal(out_image, image)
    assert out_image.dtype == image.dtype and out_image.shape == image.shape


def test_gamma_keeps_each_channel_range():
    image, label = make_batch(shape=(3, 2, 10, 10, 10))
    out_image, _ = BatchAugmenter(all_off(p_gamma=1.0))(image, label, generator(0))
    dims = (2, 3, 4)
    torch.testing.assert_close(out_image.amin(dims), image.amin(dims), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_image.amax(dims), image.amax(dims), atol=1e-5, rtol=0)
    assert not torch.allclose(out_image, image)


def test_contrast_scales_about_the_mean_within_the_original_range():
    image, label = make_batch(shape=(2, 2, 10, 10, 10))
    dims = (2, 3, 4)
    lower, _ = BatchAugmenter(all_off(p_contrast=1.0, contrast_range=(0.5, 0.5)))(image, label, generator(0))
    torch.testing.assert_close(lower.mean(dims), image.mean(dims), atol=1e-5, rtol=0)
    torch.testing.assert_close(lower.std(dim=dims), 0.5 * image.std(dim=dims), atol=1e-5, rtol=1e-4)
    higher, _ = BatchAugmenter(all_off(p_contrast=1.0, contrast_range=(2.0, 2.0)))(image, label, generator(0))
    assert (higher.amin(dims) >= image.amin(dims) - 1e-6).all() and (higher.amax(dims) <= image.amax(dims) + 1e-6).all()
    assert (higher.std(dim=dims) > 1.2 * image.std(dim=dims)).all()


def test_intensity_only_touches_chosen_samples():
    image, label = make_batch(shape=(16, 1, 6, 6, 6))
    out_image, _ = BatchAugmenter(all_off(p_brightness=0.5))(image, label, generator(0))
    unchanged = [torch.equal(out_image[b], image[b]) for b in range(16)]
    assert any(unchanged) and not all(unchanged)


def test_blur_smooths_and_preserves_mean():
    image = torch.zeros(1, 1, 15, 15, 15)
    image[0, 0, 7, 7, 7] = 1.0
    label = torch.zeros(1, 1, 15, 15, 15, dtype=torch.uint8)
    out_image, _ = BatchAugmenter(all_off(p_blur=1.0))(image, label, generator(0))
    assert out_image.max() < 0.5 and out_image.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_lowres_zoom_one_is_near_identity():
    image, label = make_batch(shape=(2, 1, 12, 12, 12))
    out_image, _ = BatchAugmenter(all_off(p_lowres=1.0, lowres_zoom_range=(1.0, 1.0)))(image, label, generator(0))
    torch.testing.assert_close(out_image, image, atol=1e-5, rtol=0)


# ---- whole configs on a training-sized batch --------------------------------------------------------
# (their speed is measured by benchmarks/augment_speed.py, against MONAI's per-sample transforms)


@pytest.mark.parametrize("name", ["defaults", "every transform"])
def test_whole_configs_keep_shapes_dtypes_label_values_and_finite_images(name):
    image, label = make_batch(shape=(2, 1, 40, 56, 40))
    config = AugmentConfig() if name == "defaults" else everything_on()
    for seed in range(3):
        out_image, out_label = BatchAugmenter(config)(image, label, generator(seed))
        assert out_image.shape == image.shape and out_image.dtype == image.dtype
        assert out_label.shape == label.shape and out_label.dtype == label.dtype
        assert out_image.isfinite().all()
        assert set(out_label.unique().tolist()) <= set(label.unique().tolist()) | {0}


def test_warping_onto_the_crop_equals_cropping_the_full_warp():
    """augmenter(padded, crop=patch) resamples straight onto the patch: the same voxels as warping the whole
    context-padded batch and cropping its centre (the training loop's old way), for flips, rotations and zooms."""
    from unet3d.augment import center_crop

    config = AugmentConfig(p_flip=0.5, p_rotate=0.6, max_rotation_deg=25.0, p_scale=0.6, scale_range=(0.8, 1.25),
                           p_elastic=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0,
                           p_gamma=0.0)
    augmenter = BatchAugmenter(config)
    patch = (20, 16, 12)
    big = [p + 2 * c for p, c in zip(patch, augmenter.context(patch))]
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(12, 2, *big, generator=gen)
    label = (torch.rand(12, 1, *big, generator=gen) * 3).to(torch.uint8)
    full_image, full_label = augmenter(image, label, torch.Generator().manual_seed(5))
    cropped_image, cropped_label = augmenter(image, label, torch.Generator().manual_seed(5), crop=patch)
    assert tuple(cropped_image.shape[2:]) == patch and tuple(cropped_label.shape[2:]) == patch
    torch.testing.assert_close(cropped_image, center_crop(full_image, patch), atol=1e-5, rtol=0)
    # nearest sampling at the same points: the same labels, but for points that fall on a voxel boundary
    mismatch = (cropped_label != center_crop(full_label, patch)).float().mean()
    assert mismatch < 1e-3


def test_a_preset_name_gives_its_configuration_and_its_mirror_axes():
    from unet3d.augment import PRESETS, preset_config, preset_mirror_axes

    assert preset_config("none") is None and preset_mirror_axes("none") == []
    assert preset_mirror_axes("full") == preset_mirror_axes("light") == [0, 1, 2]
    assert preset_mirror_axes("light_no_mirror") == []
    thick = preset_config("light", spacing=(0.7, 0.7, 5.0))
    assert thick.in_plane_only and thick.thick_axis == 2 and thick.p_rotate == PRESETS["light"]["p_rotate"]
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        preset_config("heavy")
