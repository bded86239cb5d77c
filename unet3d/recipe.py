"""The training recipe, planned from the data, the device and the budget (nnU-Net plans from the data and the
GPU's memory; here the time budget and a measured calibration decide too).

What the planner decides, for every recipe key the config leaves unset (`None`; a value set in the config is
used exactly as given):

* ``patch_size``: the median training region rounded up to a multiple of 8 (the whole structure fits), under
  a voxel cap that grows with the GPU's free memory.
* ``features`` and ``stem_stride`` (the network's widths and whether stage 0 runs on a 2x coarser grid): a
  ladder of candidate networks, cheapest first, is *timed on the actual device* (a few real training
  iterations: sampling aside, forward, Dice+CE with deep supervision, backward, AdamW step). With a time budget
  the planner takes the most capable candidate that still fits the iterations it needs to converge into it
  (:func:`min_iterations`: ``MIN_ITERATIONS`` without mirroring, ``MIN_ITERATIONS_MIRRORED`` with it; a network
  that sees too few batches over-segments: see the README's quality notes); without one, today's default network.
* ``augment``: ``light_no_mirror`` (light geometry and intensity, no mirroring) when the run is too short for
  heavy augmentation to pay off (fewer than ``FULL_AUGMENT_MIN_ITERATIONS`` iterations), else ``full``. Mirroring
  is what slowed short runs most: a network shown scans flipped along every axis must tell structures apart by
  appearance alone (anterior from posterior hippocampus), which takes many more iterations to learn. Test-time
  augmentation mirrors over the axes training mirrored, so a model trained without mirroring predicts in one pass.
* ``iterations_per_epoch``, ``max_epochs``, ``val_every``: with a time budget, epochs of about 1/40 of the
  budget and validation every epoch unless its measured cost would take more than ``MAX_VALIDATION_SHARE`` of
  the budget; without one, 50 x 50 iterations, validation every epoch.
* ``batch_size``: 2 (nnU-Net's choice; on a CPU a larger batch only costs proportionally more time).
* ``ema_decay``: 0, no moving average of the weights. Set (e.g. 0.999), validation, the best checkpoint and so
  inference use the average. It did not earn a default: on the 8-minute hippocampus cascade the test Dice was
  0.8685 with an average over 5 % of the iterations and 0.874 without (README "Training recipe").

The recipe, every candidate's measured time and the reason for each choice are written to ``model.json`` and
the training log, so a user sees what was chosen and why, and can pin any part of it in the config.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .config import TrainConfig

if TYPE_CHECKING:  # torch is imported where a candidate is measured: the cascade's budget split needs no torch
    import torch

log = logging.getLogger(__name__)

# Iterations a candidate network must fit into the budget (README "Training recipe"; benchmarks/train_hippocampus.py,
# hippocampus, 2-core CPU): below them a network has not converged and its soft-Dice optimum over-segments.
# Mirrored runs learn slowly (validation Dice 0.87 after about 3,000 iterations); without mirroring both the
# [16, 32, 64] + stem and the [8, 16, 32, 64] full-resolution network were within 0.003-0.008 of their best
# 15-minute validation Dice after 2,000 (three runs; volume ratio 0.96-1.03 from then on), and [16, 32, 64, 128] at
# full resolution, 15 minutes in which it made only 1,915 iterations, ended at 0.894 (test 0.887, volume ratio 1.003).
MIN_ITERATIONS = 2000
MIN_ITERATIONS_MIRRORED = 4000
# Light augmentation without mirroring below this many iterations (README "Training recipe"). With mirroring, at
# 11,000-13,000 iterations (15 CPU minutes at 32x48x32 on a fast 2-core machine) light reached validation Dice 0.87
# after 233 s against 440 s with full, and ended as high; at about 5,000 (the same on a slower machine) light
# without mirroring reached 0.87 after 133 s against 545 s with mirroring, and ended at 0.890 against 0.878.
SHORT_RUN_AUGMENT = "light_no_mirror"
FULL_AUGMENT_MIN_ITERATIONS = 25_000
MAX_VALIDATION_SHARE = 0.10
MAX_CALIBRATION_SHARE = 0.05
EPOCHS_PER_BUDGET = 40
DEFAULT_EPOCHS = 50
DEFAULT_ITERATIONS = 50
DEFAULT_BATCH = 2
DEFAULT_FEATURES = [16, 32, 64, 128]
MAX_FEATURES = 320
CALIBRATION_ITERATIONS = 3
# A cascade's first stage only has to find the organ on a coarse grid (its box is grown by a margin, so a
# rough mask will do) and converges in a fraction of the iterations: it gets this share of the cascade's time.
ROI_STAGE_SHARE = 0.3

# Candidate networks, cheapest first: (base width, stem stride). Depth and the widths' doubling come from the
# patch (stages until the bottleneck is small), capped at MAX_FEATURES as nnU-Net does. (8, 1) costs 1.4-1.7x (16, 2)
# per iteration and works at full resolution: without mirroring, 15 CPU minutes on the hippocampus benchmark gave
# validation Dice 0.891 against 0.890 (last ten epochs 0.890 against 0.887 on average), test 0.884 against 0.878,
# 0.87 reached after 97 s against 133 s. (With mirroring and a 40x56x40 patch it had learned less in the same time
# than (16, 2): 0.873 against 0.878, too few iterations for a mirrored run.)
CPU_LADDER = [(8, 2), (16, 2), (8, 1), (16, 1), (24, 1), (32, 1)]
CUDA_LADDER = [(16, 1), (24, 1), (32, 1)]


@dataclass
class Recipe:
    """A complete, explicit training recipe (every value decided)."""

    features: list[int]
    stem_stride: list[int]
    batch_size: int
    patch_size: list[int]
    iterations_per_epoch: int
    max_epochs: int
    val_every: int
    augment: str
    # weight of the running average per step is 1 - ema_decay; 0: no average (a recipe planned before it existed)
    ema_decay: float = 0.0
    seconds_per_iteration: float | None = None  # measured, for the chosen network
    calibration: list[dict] = field(default_factory=list)  # every candidate timed: features, stem, s/iteration
    reasons: dict[str, str] = field(default_factory=dict)  # recipe key -> why it has this value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def identity(self) -> dict:
        """What makes two runs the same training (not the measurements or the explanations; no average is left
        out, as recipes planned before it existed had none, so that their checkpoints still resume)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in ("seconds_per_iteration", "calibration", "reasons") and not (k == "ema_decay" and not v)}


def min_iterations(augment: str) -> int:
    """Iterations a candidate network must fit into the budget under `augment` (a preset name or "none"):
    MIN_ITERATIONS_MIRRORED when the preset mirrors, else MIN_ITERATIONS."""
    from .augment import preset_mirror_axes

    return MIN_ITERATIONS_MIRRORED if preset_mirror_axes(augment) else MIN_ITERATIONS


def stage_time_budgets(time_limit_min: float | None, stage_limits: Sequence[float | None]) -> list[float | None]:
    """Minutes of training per cascade stage. `train.time_limit_min` is the budget per stage on average: a
    two-stage cascade shares 2 x time_limit_min, ROI_STAGE_SHARE of it to the coarse first stage and the rest
    to the full-resolution stage that decides the Dice. A stage's own `time_limit_min` is used as given (the
    other stage then gets time_limit_min)."""
    n = len(stage_limits)
    if n != 2 or any(v is not None for v in stage_limits) or time_limit_min is None:
        return [v if v is not None else time_limit_min for v in stage_limits]
    total = 2 * time_limit_min
    return [total * ROI_STAGE_SHARE, total * (1 - ROI_STAGE_SHARE)]


def widths(base: int, n_stages: int) -> list[int]:
    return [min(base * 2**i, MAX_FEATURES) for i in range(n_stages)]


def stage_count(patch: Sequence[int], stem: int, min_bottleneck: int = 4, max_stages: int = 6) -> int:
    """Stages (resolution levels) for a patch: halve until the smallest axis would drop below min_bottleneck."""
    size = min(math.ceil(p / stem) for p in patch)
    n = 1
    while n < max_stages and size / 2 >= min_bottleneck:
        size /= 2
        n += 1
    return max(n, 2)


def stem_strides(spacing: Sequence[float], stem: int) -> list[int]:
    """The stem strides only axes within 2x of the finest spacing (a thick-slice axis keeps its resolution)."""
    finest = min(spacing)
    return [stem if s <= 2 * finest else 1 for s in spacing]


def plan_slice_patch_size(shapes: Sequence[Sequence[int]], slice_axis: int, max_voxels: int,
                          multiple: int = 8) -> list[int]:
    """A slice-wise (2D) network's patch: whole slices (the median in-plane size rounded up to a multiple of 8,
    the larger in-plane side shrunk while one slice alone passes the voxel cap) stacked along `slice_axis` up to the
    voxel cap or the median depth. Every slice of the stack is one 2D sample, so an iteration sees about as many
    voxels as a 3D network's patch; the stack's depth needs no rounding (nothing pools across slices)."""
    median = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    plane = [a for a in range(3) if a != slice_axis]
    patch = [1, 1, 1]
    for a in plane:
        patch[a] = max(multiple, int(math.ceil(median[a] / multiple) * multiple))
    while patch[plane[0]] * patch[plane[1]] > max_voxels:
        a = max(plane, key=lambda axis: patch[axis])
        if patch[a] <= multiple:
            break
        patch[a] -= multiple
    slices_in_cap = max_voxels // (patch[plane[0]] * patch[plane[1]])
    patch[slice_axis] = int(max(1, min(math.ceil(median[slice_axis]), slices_in_cap)))
    return patch


def cuda_patch_voxels(device: torch.device, configured: int) -> int:
    """On a GPU the patch cap grows with free memory (about 128^3 per 10 GB, nnU-Net's reference point)."""
    if device.type != "cuda":
        return configured
    import torch

    free = torch.cuda.mem_get_info(device)[0]
    return max(configured, int(128**3 * min(free / 10e9, 3.0)))


def plan_recipe(cfg: TrainConfig, *, patch: list[int], spacing: Sequence[float], num_classes: int,
                in_channels: int, n_val_cases: int, device: torch.device, time_fn=None) -> Recipe:
    """Fill every recipe key that `cfg` leaves as None. `time_fn(features, stem_stride, batch, augment) ->
    seconds per training iteration` measures a candidate (default: :func:`measure_iteration` on `device`)."""
    reasons: dict[str, str] = {}
    budget_s = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    batch = cfg.batch_size or DEFAULT_BATCH
    reasons["batch_size"] = "set in the config" if cfg.batch_size else "2: nnU-Net's choice; larger batches cost proportionally more"
    augment_guess = cfg.augment if cfg.augment is not None else SHORT_RUN_AUGMENT
    if time_fn is None:
        architecture = {"architecture": cfg.architecture, "block": cfg.block, "skip": cfg.skip, "gate": cfg.gate}

        def time_fn(features, stem, b, aug):
            return measure_iteration(features, stem, patch, spacing, num_classes, in_channels, b, aug, device,
                                     architecture=architecture)

    calibration: list[dict] = []
    from .models import architecture_parts, slice_axis_for

    # a slice-wise (2D) network pools within slices only: its depth comes from the in-plane sides of the patch
    pooled = list(patch)
    if architecture_parts(cfg.architecture).slice_wise:
        pooled = [p for axis, p in enumerate(patch) if axis != slice_axis_for(spacing)]
    features, stem = cfg.features, cfg.stem_stride
    if features is not None and stem is None:
        stem = [1, 1, 1]
        reasons["stem_stride"] = "none: features are set in the config, the stem is chosen with the widths only"
    elif stem is not None:
        reasons["stem_stride"] = "set in the config"
    if features is not None:
        reasons["features"] = "set in the config"
    if features is None:
        if budget_s is None:
            stem = stem or [1, 1, 1]
            features = widths(DEFAULT_FEATURES[0], stage_count(pooled, max(stem)))
            reasons["features"] = "no time budget: the default network (base width 16)"
        else:
            ladder = CUDA_LADDER if device.type == "cuda" else CPU_LADDER
            if stem is not None:  # stem fixed by the user: only the widths are planned
                ladder = [(w, max(stem)) for w, _ in ladder]
                ladder = list(dict.fromkeys(ladder))
            chosen = None
            needed = min_iterations(augment_guess)
            t_calibration = time.perf_counter()
            for base, s in ladder:
                cand_stem = stem or stem_strides(spacing, s)
                cand = widths(base, stage_count(pooled, max(cand_stem)))
                t = time_fn(cand, cand_stem, batch, augment_guess)
                iterations = int(budget_s * (1 - MAX_VALIDATION_SHARE) / t) if t > 0 else 0
                calibration.append({"features": cand, "stem_stride": cand_stem, "seconds_per_iteration": round(t, 4),
                                    "iterations_in_budget": iterations})
                if chosen is None or iterations >= needed:
                    chosen = (cand, cand_stem, t, iterations)
                if iterations < needed:
                    break  # every later candidate is costlier still
                if time.perf_counter() - t_calibration > MAX_CALIBRATION_SHARE * budget_s:
                    break  # timing more candidates would eat the budget they are timed for
            features, stem, _t, iterations = chosen
            reasons["features"] = (
                f"the most capable candidate that fits >= {needed} iterations ({augment_guess}) into the "
                f"{budget_s / 60:g} min budget ({iterations} measured-time iterations)" if iterations >= needed
                else f"the cheapest candidate: none fits {needed} iterations ({augment_guess}) into "
                     f"{budget_s / 60:g} min")
    t_iter = next((c["seconds_per_iteration"] for c in calibration
                   if c["features"] == features and c["stem_stride"] == stem), None)
    if t_iter is None and budget_s is not None:
        t_iter = time_fn(features, stem, batch, augment_guess)
        calibration.append({"features": features, "stem_stride": stem, "seconds_per_iteration": round(t_iter, 4),
                            "iterations_in_budget": int(budget_s * (1 - MAX_VALIDATION_SHARE) / t_iter)})

    total_iterations = (int(budget_s * (1 - MAX_VALIDATION_SHARE) / t_iter) if budget_s is not None
                        else (cfg.max_epochs or DEFAULT_EPOCHS) * (cfg.iterations_per_epoch or DEFAULT_ITERATIONS))
    if cfg.augment is not None:
        augment = cfg.augment
        reasons["augment"] = "set in the config"
    else:
        augment = "full" if total_iterations >= FULL_AUGMENT_MIN_ITERATIONS else SHORT_RUN_AUGMENT
        reasons["augment"] = (f"{augment}: about {total_iterations} iterations planned "
                              f"({'>=' if augment == 'full' else '<'} {FULL_AUGMENT_MIN_ITERATIONS}, where heavy "
                              "augmentation starts to pay off)")

    budgeted = budget_s is not None
    iterations_per_epoch = _pick(reasons, "iterations_per_epoch", cfg.iterations_per_epoch, budgeted,
                                 lambda: int(np.clip(round(budget_s / EPOCHS_PER_BUDGET / t_iter), 10, 250)),
                                 f"epochs of about 1/{EPOCHS_PER_BUDGET} of the time budget", DEFAULT_ITERATIONS)
    max_epochs = _pick(reasons, "max_epochs", cfg.max_epochs, budgeted, lambda: 100_000,
                       "unbounded: the time budget ends the run", DEFAULT_EPOCHS)
    if cfg.val_every is not None:
        val_every = cfg.val_every
        reasons["val_every"] = "set in the config"
    elif budget_s is not None and n_val_cases:
        # A validation case costs about one forward pass per window: a third of a training iteration per
        # sample, and sliding windows overlap by half (about 2x the windows of a patch-sized case).
        val_cost = n_val_cases * 2 * t_iter / (3 * batch)
        epochs = max(1.0, budget_s / (iterations_per_epoch * t_iter + val_cost))
        val_every = max(1, math.ceil(epochs * val_cost / (MAX_VALIDATION_SHARE * budget_s)))
        reasons["val_every"] = f"validation (about {val_cost:.1f} s for {n_val_cases} cases) kept under " \
                               f"{MAX_VALIDATION_SHARE:.0%} of the budget"
    else:
        val_every = 1
        reasons["val_every"] = "every epoch"
    if cfg.ema_decay is not None:
        ema_decay = cfg.ema_decay
        reasons["ema_decay"] = "set in the config"
    else:
        ema_decay = 0.0
        reasons["ema_decay"] = "none: a moving average of the weights showed no gain on the hippocampus benchmark"
    recipe = Recipe(features=list(features), stem_stride=list(stem), batch_size=batch, patch_size=list(patch),
                    iterations_per_epoch=iterations_per_epoch, max_epochs=max_epochs, val_every=val_every,
                    augment=augment, ema_decay=ema_decay, seconds_per_iteration=t_iter, calibration=calibration,
                    reasons=reasons)
    return recipe


def _pick(reasons: dict[str, str], key: str, explicit, budgeted: bool, planned, planned_reason: str, default):
    """A recipe value: the config's if set; else planned from the budget (`planned()`), or the default when the
    run has no time budget. The reason goes into `reasons[key]`."""
    if explicit is not None:
        reasons[key] = "set in the config"
        return explicit
    if budgeted:
        reasons[key] = planned_reason
        return planned()
    reasons[key] = "no time budget: the default"
    return default


def measure_iteration(features: Sequence[int], stem_stride: Sequence[int], patch: Sequence[int],
                      spacing: Sequence[float], num_classes: int, in_channels: int, batch: int, augment: str,
                      device: torch.device, iterations: int = CALIBRATION_ITERATIONS,
                      architecture: dict | None = None) -> float:
    """Seconds per training iteration of a candidate on `device`: the median of a few timed iterations after
    one warm-up (augmentation, forward under autocast, deep-supervised Dice+CE, backward, AdamW step).
    `architecture`: build_network's architecture, block, skip and gate (default: a plain unet3d)."""
    import torch

    from .augment import BatchAugmenter, preset_config
    from .losses import DeepSupervisionLoss, DiceCELoss
    from .models import architecture_parts, build_network, slice_axis_for
    from .train import autocast, network_topology

    architecture = dict(architecture or {"architecture": "unet3d"})
    if architecture_parts(**architecture).slice_wise:
        architecture["slice_axis"] = slice_axis_for(spacing)
    strides, kernels = network_topology(patch, spacing, len(features), stem_stride)
    net = build_network(in_channels=in_channels, num_classes=num_classes, features=features, strides=strides,
                        kernel_sizes=kernels, deep_supervision=True, stem_stride=stem_stride,
                        **architecture).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = DeepSupervisionLoss(DiceCELoss())
    augment_config = preset_config(augment, spacing)
    augmenter = None if augment_config is None else BatchAugmenter(augment_config)
    gen = torch.Generator(device=device).manual_seed(0)
    context = augmenter.context(patch) if augmenter is not None else [0, 0, 0]
    padded = [p + 2 * c for p, c in zip(patch, context)]  # what the sampler cuts: warped, then cropped
    x = torch.randn(batch, in_channels, *padded, device=device)
    y = torch.randint(0, num_classes, (batch, 1, *padded), device=device, dtype=torch.uint8)
    times = []
    for i in range(iterations + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        img, lab = (augmenter(x, y, gen, crop=patch) if augmenter is not None else (x, y))
        with autocast(device):
            out = net(img)
        loss = loss_fn([o.float() for o in out], lab.long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    del net, opt
    return float(np.median(times))
