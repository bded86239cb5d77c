"""U-Net family built from one configurable encoder/decoder: 3D, slice-wise 2D, and composable blocks.

Every named architecture is one :class:`UNet3D` configured by a few per-stage lists (features, strides, kernel
sizes) and four composable parts (see :data:`ARCHITECTURE_PARTS`):

* ``block``: the level block, ``double_conv`` (two conv-norm-ReLU, Çiçek et al. 2016), ``residual`` (the same
  with an identity / 1x1 shortcut) or ``inverted_residual`` (MobileNetV2's depthwise-separable inverted residual,
  :class:`InvertedResidualBlock`: few parameters, and its wide tensors are recomputed in the backward pass);
* ``skip``: ``plain`` (one encoder skip per decoder level) or ``nested`` (UNet++, Zhou et al. 2018: nested decoder
  nodes with dense skips);
* ``gate``: ``none`` or ``attention`` (additive attention gates on the skips, Oktay et al. 2018);
* ``slice_wise``: the network convolves and pools within slices only and sees every slice on its own (the slice
  axis is folded into the batch), i.e. a 2D U-Net applied slice by slice.

Named architectures (``architecture`` in the config; ``train.block``/``skip``/``gate`` replace a part):

* ``unet3d``            - double_conv, plain, none
* ``residual_unet3d``   - residual, plain, none
* ``attention_unet3d``  - double_conv, plain, attention
* ``unet3d_plusplus``   - double_conv, nested, none
* ``mobile_unet3d``     - inverted_residual, plain, none
* ``unet2d``            - double_conv, plain, none, slice-wise (the slice axis: :func:`slice_axis_for`)

Tensors are (B, C, X, Y, Z). Any spatial size is accepted: pooling uses ``ceil_mode`` so no voxel is dropped, and
upsampled decoder maps are cropped / padded to their skip's size, so the logits always have the input's spatial size.

Example::

    net = build_network("unet3d", in_channels=1, num_classes=3)
    logits = net(torch.randn(2, 1, 40, 56, 40))          # (2, 3, 40, 56, 40)
    net2d = build_network("unet2d", 1, 3, slice_axis=2)  # the same logits' shape, every z slice on its own
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import TRAIN_DEFAULTS

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_PARTS",
    "AttentionGate",
    "BLOCKS",
    "ConvNormAct",
    "DecoderNode",
    "DoubleConv",
    "Down",
    "GATES",
    "InstanceNorm",
    "InvertedResidual",
    "InvertedResidualBlock",
    "Parts",
    "ResidualBlock",
    "SKIPS",
    "UNet3D",
    "Up",
    "architecture_parts",
    "build_network",
    "count_parameters",
    "match_size",
    "plan_topology",
    "slice_axis_for",
    "slice_wise_topology",
]

NORMS: tuple[str, ...] = ("batch", "instance", "group")
BLOCKS: tuple[str, ...] = ("double_conv", "residual", "inverted_residual")
SKIPS: tuple[str, ...] = ("plain", "nested")
GATES: tuple[str, ...] = ("none", "attention")


@dataclass(frozen=True)
class Parts:
    """What a U-Net is made of: the level block, the skip pattern, the skip gate, and whether it is slice-wise."""

    block: str = "double_conv"
    skip: str = "plain"
    gate: str = "none"
    slice_wise: bool = False


#: Each named architecture as a combination of parts; `train.block` / `skip` / `gate` replace one of them.
ARCHITECTURE_PARTS: dict[str, Parts] = {
    "unet3d": Parts(),
    "residual_unet3d": Parts(block="residual"),
    "attention_unet3d": Parts(gate="attention"),
    "unet3d_plusplus": Parts(skip="nested"),
    "mobile_unet3d": Parts(block="inverted_residual"),
    "unet2d": Parts(slice_wise=True),
}
ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURE_PARTS)


def architecture_parts(architecture: str, block: str | None = None, skip: str | None = None,
                       gate: str | None = None) -> Parts:
    """The parts of a named architecture, with any of block / skip / gate replaced (None: the architecture's own)."""
    if architecture not in ARCHITECTURE_PARTS:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    for name, value, valid in (("block", block, BLOCKS), ("skip", skip, SKIPS), ("gate", gate, GATES)):
        if value is not None and value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    base = ARCHITECTURE_PARTS[architecture]
    return Parts(block=block or base.block, skip=skip or base.skip, gate=gate or base.gate,
                 slice_wise=base.slice_wise)


def slice_axis_for(spacing: Sequence[float] | None) -> int:
    """The axis a slice-wise network cuts slices along: the one with the coarsest spacing (the acquired slices of
    a thick-slice scan; the in-plane axes keep the finest detail), the last axis (z) on a tie or without spacing."""
    if spacing is None:
        return 2
    values = [float(s) for s in spacing]
    coarsest = max(values)
    return max(i for i, s in enumerate(values) if s >= coarsest * (1 - 1e-6))


def slice_wise_topology(values: Sequence[Sequence[int]], axis: int) -> list[Triple]:
    """Strides, kernel sizes or a stem stride with 1 along the slice axis: a slice-wise network never pools or
    convolves across slices."""
    return [tuple(1 if a == axis else int(v) for a, v in enumerate(entry)) for entry in values]  # type: ignore[misc]

Triple = tuple[int, int, int]


def _triple(value: int | Sequence[int], name: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (x, y, z), got {value!r}")
    return values  # type: ignore[return-value]


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name; all variants are affine and act per channel on (B, C, X, Y, Z)."""
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return InstanceNorm(channels)
    if norm == "group":
        # Up to 8 groups; gcd keeps it a divisor of any channel count (a 1-channel map degenerates to LayerNorm).
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


class InstanceNorm(nn.GroupNorm):
    """Affine instance norm over (X, Y, Z) per sample and channel: (B, C, X, Y, Z) -> same shape.

    Implemented as group norm with one channel per group: PyTorch's CPU GroupNorm kernel is several times faster
    than InstanceNorm3d and keeps channels_last_3d tensors in that layout (InstanceNorm3d makes a contiguous copy,
    which then sends the next conv down a much slower backward path). A 1-voxel map (the bottleneck of a tiny
    input) normalises to the bias instead of raising.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2:].numel() == 1:
            return torch.zeros_like(x) + self.bias.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)
        return super().forward(x)


def match_size(x: Tensor, spatial_size: Sequence[int]) -> Tensor:
    """Crop (at the far end) or zero-pad (at the far end) x: (B, C, *S) to (B, C, *spatial_size).

    Decoder maps are aligned with their skips at index 0 (pooling window i covers voxels [s*i, s*i + s)), so any
    surplus or deficit sits at the far end of each axis.
    """
    if tuple(x.shape[2:]) == tuple(spatial_size):
        return x
    slices = tuple(slice(0, min(have, want)) for have, want in zip(x.shape[2:], spatial_size))
    x = x[(slice(None), slice(None), *slices)]
    pad: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(tuple(spatial_size))):
        pad += [0, max(want - have, 0)]
    if any(pad):
        x = F.pad(x, pad)
    return x


class Conv3d(nn.Conv3d):
    """nn.Conv3d that runs a float32 CPU batch of one sample on oneDNN. (B, C_in, X, Y, Z) -> (B, C_out, X', Y', Z')

    PyTorch's dispatch (ATen's use_mkldnn, a heuristic made for 2D) sends a batch of one with 3x3x3 kernels and
    small maps to its im2col fallback, aten::slow_conv3d: on this project's networks 5-10x slower per sample than
    oneDNN (the hippocampus network's forward pass 139 ms for one window against 17 ms per window in a batch of
    two, on a 2-core AVX2 machine). One window without mirroring, the last partial batch of sliding windows and
    batch-1 training all run such batches. The same weights and padding; the backward pass stays PyTorch's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)


class ConvNormAct(nn.Sequential):
    """Conv3d (odd kernel, 'same' padding, no bias) -> norm -> ReLU (omitted with act=False).

    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, norm: str, act: bool = True):
        padding = tuple(k // 2 for k in kernel_size)
        layers: list[nn.Module] = [
            Conv3d(in_channels, out_channels, kernel_size, padding=padding, bias=False),  # norm supplies the bias
            make_norm(norm, out_channels),
        ]
        if act:
            # In place is safe: the norm's backward needs its input, not its output.
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DoubleConv(nn.Module):
    """Two ConvNormAct with optional channel dropout between them (Çiçek et al. 2016 level block).

    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, norm: str, dropout: float = 0.0):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.dropout(self.conv1(x)))


class ResidualBlock(nn.Module):
    """conv-norm-ReLU -> conv-norm, plus a shortcut (identity, or 1x1 conv-norm when channels change), then ReLU.

    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, norm: str, dropout: float = 0.0):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, norm, act=False)
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(Conv3d(in_channels, out_channels, 1, bias=False), make_norm(norm, out_channels))
        )
        self.act = nn.ReLU(inplace=True)  # acts on the fresh sum, never on a tensor autograd still needs

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.dropout(self.conv1(x))) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (Sandler et al. 2018) in 3D: 1x1x1 expand -> norm -> ReLU6, depthwise
    kernel_size conv -> norm -> ReLU6, 1x1x1 project -> norm (linear), plus the input when the shapes match.

    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z). The hidden width is expansion x C_out (expansion 2: MobileNetV2's 6
    would make every full-resolution hidden tensor of a 3D network six times the level's width). With `recompute`,
    training keeps only the unit's narrow input for the backward pass and recomputes the wide hidden tensors there
    (torch.utils.checkpoint; MobileNetV2's point that the expanded tensor need not persist): about a third less peak
    memory than keeping them, for one more forward of the unit. Depthwise 3D convolutions are memory-bound; on a CPU
    PyTorch runs them slowly (benchmarks/architectures.py measures time and memory against the other blocks).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, norm: str, expansion: int = 2,
                 recompute: bool = True):
        super().__init__()
        hidden = expansion * out_channels
        self.body = nn.Sequential(
            Conv3d(in_channels, hidden, 1, bias=False),
            make_norm(norm, hidden),
            nn.ReLU6(inplace=True),
            Conv3d(hidden, hidden, kernel_size, padding=tuple(k // 2 for k in kernel_size), groups=hidden,
                      bias=False),  # depthwise: one filter per channel
            make_norm(norm, hidden),
            nn.ReLU6(inplace=True),
            Conv3d(hidden, out_channels, 1, bias=False),
            make_norm(norm, out_channels),  # linear bottleneck: no activation on the narrow output
        )
        self.residual = in_channels == out_channels
        self.recompute = recompute

    def forward(self, x: Tensor) -> Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            out = checkpoint(self.body, x, use_reentrant=False)
        else:
            out = self.body(x)
        return out + x if self.residual else out


class InvertedResidualBlock(nn.Module):
    """A level block of two :class:`InvertedResidual` units (the first changes the channels, the second has the
    residual), in the place of DoubleConv's two convolutions.

    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, norm: str, dropout: float = 0.0):
        super().__init__()
        self.unit1 = InvertedResidual(in_channels, out_channels, kernel_size, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.unit2 = InvertedResidual(out_channels, out_channels, kernel_size, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.unit2(self.dropout(self.unit1(x)))


BLOCK_CLASSES: dict[str, type[nn.Module]] = {
    "double_conv": DoubleConv, "residual": ResidualBlock, "inverted_residual": InvertedResidualBlock}


class Down(nn.Module):
    """Max-pool by `stride` (ceil mode: trailing partial windows are kept, so no voxel is lost).

    (B, C, X, Y, Z) -> (B, C, ceil(X / s_x), ceil(Y / s_y), ceil(Z / s_z)); identity when the stride is (1, 1, 1).
    """

    def __init__(self, stride: Triple):
        super().__init__()
        self.pool: nn.Module = (
            nn.Identity() if stride == (1, 1, 1) else nn.MaxPool3d(stride, stride=stride, ceil_mode=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x)


class Up(nn.Module):
    """Transposed conv with kernel = stride, then crop/pad to the skip's spatial size.

    (B, C_in, X, Y, Z), size (X', Y', Z') -> (B, C_out, X', Y', Z')  with X' ~= s_x * X.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Triple):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=stride, stride=stride, bias=False)

    def forward(self, x: Tensor, spatial_size: Sequence[int]) -> Tensor:
        return match_size(self.up(x), spatial_size)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) computed at the coarse (gating) resolution.

    skip: (B, C_skip, X, Y, Z), gate: (B, C_gate, ceil(X / s_x), ...) -> skip * alpha, alpha in (0, 1) of shape
    (B, 1, X, Y, Z). The skip is brought to the gate's grid with a strided conv, the 1-channel attention map is
    computed there and upsampled trilinearly, so the full-resolution cost is one multiply.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int, stride: Triple):
        super().__init__()
        self.stride = stride
        self.theta_skip = Conv3d(skip_channels, inter_channels, kernel_size=stride, stride=stride, bias=False)
        self.phi_gate = Conv3d(gate_channels, inter_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.psi = Conv3d(inter_channels, 1, kernel_size=1, bias=True)

    def forward(self, skip: Tensor, gate: Tensor) -> Tensor:
        coarse = gate.shape[2:]
        # Pad the skip to a multiple of the stride so its strided conv lands exactly on the gate's (ceil-mode) grid.
        padded = match_size(skip, [c * s for c, s in zip(coarse, self.stride)])
        alpha = torch.sigmoid(self.psi(self.act(self.theta_skip(padded) + self.phi_gate(gate))))
        if self.stride != (1, 1, 1):
            alpha = F.interpolate(alpha, scale_factor=self.stride, mode="trilinear", align_corners=False)
        return skip * match_size(alpha, skip.shape[2:])


class DecoderNode(nn.Module):
    """One decoder node X[i, j]: upsample the node below, (optionally gate) and concatenate skips, fuse with a block.

    below: (B, C_below, ~X / s, ...), skips: list of (B, C_i, X, Y, Z) -> (B, C_i, X, Y, Z).
    """

    def __init__(
        self,
        below_channels: int,
        channels: int,
        n_skips: int,
        stride: Triple,
        kernel_size: Triple,
        norm: str,
        dropout: float,
        block: type[nn.Module],
        attention: bool,
    ):
        super().__init__()
        self.up = Up(below_channels, channels, stride)
        self.gate = (
            AttentionGate(n_skips * channels, below_channels, max(channels // 2, 1), stride) if attention else None
        )
        self.block = block((n_skips + 1) * channels, channels, kernel_size, norm, dropout)

    def forward(self, below: Tensor, skips: list[Tensor]) -> Tensor:
        skip = skips[0] if len(skips) == 1 else torch.cat(skips, dim=1)
        if self.gate is not None:
            skip = self.gate(skip, below)
        return self.block(torch.cat([skip, self.up(below, skip.shape[2:])], dim=1))


class StridedStem(nn.Sequential):
    """Strided conv-norm-ReLU from the input to stage 0's coarser grid (MONAI's UNet starts the same way).

    (B, C_in, X, Y, Z) -> (B, C_out, ceil(X / s_x), ceil(Y / s_y), ceil(Z / s_z)); kernel 3 on strided axes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Triple, norm: str):
        kernel = tuple(3 if s > 1 else 1 for s in stride)
        super().__init__(
            Conv3d(in_channels, out_channels, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class FullResolutionRefine(nn.Module):
    """Back to the input grid after a strided stem: transposed conv up, concatenate the input image, one conv.

    coarse: (B, C_coarse, ~X / s, ...), image: (B, C_in, X, Y, Z) -> (B, out_channels, X, Y, Z). Seeing the image
    again at full resolution lets the boundary follow its edges instead of the coarse grid's blocks.
    """

    def __init__(self, coarse_channels: int, image_channels: int, out_channels: int, stride: Triple, norm: str,
                 kernel_size: Triple = (3, 3, 3)):
        super().__init__()
        self.out_channels = out_channels
        self.up = Up(coarse_channels, out_channels, stride)
        self.conv = ConvNormAct(out_channels + image_channels, out_channels, kernel_size, norm)

    def forward(self, coarse: Tensor, image: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(coarse, image.shape[2:]), image], dim=1))


class UNet3D(nn.Module):
    """Configurable U-Net: any level block (double conv, residual, inverted residual), plain or nested (UNet++)
    skips, with or without attention gates, volumetric or slice-wise, in one class.

    Stage i (0..L, L = len(features) - 1) pools by strides[i] (strides[0] must be (1, 1, 1)) and runs one block with
    features[i] channels and kernel kernel_sizes[i]. Decoder node X[i, j] (j >= 1) lives at stage i's resolution;
    the plain U-Net computes only the nodes on the path i + j = L with the single encoder skip X[i, 0], UNet++
    computes every node with dense skips X[i, 0..j-1]. Row i's last node X[i, L - i] is the decoder output at scale
    1 / prod(strides[1..i]).

    stem_stride > 1: a :class:`StridedStem` puts stage 0 on a grid coarser by stem_stride, and a
    :class:`FullResolutionRefine` brings row 0 back to the input grid (several times cheaper per iteration on a
    CPU; the planner in :mod:`unet3d.recipe` picks it for short CPU budgets).

    slice_axis (0, 1 or 2; None: volumetric): a slice-wise (2D) network. Strides, kernels and the stem are 1 along
    that axis, and forward folds the axis into the batch: every slice is one 2D sample, normalised on its own
    (instance and group norm; batch norm's training statistics span the batch of slices, as in any 2D training),
    so at inference a slice's logits depend on that slice only, however many slices a window holds.

    forward: (B, in_channels, X, Y, Z) -> (B, num_classes, X, Y, Z) logits; in training mode with deep supervision a
    list [full resolution, stage 1, ..., stage L-1] of logits (with a stem: [full resolution, stage 0, ...]).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        strides: Sequence[Triple],
        kernel_sizes: Sequence[Triple],
        norm: str = TRAIN_DEFAULTS.norm,
        dropout: float = TRAIN_DEFAULTS.dropout,
        deep_supervision: bool = False,
        block: str = "double_conv",
        skip: str = "plain",
        gate: str = "none",
        channels_last: bool = True,
        stem_stride: int | Sequence[int] = 1,
        slice_axis: int | None = None,
    ):
        super().__init__()
        n_stages = len(features)
        if n_stages < 2:
            raise ValueError("need at least 2 stages (one downsampling)")
        if len(strides) != n_stages or len(kernel_sizes) != n_stages:
            raise ValueError(
                f"features, strides and kernel_sizes need one entry per stage: {n_stages}, {len(strides)}, "
                f"{len(kernel_sizes)}"
            )
        self.features = tuple(int(f) for f in features)
        self.strides = tuple(_triple(s, "stride") for s in strides)
        self.kernel_sizes = tuple(_triple(k, "kernel size") for k in kernel_sizes)
        if self.strides[0] != (1, 1, 1):
            raise ValueError(f"the first stage is full resolution: strides[0] must be (1, 1, 1), not {strides[0]}")
        if any(s < 1 for stride in self.strides for s in stride) or any(f < 1 for f in self.features):
            raise ValueError(f"strides and features must be positive, got {self.strides}, {self.features}")
        if any(k < 1 or k % 2 == 0 for ks in self.kernel_sizes for k in ks):
            raise ValueError(f"kernel sizes must be positive and odd for 'same' padding, got {self.kernel_sizes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        for name, value, valid in (("block", block, BLOCKS), ("skip", skip, SKIPS), ("gate", gate, GATES)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        self.parts = Parts(block=block, skip=skip, gate=gate, slice_wise=slice_axis is not None)
        nested = skip == "nested"
        self.deep_supervision = deep_supervision
        self.nested = nested
        self.channels_last = channels_last
        self.depth = n_stages - 1
        self.stem_stride = _triple(stem_stride, "stem_stride")
        if any(s < 1 for s in self.stem_stride):
            raise ValueError(f"stem_stride must be positive, got {self.stem_stride}")
        self.slice_axis = slice_axis
        if slice_axis is not None:
            if slice_axis not in (0, 1, 2):
                raise ValueError(f"slice_axis must be 0, 1 or 2 (x, y, z), got {slice_axis!r}")
            topology = {"strides": self.strides, "kernel_sizes": self.kernel_sizes, "stem_stride": [self.stem_stride]}
            across = [name for name, values in topology.items() if any(v[slice_axis] != 1 for v in values)]
            if across:
                raise ValueError(f"a slice-wise network needs 1 along its slice axis {'xyz'[slice_axis]} in "
                                 f"{', '.join(across)} (see slice_wise_topology)")
        block_class = BLOCK_CLASSES[block]

        # Strided stem: a strided conv takes the input to stage 0's grid, so no block runs at full resolution
        # (the costliest part of a 3D U-Net on a CPU); a light refinement restores full-resolution detail.
        self.stem: nn.Module | None = None
        first_in = in_channels
        if self.stem_stride != (1, 1, 1):
            f0 = self.features[0]
            self.stem = StridedStem(in_channels, f0, self.stem_stride, norm)
            refine_kernel = tuple(1 if axis == slice_axis else 3 for axis in range(3))
            self.refine = FullResolutionRefine(f0, in_channels, max(f0 // 2, 4), self.stem_stride, norm, refine_kernel)
            first_in = f0
        self.downs = nn.ModuleList(Down(s) for s in self.strides)
        self.encoder = nn.ModuleList(
            block_class(c_in, c_out, k, norm, dropout)
            for c_in, c_out, k in zip((first_in, *self.features[:-1]), self.features, self.kernel_sizes)
        )
        self.decoder = nn.ModuleDict()
        for i, j in self._decoder_nodes():
            self.decoder[f"{i}_{j}"] = DecoderNode(
                below_channels=self.features[i + 1],
                channels=self.features[i],
                n_skips=j if nested else 1,
                stride=self.strides[i + 1],
                kernel_size=self.kernel_sizes[i],
                norm=norm,
                dropout=dropout,
                block=block_class,
                attention=gate == "attention",
            )
        n_heads = self.depth if deep_supervision else 1
        # Head i reads output i of _outputs: with a stem, output 0 is the refined full-resolution map and output
        # i >= 1 is decoder row i - 1; without one, output i is decoder row i.
        head_channels = [self.refine.out_channels, *self.features] if self.stem is not None else list(self.features)
        self.heads = nn.ModuleList(Conv3d(head_channels[i], num_classes, 1) for i in range(n_heads))
        self.apply(_kaiming_init)
        if channels_last:
            # Weights in the same layout as the activations; a mixed pair makes oneDNN reorder on every step.
            self.to(memory_format=torch.channels_last_3d)

    def _decoder_nodes(self) -> list[tuple[int, int]]:
        """(row, column) of every computed decoder node, in an order where each node's inputs already exist."""
        depth = self.depth
        return [(i, j) for j in range(1, depth + 1) for i in (range(depth - j + 1) if self.nested else [depth - j])]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.slice_axis is None:
            return self._forward(x)
        # (B, C, X, Y, Z) -> (B * D, C, ...) with size 1 along the slice axis (D slices): one 2D sample per slice.
        axis = 2 + self.slice_axis
        batch, depth = x.shape[0], x.shape[axis]
        slices = x.movedim(axis, 1).reshape(batch * depth, *x.shape[1:axis], *x.shape[axis + 1:]).unsqueeze(axis)
        outputs = self._forward(slices)

        def unfold(logits: Tensor) -> Tensor:  # (B * D, K, ..., 1, ...) -> (B, K, X, Y, Z)
            logits = logits.squeeze(axis)
            return logits.reshape(batch, depth, *logits.shape[1:]).movedim(1, axis).contiguous()

        return [unfold(o) for o in outputs] if isinstance(outputs, list) else unfold(outputs)

    def _forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.channels_last:
            # (B, X, Y, Z, C) memory order: oneDNN's 3D conv backward is several times faster in it for the narrow
            # full-resolution stages (and cuDNN prefers it under bf16). Only the layout changes, not the shape.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        image = x
        if self.stem is not None:
            x = self.stem(x)
        nodes: dict[tuple[int, int], Tensor] = {}  # (i, j) -> X[i, j]
        for i, (down, block) in enumerate(zip(self.downs, self.encoder)):
            x = block(down(x))
            nodes[(i, 0)] = x
        for i, j in self._decoder_nodes():
            skips = [nodes[(i, k)] for k in range(j)] if self.nested else [nodes[(i, 0)]]
            nodes[(i, j)] = self.decoder[f"{i}_{j}"](nodes[(i + 1, j - 1)], skips)
        rows = [nodes[(i, self.depth - i)] for i in range(self.depth)]  # decoder outputs, finest first
        if self.stem is not None:
            rows = [self.refine(rows[0], image), *rows]
        # Logits go back to the default layout (cheap: num_classes channels) so callers may .view() them.
        if self.deep_supervision and self.training:
            return [head(row).contiguous() for head, row in zip(self.heads, rows)]
        return self.heads[0](rows[0]).contiguous()


def _kaiming_init(module: nn.Module) -> None:
    """He initialisation for (transposed) convolutions feeding ReLUs; zero biases. Norm layers keep (1, 0)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(
    architecture: str,
    in_channels: int,
    num_classes: int,
    features: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[Sequence[int]] | None = None,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    norm: str = TRAIN_DEFAULTS.norm,
    dropout: float = TRAIN_DEFAULTS.dropout,
    deep_supervision: bool = False,
    stem_stride: int | Sequence[int] = 1,
    block: str | None = None,
    skip: str | None = None,
    gate: str | None = None,
    slice_axis: int | None = None,
) -> nn.Module:
    """Build one of ARCHITECTURES, with any of its parts (block, skip, gate) replaced (None: its own).

    strides / kernel_sizes: one (x, y, z) triple per stage (see :func:`plan_topology`); default stride 1 for the
    first stage and 2 after it, kernel 3 everywhere. A slice-wise architecture (``unet2d``) cuts slices along
    `slice_axis` (default: z) and sets that axis of the strides, kernels and stem stride to 1
    (:func:`slice_wise_topology`), so a topology planned for a 3D patch builds its 2D counterpart.
    """
    parts = architecture_parts(architecture, block, skip, gate)
    if slice_axis is not None and not parts.slice_wise:
        raise ValueError(f"slice_axis is for a slice-wise architecture (unet2d), not {architecture!r}")
    n_stages = len(features)
    if strides is None:
        strides = [(1, 1, 1)] + [(2, 2, 2)] * (n_stages - 1)
    if kernel_sizes is None:
        kernel_sizes = [(3, 3, 3)] * n_stages
    strides = [_triple(s, "stride") for s in strides]
    kernel_sizes = [_triple(k, "kernel size") for k in kernel_sizes]
    stem = _triple(stem_stride, "stem_stride")
    if parts.slice_wise:
        slice_axis = 2 if slice_axis is None else slice_axis
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (x, y, z), got {slice_axis!r}")
        strides = slice_wise_topology(strides, slice_axis)
        kernel_sizes = slice_wise_topology(kernel_sizes, slice_axis)
        stem = slice_wise_topology([stem], slice_axis)[0]
    return UNet3D(
        in_channels,
        num_classes,
        features,
        strides,
        kernel_sizes,
        norm=norm,
        dropout=dropout,
        deep_supervision=deep_supervision,
        stem_stride=stem,
        block=parts.block,
        skip=parts.skip,
        gate=parts.gate,
        slice_axis=slice_axis if parts.slice_wise else None,
    )


def plan_topology(
    patch_size: Sequence[int], spacing: Sequence[float], n_stages: int, min_size_to_pool: int = 8
) -> tuple[list[Triple], list[Triple]]:
    """nnU-Net-like strides and kernel sizes per stage for a patch (x, y, z) of voxels with spacing (x, y, z) mm.

    Stage 0 has stride 1. At each later stage an axis is halved when its feature map still has >= min_size_to_pool
    voxels (so it never drops below half that) and its current spacing is within 2x of the finest spacing among
    such poolable axes; otherwise it keeps stride 1 (a stage where no axis qualifies gets (1, 1, 1)). Thick-slice
    axes are thus left alone until pooling the fine axes has made the spacing roughly isotropic.

    Kernels: an axis more than 2x coarser than the finest axis at a stage's resolution gets kernel 1 (in-plane
    context only on thick slices); once an axis has reached kernel 3 it keeps it in deeper stages.
    """
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ValueError("patch_size and spacing need 3 entries (x, y, z)")
    if n_stages < 1:
        raise ValueError("n_stages must be >= 1")
    if any(s <= 0 for s in spacing) or any(n < 1 for n in patch_size):
        raise ValueError(f"spacing and patch_size must be positive, got {spacing}, {patch_size}")
    size = [int(n) for n in patch_size]
    current_spacing = [float(s) for s in spacing]
    kernel = [1, 1, 1]
    strides: list[Triple] = []
    kernels: list[Triple] = []
    for stage in range(n_stages):
        stride = [1, 1, 1]
        poolable = [n >= min_size_to_pool for n in size]
        if stage > 0 and any(poolable):
            finest_poolable = min(sp for sp, ok in zip(current_spacing, poolable) if ok)
            stride = [2 if ok and sp <= 2 * finest_poolable else 1 for sp, ok in zip(current_spacing, poolable)]
        size = [math.ceil(n / s) for n, s in zip(size, stride)]
        current_spacing = [sp * s for sp, s in zip(current_spacing, stride)]
        finest = min(current_spacing)
        kernel = [3 if k == 3 or sp <= 2 * finest else 1 for k, sp in zip(kernel, current_spacing)]
        strides.append((stride[0], stride[1], stride[2]))
        kernels.append((kernel[0], kernel[1], kernel[2]))
    return strides, kernels


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
