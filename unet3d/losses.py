"""Segmentation losses: soft Dice + cross-entropy with an ignore label, and a deep-supervision wrapper.

Logits are (B, K, X, Y, Z); targets are integer class maps (B, X, Y, Z) or (B, 1, X, Y, Z) in which voxels equal to
`ignore_index` (unet3d.labels.IGNORE_LABEL, the one ignore code of stage labels, into which map_labels turns the
config's `ignore_label`: unlabelled, sparse annotation) contribute nothing to either term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .labels import IGNORE_LABEL

__all__ = ["DeepSupervisionLoss", "DiceCELoss", "downsample_target"]


def _as_class_map(target: Tensor, logits: Tensor) -> Tensor:
    """(B, X, Y, Z) or (B, 1, X, Y, Z) integer map -> (B, X, Y, Z) int64, checked against logits (B, K, X, Y, Z)."""
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}")
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    return target.long()


class DiceCELoss(nn.Module):
    """dice_weight * (1 - mean soft Dice) + ce_weight * cross-entropy, both restricted to labelled voxels.

    * Computed in float32 with autocast disabled, so bf16/fp16 logits are safe.
    * CE is the (class-weighted) mean over labelled voxels, normalised by the sum of their class weights like
      ``F.cross_entropy(weight=...)``.
    * Soft Dice per class uses softmax probabilities and one-hot targets with ignored voxels zeroed in both, summed
      over space and, with ``batch_dice``, over the batch too (one Dice per class for the whole batch: stable when a
      class is absent from some samples). Per-class Dice losses are averaged over the foreground classes (all
      classes with ``include_background``); class weights, if given, weight that average. Dice is already invariant
      to class frequency, so the weights there express class importance only.
    * A batch whose voxels are all ignored gives 0 (with a graph, zero gradients), not NaN.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_LABEL,
        class_weights: Sequence[float] | None = None,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1e-5,
        batch_dice: bool = True,
        include_background: bool = False,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth = smooth
        self.batch_dice = batch_dice
        self.include_background = include_background
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and (weights.dim() != 1 or (weights < 0).any()):
            raise ValueError("class_weights must be a 1-D sequence of non-negative numbers")
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits: (B, K, X, Y, Z) float, target: (B, X, Y, Z) or (B, 1, X, Y, Z) int -> scalar float32."""
        target = _as_class_map(target, logits)
        num_classes = logits.shape[1]
        weights = self.class_weights
        if weights is not None and weights.numel() != num_classes:
            raise ValueError(f"{weights.numel()} class weights for {num_classes} classes")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            labelled = target != self.ignore_index  # (B, X, Y, Z)
            loss = logits.new_zeros(())
            if self.ce_weight:
                loss = loss + self.ce_weight * self._cross_entropy(logits, target, labelled, weights)
            if self.dice_weight:
                loss = loss + self.dice_weight * self._dice_loss(logits, target, labelled, weights)
        return loss

    def _cross_entropy(self, logits: Tensor, target: Tensor, labelled: Tensor, weights: Tensor | None) -> Tensor:
        summed = F.cross_entropy(logits, target, weight=weights, ignore_index=self.ignore_index, reduction="sum")
        safe_target = torch.where(labelled, target, 0)
        voxel_weight = labelled.float() if weights is None else weights[safe_target] * labelled
        # clamp: an all-ignored batch gives 0 / tiny = 0 rather than 0 / 0.
        return summed / voxel_weight.sum().clamp_min(1e-8)

    def _dice_loss(self, logits: Tensor, target: Tensor, labelled: Tensor, weights: Tensor | None) -> Tensor:
        num_classes = logits.shape[1]
        mask = labelled.unsqueeze(1).float()  # (B, 1, X, Y, Z)
        probs = torch.softmax(logits, dim=1) * mask
        safe_target = torch.where(labelled, target, 0)
        one_hot = torch.zeros_like(probs).scatter_(1, safe_target.unsqueeze(1), 1.0) * mask
        dims = (0, *range(2, logits.dim())) if self.batch_dice else tuple(range(2, logits.dim()))
        intersection = (probs * one_hot).sum(dims)
        denominator = probs.sum(dims) + one_hot.sum(dims)
        dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)  # (K,) or (B, K)
        first = 0 if self.include_background or num_classes == 1 else 1
        per_class_loss = 1.0 - dice[..., first:]
        if weights is None:
            return per_class_loss.mean()
        class_weight = weights[first:].expand_as(per_class_loss)
        return (per_class_loss * class_weight).sum() / class_weight.sum().clamp_min(1e-8)


def downsample_target(target: Tensor, spatial_size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of an integer map (B, X, Y, Z) or (B, 1, X, Y, Z) to spatial_size.

    Nearest never mixes labels, so ignore voxels stay ignore and no new class values appear.
    """
    squeeze = target.dim() == 4
    volume = target.unsqueeze(1) if squeeze else target
    if tuple(volume.shape[2:]) != tuple(spatial_size):
        # float32 represents every label value (< 2**24) exactly.
        volume = F.interpolate(volume.float(), size=tuple(spatial_size), mode="nearest").to(target.dtype)
    return volume[:, 0] if squeeze else volume


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss` over a list of logits [full resolution, 1/2, 1/4, ...].

    Weights 1, 1/2, 1/4, ... normalised to sum to 1 (or the given `weights`, normalised). The target is downsampled
    with nearest neighbour to each output's spatial size. A single tensor input is passed straight to `loss`.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, target)
        if len(outputs) == 0:
            raise ValueError("no outputs to supervise")
        weights = self.weights if self.weights is not None else [0.5**i for i in range(len(outputs))]
        if len(weights) < len(outputs):
            raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
        weights = weights[: len(outputs)]
        total_weight = sum(weights)
        return sum(
            (w / total_weight) * self.loss(out, downsample_target(target, out.shape[2:]))
            for w, out in zip(weights, outputs)
        )
