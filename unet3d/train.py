"""The training engine: one stage of a cascade (or a single-stage model) from preprocessed cases.

Read top to bottom: TrainSpec (what to train) -> data -> network, loss, optimiser -> resume -> epoch loop
(sample, augment on the device, forward under autocast, Dice+CE, step, poly LR) -> sliding-window
validation -> atomic checkpoints, Parquet log, learning curve.

Determinism and exact resume: every epoch re-seeds its random streams from (seed, rank, epoch), and the
latest checkpoint (written atomically at the end of every epoch) holds model, optimiser, scaler, epoch,
RNG states and the log. A run killed at any point restarts from the end of its last finished epoch and,
on CPU with deterministic algorithms, ends with the same weights as an uninterrupted run.

Several processes: `python -m torch.distributed.run --standalone --nproc_per_node N -m unet3d.train SPEC.json`
runs DDP (NCCL with one GPU per process when CUDA has N devices, else gloo on CPU); rank 0 validates and writes.
`train_distributed` launches exactly that (the train stage does, for `train.devices: N`) and turns a failed rank
into one error line. Pure PyTorch: no Prefect here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .augment import BatchAugmenter, preset_config
from .config import INFER_DEFAULTS, TrainConfig, model_train_settings
from .io import atomic_path, parent_death_signal, save_torch_atomic, write_json_atomic
from .losses import DeepSupervisionLoss, DiceCELoss
from .metrics import dice_per_class
from .models import (architecture_parts, build_network, count_parameters, plan_topology, slice_axis_for,
                     slice_wise_topology)
from .postprocess import choose_postprocessing
from .labels import IGNORE_LABEL
from .recipe import Recipe, cuda_patch_voxels, plan_recipe, plan_slice_patch_size
from .sampling import CaseData, PatchSampler, load_case, plan_patch_size
from .sliding_window import sliding_window_predict

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ModelFiles:
    """The files of a model folder, named once: what the trainer writes and inference and the flows read."""

    folder: Path

    def __init__(self, folder: str | Path):
        object.__setattr__(self, "folder", Path(folder))

    @property
    def best_checkpoint(self) -> Path:
        return self.folder / "checkpoint_best.pt"

    @property
    def latest_checkpoint(self) -> Path:
        return self.folder / "checkpoint_latest.pt"

    @property
    def model_json(self) -> Path:
        return self.folder / "model.json"

    @property
    def train_log(self) -> Path:
        return self.folder / "train_log.parquet"

    @property
    def learning_curve(self) -> Path:
        return self.folder / "learning_curve.png"

    @property
    def recipe(self) -> Path:
        return self.folder / "recipe.json"

    @property
    def train_spec(self) -> Path:
        """The TrainSpec the flow writes, so that `torchrun -m unet3d.train SPEC.json` trains the same model."""
        return self.folder / "train_spec.json"

    @property
    def distributed_result(self) -> Path:
        """The TrainResult rank 0 of a launched DDP run writes (`--result`), read back by `train_distributed`."""
        return self.folder / ".ddp_result.json"

    @property
    def rank_errors(self) -> Path:
        """One `rank{R}.txt` per DDP rank that ended with an exception: its one-line error."""
        return self.folder / ".ddp_rank_errors"


# ---------------------------------------------------------------------------------------------------------
# What to train
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainSpec:
    """Everything a training run needs, JSON-serialisable (the flow writes it next to the checkpoints so
    that `torchrun -m unet3d.train SPEC.json` can run the same training on several GPUs)."""

    out_dir: str
    train_cases: list[str]  # preprocessed case folders
    val_cases: list[str]
    classes: dict[int, str]  # stage classes 1..K-1 (0 is background)
    label_map: dict[int, int]  # source label value -> stage class
    train: dict  # unet3d.config.TrainConfig as a dict
    stage: str = "final"
    roi: dict | None = None  # {"label_values": [...], "margin_mm": float} for a cascade's second stage
    patch_size: list[int] | None = None
    overlap: float = INFER_DEFAULTS.overlap
    spacing: list[float] | None = None  # the preprocessed grid's spacing; default: from the first case
    # Warm start (train.init_from resolved by the caller): {"init_from": what the config says, "checkpoint": the
    # weights file, "sha256": its content hash, "run_id": the champion's run, if it is one}
    init_from: dict | None = None
    # the source label value of unannotated voxels (the config's ignore_label); None: IGNORE_LABEL
    ignore_label: int | None = None

    @property
    def num_classes(self) -> int:
        return max(int(k) for k in self.classes) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        d = json.loads(text)
        d["classes"] = {int(k): v for k, v in d["classes"].items()}
        d["label_map"] = {int(k): int(v) for k, v in d["label_map"].items()}
        return cls(**d)

    def identity(self) -> dict:
        """What makes a checkpoint resumable by this spec (not the epoch or time budgets)."""
        train = {k: v for k, v in model_train_settings(self.train).items()
                 if k not in ("max_epochs", "time_limit_min", "threads")}
        identity = {"train_cases": sorted(Path(c).name for c in self.train_cases), "classes": self.classes,
                    "label_map": self.label_map, "train": train, "roi": self.roi, "patch_size": self.patch_size}
        if self.init_from:  # other starting weights: another training (absent otherwise, as before warm starts)
            identity["init_sha256"] = self.init_from["sha256"]
        if self.ignore_label is not None:  # absent at its default, as before the setting existed
            identity["ignore_label"] = self.ignore_label
        return identity

    def recipe_identity(self) -> str:
        """What a planned recipe was planned from (recipe.json is reused only under the same identity; a grown
        time budget keeps the recipe, so that the run continues instead of starting over)."""
        return json.dumps(self.identity(), sort_keys=True, default=str)


@dataclass
class TrainResult:
    out_dir: str
    best_checkpoint: str
    latest_checkpoint: str
    model_json: str
    log_path: str
    curve_path: str
    epochs: int
    best_epoch: int
    best_val_dice: float | None
    seconds: float
    resumed_from_epoch: int | None = None
    stopped_by: str = "max_epochs"
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------------
def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(requested)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def poly_lr(base_lr: float, progress: float, exponent: float = 0.9) -> float:
    return base_lr * max(0.0, 1.0 - min(progress, 1.0)) ** exponent


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of `model`'s weights (None for decay 0), updated by `update_parameters(model)`
    after each step. Its decay warms up as (1 + n) / (10 + n) over the first n steps, so that the random initial
    weights are forgotten within a few steps instead of dominating a short run's average."""
    if not decay:
        return None

    @torch.no_grad()
    def ema(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + epoch * 104_729) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
              "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(states["numpy"], dtype=np.uint32), *np_state[2:]))
    py_state = random.getstate()
    random.setstate((py_state[0], tuple(states["python"]), py_state[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Validation: the same sliding window as inference, on whole validation cases
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_cases(model: nn.Module, cases: Sequence[CaseData], patch: Sequence[int], num_classes: int,
                  device: torch.device, overlap: float) -> list[np.ndarray]:
    """Label maps (X, Y, Z) uint8 of whole cases with the inference sliding window (stage 2: inside the
    reference ROI box, background outside)."""
    was_training = model.training
    model.eval()
    preds = []
    for case in cases:
        image = torch.from_numpy(np.ascontiguousarray(case.image))
        box = case.roi_box
        if box is not None:
            sl = tuple(slice(a, b) for a, b in box)
            image = image[(slice(None), *sl)]
        probs = sliding_window_predict(model, image, patch, num_classes, overlap=overlap, device=device)
        pred = probs.argmax(0).numpy().astype(np.uint8)
        if box is not None:
            full = np.zeros(case.shape, dtype=np.uint8)
            full[sl] = pred
            pred = full
        preds.append(pred)
    model.train(was_training)
    return preds


def mean_dice(preds: Sequence[np.ndarray], cases: Sequence[CaseData], num_classes: int) -> dict[int, float]:
    scores: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    for pred, case in zip(preds, cases):
        for c, d in dice_per_class(pred, np.asarray(case.label), range(1, num_classes)).items():
            scores[c].append(d)
    return {c: float(np.mean(v)) if v else float("nan") for c, v in scores.items()}


def volume_ratio(preds: Sequence[np.ndarray], cases: Sequence[CaseData]) -> float:
    """Predicted / reference foreground volume over the cases (> 1: over-segmentation)."""
    pred = sum(int(((p > 0) & (np.asarray(c.label) != IGNORE_LABEL)).sum()) for p, c in zip(preds, cases))
    ref = sum(int(((np.asarray(c.label) > 0) & (np.asarray(c.label) != IGNORE_LABEL)).sum()) for c in cases)
    return pred / ref if ref else float("nan")


def validate(model: nn.Module, cases: Sequence[CaseData], patch: Sequence[int], num_classes: int,
             device: torch.device, overlap: float) -> dict[int, float]:
    """Mean Dice per class over whole validation cases (stage 2: inside the reference ROI box)."""
    return mean_dice(predict_cases(model, cases, patch, num_classes, device, overlap), cases, num_classes)


# ---------------------------------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------------------------------
def ddp_backend(requested_device: str, local_processes: int) -> tuple[str, str]:
    """(process-group backend, device type) for `local_processes` DDP processes on one node: NCCL with one GPU
    each when CUDA has that many devices (and train.device is not 'cpu'), else gloo on CPU processes."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested_device == "cuda" and gpus < local_processes:
        raise RuntimeError(f"train.device is 'cuda' with {local_processes} processes per node (train.devices), "
                           f"but {gpus} CUDA device(s) are available")
    if requested_device != "cpu" and gpus >= local_processes:
        return "nccl", "cuda"
    return "gloo", "cpu"


def _distributed(requested_device: str) -> tuple[int, int, str]:
    """(rank, world size, device type): joins the process group a launcher set up (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend, _ = ddp_backend(requested_device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), "cuda" if dist.get_backend() == "nccl" else "cpu"
    return 0, 1, requested_device


def build_model_from_config(model_config: dict) -> nn.Module:
    # model.json files written before the strided stem existed have no stem_stride: build_network's own default
    # (no stem) is what they were trained with.
    stem = {"stem_stride": model_config["stem_stride"]} if "stem_stride" in model_config else {}
    # replaced parts (train.block / skip / gate) and a slice-wise network's slice axis are written only when given
    parts = {k: model_config[k] for k in ("block", "skip", "gate", "slice_axis") if model_config.get(k) is not None}
    return build_network(
        model_config["architecture"], model_config["in_channels"], model_config["num_classes"],
        features=model_config["features"], strides=model_config["strides"], kernel_sizes=model_config["kernel_sizes"],
        norm=model_config["norm"], dropout=model_config["dropout"],
        deep_supervision=model_config["deep_supervision"], **stem, **parts)


def network_topology(patch: Sequence[int], spacing: Sequence[float], n_stages: int,
                     stem_stride: Sequence[int] = (1, 1, 1)):
    """Strides and kernels per stage; with a strided stem they are planned on the stem's coarser grid."""
    stem = [int(s) for s in stem_stride]
    return plan_topology([math.ceil(p / s) for p, s in zip(patch, stem)],
                         [sp * s for sp, s in zip(spacing, stem)], n_stages)


def resolve_recipe(spec: "TrainSpec", cfg: TrainConfig, patch: list[int], spacing: Sequence[float],
                   n_val_cases: int, device: torch.device, out: Path, rank: int = 0, world: int = 1,
                   in_channels: int = 1):
    """The planned recipe: recipe.json of an earlier run of the same spec if there is one (a resumed or
    extended run keeps its network), else planned now (with calibration) and written there. Under DDP rank 0
    plans and the other ranks read its recipe.json, so that every rank builds the same network."""
    if world > 1:
        if rank == 0:
            recipe, reused = resolve_recipe(spec, cfg, patch, spacing, n_val_cases, device, out,
                                            in_channels=in_channels)
            dist.barrier()
            return recipe, reused
        dist.barrier()
        return Recipe.from_dict(json.loads(ModelFiles(out).recipe.read_text())["recipe"]), True
    path = ModelFiles(out).recipe
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("planned_for") == spec.recipe_identity():
                return Recipe.from_dict(saved["recipe"]), True
        except (ValueError, KeyError, TypeError):
            log.warning("stage %s: %s is unreadable; planning the recipe again", spec.stage, path)
    recipe = plan_recipe(cfg, patch=patch, spacing=spacing, num_classes=spec.num_classes, in_channels=in_channels,
                         n_val_cases=n_val_cases, device=device)
    write_json_atomic(path, {"planned_for": spec.recipe_identity(), "recipe": recipe.to_dict()}, indent=1)
    return recipe, False


@dataclass
class WarmStart:
    """The weights a warm start begins from, with the network shape and patch they were trained with."""

    model_config: dict
    patch_size: list[int]
    state: dict
    source: dict  # TrainSpec.init_from


def load_warm_start(spec: TrainSpec, cfg: TrainConfig) -> WarmStart:
    """The source of `spec.init_from` (a model folder's checkpoint with its model.json beside it), refused in one
    line naming the stage and the setting when its architecture, classes or network shape differ from the stage's."""
    source = spec.init_from
    checkpoint = Path(source["checkpoint"])
    where = f"stage {spec.stage}: train.init_from {source['init_from']!r}"
    meta_path = ModelFiles(checkpoint.parent).model_json
    if not checkpoint.is_file() or not meta_path.is_file():
        raise ValueError(f"{where}: {checkpoint if not checkpoint.is_file() else meta_path} does not exist "
                         f"(a model folder or its checkpoint, with model.json beside it)")
    meta = json.loads(meta_path.read_text())
    model, classes = meta["model"], {int(k): v for k, v in meta["classes"].items()}
    wanted = {"architecture": (model["architecture"], cfg.architecture), "classes": (classes, dict(spec.classes)),
              "norm": (model["norm"], cfg.norm), "deep_supervision": (model["deep_supervision"], cfg.deep_supervision),
              "features": (model["features"], cfg.features or model["features"]),
              "stem_stride": (model.get("stem_stride", [1, 1, 1]), cfg.stem_stride or model.get("stem_stride", [1, 1, 1])),
              "patch_size": (meta["patch_size"], spec.patch_size or cfg.patch_size or meta["patch_size"])}
    for key, (theirs, ours) in wanted.items():
        if theirs != ours:
            raise ValueError(f"{where}: the source's {key} is {theirs}, this stage's is {ours}: a warm start needs "
                             f"the same architecture, classes and network shape")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return WarmStart(model, list(meta["patch_size"]), state.get("model", state), dict(source))


def _check_warm_start_parts(spec: TrainSpec, warm: WarmStart, model_config: dict) -> None:
    """The settings known only once the data is loaded (input channels) or given as parts of the network (block,
    skip, gate, a slice-wise network's axis) must be the source's too."""
    for key in ("in_channels", "block", "skip", "gate", "slice_axis"):
        theirs, ours = warm.model_config.get(key), model_config.get(key)
        if theirs != ours:
            raise ValueError(f"stage {spec.stage}: train.init_from {warm.source['init_from']!r}: the source's {key} is "
                             f"{theirs}, this stage's is {ours}: a warm start needs the same architecture, classes "
                             f"and network shape")


def train(spec: TrainSpec, progress: bool = True) -> TrainResult:
    cfg = TrainConfig.model_validate(spec.train)
    warm = load_warm_start(spec, cfg) if spec.init_from else None
    if warm is not None:  # the network is the source's: its widths and stem, not a newly planned ladder
        cfg = cfg.model_copy(update={"features": warm.model_config["features"],
                                     "stem_stride": warm.model_config.get("stem_stride", [1, 1, 1])})
    rank, world, device_type = _distributed(cfg.device)
    if cfg.devices > 1 and world != cfg.devices:
        raise ValueError(f"stage {spec.stage}: train.devices is {cfg.devices} but this run has {world} process(es): "
                         f"the train stage launches them (train_distributed), or run `python -m torch.distributed.run "
                         f"--standalone --nproc_per_node {cfg.devices} -m unet3d.train SPEC.json`")
    if cfg.class_weights is not None and len(cfg.class_weights) != spec.num_classes:
        # the pipeline's config refuses this already; a hand-written train_spec.json is checked here, before any work
        raise ValueError(f"stage {spec.stage}: train.class_weights has {len(cfg.class_weights)} weights for "
                         f"{spec.num_classes} classes (background first): give one weight per class")
    is_main = rank == 0
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(device_type)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)
    t_start = time.perf_counter()

    # --- data -------------------------------------------------------------------------------------------
    train_cases = [load_case(d, spec.label_map, spec.roi, seed=cfg.seed, ignore_value=spec.ignore_label)
                   for d in spec.train_cases]
    train_cases = [c for c in train_cases if c.label is not None and (spec.roi is None or c.roi_box is not None)]
    val_cases = [load_case(d, spec.label_map, spec.roi, ignore_value=spec.ignore_label) for d in spec.val_cases]
    val_cases = [c for c in val_cases if c.label is not None and (spec.roi is None or c.roi_box is not None)]
    if cfg.val_max_cases:
        val_cases = val_cases[: cfg.val_max_cases]
    if not train_cases:
        raise ValueError(f"stage {spec.stage}: no labelled training case" +
                         (" with a non-empty ROI" if spec.roi else ""))
    spacing = list(spec.spacing or train_cases[0].spacing)
    # a slice-wise (2D) network: its patch is a stack of whole slices, each slice one 2D sample
    slice_axis = slice_axis_for(spacing) if architecture_parts(cfg.architecture).slice_wise else None
    shapes, max_voxels = [c.region_shape() for c in train_cases], cuda_patch_voxels(device, cfg.max_patch_voxels)
    # Trained against a time budget on a CPU, compute (not memory) limits training: a patch that fits the structure
    # rather than the whole scan buys more iterations in the same time. (With a fixed number of iterations it
    # would only see less: the demo's organ lost 0.03 Dice that way.)
    fit_to_structure = device.type == "cpu" and cfg.time_limit_min is not None
    extents = [c.foreground_extent for c in train_cases if c.foreground_extent] if fit_to_structure else None
    patch = list(spec.patch_size or cfg.patch_size or (warm.patch_size if warm is not None else None) or
                 (plan_slice_patch_size(shapes, slice_axis, max_voxels) if slice_axis is not None
                  else plan_patch_size(shapes, spacing, max_voxels, foreground_extents=extents)))
    num_classes = spec.num_classes
    # The input channels come from the data (image (C, X, Y, Z)): 1, or a multi-channel cohort's channels
    in_channels = int(train_cases[0].image.shape[0])
    for case in train_cases + val_cases:
        if int(case.image.shape[0]) != in_channels:
            raise ValueError(f"stage {spec.stage}: case {case.case_id} has {case.image.shape[0]} channel(s) and case "
                             f"{train_cases[0].case_id} {in_channels}: every case needs the same channels")
    if warm is not None and int(warm.model_config.get("in_channels", 1)) != in_channels:
        raise ValueError(f"stage {spec.stage}: train.init_from {warm.source['init_from']!r} takes "
                         f"{warm.model_config.get('in_channels', 1)} input channel(s), this stage's cases have "
                         f"{in_channels}: a warm start needs the same channels")
    t_load = time.perf_counter() - t_start

    # --- the recipe: every key the config leaves open, planned (and timed) on this device ----------------
    recipe, reused = resolve_recipe(spec, cfg, patch, spacing, len(val_cases), device, out, rank, world, in_channels)
    if warm is not None:
        recipe.reasons["features"] = recipe.reasons["stem_stride"] = (
            f"the warm-start source's ({warm.source['init_from']}, sha256 {warm.source['sha256'][:12]})")
    augment = recipe.augment
    augment_config = preset_config(augment, spacing)
    augmenter = None if augment_config is None else BatchAugmenter(augment_config)
    # Spatial augmentation warps a larger region and crops its centre afterwards, so that rotated or zoomed
    # patches carry real image in their corners instead of zeros (as nnU-Net does).
    context = augmenter.context(patch) if augmenter is not None else [0, 0, 0]
    data_bytes = sum(c.nbytes() for c in train_cases)
    keep_on_device = device.type == "cuda" and data_bytes < 0.3 * torch.cuda.mem_get_info(device)[0]
    sampler = PatchSampler(train_cases, patch, recipe.batch_size, device, foreground_oversample=cfg.foreground_oversample,
                           roi_jitter_mm=cfg.roi_jitter_mm if spec.roi else 0.0, keep_on_device=keep_on_device,
                           context=context)
    log.info("stage %s: %d training and %d validation cases loaded in %.1f s; patch %s at %s mm; device %s%s",
             spec.stage, len(train_cases), len(val_cases), t_load, patch,
             [round(s, 3) for s in spacing], device, " (training set on the device)" if keep_on_device else "")
    log.info("stage %s: recipe %s%s: features %s, stem %s, batch %d, %d iterations/epoch, augment %s, "
             "validation every %d epoch(s)%s", spec.stage, "reused from recipe.json" if reused else "planned",
             f" in {time.perf_counter() - t_start - t_load:.1f} s" if not reused else "", recipe.features,
             recipe.stem_stride, recipe.batch_size, recipe.iterations_per_epoch, augment, recipe.val_every,
             f"; measured {recipe.seconds_per_iteration:.3f} s/iteration" if recipe.seconds_per_iteration else "")
    for key, why in recipe.reasons.items():
        log.info("stage %s: recipe %s: %s", spec.stage, key, why)
    if is_main and world > 1:
        log.info("stage %s: DDP over %d processes (%s on %s), batch %d per process", spec.stage, world,
                 dist.get_backend(), device.type, recipe.batch_size)

    # --- network, loss, optimiser --------------------------------------------------------------------------
    features = list(recipe.features)
    strides, kernels = network_topology(patch, spacing, len(features), recipe.stem_stride)
    stem_stride = list(recipe.stem_stride)
    if slice_axis is not None:  # what the slice-wise network is built with: nothing across slices
        strides, kernels = slice_wise_topology(strides, slice_axis), slice_wise_topology(kernels, slice_axis)
        stem_stride = list(slice_wise_topology([stem_stride], slice_axis)[0])
    model_config = {
        "architecture": cfg.architecture, "in_channels": in_channels, "num_classes": num_classes,
        "features": features, "strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernels],
        "stem_stride": stem_stride, "norm": cfg.norm, "dropout": cfg.dropout,
        "deep_supervision": cfg.deep_supervision,
        **{k: getattr(cfg, k) for k in ("block", "skip", "gate") if getattr(cfg, k) is not None},
        **({"slice_axis": slice_axis} if slice_axis is not None else {}),
    }
    if warm is not None:  # the source's topology exactly (its strides and kernels), so that its weights fit
        _check_warm_start_parts(spec, warm, model_config)
        model_config = dict(warm.model_config)
    model = build_model_from_config(model_config)
    if warm is not None:
        model.load_state_dict(warm.state)  # a checkpoint resumed below replaces these weights
    model = model.to(device)
    n_params = count_parameters(model)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    average = weight_average(model, recipe.ema_decay)
    # what is validated, kept as the best checkpoint and so served: the weights' moving average where one is set
    evaluated: nn.Module = average.module if average is not None else model
    base_lr = cfg.lr or (1e-2 if cfg.optimizer == "sgd" else 3e-3)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.99, nesterov=True,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    # bf16 needs no loss scaling; a scaler is kept (disabled) so checkpoints have one format on every device
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    base_loss = DiceCELoss(ignore_index=IGNORE_LABEL, class_weights=cfg.class_weights).to(device)
    criterion = DeepSupervisionLoss(base_loss) if cfg.deep_supervision else base_loss

    max_epochs = recipe.max_epochs
    iters = recipe.iterations_per_epoch
    # The budget covers everything this run does: loading and recipe calibration count against it.
    time_limit_s = cfg.time_limit_min * 60 - (time.perf_counter() - t_start) if cfg.time_limit_min else None
    total_steps = max_epochs * iters

    # --- resume ------------------------------------------------------------------------------------------
    files = ModelFiles(out)
    latest_path, best_path = files.latest_checkpoint, files.best_checkpoint
    log_path, curve_path, model_json = files.train_log, files.learning_curve, files.model_json
    # The world size belongs to the identity even where train.devices does not say it (a spec run by hand under
    # torchrun): a checkpoint of another world size would resume into different sampling and batches. One
    # process is the identity checkpoints had before DDP could be launched by the stage, so it is not written.
    identity = json.loads(json.dumps({**spec.identity(), "recipe": recipe.identity(),
                                      **({"world_size": world} if world > 1 else {})}, sort_keys=True))
    start_epoch, elapsed, history, best_dice, best_epoch, resumed_from = 0, 0.0, [], -1.0, -1, None
    best_preds: list[np.ndarray] | None = None  # validation predictions of the best epoch, in this process
    if latest_path.exists():
        state = torch.load(latest_path, map_location=device, weights_only=True)
        if state.get("identity") == json.dumps(identity, sort_keys=True) and state.get("version") == CHECKPOINT_VERSION:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if average is not None:
                average.load_state_dict(state["average"])
            restore_rng_states(state["rng"])
            start_epoch, elapsed = int(state["epoch"]) + 1, float(state["elapsed"])
            history, best_dice, best_epoch = list(state["history"]), float(state["best_dice"]), int(state["best_epoch"])
            resumed_from = start_epoch - 1
            log.info("stage %s: resuming after epoch %d (%.0f s of training done)", spec.stage, resumed_from, elapsed)
        else:
            log.warning("stage %s: %s belongs to another configuration; training from scratch", spec.stage, latest_path)

    model_meta = {"model": model_config, "patch_size": patch, "spacing": spacing, "classes": spec.classes,
                  "label_map": spec.label_map, "roi": spec.roi, "overlap": spec.overlap, "stage": spec.stage,
                  "parameters": n_params, "recipe": recipe.to_dict(), "world_size": world,
                  # test-time augmentation mirrors over these axes only (unet3d.inference.trained_mirror_axes)
                  "mirror_axes": augment_config.mirror_axes if augment_config is not None else [],
                  **({"init_from": warm.source} if warm is not None else {})}
    if is_main:
        write_json_atomic(model_json, model_meta, indent=1)

    # --- epochs ------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    stopped_by = "max_epochs"
    step = start_epoch * iters
    # A time budget ends the run, not max_epochs (then unbounded): the bar counts epochs and shows the budget
    # left, instead of a total and an ETA of hundreds of hours.
    epochs = range(start_epoch, max_epochs)
    bar = tqdm(epochs if time_limit_s is None else iter(epochs), desc=f"train {spec.stage}", unit="epoch",
               disable=not (progress and is_main), initial=start_epoch,
               total=max_epochs if time_limit_s is None else None, leave=False)
    seed = cfg.seed
    epoch = start_epoch - 1
    for epoch in bar:
        if time_limit_s is not None and elapsed >= time_limit_s and history:
            stopped_by = "time_limit"  # (a run always trains at least one epoch, so that a model exists)
            break
        t_epoch = time.perf_counter()
        # Every epoch's randomness derives from (seed, rank, epoch): resuming needs no stream replay.
        es = epoch_seed(seed, rank, epoch)
        torch.manual_seed(es)
        rng = np.random.default_rng(es)
        aug_gen = torch.Generator(device=device).manual_seed(es)
        train_model.train()
        losses = []
        for _ in range(iters):
            progress_frac = step / total_steps
            if time_limit_s is not None:
                spent = elapsed + time.perf_counter() - t_epoch
                if spent >= time_limit_s and (history or losses):
                    break  # the budget ends inside an epoch: stop now (the epoch is recorded as it stands)
                progress_frac = max(progress_frac, spent / time_limit_s)
            lr = poly_lr(base_lr, progress_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image, label = sampler.sample(rng)
            if augmenter is not None:  # warped from the context-padded patch straight onto the patch
                image, label = augmenter(image, label, aug_gen, crop=patch)
            with autocast(device):
                outputs = train_model(image)
            loss = criterion(_float(outputs), label.long())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update_parameters(model)
            losses.append(float(loss.detach()))
            step += 1
        train_seconds = time.perf_counter() - t_epoch

        row: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr,
                               "iterations": len(losses), "train_seconds": train_seconds, "world_size": world}
        improved = False
        # The last epoch is validated whatever val_every says: the budget ended inside it, or it is spent now
        # (then the next epoch would stop before training, and a run could end with nothing validated).
        budget_spent = time_limit_s is not None and (
            len(losses) < iters or elapsed + time.perf_counter() - t_epoch >= time_limit_s)
        last_epoch = epoch == max_epochs - 1 or budget_spent
        if is_main and val_cases and ((epoch + 1) % recipe.val_every == 0 or last_epoch):
            preds = predict_cases(evaluated, val_cases, patch, num_classes, device, spec.overlap)
            dice = mean_dice(preds, val_cases, num_classes)
            for c, d in dice.items():
                row[f"val_dice_{spec.classes.get(c, c)}"] = d
            row["val_dice_mean"] = float(np.nanmean(list(dice.values())))
            row["val_volume_ratio"] = volume_ratio(preds, val_cases)
            if row["val_dice_mean"] > best_dice:
                best_dice, best_epoch, improved = row["val_dice_mean"], epoch, True
                best_preds = preds  # the post-processing choice below needs exactly these
        elif is_main and not val_cases:
            improved, best_epoch = True, epoch  # nothing to validate on: the latest is the best we know
        elapsed += time.perf_counter() - t_epoch
        row["seconds"] = time.perf_counter() - t_epoch
        row["elapsed"] = elapsed
        history.append(row)
        if is_main:
            if improved:
                save_torch_atomic({"model": evaluated.state_dict(), "epoch": epoch, "val_dice_mean": best_dice,
                                   "version": CHECKPOINT_VERSION}, best_path)
            save_torch_atomic({
                "version": CHECKPOINT_VERSION, "identity": json.dumps(identity, sort_keys=True),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                **({"average": average.state_dict()} if average is not None else {}),
                "epoch": epoch, "elapsed": elapsed, "rng": rng_states(), "history": history,
                "best_dice": best_dice, "best_epoch": best_epoch}, latest_path)
            _write_log(history, log_path)
            if (epoch + 1) % 10 == 0:
                _write_curve(history, curve_path, spec.stage)
            bar.set_postfix(loss=f"{row['loss']:.3f}", dice=f"{row.get('val_dice_mean', float('nan')):.3f}",
                            **({"left": f"{max(0.0, time_limit_s - elapsed) / 60:.1f} min"} if time_limit_s else {}))
        if world > 1:
            dist.barrier()
        if budget_spent:
            stopped_by = "time_limit"
            break
    bar.close()
    if is_main:
        if history:
            _write_log(history, log_path)
            _write_curve(history, curve_path, spec.stage)
        if not best_path.exists() and latest_path.exists():
            state = torch.load(latest_path, map_location="cpu", weights_only=True)
            weights = state["model"]
            if "average" in state:  # the averaged network's own weights (AveragedModel keeps it as `module.`)
                weights = {k[len("module."):]: v for k, v in state["average"].items() if k.startswith("module.")}
            save_torch_atomic({"model": weights, "epoch": state["epoch"], "val_dice_mean": None,
                               "version": CHECKPOINT_VERSION}, best_path)
        # Post-processing learned on validation (nnU-Net's rule): keep the largest connected component of a
        # class only where that raises the validation Dice of the best checkpoint.
        if val_cases and cfg.postprocess != "none" and best_path.exists():
            preds = best_preds
            if preds is None:  # the best epoch was validated in an earlier process: predict with its weights
                evaluated.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
                preds = predict_cases(evaluated, val_cases, patch, num_classes, device, spec.overlap)
            choice = choose_postprocessing(preds, [c.label for c in val_cases], range(1, num_classes),
                                           force=cfg.postprocess == "largest_component")
            model_meta["postprocess"] = choice
            write_json_atomic(model_json, model_meta, indent=1)
            log.info("stage %s: post-processing %s (validation Dice %.4f -> %.4f)", spec.stage,
                     f"keeps the largest component of classes {choice['largest_component']}"
                     if choice["largest_component"] else "none", choice["val_dice_before"], choice["val_dice_after"])
    if world > 1:
        dist.barrier()
    return TrainResult(str(out), str(best_path), str(latest_path), str(model_json), str(log_path), str(curve_path),
                       epochs=len(history), best_epoch=best_epoch, best_val_dice=best_dice if best_dice >= 0 else None,
                       seconds=elapsed, resumed_from_epoch=resumed_from, stopped_by=stopped_by, world_size=world)


def _float(outputs):
    """Losses in float32 whatever the autocast dtype of the logits."""
    if isinstance(outputs, (list, tuple)):
        return [o.float() for o in outputs]
    return outputs.float()


def _write_log(history: list[dict], path: Path) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(pd.DataFrame(history), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_curve(history: list[dict], path: Path, stage: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss (Dice + CE)", color="tab:blue")
    ax2 = ax1.twinx()
    dice_keys = sorted({k for h in history for k in h if k.startswith("val_dice_") and k != "val_dice_mean"})
    for key in dice_keys:
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        ax2.plot(*zip(*pts), label=key.replace("val_dice_", "val Dice "), linestyle="--")
    if any("val_dice_mean" in h for h in history):
        pts = [(h["epoch"], h["val_dice_mean"]) for h in history if "val_dice_mean" in h]
        ax2.plot(*zip(*pts), color="black", label="val Dice (mean)")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("validation Dice")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="center right", fontsize=8)
    ax1.set_title(f"stage {stage}")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


class DistributedTrainingError(RuntimeError):
    """A launched DDP run failed: one line naming the stage, the failed rank's error and the launcher's exit code."""


def _failed_rank(launcher_output: str) -> tuple[int | None, int | None]:
    """(rank, exit code) of the first failure that torch.distributed.run reports ("Root Cause" block)."""
    block = launcher_output.rsplit("Root Cause", 1)[1] if "Root Cause" in launcher_output else ""
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", block, re.MULTILINE)
    code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", block, re.MULTILINE)
    return (int(rank.group(1)) if rank else None), (int(code.group(1)) if code else None)


def _rank_error(errors_dir: Path, rank: int | None, exit_code: int | None) -> str:
    """The failed rank's error in words: its own one-line exception, else how it ended."""
    if rank is not None and (errors_dir / f"rank{rank}.txt").exists():
        return f"rank {rank} failed: {(errors_dir / f'rank{rank}.txt').read_text().strip()}"
    if rank is not None and exit_code is not None and exit_code < 0:
        try:
            how = f"was killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            how = f"was killed by signal {-exit_code}"
        return f"rank {rank} {how}"
    if rank is not None:
        return f"rank {rank} exited with code {exit_code}"
    # No root cause in the launcher's output: the first rank that wrote an exception
    written = sorted(errors_dir.glob("rank*.txt"), key=lambda p: p.stat().st_mtime) if errors_dir.exists() else []
    if written:
        return f"{written[0].stem.replace('rank', 'rank ')} failed: {written[0].read_text().strip()}"
    return "no rank reported its error (see the launcher's output above)"


def train_distributed(spec_path: str | Path, nproc: int, progress: bool = True) -> TrainResult:
    """Train the TrainSpec in `spec_path` with DDP over `nproc` local processes, launched by PyTorch's own
    launcher (`python -m torch.distributed.run --standalone`): one GPU each with NCCL when CUDA has `nproc`
    devices, else CPU processes with gloo. The launcher's output is passed through; rank 0 writes the result.
    A failed rank stops the run (the launcher ends the others) and raises DistributedTrainingError; the
    checkpoints of every finished epoch stay, so the same call again resumes after the last one."""
    spec_path = Path(spec_path)
    spec = TrainSpec.from_json(spec_path.read_text())
    cfg = TrainConfig.model_validate(spec.train)
    ddp_backend(cfg.device, nproc)  # a CUDA request that cannot be met fails here, before any process starts
    files = ModelFiles(spec.out_dir)
    files.folder.mkdir(parents=True, exist_ok=True)
    files.distributed_result.unlink(missing_ok=True)
    shutil.rmtree(files.rank_errors, ignore_errors=True)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "unet3d.train", str(spec_path), "--result", str(files.distributed_result)]
    if not progress:
        command.append("--no-progress")
    log.info("stage %s: launching %d DDP processes: %s", spec.stage, nproc, " ".join(command[1:]))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=parent_death_signal())
    tail = b""
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
            tail = (tail + chunk)[-200_000:]  # enough for the launcher's failure report
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted while waiting: the launcher ends its ranks on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    if code != 0:
        rank, rank_code = _failed_rank(tail.decode(errors="replace"))
        raise DistributedTrainingError(
            f"stage {spec.stage}: DDP training over {nproc} processes failed: "
            f"{_rank_error(files.rank_errors, rank, rank_code)}; torch.distributed.run exited with code {code} "
            f"(the checkpoints of finished epochs are kept: a rerun resumes after the last one)")
    if not files.distributed_result.exists():
        raise DistributedTrainingError(f"stage {spec.stage}: torch.distributed.run exited with code 0 but rank 0 "
                                       f"wrote no result ({files.distributed_result})")
    return TrainResult(**json.loads(files.distributed_result.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unet3d.train",
                                     description="Train one stage from a TrainSpec JSON (works under torchrun).")
    parser.add_argument("spec", help="TrainSpec JSON file (written by the train stage as train_spec.json)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--result", help="rank 0 writes the TrainResult JSON here (train_distributed reads it)")
    args = parser.parse_args(argv)
    # Under a launcher only rank 0 tells the story; the other ranks speak up for warnings and errors.
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = TrainSpec.from_json(Path(args.spec).read_text())
    try:
        result = train(spec, progress=not args.no_progress)
    except Exception as exc:
        if "RANK" in os.environ:  # under a launcher: the rank's error in one line, for train_distributed
            first_line = (str(exc).strip().splitlines() or [""])[0]
            path = ModelFiles(spec.out_dir).rank_errors / f"rank{os.environ['RANK']}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{type(exc).__name__}: {first_line}\n")
        raise
    rank = 0
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
    if rank != 0:
        return 0
    if args.result:
        write_json_atomic(Path(args.result), result.to_dict(), indent=1)
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
