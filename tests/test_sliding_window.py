"""Sliding-window inference against whole-volume forwards of tiny convolutional models."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from unet3d.sliding_window import gaussian_importance_map, sliding_window_predict, window_starts

PATCH = (8, 10, 6)
CHANNELS = 2
CLASSES = 3


def conv_model(kernel: int, seed: int = 0) -> nn.Conv3d:
    """One conv layer with zero padding: translation-equivariant, receptive radius kernel // 2."""
    torch.manual_seed(seed)
    model = nn.Conv3d(CHANNELS, CLASSES, kernel, padding=kernel // 2)
    with torch.no_grad():
        model.weight.mul_(3.0)  # sharper logits make disagreements visible in the probabilities
    return model.eval()


def whole_volume_probabilities(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(image[None]), dim=1)[0]


def window_margin_mask(size: tuple[int, ...], patch: tuple[int, ...], radius: int) -> torch.Tensor:
    """True where some window sees the voxel within `radius` of one of its edges inside the volume.

    There the window's zero padding replaces real neighbours, so only those voxels may differ from a
    whole-volume forward of a model with that receptive radius.
    """
    starts = [window_starts(s, p, 0.5) for s, p in zip(size, patch)]
    margin = torch.zeros(size, dtype=torch.bool)
    for origin in itertools.product(*starts):
        window = torch.zeros(size, dtype=torch.bool)
        window[tuple(slice(o, o + p) for o, p in zip(origin, patch))] = True
        inner = window.clone()
        for axis, (o, p, s) in enumerate(zip(origin, patch, size)):
            index = [slice(None)] * 3
            if o > 0:
                index[axis] = slice(o, o + radius)
                inner[tuple(index)] = False
            if o + p < s:
                index[axis] = slice(o + p - radius, o + p)
                inner[tuple(index)] = False
        margin |= window & ~inner
    return margin


# --------------------------------------------------------------------------------------------- window_starts
@pytest.mark.parametrize("size", [1, 5, 8])
def test_window_starts_single_window_when_volume_fits(size: int) -> None:
    assert window_starts(size, 8, 0.5) == [0]


def test_window_starts_cover_volume_evenly() -> None:
    assert window_starts(9, 8, 0.5) == [0, 1]
    assert window_starts(120, 40, 0.5) == [0, 20, 40, 60, 80]
    assert window_starts(120, 40, 0.0) == [0, 40, 80]
    assert window_starts(100, 40, 0.5) == [0, 20, 40, 60]
    assert window_starts(110, 40, 0.5) == [0, 18, 35, 52, 70]
    for size, patch, overlap in [(37, 8, 0.5), (128, 40, 0.5), (128, 56, 0.25), (61, 7, 0.9)]:
        starts = window_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == size - patch
        steps = [b - a for a, b in zip(starts, starts[1:])]
        assert max(steps) - min(steps) <= 1  # evenly spread
        assert max(steps) <= max(patch * (1 - overlap), 1) + 0.5  # at least the requested overlap


def test_window_starts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        window_starts(10, 4, 1.0)
    with pytest.raises(ValueError):
        window_starts(10, 0, 0.5)


# --------------------------------------------------------------------------------------------- gaussian map
def test_gaussian_map_shape_range_symmetry_and_cache() -> None:
    weights = gaussian_importance_map((9, 10, 4))
    assert weights.shape == (9, 10, 4) and weights.dtype == torch.float32
    assert weights.max().item() == pytest.approx(1.0)
    assert weights.min().item() >= 1e-3  # floored: unfloored corners would weigh ~1e-11
    assert weights[4, 4, 1] > weights[0, 4, 1] and weights[4, 4, 1] > weights[4, 0, 1]
    for dims in [(0,), (1,), (2,), (0, 1, 2)]:
        assert torch.equal(weights, torch.flip(weights, dims))
    assert gaussian_importance_map([9, 10, 4]) is weights
    with torch.inference_mode():
        cached_in_inference_mode = gaussian_importance_map((5, 5, 5))
    assert not cached_in_inference_mode.is_inference()  # later autograd users of the cache must not fail
    assert gaussian_importance_map((9, 10, 4), sigma_scale=0.25) is not weights


# --------------------------------------------------------------------------------------------- prediction
def test_single_window_equals_whole_volume_forward() -> None:
    model = conv_model(3)
    image = torch.randn(CHANNELS, *PATCH)
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES)
    assert probabilities.shape == (CLASSES, *PATCH) and probabilities.dtype == torch.float32
    assert probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, image), atol=1e-6, rtol=0)


def test_constant_model_has_no_seams() -> None:
    model = nn.Conv3d(CHANNELS, CLASSES, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.3, -1.2, 2.0]))
    model.eval()
    image = torch.randn(CHANNELS, 29, 37, 17)  # many overlapping windows with uneven steps
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES, batch_size=5)
    expected = torch.softmax(model.bias.detach(), dim=0)
    spread = probabilities.amax(dim=(1, 2, 3)) - probabilities.amin(dim=(1, 2, 3))
    assert spread.max().item() < 1e-6
    torch.testing.assert_close(probabilities[:, 0, 0, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(29, 37, 17), (17, 21, 11)])
def test_translation_equivariant_model_matches_whole_volume(size: tuple[int, int, int]) -> None:
    model = conv_model(3)
    image = torch.randn(CHANNELS, *size)
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES)
    reference = whole_volume_probabilities(model, image)
    assert probabilities.shape == reference.shape
    margin = window_margin_mask(size, PATCH, radius=1)
    assert (~margin).sum() > 0.3 * margin.numel()
    error = (probabilities - reference).abs().amax(dim=0)
    assert error[~margin].max().item() < 1e-5
    # Near window edges the gaussian down-weights the cut-off windows: close, though not exact.
    assert error[margin].mean().item() < 0.05
    # ...and a pointwise model is exact everywhere.
    pointwise = conv_model(1)
    torch.testing.assert_close(sliding_window_predict(pointwise, image, PATCH, CLASSES),
                               whole_volume_probabilities(pointwise, image), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(5, 23, 7), (5, 7, 3), (8, 3, 6)])
def test_volume_smaller_than_patch_is_padded_and_cropped(size: tuple[int, int, int]) -> None:
    model = conv_model(3)
    image = torch.randn(CHANNELS, *size)
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES)
    assert probabilities.shape == (CLASSES, *size)
    # Zero padding to the window equals the convolution's own zero padding: exact away from window edges.
    padded_size = tuple(max(s, p) for s, p in zip(size, PATCH))
    margin = window_margin_mask(padded_size, PATCH, radius=1)
    crop = tuple(slice((p - s) // 2, (p - s) // 2 + s) if s < p else slice(None) for s, p in zip(size, PATCH))
    error = (probabilities - whole_volume_probabilities(model, image)).abs().amax(dim=0)
    assert error[~margin[crop]].max().item() < 1e-5


def test_padding_is_symmetric_and_uses_pad_value() -> None:
    model = conv_model(5)  # receptive radius 2 reaches past the one-voxel padding before each axis
    image = torch.randn(CHANNELS, 5, 7, 3)  # smaller than the window along every axis: one window
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES, pad_value=-2.0)
    # Manual symmetric padding: (8-5)//2=1 before x, (10-7)//2=1 before y, (6-3)//2=1 before z.
    padded = torch.full((CHANNELS, *PATCH), -2.0)
    padded[:, 1:6, 1:8, 1:4] = image
    expected = whole_volume_probabilities(model, padded)[:, 1:6, 1:8, 1:4]
    torch.testing.assert_close(probabilities, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(probabilities, sliding_window_predict(model, image, PATCH, CLASSES), atol=1e-3)


def test_mirroring_a_mirror_symmetric_model_changes_nothing() -> None:
    model = conv_model(3)
    with torch.no_grad():  # average the kernel over all flips: then model(flip(x)) == flip(model(x))
        flips = [torch.flip(model.weight, [d + 2 for d in dims])
                 for n in range(4) for dims in itertools.combinations(range(3), n)]
        model.weight.copy_(torch.stack(flips).mean(dim=0))
    image = torch.randn(CHANNELS, 13, 17, 9)
    plain = sliding_window_predict(model, image, PATCH, CLASSES)
    mirrored = sliding_window_predict(model, image, PATCH, CLASSES, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=0)


def test_mirroring_averages_logits_of_mirrored_inputs() -> None:
    model = conv_model(3)
    image = torch.randn(CHANNELS, *PATCH)
    logits = sliding_window_predict(model, image, PATCH, CLASSES, mirror_axes=(1, 2), return_logits=True)
    with torch.no_grad():
        expected = torch.stack([
            torch.flip(model(torch.flip(image[None], dims)), dims)[0] if dims else model(image[None])[0]
            for dims in [(), (3,), (4,), (3, 4)]
        ]).mean(dim=0)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, sliding_window_predict(model, image, PATCH, CLASSES, return_logits=True),
                              atol=1e-3)


@pytest.mark.parametrize("mirror_axes", [None, (0, 2)])
def test_batch_size_does_not_change_the_result(mirror_axes: tuple[int, ...] | None) -> None:
    model = conv_model(3)
    image = torch.randn(CHANNELS, 19, 23, 11)
    results = [sliding_window_predict(model, image, PATCH, CLASSES, batch_size=b, mirror_axes=mirror_axes)
               for b in (1, 3, 64)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)


def test_logits_softmax_to_probabilities() -> None:
    model = conv_model(3)
    image = torch.randn(CHANNELS, 13, 17, 9)
    logits = sliding_window_predict(model, image, PATCH, CLASSES, return_logits=True)
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES)
    torch.testing.assert_close(torch.softmax(logits, dim=0), probabilities, atol=1e-6, rtol=0)
    torch.testing.assert_close(probabilities.sum(dim=0), torch.ones(13, 17, 9), atol=1e-5, rtol=0)


class DeepSupervisionModel(nn.Module):
    """Returns (full-resolution logits, half-resolution logits), as a network trained with deep supervision."""

    def __init__(self) -> None:
        super().__init__()
        self.head = conv_model(3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(x)
        return logits, logits[:, :, ::2, ::2, ::2]


def test_deep_supervision_output_uses_the_first_head() -> None:
    model = DeepSupervisionModel().eval()
    image = torch.randn(CHANNELS, 13, 17, 9)
    torch.testing.assert_close(sliding_window_predict(model, image, PATCH, CLASSES),
                               sliding_window_predict(model.head, image, PATCH, CLASSES), atol=0, rtol=0)


def test_identity_model_with_mirroring_is_not_corrupted_in_place() -> None:
    image = torch.randn(CLASSES, *PATCH)
    logits = sliding_window_predict(nn.Identity().eval(), image, PATCH, CLASSES, mirror_axes=(0,), return_logits=True,
                                    device="cpu")
    torch.testing.assert_close(logits, image, atol=1e-6, rtol=0)


def test_wrong_inputs_are_rejected_and_training_mode_warns() -> None:
    model = conv_model(3)
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_predict(model, torch.randn(CHANNELS, *PATCH), PATCH, CLASSES + 1)
    with pytest.raises(ValueError, match="image must be"):
        sliding_window_predict(model, torch.randn(1, CHANNELS, *PATCH), PATCH, CLASSES)
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_predict(model, torch.randn(CHANNELS, *PATCH), PATCH, CLASSES, mirror_axes=(3,))
    model.train()
    with pytest.warns(UserWarning, match="eval"):
        sliding_window_predict(model, torch.randn(CHANNELS, *PATCH), PATCH, CLASSES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_result_lands_on_output_device() -> None:
    model = conv_model(3).cuda()
    image = torch.randn(CHANNELS, 19, 23, 11)
    probabilities = sliding_window_predict(model, image, PATCH, CLASSES)  # amp on by default on CUDA
    assert probabilities.device.type == "cpu" and probabilities.dtype == torch.float32
    reference = sliding_window_predict(model.cpu(), image, PATCH, CLASSES)
    assert (probabilities - reference).abs().max().item() < 0.05
    on_gpu = sliding_window_predict(model.cuda(), image, PATCH, CLASSES, amp=False, output_device="cuda")
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), reference, atol=1e-4, rtol=0)
