"""3D U-Net family built from one configurable encoder/decoder.

Four named architectures share a single network class, :class:`UNet3D`, which is configured by a few per-stage lists
(features, strides, kernel sizes) and three switches:

* ``unet3d``            - Çiçek et al. 2016: two conv-norm-ReLU per level, max-pool down, transposed-conv up,
                          concatenated skips.
* ``residual_unet3d``   - the same with residual blocks (two convs plus an identity / 1x1 shortcut).
* ``attention_unet3d``  - the same with additive attention gates on the skips (Oktay et al. 2018).
* ``unet3d_plusplus``   - UNet++ (Zhou et al. 2018): nested decoder nodes with dense skip connections.

Tensors are (B, C, X, Y, Z). Any spatial size is accepted: pooling uses ``ceil_mode`` so no voxel is dropped, and
upsampled decoder maps are cropped / padded to their skip's size, so the logits always have the input's spatial size.

Example::

    net = build_network("unet3d", in_channels=1, num_classes=3)
    logits = net(torch.randn(2, 1, 40, 56, 40))          # (2, 3, 40, 56, 40)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TRAIN_DEFAULTS

__all__ = [
    "ARCHITECTURES",
    "AttentionGate",
    "ConvNormAct",
    "DecoderNode",
    "DoubleConv",
    "Down",
    "InstanceNorm",
    "ResidualBlock",
    "UNet3D",
    "Up",
    "build_network",
    "count_parameters",
    "match_size",
    "plan_topology",
]

ARCHITECTURES: tuple[str, ...] = ("unet3d", "residual_unet3d", "attention_unet3d", "unet3d_plusplus")
NORMS: tuple[str, ...] = ("batch", "instance", "group")

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


class ConvNormAct(nn.Sequential):
    """Conv3d (odd kernel, 'same' padding, no bias) -> norm -> ReLU (omitted with act=False).

    (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, norm: str, act: bool = True):
        padding = tuple(k // 2 for k in kernel_size)
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=padding, bias=False),  # norm supplies the bias
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
            else nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False), make_norm(norm, out_channels))
        )
        self.act = nn.ReLU(inplace=True)  # acts on the fresh sum, never on a tensor autograd still needs

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.dropout(self.conv1(x))) + self.shortcut(x))


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
        self.theta_skip = nn.Conv3d(skip_channels, inter_channels, kernel_size=stride, stride=stride, bias=False)
        self.phi_gate = nn.Conv3d(gate_channels, inter_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.psi = nn.Conv3d(inter_channels, 1, kernel_size=1, bias=True)

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
            nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class FullResolutionRefine(nn.Module):
    """Back to the input grid after a strided stem: transposed conv up, concatenate the input image, one conv.

    coarse: (B, C_coarse, ~X / s, ...), image: (B, C_in, X, Y, Z) -> (B, out_channels, X, Y, Z). Seeing the image
    again at full resolution lets the boundary follow its edges instead of the coarse grid's blocks.
    """

    def __init__(self, coarse_channels: int, image_channels: int, out_channels: int, stride: Triple, norm: str):
        super().__init__()
        self.out_channels = out_channels
        self.up = Up(coarse_channels, out_channels, stride)
        self.conv = ConvNormAct(out_channels + image_channels, out_channels, (3, 3, 3), norm)

    def forward(self, coarse: Tensor, image: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(coarse, image.shape[2:]), image], dim=1))


class UNet3D(nn.Module):
    """Configurable 3D U-Net: plain, residual, attention-gated and nested (UNet++) variants in one class.

    Stage i (0..L, L = len(features) - 1) pools by strides[i] (strides[0] must be (1, 1, 1)) and runs one block with
    features[i] channels and kernel kernel_sizes[i]. Decoder node X[i, j] (j >= 1) lives at stage i's resolution;
    the plain U-Net computes only the nodes on the path i + j = L with the single encoder skip X[i, 0], UNet++
    computes every node with dense skips X[i, 0..j-1]. Row i's last node X[i, L - i] is the decoder output at scale
    1 / prod(strides[1..i]).

    stem_stride > 1: a :class:`StridedStem` puts stage 0 on a grid coarser by stem_stride, and a
    :class:`FullResolutionRefine` brings row 0 back to the input grid (several times cheaper per iteration on a
    CPU; the planner in :mod:`unet3d.recipe` picks it for short CPU budgets).

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
        residual: bool = False,
        attention: bool = False,
        nested: bool = False,
        channels_last: bool = True,
        stem_stride: int | Sequence[int] = 1,
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
        self.deep_supervision = deep_supervision
        self.nested = nested
        self.channels_last = channels_last
        self.depth = n_stages - 1
        self.stem_stride = _triple(stem_stride, "stem_stride")
        if any(s < 1 for s in self.stem_stride):
            raise ValueError(f"stem_stride must be positive, got {self.stem_stride}")
        block: type[nn.Module] = ResidualBlock if residual else DoubleConv

        # Strided stem: a strided conv takes the input to stage 0's grid, so no block runs at full resolution
        # (the costliest part of a 3D U-Net on a CPU); a light refinement restores full-resolution detail.
        self.stem: nn.Module | None = None
        first_in = in_channels
        if self.stem_stride != (1, 1, 1):
            f0 = self.features[0]
            self.stem = StridedStem(in_channels, f0, self.stem_stride, norm)
            self.refine = FullResolutionRefine(f0, in_channels, max(f0 // 2, 4), self.stem_stride, norm)
            first_in = f0
        self.downs = nn.ModuleList(Down(s) for s in self.strides)
        self.encoder = nn.ModuleList(
            block(c_in, c_out, k, norm, dropout)
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
                block=block,
                attention=attention,
            )
        n_heads = self.depth if deep_supervision else 1
        # Head i reads output i of _outputs: with a stem, output 0 is the refined full-resolution map and output
        # i >= 1 is decoder row i - 1; without one, output i is decoder row i.
        head_channels = [self.refine.out_channels, *self.features] if self.stem is not None else list(self.features)
        self.heads = nn.ModuleList(nn.Conv3d(head_channels[i], num_classes, 1) for i in range(n_heads))
        self.apply(_kaiming_init)
        if channels_last:
            # Weights in the same layout as the activations; a mixed pair makes oneDNN reorder on every step.
            self.to(memory_format=torch.channels_last_3d)

    def _decoder_nodes(self) -> list[tuple[int, int]]:
        """(row, column) of every computed decoder node, in an order where each node's inputs already exist."""
        depth = self.depth
        return [(i, j) for j in range(1, depth + 1) for i in (range(depth - j + 1) if self.nested else [depth - j])]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
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
) -> nn.Module:
    """Build one of ARCHITECTURES.

    strides / kernel_sizes: one (x, y, z) triple per stage (see :func:`plan_topology`); default stride 1 for the
    first stage and 2 after it, kernel 3 everywhere.
    """
    switches = {
        "unet3d": {},
        "residual_unet3d": {"residual": True},
        "attention_unet3d": {"attention": True},
        "unet3d_plusplus": {"nested": True},
    }
    if architecture not in switches:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    n_stages = len(features)
    if strides is None:
        strides = [(1, 1, 1)] + [(2, 2, 2)] * (n_stages - 1)
    if kernel_sizes is None:
        kernel_sizes = [(3, 3, 3)] * n_stages
    return UNet3D(
        in_channels,
        num_classes,
        features,
        [_triple(s, "stride") for s in strides],
        [_triple(k, "kernel size") for k in kernel_sizes],
        norm=norm,
        dropout=dropout,
        deep_supervision=deep_supervision,
        stem_stride=stem_stride,
        **switches[architecture],
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
