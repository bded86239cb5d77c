"""Training patches: cases from the preprocessed store, patch-size planning, and a sampler with foreground
oversampling and cascade ROI crops.

A patch may reach outside its volume (always, when the volume is smaller than the patch): the outside is
image 0.0 and label 0, exactly the padding that sliding-window inference applies, so the network never
meets a border at inference that it did not see in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .augment import center_crop  # noqa: F401 (where train, recipe and tests take it from)
from .case_folder import read_case_folder
from .config import TRAIN_DEFAULTS
from .labels import IGNORE_LABEL, map_labels

MAX_FOREGROUND_COORDS = 20_000  # per class and case: enough to sample centres from, small in memory


@dataclass
class CaseData:
    """One preprocessed case for a stage: image (C, X, Y, Z) float32 (C input channels), label (X, Y, Z) uint8 in
    stage classes."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    roi_box: list[list[int]] | None = None  # cascade stage 2: reference ROI (with margin) on this grid
    foreground: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (N, 3) voxel coordinates
    # (x, y, z) size of the bounding box of every labelled class (unannotated voxels aside); None: no foreground
    foreground_extent: tuple[int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])  # type: ignore[return-value]

    def region_shape(self) -> tuple[int, int, int]:
        if self.roi_box is None:
            return self.shape
        return tuple(b - a for a, b in self.roi_box)  # type: ignore[return-value]

    def nbytes(self) -> int:
        return int(self.image.nbytes + (self.label.nbytes if self.label is not None else 0))


def roi_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> list[list[int]] | None:
    """Bounding box [start, stop) of a mask's foreground, grown by margin_mm and clipped; None if empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        m = int(math.ceil(margin_mm / spacing[axis]))
        box.append([max(0, int(hit[0]) - m), min(mask.shape[axis], int(hit[-1]) + 1 + m)])
    return box


def load_case(case_dir: str | Path, label_map: dict[int, int] | None, roi: dict | None = None,
              in_memory: bool = True, seed: int = 0, ignore_value: int | None = None) -> CaseData:
    """A store case folder -> CaseData for one stage.

    ignore_value: the source label value of unannotated voxels (the config's `ignore_label`; None: IGNORE_LABEL);
    it becomes IGNORE_LABEL in the stage label, so such voxels are never a foreground sampling centre nor learned.

    roi: {"label_values": [source labels whose union is the ROI], "margin_mm": float} for a cascade's
    second stage (the reference ROI; the sampler jitters it).
    """
    d = Path(case_dir)
    image, raw, meta = read_case_folder(d, mmap=not in_memory)
    if raw is not None and not in_memory:
        raw = np.array(raw)  # the label is read whole even then: its foreground coordinates are listed below
    spacing = tuple(float(s) for s in meta["effective_spacing"])
    label = map_labels(raw, label_map, ignore_value) if raw is not None and label_map is not None else raw
    box = None
    if roi is not None and raw is not None:
        box = roi_box(np.isin(raw, list(roi["label_values"])), spacing, roi["margin_mm"])
    case = CaseData(meta["case_id"], image, label, spacing, box)  # type: ignore[arg-type]
    if label is not None:
        rng = np.random.default_rng(seed)
        low, high = None, None
        for c in np.unique(label):
            if c == 0 or c == IGNORE_LABEL:
                continue
            coords = np.argwhere(label == c).astype(np.int32)
            # the foreground's bounding box, from every coordinate (before the sampling centres are thinned out)
            low = coords.min(0) if low is None else np.minimum(low, coords.min(0))
            high = coords.max(0) if high is None else np.maximum(high, coords.max(0))
            if len(coords) > MAX_FOREGROUND_COORDS:
                coords = coords[rng.choice(len(coords), MAX_FOREGROUND_COORDS, replace=False)]
            case.foreground[int(c)] = coords
        if low is not None:
            case.foreground_extent = tuple(int(e) for e in high - low + 1)  # type: ignore[assignment]
    return case


def plan_patch_size(shapes: Sequence[Sequence[int]], spacing: Sequence[float], max_voxels: int,
                    multiple: int = 8, foreground_extents: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The median shape rounded up to a multiple of 8 (the whole structure fits, as nnU-Net plans for
    small volumes), shrunk along the physically longest axis until under the voxel budget.

    `foreground_extents`, each training case's foreground bounding-box size, are given where compute and not
    memory limits training (a time budget on a CPU). They shrink the patch to what the structure needs: per
    axis the extent that 90 % of the cases' foreground fits in, at least half the median shape (context around
    a small structure), rounded up to a multiple of 8. On scans already cropped around their structure (MSD
    hippocampus: 35x50x36 voxels, foreground 22x39x26) the background beyond it costs time without teaching
    much: 32x48x32 instead of 40x56x40 was ahead at every validation of a 12-minute CPU run (README "Training
    recipe").
    """
    median = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    patch = [max(multiple, int(math.ceil(m / multiple) * multiple)) for m in median]
    if foreground_extents:
        needed = np.maximum(np.percentile(np.asarray(foreground_extents, dtype=np.float64), 90, axis=0), median / 2)
        patch = [min(p, max(multiple, int(math.ceil(n / multiple) * multiple))) for p, n in zip(patch, needed)]
    while int(np.prod(patch)) > max_voxels:
        extents = [p * s if p > multiple else -1 for p, s in zip(patch, spacing)]
        axis = int(np.argmax(extents))
        if extents[axis] < 0:
            break
        patch[axis] -= multiple
    return patch


class PatchSampler:
    """Random training batches (image (B, C, *patch) float32, label (B, 1, *patch) uint8) on `device`.

    A fraction `foreground_oversample` of the patches is centred on a foreground voxel of a random present
    class (rare classes would otherwise hardly be seen); the rest are placed uniformly. With `keep_on_device`
    the whole training set lives on the device and patches are cut there (no host->device copy per step).
    """

    def __init__(self, cases: Sequence[CaseData], patch_size: Sequence[int], batch_size: int, device: torch.device,
                 foreground_oversample: float = TRAIN_DEFAULTS.foreground_oversample, roi_jitter_mm: float = 0.0, keep_on_device: bool = False,
                 context: Sequence[int] = (0, 0, 0)):
        self.cases = [c for c in cases if c.label is not None]
        if not self.cases:
            raise ValueError("no labelled training case")
        # Patches are placed as `patch_size` patches (so every voxel can be a patch's border, and foreground
        # sits where it would without context), then cut `context` voxels larger on each side for the warp.
        self.placed = tuple(int(p) for p in patch_size)
        self.context = tuple(int(c) for c in context)
        self.patch = tuple(p + 2 * c for p, c in zip(self.placed, self.context))
        self.batch_size = batch_size
        self.device = device
        self.foreground_oversample = foreground_oversample
        self.roi_jitter_mm = roi_jitter_mm
        self.keep_on_device = keep_on_device
        self._images: list = [c.image for c in self.cases]
        self._labels: list = [c.label for c in self.cases]
        if keep_on_device:
            self._images = [torch.as_tensor(np.ascontiguousarray(c.image)).to(device) for c in self.cases]
            self._labels = [torch.as_tensor(np.ascontiguousarray(c.label)).to(device) for c in self.cases]

    def _region(self, case: CaseData, rng: np.random.Generator) -> list[list[int]]:
        """The part of the volume this sample may see: everything, or a jittered ROI box (stage 2)."""
        if case.roi_box is None:
            return [[0, s] for s in case.shape]
        box = []
        for (a, b), n, sp in zip(case.roi_box, case.shape, case.spacing):
            j = self.roi_jitter_mm / sp
            a2 = int(round(a + rng.uniform(-j, j))) if j else a
            b2 = int(round(b + rng.uniform(-j, j))) if j else b
            a2, b2 = max(0, min(a2, n - 1)), min(n, max(b2, 1))
            if b2 <= a2:
                a2, b2 = a, b
            box.append([a2, b2])
        return box

    def _corner(self, case: CaseData, region, rng: np.random.Generator, foreground: bool) -> list[int]:
        """Lower corner of the patch (may be negative or past the region: padding)."""
        lows, highs = [], []
        for (a, b), p in zip(region, self.placed):
            size = b - a
            # region larger than patch: stay inside; smaller: the region sits anywhere inside the patch
            lo, hi = (a, b - p) if size >= p else (b - p, a)
            lows.append(lo)
            highs.append(hi)
        corner = None
        if foreground and case.foreground:
            classes = sorted(case.foreground)
            coords = case.foreground[classes[rng.integers(len(classes))]]
            inside = np.all((coords >= [a for a, _ in region]) & (coords < [b for _, b in region]), axis=1)
            coords = coords[inside]
            if len(coords):
                centre = coords[rng.integers(len(coords))]
                corner = [int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(centre, self.placed, lows, highs)]
        if corner is None:
            corner = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]
        return [c - m for c, m in zip(corner, self.context)]

    def _cut(self, index: int, region, corner) -> tuple:
        """Copy the patch at `corner`, zero outside `region`."""
        src, dst = [], []
        for (a, b), c, p in zip(region, corner, self.patch):
            s0, s1 = max(a, c), min(b, c + p)
            src.append(slice(s0, max(s0, s1)))
            dst.append(slice(s0 - c, s0 - c + max(0, s1 - s0)))
        image, label = self._images[index], self._labels[index]
        if self.keep_on_device:
            img = torch.zeros((image.shape[0], *self.patch), dtype=torch.float32, device=self.device)
            lab = torch.zeros(self.patch, dtype=torch.uint8, device=self.device)
        else:
            img = np.zeros((image.shape[0], *self.patch), dtype=np.float32)  # (C, *patch)
            lab = np.zeros(self.patch, dtype=np.uint8)
        img[(slice(None), *dst)] = image[(slice(None), *src)]
        lab[tuple(dst)] = label[tuple(src)]
        return img, lab

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for _ in range(self.batch_size):
            index = int(rng.integers(len(self.cases)))
            case = self.cases[index]
            region = self._region(case, rng)
            corner = self._corner(case, region, rng, foreground=rng.random() < self.foreground_oversample)
            img, lab = self._cut(index, region, corner)
            images.append(img)
            labels.append(lab)
        if self.keep_on_device:
            return torch.stack(images), torch.stack(labels)[:, None]
        image = torch.from_numpy(np.stack(images))
        label = torch.from_numpy(np.stack(labels)[:, None])
        if self.device.type == "cuda":
            return image.pin_memory().to(self.device, non_blocking=True), label.pin_memory().to(self.device, non_blocking=True)
        return image, label


