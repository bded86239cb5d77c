"""Where a voxel is resampled: canonical reorientation, cropping, separable resampling, intensity
normalisation, and the exact inverse of each step.

Forward (preprocessing) order, as nnU-Net does it: reorient -> crop to the nonzero box -> normalise -> resample.
Inverse (a prediction back onto the input's grid): resample back to the crop's shape -> paste into the
canonical grid -> undo the reorientation. Every number needed for the inverse lives in `CaseProperties`.

Resampling works in index space on the canonical grid, so each axis is independent: one 1-D interpolation
per axis (nearest, linear, or Keys cubic) applied in turn. That is exact for tensor-product kernels and is
far cheaper than a 3-D kernel evaluated per voxel (4 taps per axis instead of 64 per voxel), which keeps
large CT volumes quick on one core. Voxel centres are mapped edge-aligned: the resampled volume covers
the same physical box, and resampling back to the original shape maps centres onto centres.

numpy only (no torch), so that Dask workers stay small.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np

from .io import Geometry

# An axis whose spacing is more than this many times the finest one is "thick": it is interpolated
# linearly rather than cubically, which avoids ringing across few, distant slices (nnU-Net's rule of 3).
ANISOTROPY_THRESHOLD = 3.0


# ---------------------------------------------------------------------------------------------------------
# Orientation
# ---------------------------------------------------------------------------------------------------------
def canonical_axes(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The axis permutation and flips that bring an array closest to the identity direction (LPS+).

    Canonical axis k is original axis perm[k], flipped if flips[k]. Oblique images keep their residual
    rotation in the direction matrix; only the nearest axis-aligned orientation is undone.
    """
    direction = np.asarray(direction, dtype=np.float64)
    n = direction.shape[0]
    perm = [-1] * n
    flips = [False] * n
    weights = np.abs(direction).copy()  # weights[i, j]: how much array axis j points along physical axis i
    for _ in range(n):
        i, j = np.unravel_index(np.argmax(weights), weights.shape)
        perm[i] = int(j)
        flips[i] = bool(direction[i, j] < 0)
        weights[i, :] = -1
        weights[:, j] = -1
    return tuple(perm), tuple(flips)


def to_canonical(array: np.ndarray, perm: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    out = np.transpose(array, perm)
    flip_axes = tuple(k for k, f in enumerate(flips) if f)
    return np.flip(out, axis=flip_axes) if flip_axes else out


def from_canonical(array: np.ndarray, perm: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    flip_axes = tuple(k for k, f in enumerate(flips) if f)
    out = np.flip(array, axis=flip_axes) if flip_axes else array
    return np.transpose(out, np.argsort(perm))


def canonical_geometry(geometry: Geometry, perm: Sequence[int], flips: Sequence[bool]) -> Geometry:
    """The geometry of `to_canonical(array)`: same physical voxels, permuted and flipped index axes."""
    d = geometry.direction_matrix()
    size = np.asarray(geometry.size)
    spacing = np.asarray(geometry.spacing)
    origin = np.asarray(geometry.origin)
    new_dir = d[:, perm].copy()
    for k, f in enumerate(flips):
        if f:
            axis = perm[k]
            # the new first voxel is the old last one along that axis
            origin = origin + d[:, axis] * spacing[axis] * (size[axis] - 1)
            new_dir[:, k] *= -1
    return Geometry(
        size=tuple(int(size[p]) for p in perm),
        spacing=tuple(float(spacing[p]) for p in perm),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(v) for v in new_dir.ravel()),
    )


# ---------------------------------------------------------------------------------------------------------
# Cropping
# ---------------------------------------------------------------------------------------------------------
def nonzero_bbox(*masks: np.ndarray) -> tuple[tuple[int, int], ...]:
    """[start, stop) per axis of the union of the masks; the whole volume if they are all empty."""
    union = masks[0].astype(bool, copy=len(masks) > 1)
    for m in masks[1:]:
        union |= m.astype(bool, copy=False)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, union.shape[axis]))
    return tuple(box)


def crop(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    return array[tuple(slice(a, b) for a, b in bbox)]


def uncrop(array: np.ndarray, bbox: Sequence[Sequence[int]], full_shape: Sequence[int], fill=0) -> np.ndarray:
    out = np.full(tuple(full_shape) + array.shape[len(full_shape):], fill, dtype=array.dtype)
    out[tuple(slice(a, b) for a, b in bbox)] = array
    return out


# ---------------------------------------------------------------------------------------------------------
# Separable resampling
# ---------------------------------------------------------------------------------------------------------
def _keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5): interpolating, C1, 4 taps."""
    t = np.abs(t)
    t2, t3 = t * t, t * t * t
    return np.where(t <= 1, 1.5 * t3 - 2.5 * t2 + 1, np.where(t < 2, -0.5 * t3 + 2.5 * t2 - 4 * t + 2, 0.0))


def axis_taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each (taps, n_out), of a 1-D edge-aligned resampling; borders replicate."""
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.clip(np.floor(centres + 0.5), 0, n_in - 1).astype(np.int64)[None]
        return idx, np.ones_like(idx, dtype=np.float32)
    base = np.floor(centres)
    if order == 1:
        offsets = np.arange(0, 2)
        frac = centres - base
        weights = np.stack([1 - frac, frac])
    elif order == 3:
        offsets = np.arange(-1, 3)
        weights = _keys_cubic(centres[None] - (base[None] + offsets[:, None]))
    else:
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    idx = np.clip(base[None] + offsets[:, None], 0, n_in - 1).astype(np.int64)
    return idx, weights.astype(np.float32)


_MAX_CHUNK_VOXELS = 4_000_000  # bounds each temporary to ~16 MB whatever the volume's size


def _resample_axis(array: np.ndarray, axis: int, idx: np.ndarray, weights: np.ndarray, order: int,
                   transform=None) -> np.ndarray:
    """Apply a 1-D tap table (see `axis_taps`) along `axis`; `transform` (elementwise) is applied to each
    source chunk first, so that normalising costs no volume-sized copy."""
    n_out = idx.shape[1]
    out_shape = list(array.shape)
    out_shape[axis] = n_out
    out = np.empty(out_shape, dtype=np.float32)
    # Chunk along another axis so that the gathered temporaries stay small.
    chunk_axis = max((a for a in range(array.ndim) if a != axis), key=lambda a: array.shape[a])
    per_slice = int(np.prod(out_shape)) // max(out_shape[chunk_axis], 1)
    step = max(1, _MAX_CHUNK_VOXELS // max(per_slice, 1))
    wshape = [1] * array.ndim
    wshape[axis] = n_out
    for start in range(0, array.shape[chunk_axis], step):
        sl = [slice(None)] * array.ndim
        sl[chunk_axis] = slice(start, start + step)
        src = array[tuple(sl)]
        if transform is not None:
            src = transform(src)
        acc = np.take(src, idx[0], axis=axis).astype(np.float32, copy=False)
        acc = acc * weights[0].reshape(wshape) if order else acc.copy()
        for k in range(1, idx.shape[0]):
            acc += np.take(src, idx[k], axis=axis) * weights[k].reshape(wshape)
        out[tuple(sl)] = acc
    return out


def resample_to_shape(array: np.ndarray, out_shape: Sequence[int], orders: int | Sequence[int] = 3) -> np.ndarray:
    """Resample an (X, Y, Z) array to `out_shape`, one axis at a time, in float32 (order 0 keeps the dtype).

    `orders` is an interpolation order per axis (0 nearest, 1 linear, 3 cubic) or one for all axes.
    Axes that shrink most go first, so later passes touch fewer voxels.
    """
    out_shape = tuple(int(s) for s in out_shape)
    if isinstance(orders, int):
        orders = (orders,) * array.ndim
    if tuple(array.shape) == out_shape:
        return array
    if all(o == 0 for o in orders):
        # nearest: one gather with broadcast indices, no arithmetic, dtype kept
        index = [axis_taps(n, m, 0)[0][0] for n, m in zip(array.shape, out_shape)]
        return array[np.ix_(*index)]
    return _resample_passes([array], out_shape, orders)


def _resample_passes(holder: list, out_shape: tuple[int, ...], orders: Sequence[int], transform=None) -> np.ndarray:
    """The separable passes. The input comes in a one-element list that is emptied, so that when the caller
    keeps no other reference, each pass frees its input as soon as the next one has its output: for a CT
    volume that is one float32 copy less at the peak."""
    out = holder.pop()
    in_shape = out.shape
    for axis in sorted(range(out.ndim), key=lambda a: out_shape[a] / in_shape[a]):
        if out.shape[axis] != out_shape[axis]:
            idx, weights = axis_taps(out.shape[axis], out_shape[axis], orders[axis])
            out = _resample_axis(out, axis, idx, weights, orders[axis], transform)
            transform = None  # applied by the first pass
    return out if transform is None else transform(out)


def _box_tables(in_shape: Sequence[int], out_shape: Sequence[int], box):
    """For data that is constant outside `box`: the source slices, output slices and per-axis linear tap
    tables (relative to the source slices) of the outputs whose taps reach into the box."""
    out_slices, src_slices, tables = [], [], []
    for n_in, n_out, (b0, b1) in zip(in_shape, out_shape, box):
        idx, weights = axis_taps(n_in, n_out, 1)
        hit = np.flatnonzero((((idx >= b0) & (idx < b1)) & (weights > 0)).any(axis=0))
        o0, o1 = int(hit[0]), int(hit[-1]) + 1
        sub_idx = idx[:, o0:o1]
        s0, s1 = int(sub_idx.min()), int(sub_idx.max()) + 1
        out_slices.append(slice(o0, o1))
        src_slices.append(slice(s0, s1))
        tables.append((sub_idx - s0, weights[:, o0:o1]))
    return tuple(src_slices), tuple(out_slices), tables


def interpolation_orders(spacing: Sequence[float], order: int = 3) -> tuple[int, ...]:
    """Cubic in-plane, linear across a thick axis (max/min spacing above ANISOTROPY_THRESHOLD)."""
    finest = min(spacing)
    return tuple(min(order, 1) if s / finest > ANISOTROPY_THRESHOLD else order for s in spacing)


def label_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, voxel counts) of an integer label map; a histogram rather than np.unique's sort."""
    if label.dtype.kind in "ui" and label.size:
        low, high = int(label.min()), int(label.max())
        # few classes (the usual case): one comparison pass per value, no int64 copy of the volume
        if high - low < 16:
            counts = np.array([np.count_nonzero(label == v) for v in range(low, high + 1)])
            values = np.arange(low, high + 1)[counts > 0]
            return values.astype(label.dtype), counts[counts > 0]
    return np.unique(label, return_counts=True)


def resample_labels(label: np.ndarray, out_shape: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Resample a label map. `nearest` copies the closest voxel's class; `linear` interpolates each class's
    one-hot mask linearly and takes the argmax (smoother boundaries, nnU-Net's choice). Values like 255
    (ignore) are classes like any other."""
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(label.shape) == out_shape:
        return label
    if mode == "nearest":
        return resample_to_shape(label, out_shape, 0)
    if mode != "linear":
        raise ValueError(f"label resampling mode must be 'nearest' or 'linear', got {mode!r}")
    values, counts = label_counts(label)
    if values.size == 1:
        return np.full(out_shape, values[0], dtype=label.dtype)
    # Linear interpolation of one-hot masks preserves their sum (1), so the most frequent class needs no
    # pass of its own: its score is 1 minus the others'. A binary mask costs one resampling, not two.
    dominant = values[np.argmax(counts)]
    # Structures are usually small: everything happens in the box around the non-dominant classes, and its
    # outputs are the only ones that can differ from the dominant class.
    src, dst, tables = _box_tables(label.shape, out_shape, nonzero_bbox(label != dominant))
    sub = label[src]
    region = tuple(s.stop - s.start for s in dst)
    best = np.zeros(region, dtype=np.float32)
    total = np.zeros(region, dtype=np.float32)
    winner = np.full(region, dominant, dtype=label.dtype)
    for c in values:
        if c == dominant:
            continue
        score = np.ascontiguousarray(sub == c, dtype=np.float32)
        for axis, (idx, weights) in enumerate(tables):
            score = _resample_axis(score, axis, idx, weights, 1)
        total += score
        better = score > best
        np.copyto(best, score, where=better)
        winner[better] = c
    winner[(1.0 - total) >= best] = dominant
    out = np.full(out_shape, dominant, dtype=label.dtype)
    out[dst] = winner
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


# ---------------------------------------------------------------------------------------------------------
# Intensity normalisation
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Normalisation:
    """`ct`: clip to cohort foreground percentiles, z-score with the cohort foreground mean/std.
    `zscore`: per-case z-score over the nonzero region (voxels outside it stay 0 when it is a real mask)."""

    scheme: str
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None

    def fit(self, image: np.ndarray) -> dict:
        """The statistics this image is normalised with (no copy of the image is made)."""
        if self.scheme == "ct":
            return {"scheme": "ct", "mean": self.mean, "std": self.std}
        if self.scheme == "zscore":
            mask = image != 0
            count = int(np.count_nonzero(mask))
            where = mask if count else None
            mean = float(np.mean(image, where=where, dtype=np.float64)) if image.size else 0.0
            std = float(np.std(image, where=where, dtype=np.float64)) if image.size else 1.0
            # A background of exact zeros (skull-stripped MRI) is a mask, not tissue: it stays 0.
            masked = count < 0.75 * image.size
            return {"scheme": "zscore", "mean": mean, "std": std, "masked": masked}
        if self.scheme == "none":
            return {"scheme": "none"}
        raise ValueError(f"unknown normalisation scheme {self.scheme!r}")

    def transform(self, image: np.ndarray, stats: dict) -> np.ndarray:
        """Normalised float32, C-contiguous (the resampler's gathers want it); elementwise, so it can be
        applied chunk by chunk."""
        out = image.astype(np.float32, order="C", copy=True)
        if stats["scheme"] == "ct":
            np.clip(out, self.clip_low, self.clip_high, out=out)
        if stats["scheme"] in ("ct", "zscore"):
            out -= np.float32(stats["mean"])
            out /= np.float32(max(stats["std"], 1e-8))
        if stats.get("masked"):
            out[image == 0] = 0
        return out

    def apply(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
        stats = self.fit(image)
        return self.transform(image, stats), stats


def plan_normalisation(plan: dict) -> Normalisation:
    """The Normalisation a preprocessing plan records (`plan["normalisation"]`): training cases and inference
    inputs are normalised by this one reading of the plan. The clip and statistics keys exist only for `ct`."""
    n = plan["normalisation"]
    return Normalisation(n["scheme"], n.get("clip_low"), n.get("clip_high"), n.get("mean"), n.get("std"))


def plan_channels(plan: dict) -> int:
    """Input channels of the images a plan preprocesses (a multi-channel plan normalises each of its own)."""
    return len(plan.get("channel_normalisations") or [None])


def plan_channel_normalisations(plan: dict) -> list[Normalisation] | None:
    """One Normalisation per channel of a multi-channel plan (`plan["channel_normalisations"]`, channel order);
    None for a single-channel plan, whose one normalisation is `plan_normalisation`."""
    per_channel = plan.get("channel_normalisations")
    if not per_channel:
        return None
    return [Normalisation(n["scheme"], n.get("clip_low"), n.get("clip_high"), n.get("mean"), n.get("std"))
            for n in per_channel]


# ---------------------------------------------------------------------------------------------------------
# The whole forward step and its inverse
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CaseProperties:
    """Everything needed to put a preprocessed-grid array back onto the case's original grid."""

    original: dict  # Geometry.to_dict() of the input image
    perm: list[int]
    flips: list[bool]
    canonical_shape: list[int]
    canonical_spacing: list[float]
    bbox: list[list[int]]  # crop box [start, stop) per axis on the canonical grid
    resampled_shape: list[int]
    target_spacing: list[float]
    effective_spacing: list[float]  # the exact spacing of the preprocessed grid (target up to rounding)
    normalisation: dict | list = field(default_factory=dict)  # a list of per-channel dicts for a multi-channel case
    foreground_voxels: dict = field(default_factory=dict)  # class index -> voxel count after resampling

    def to_dict(self) -> dict:
        """The fields as a dict for props.json, sharing their values (no deep copy as dataclasses.asdict makes:
        the dict is written and dropped)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseProperties":
        return cls(**d)

    @property
    def original_geometry(self) -> Geometry:
        return Geometry.from_dict(self.original)


def preprocess_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    target_spacing: Sequence[float],
    normalisation: Normalisation | Sequence[Normalisation],
    image_order: int = 3,
    label_mode: str = "linear",
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Reorient, crop, normalise and resample one case held as (x, y, z) arrays."""
    return preprocess_consuming([image, label], geometry, target_spacing, normalisation, image_order, label_mode)


def preprocess_consuming(arrays: list, geometry: Geometry, target_spacing: Sequence[float],
                         normalisation: Normalisation | Sequence[Normalisation], image_order: int = 3,
                         label_mode: str = "linear") -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """`preprocess_arrays` for a caller that hands over its arrays in a list ([image, label], emptied here):
    the raw image is then freed after the first resampling pass instead of living until the end.

    A multi-channel case: `normalisation` is a list, one per channel, and the image its channels' (x, y, z) arrays
    (a list or a (C, x, y, z) array); every channel is cropped to the same box (nonzero in any channel) and
    resampled alike, each normalised by its own scheme and statistics; the result is (C, X, Y, Z) and
    props.normalisation a list of per-channel statistics."""
    image, label = arrays.pop(0), arrays.pop(0)
    multi = isinstance(normalisation, (list, tuple))
    channels = list(image) if multi else [image]
    norms = list(normalisation) if multi else [normalisation]
    if len(channels) != len(norms):
        raise ValueError(f"the image has {len(channels)} channels and the plan normalises {len(norms)}")
    del image
    perm, flips = canonical_axes(geometry.direction_matrix())
    canon = canonical_geometry(geometry, perm, flips)
    channels = [to_canonical(c, perm, flips) for c in channels]
    label = to_canonical(label, perm, flips) if label is not None else None

    nonzero = channels[0] != 0
    for other in channels[1:]:
        nonzero |= other != 0
    if label is not None:
        nonzero |= label > 0
    bbox = nonzero_bbox(nonzero)
    del nonzero
    label = crop(label, bbox) if label is not None else None

    out_shape = resampled_shape([b - a for a, b in bbox], canon.spacing, target_spacing)
    outputs, stats = [], []
    for norm in norms:
        holder = [crop(channels.pop(0), bbox)]
        norm_stats = norm.fit(holder[0])
        # Normalisation is elementwise: the first resampling pass applies it chunk by chunk, so no normalised
        # copy of the whole volume ever exists (one float32 volume less at the peak for a CT).
        outputs.append(_resample_passes(holder, out_shape, interpolation_orders(canon.spacing, image_order),
                                        transform=lambda chunk, n=norm, st=norm_stats: n.transform(chunk, st)))
        stats.append(norm_stats)
    image = np.stack(outputs) if multi else outputs[0]
    norm_stats = stats if multi else stats[0]
    del outputs
    if label is not None:
        label = resample_labels(label, out_shape, label_mode)
    cropped_shape = [b - a for a, b in bbox]
    props = CaseProperties(
        original=geometry.to_dict(),
        perm=list(perm),
        flips=list(flips),
        canonical_shape=list(canon.size),
        canonical_spacing=list(canon.spacing),
        bbox=[list(b) for b in bbox],
        resampled_shape=list(out_shape),
        target_spacing=[float(t) for t in target_spacing],
        effective_spacing=[float(c * s / o) for c, s, o in zip(cropped_shape, canon.spacing, out_shape)],
        normalisation=norm_stats,
    )
    if label is not None:
        values, counts = label_counts(label)
        props.foreground_voxels = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
    return image, label, props


def invert_labels(label: np.ndarray, props: CaseProperties, mode: str = "nearest") -> np.ndarray:
    """A label map on the preprocessed grid, back on the case's original (x, y, z) grid."""
    cropped_shape = [b - a for a, b in props.bbox]
    restored = resample_labels(label, cropped_shape, mode)
    full = uncrop(restored, props.bbox, props.canonical_shape, fill=0)
    return from_canonical(full, props.perm, props.flips)


def invert_probabilities(probs: np.ndarray, props: CaseProperties) -> np.ndarray:
    """Class probabilities (K, X, Y, Z) on the preprocessed grid -> argmax label map on the original grid.

    Probabilities are resampled linearly before the argmax (smoother than resampling the label map); outside
    the crop box everything is background, as it was cut away for being empty.
    """
    cropped_shape = [b - a for a, b in props.bbox]
    best = None
    out = np.zeros(cropped_shape, dtype=np.uint8)
    for k in range(probs.shape[0]):
        p = resample_to_shape(np.asarray(probs[k], dtype=np.float32), cropped_shape, 1)
        if best is None:
            best = p
            continue
        better = p > best
        best = np.where(better, p, best)
        out[better] = k
    full = uncrop(out, props.bbox, props.canonical_shape, fill=0)
    return from_canonical(full, props.perm, props.flips)
