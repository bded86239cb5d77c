"""Tests for unet3d.losses: ignore-label semantics, hand-computed values, class weights, deep supervision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unet3d.losses import DeepSupervisionLoss, DiceCELoss, downsample_target

IGNORE = 255


def _sparse_target() -> torch.Tensor:
    """(2, 4, 5, 3) all-ignore target with one labelled voxel (class 2) at (0, 1, 2, 1)."""
    target = torch.full((2, 4, 5, 3), IGNORE, dtype=torch.long)
    target[0, 1, 2, 1] = 2
    return target


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("class_weights", [None, (0.5, 1.0, 3.0)])
def test_loss_and_gradient_depend_only_on_labelled_voxel(batch_dice: bool, class_weights) -> None:
    torch.manual_seed(0)
    target = _sparse_target()
    labelled = target != IGNORE
    loss_fn = DiceCELoss(class_weights=class_weights, batch_dice=batch_dice)

    def loss_and_grad(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.clone().requires_grad_(True)
        loss = loss_fn(logits, target)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss.detach(), grad

    logits = torch.randn(2, 3, 4, 5, 3)
    loss, grad = loss_and_grad(logits)
    assert loss > 0
    ignored = ~labelled.unsqueeze(1).expand_as(grad)
    assert (grad[ignored] == 0).all(), "ignored voxels must get exactly zero gradient"
    assert grad[~ignored].abs().sum() > 0

    perturbed = logits + 10.0 * torch.randn_like(logits) * ignored
    loss2, grad2 = loss_and_grad(perturbed)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad2[~ignored], grad[~ignored], rtol=1e-6, atol=1e-7)
    assert (grad2[ignored] == 0).all()


def test_all_ignored_gives_zero_with_graph() -> None:
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4, 4), IGNORE)
    loss = DiceCELoss(class_weights=(1.0, 2.0, 3.0))(logits, target)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("batch_dice", [True, False])
def test_perfect_prediction_gives_near_zero_loss(batch_dice: bool) -> None:
    target = torch.randint(0, 3, (2, 6, 5, 4))
    target[:, 0, 0, 0] = 1  # every class present in every sample
    target[:, 0, 0, 1] = 2
    target[:, 0, 0, 2] = 0
    target[0, 3, 3, 3] = IGNORE
    logits = 30.0 * F.one_hot(torch.where(target == IGNORE, 0, target), 3).permute(0, 4, 1, 2, 3).float()
    loss = DiceCELoss(batch_dice=batch_dice, include_background=True)(logits, target)
    assert 0 <= loss.item() < 1e-4
    bad = DiceCELoss(batch_dice=batch_dice)(-logits, target)
    assert bad.item() > 1.0


def _hand_dice_ce(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool, batch_dice: bool, smooth: float
) -> float:
    """Plain-Python reference: softmax, CE and soft Dice written out voxel by voxel."""
    batch, num_classes = logits.shape[:2]
    voxels = [(b, idx) for b in range(batch) for idx in range(target[b].numel())]
    flat_logits = logits.reshape(batch, num_classes, -1).tolist()
    flat_target = target.reshape(batch, -1).tolist()
    probs = {}
    ce = 0.0
    for b, idx in voxels:
        scores = [flat_logits[b][k][idx] for k in range(num_classes)]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        total = sum(exps)
        probs[(b, idx)] = [e / total for e in exps]
        ce -= math.log(probs[(b, idx)][flat_target[b][idx]])
    ce /= len(voxels)
    groups = [list(range(batch))] if batch_dice else [[b] for b in range(batch)]
    classes = range(num_classes) if include_background else range(1, num_classes)
    dice_losses = []
    for group in groups:
        for k in classes:
            inter = sum(probs[(b, i)][k] * (flat_target[b][i] == k) for b, i in voxels if b in group)
            p_sum = sum(probs[(b, i)][k] for b, i in voxels if b in group)
            g_sum = sum(float(flat_target[b][i] == k) for b, i in voxels if b in group)
            dice_losses.append(1.0 - (2.0 * inter + smooth) / (p_sum + g_sum + smooth))
    return ce + sum(dice_losses) / len(dice_losses)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_matches_hand_computation(include_background: bool, batch_dice: bool) -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 2, 3, 1, dtype=torch.float64)
    target = torch.tensor([[[[0], [1], [2]], [[2], [2], [1]]], [[[1], [1], [0]], [[0], [0], [0]]]])
    smooth = 1e-5
    expected = _hand_dice_ce(logits, target, include_background, batch_dice, smooth)
    loss_fn = DiceCELoss(smooth=smooth, batch_dice=batch_dice, include_background=include_background)
    assert loss_fn(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # The (B, 1, X, Y, Z) target layout gives the same value.
    assert loss_fn(logits, target.unsqueeze(1)).item() == pytest.approx(expected, rel=1e-5)


def test_class_weights_change_cross_entropy_as_expected() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, 2)
    target = torch.randint(0, 3, (2, 4, 4, 2))
    target[0, 0, 0, 0] = IGNORE
    weights = torch.tensor([0.2, 1.0, 5.0])
    ce_only = DiceCELoss(class_weights=weights.tolist(), dice_weight=0.0)
    reference = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)  # weighted mean
    torch.testing.assert_close(ce_only(logits, target), reference)

    unit = DiceCELoss(class_weights=[1.0, 1.0, 1.0], dice_weight=0.0)(logits, target)
    torch.testing.assert_close(unit, DiceCELoss(dice_weight=0.0)(logits, target))

    # Up-weighting the class with the worst per-voxel CE raises the (weighted-mean) loss.
    per_voxel = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    per_class = torch.stack([per_voxel[target == k].mean() for k in range(3)])
    worst = int(per_class.argmax())
    heavy = [1.0, 1.0, 1.0]
    heavy[worst] = 10.0
    assert DiceCELoss(class_weights=heavy, dice_weight=0.0)(logits, target) > unit


def test_class_weights_weight_the_dice_average() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 4, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4, 4))
    dice_only = DiceCELoss(ce_weight=0.0, include_background=True, class_weights=[1.0, 0.0, 0.0])
    probs = torch.softmax(logits, 1)[0, 0]
    gt = (target[0] == 0).float()
    expected = 1 - (2 * (probs * gt).sum() + 1e-5) / (probs.sum() + gt.sum() + 1e-5)
    torch.testing.assert_close(dice_only(logits, target), expected)


def test_bf16_logits_are_computed_in_float32() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 6, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6, 6))
    loss_fn = DiceCELoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(logits.bfloat16(), target)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss_fn(logits.bfloat16().float(), target))


def test_shape_mismatch_and_float_target_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        DiceCELoss()(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        DiceCELoss()(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="class weights"):
        DiceCELoss(class_weights=[1.0, 2.0])(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long))


def test_downsample_target_keeps_ignore_and_labels() -> None:
    target = torch.zeros(1, 8, 6, 5, dtype=torch.long)
    target[:, :4] = IGNORE
    target[:, 4:, :, 2:] = 2
    small = downsample_target(target, (4, 3, 3))
    assert small.shape == (1, 4, 3, 3) and small.dtype == torch.long
    assert (small[:, :2] == IGNORE).all()
    assert set(small.unique().tolist()) <= {0, 2, IGNORE}
    assert (small[:, 2:, :, 2] == 2).all() and (small[:, 2:, :, 0] == 0).all()
    with_channel = downsample_target(target.unsqueeze(1).to(torch.uint8), (4, 3, 3))
    assert with_channel.shape == (1, 1, 4, 3, 3) and with_channel.dtype == torch.uint8
    assert torch.equal(with_channel[:, 0].long(), small)


def test_deep_supervision_loss_weights_and_downsampling() -> None:
    torch.manual_seed(5)
    target = torch.randint(0, 3, (2, 8, 8, 6))
    target[:, :2] = IGNORE
    outputs = [torch.randn(2, 3, 8, 8, 6), torch.randn(2, 3, 4, 4, 3), torch.randn(2, 3, 2, 2, 3)]
    base = DiceCELoss()
    expected = sum(
        w / 1.75 * base(out, downsample_target(target, out.shape[2:])) for w, out in zip((1.0, 0.5, 0.25), outputs)
    )
    ds = DeepSupervisionLoss(base)
    torch.testing.assert_close(ds(outputs, target), expected)
    torch.testing.assert_close(ds(outputs[0], target), base(outputs[0], target))
    # The coarse target keeps the ignored slab: perturbing the coarse logits there changes nothing.
    coarse = outputs[1].clone()
    coarse[:, :, :1] += 100.0
    torch.testing.assert_close(ds([outputs[0], coarse, outputs[2]], target), expected)
