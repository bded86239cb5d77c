"""Cascaded inference: trained stage models applied to a case, results on the case's original grid.

Stage 1 ("roi") sees the whole volume at its coarse spacing; its foreground (connected components, noise
removed) gives a bounding box, grown by `margin_mm`; stage 2 segments inside that box at full resolution and
is pasted back. A single-stage model is the same code without the crop. Every prediction is mapped back
through the stored preprocessing properties (undo resampling, crop and reorientation) so that it has
exactly the input's size, spacing, origin and direction.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from .augment import preset_mirror_axes
from .case_folder import case_properties, read_case_folder
from .jobs import ModelRef, PredictionJob  # noqa: F401  (part of this module's API; defined without torch)
from .config import INFER_DEFAULTS
from .io import Geometry, atomic_path, from_numpy, read_image, save_array, to_numpy, write_image_atomic
from .postprocess import apply_postprocessing
from .resample import (
    CaseProperties,
    invert_probabilities,
    plan_channel_normalisations,
    plan_channels,
    plan_normalisation,
    preprocess_arrays,
    resample_to_shape,
)
from .sampling import roi_box
from .sliding_window import sliding_window_predict
from .train import ModelFiles, build_model_from_config, pick_device

log = logging.getLogger(__name__)

# Components of the stage-1 mask smaller than this fraction of the largest are noise, not anatomy.
MIN_COMPONENT_FRACTION = 0.05
MIN_COMPONENT_VOXELS = 8


@dataclass
class StageModel:
    """A trained stage, ready to predict: network in eval mode plus what it was trained with."""

    name: str
    network: torch.nn.Module
    patch_size: list[int]
    classes: dict[int, str]
    label_map: dict[int, int]
    spacing: list[float]
    margin_mm: float | None
    device: torch.device
    postprocess: dict | None = None  # chosen on validation at training time (unet3d.postprocess)
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # what test-time augmentation may mirror: what training mirrored

    @property
    def num_classes(self) -> int:
        return max(self.classes) + 1

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "auto", checkpoint: str | None = None,
             margin_mm: float | None = None) -> "StageModel":
        """The model of a model folder (unet3d.train.ModelFiles); `checkpoint`: a file name in it other than
        the best checkpoint."""
        files = ModelFiles(model_dir)
        model_dir = files.folder
        meta = json.loads(files.model_json.read_text())
        dev = pick_device(device) if isinstance(device, str) else device
        network = build_model_from_config(meta["model"])
        path = model_dir / checkpoint if checkpoint else files.best_checkpoint
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["model"])
        network.to(dev).eval()
        roi = meta.get("roi") or {}
        return cls(meta["stage"], network, list(meta["patch_size"]), {int(k): v for k, v in meta["classes"].items()},
                   {int(k): int(v) for k, v in meta["label_map"].items()}, list(meta["spacing"]),
                   margin_mm if margin_mm is not None else roi.get("margin_mm"), dev, meta.get("postprocess"),
                   trained_mirror_axes(meta))

    def predict(self, image: np.ndarray, overlap: float = INFER_DEFAULTS.overlap, tta: bool = INFER_DEFAULTS.tta,
                batch_size: int = INFER_DEFAULTS.batch_size) -> np.ndarray:
        """Class probabilities (K, X, Y, Z) float32 for a preprocessed image (C, X, Y, Z). `tta`: also predict the
        image mirrored over the axes that training mirrored over (none: one pass, whatever `tta` says)."""
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        probs = sliding_window_predict(self.network, tensor, self.patch_size, self.num_classes, overlap=overlap,
                                       batch_size=batch_size, mirror_axes=self.mirror_axes if tta else None,
                                       device=self.device)
        return probs.numpy()


def trained_mirror_axes(meta: dict) -> tuple[int, ...]:
    """The axes a model's training mirrored over (model.json), the only ones test-time augmentation may use: a
    network never shown a mirrored scan segments one badly (hippocampus, trained without augmentation: validation
    Dice 0.888 in one pass, 0.17 averaged over the 8 mirrorings). A model.json written before `mirror_axes` was
    recorded: the axes of its recipe's augmentation preset; every axis where it has no recipe."""
    if "mirror_axes" in meta:
        return tuple(int(a) for a in meta["mirror_axes"])
    return tuple(preset_mirror_axes((meta.get("recipe") or {}).get("augment") or "full"))


def preprocess_for_plan(image: np.ndarray | list[np.ndarray], geometry: Geometry,
                        plan: dict) -> tuple[np.ndarray, CaseProperties]:
    """A raw (x, y, z) image, or a multi-channel case's list of them (channel order), preprocessed exactly as the
    plan's training cases were: (C, X, Y, Z)."""
    channels = image if isinstance(image, list) else [image]
    if len(channels) != plan_channels(plan):
        raise ValueError(f"the model takes {plan_channels(plan)} input channel(s) per case, got {len(channels)}")
    per_channel = plan_channel_normalisations(plan)
    pre, _, props = preprocess_arrays(channels if per_channel else channels[0], None, geometry, plan["target_spacing"],
                                      per_channel or plan_normalisation(plan), image_order=plan["image_order"],
                                      label_mode=plan["label_mode"])
    return (pre if per_channel else pre[None]), props


def roi_from_mask(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> list[list[int]] | None:
    """Bounding box of the mask's significant connected components, grown by margin_mm, clipped."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= max(MIN_COMPONENT_VOXELS, MIN_COMPONENT_FRACTION * sizes.max())) + 1
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return roi_box(np.isin(labels, keep), spacing, margin_mm)


@dataclass
class CascadeOutput:
    labels: dict[str, np.ndarray]  # stage name -> label map on the original (x, y, z) grid, stage classes
    roi_box: list[list[int]] | None  # stage-2 crop on the stage-2 preprocessed grid (None: no ROI found)
    warnings: list[str]


def run_cascade(image: np.ndarray, geometry: Geometry, stages: Sequence[StageModel], plans: Sequence[dict],
                overlap: float = INFER_DEFAULTS.overlap, tta: bool = INFER_DEFAULTS.tta,
                batch_size: int = INFER_DEFAULTS.batch_size,
                stage1_probs: np.ndarray | None = None) -> tuple[CascadeOutput, np.ndarray]:
    """Segment one raw (x, y, z) image: preprocess it with each stage's plan, then `cascade`."""
    inputs = [preprocess_for_plan(image, geometry, plan) for plan in plans]
    return cascade(inputs, stages, overlap, tta, batch_size, stage1_probs)


def cascade(inputs: Sequence[tuple[np.ndarray, CaseProperties]], stages: Sequence[StageModel],
            overlap: float = INFER_DEFAULTS.overlap, tta: bool = INFER_DEFAULTS.tta,
            batch_size: int = INFER_DEFAULTS.batch_size,
            stage1_probs: np.ndarray | None = None) -> tuple[CascadeOutput, np.ndarray]:
    """Segment one case given, per stage, its preprocessed image (C, X, Y, Z) and properties.

    `stage1_probs`: stage 1's probabilities from an earlier run (the stage-1 cache); they are returned as the
    second value so that the caller can cache them.
    """
    warnings: list[str] = []
    first = stages[0]
    pre1, props1 = inputs[0]
    probs1 = stage1_probs if stage1_probs is not None else first.predict(pre1, overlap, tta, batch_size)
    labels = {first.name: apply_postprocessing(invert_probabilities(probs1, props1), first.postprocess)}
    if len(stages) == 1:
        return CascadeOutput(labels, None, warnings), probs1

    second = stages[1]
    pre2, props2 = inputs[1]
    grid2 = pre2.shape[1:]
    # Both grids cover the same cropped physical box (the crop is decided before resampling), so stage 1's
    # probabilities map onto stage 2's grid by resampling alone.
    fg1 = 1.0 - resample_to_shape(np.asarray(probs1[0], dtype=np.float32), grid2, 1)
    box = roi_from_mask(fg1 > 0.5, props2.effective_spacing, second.margin_mm or 0.0)
    if box is None:
        warnings.append(f"stage {first.name} found no foreground: stage {second.name} prediction is empty")
        labels[second.name] = np.zeros(tuple(props2.original["size"]), dtype=np.uint8)
        return CascadeOutput(labels, None, warnings), probs1
    sl = tuple(slice(a, b) for a, b in box)
    crop_probs = second.predict(pre2[(slice(None), *sl)], overlap, tta, batch_size)
    # Outside the crop the answer is background: probability 1 for class 0.
    full = np.zeros((second.num_classes, *grid2), dtype=np.float32)
    full[0] = 1.0
    full[(slice(None), *sl)] = crop_probs
    labels[second.name] = apply_postprocessing(invert_probabilities(full, props2), second.postprocess)
    return CascadeOutput(labels, box, warnings), probs1


# ---------------------------------------------------------------------------------------------------------
# Many cases: the one inference loop of the pipeline's infer stage and of `unet3d predict`
# ---------------------------------------------------------------------------------------------------------
def load_preprocessed_case(case_dir: str | Path) -> tuple[np.ndarray, CaseProperties]:
    """A preprocessed case folder's image (C, X, Y, Z) float32 and its properties (props.json)."""
    image, _label, props = read_case_folder(case_dir)
    return image, case_properties(props)


@dataclass
class CaseOutcome:
    case_id: str
    written: list[Path]
    warnings: list[str]
    resumed: bool = False  # every target existed: predicted before an interruption
    error: str | None = None  # keep_going: why this case failed
    roi_found: bool | None = None  # a cascade's stage 1 found an ROI (None: one stage, or nothing predicted)


@dataclass
class InferenceSummary:
    outcomes: list[CaseOutcome]

    @property
    def predicted(self) -> int:
        return sum(1 for o in self.outcomes if o.written)

    @property
    def resumed(self) -> int:
        return sum(1 for o in self.outcomes if o.resumed)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.error is not None)

    @property
    def warnings(self) -> list[str]:
        return [f"{o.case_id}: {w}" for o in self.outcomes for w in o.warnings]


def _job_inputs(job: PredictionJob, plans: Sequence[dict]) -> tuple[list[tuple[np.ndarray, CaseProperties]], Geometry]:
    if job.case_dirs is not None:
        inputs = [load_preprocessed_case(d) for d in job.case_dirs]
        return inputs, Geometry.from_dict(inputs[0][1].original)
    if job.channels:
        arrays, geometry = read_channel_images(job.channels)
        return [preprocess_for_plan(arrays, geometry, plan) for plan in plans], geometry
    image = read_image(job.image)
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    geometry = Geometry.of(image)
    array = to_numpy(image)
    return [preprocess_for_plan(array, geometry, plan) for plan in plans], geometry


def read_channel_images(files: Sequence[str | Path]) -> tuple[list[np.ndarray], Geometry]:
    """A multi-channel case's (x, y, z) arrays, one per file in channel order, and channel 0's geometry; a channel
    that is not 3-D or not on channel 0's voxel grid is refused naming it (its voxels would not correspond)."""
    arrays, geometry = [], None
    for channel, file in enumerate(files):
        image = read_image(file)
        if image.GetDimension() != 3:
            raise ValueError(f"channel {channel} ({Path(file).name}): expected a 3-D image, got "
                             f"{image.GetDimension()}-D")
        g = Geometry.of(image)
        if geometry is None:
            geometry = g
        elif g.size != geometry.size or not np.allclose(g.spacing, geometry.spacing, rtol=1e-3) or \
                not np.allclose(g.origin, geometry.origin, atol=0.1 * min(geometry.spacing)) or \
                not np.allclose(g.direction, geometry.direction, atol=1e-3):
            raise ValueError(f"channel {channel} ({Path(file).name}) is not on the voxel grid of channel 0 "
                             f"({Path(files[0]).name}): size {g.size} vs {geometry.size}, spacing "
                             f"{tuple(round(s, 4) for s in g.spacing)} vs "
                             f"{tuple(round(s, 4) for s in geometry.spacing)}")
        arrays.append(to_numpy(image))
    return arrays, geometry


def _predict_job(job: PredictionJob, models: Sequence[StageModel], plans: Sequence[dict], overlap: float, tta: bool,
                 batch_size: int) -> CaseOutcome:
    inputs, geometry = _job_inputs(job, plans)
    cache = job.stage1_cache
    cached = np.load(cache).astype(np.float32) if cache is not None and cache.exists() else None
    out, probs1 = cascade(inputs, models, overlap, tta, batch_size, stage1_probs=cached)
    if cached is None and cache is not None:
        with atomic_path(cache, suffix=".tmp.npy") as tmp:
            save_array(tmp, probs1.astype(np.float16))
    written = []
    for name, labels in out.labels.items():
        written.append(write_image_atomic(from_numpy(labels.astype(np.uint8), geometry), job.targets[name]))
    return CaseOutcome(job.case_id, written, list(out.warnings),
                       roi_found=(out.roi_box is not None) if len(models) > 1 else None)


def infer_cases(jobs: Sequence[PredictionJob], models: Sequence[StageModel], plans: Sequence[dict],
                overlap: float = INFER_DEFAULTS.overlap, tta: bool = INFER_DEFAULTS.tta,
                batch_size: int = INFER_DEFAULTS.batch_size, resume: bool = True,
                keep_going: bool = False, progress: bool = True, desc: str = "infer") -> InferenceSummary:
    """Predict every job through the cascade and write its label maps atomically.

    resume: a job whose targets all exist was predicted before an interruption and is skipped.
    keep_going: a failing case is recorded (CaseOutcome.error) and the others still run; otherwise it raises.
    """
    from tqdm.auto import tqdm

    outcomes = []
    for job in tqdm(jobs, desc=desc, unit="case", disable=not progress, leave=False):
        outcome = infer_case(job, models, plans, overlap, tta, batch_size, resume, keep_going)
        for w in outcome.warnings:
            log.warning("case %s: %s", job.case_id, w)
        outcomes.append(outcome)
    return InferenceSummary(outcomes)


def job_pending(job: PredictionJob, resume: bool = True) -> bool:
    """Whether `infer_case` has a prediction to make: not every target written yet (or no resume), and an input."""
    if resume and all(Path(p).exists() for p in job.targets.values()):
        return False
    return job.case_dirs is not None or job.image is not None


def infer_case(job: PredictionJob, models: Sequence[StageModel], plans: Sequence[dict],
               overlap: float = INFER_DEFAULTS.overlap, tta: bool = INFER_DEFAULTS.tta,
               batch_size: int = INFER_DEFAULTS.batch_size, resume: bool = True,
               keep_going: bool = False) -> CaseOutcome:
    """One job of `infer_cases` (the unit a Dask worker runs): skipped if resumed or not preprocessed, else
    predicted and its label maps written atomically."""
    if resume and all(Path(p).exists() for p in job.targets.values()):
        return CaseOutcome(job.case_id, [], [], resumed=True)
    if job.case_dirs is None and job.image is None:
        return CaseOutcome(job.case_id, [], ["not preprocessed (quarantined?), skipped"])
    try:
        return _predict_job(job, models, plans, overlap, tta, batch_size)
    except Exception as exc:
        if not keep_going:
            raise
        return CaseOutcome(job.case_id, [], [], error=" ".join(str(exc).split()) or type(exc).__name__)


# ---------------------------------------------------------------------------------------------------------
# Models loaded where the work runs (a Dask worker): once per process, not once per case
# ---------------------------------------------------------------------------------------------------------
# A worker serves one run at a time; a few entries keep a cascade's stages (and a previous run's) without letting
# a long-lived worker accumulate every model it ever saw.
MODEL_CACHE_SIZE = 4
_loaded_models: "OrderedDict[ModelRef, StageModel]" = OrderedDict()


def load_models(refs: Sequence[ModelRef]) -> list[StageModel]:
    """The StageModels of `refs`, each loaded once per process (cached by folder, checkpoint and its sha256)."""
    models = []
    for ref in refs:
        model = _loaded_models.pop(ref, None)
        if model is None:
            model = StageModel.load(ref.model_dir, device=ref.device, checkpoint=ref.checkpoint,
                                    margin_mm=ref.margin_mm)
        _loaded_models[ref] = model  # most recently used last
        while len(_loaded_models) > MODEL_CACHE_SIZE:
            _loaded_models.popitem(last=False)
        models.append(model)
    return models
