"""Planning the preprocessing of a cohort: from per-case fingerprints (or, when no intensities are needed,
the catalog's headers) to a plan: target spacing, normalisation and interpolation, named by its plan id.

The plan is pinned the first time a cohort is preprocessed with a given config (`plan_key`): adding cases
later does not move the target spacing or the CT intensity window, so N new cases cost N preprocessings,
not a rerun of the whole cohort (nnU-Net's #176). `refresh` (or `unet3d preprocess --refresh preprocess`)
re-plans; a re-plan that lands on the same plan id still reuses every case.
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np
import pandas as pd

from unet3d.config import PreprocessConfig
from unet3d.resample import ANISOTROPY_THRESHOLD, canonical_axes

from .case_worker import PREPROCESS_VERSION, fingerprint_case
from .hashing import stable_hash
from .parallel import map_cases
from .store import PreprocessedStore


def plan_key(preprocess_config: PreprocessConfig | dict, modality: str, channels: int = 1,
             ignore_label: int | None = None) -> str:
    """The key a plan is pinned under: the config keys that shape a plan, the modality, the code version (and the
    channel count of a multi-channel cohort, the ignore label of sparse labels: both change the statistics)."""
    cfg = PreprocessConfig.model_validate(preprocess_config).model_dump(mode="json")
    relevant = {k: cfg[k] for k in ("target_spacing", "normalisation", "image_interpolation", "label_interpolation")}
    identity = {"config": relevant, "modality": modality, "version": PREPROCESS_VERSION}
    if channels > 1:
        identity["channels"] = channels
    if ignore_label is not None:
        identity["ignore_label"] = int(ignore_label)
    return stable_hash(identity, 12)


def make_plan(fingerprints: list[dict], modality: str, preprocess_config: PreprocessConfig | dict,
              channels: int = 1) -> dict:
    """Target spacing, normalisation and interpolation for a cohort, from its per-case fingerprints.

    A cohort of `channels` > 1 gets one normalisation per channel (`channel_normalisations`, channel 0's also as
    `normalisation`), each from `preprocess.normalisation` (one scheme for all, or a list of one per channel)
    and, for `ct`, from that channel's own foreground intensities. A single-channel plan is unchanged."""
    cfg = PreprocessConfig.model_validate(preprocess_config)
    if not fingerprints:
        raise ValueError("no case could be fingerprinted: nothing to plan from")
    # The plan is made from the labelled cases, the ones the model learns from (nnU-Net plans from its training
    # cases): a nightly folder of unlabelled scans must not move the target spacing or the intensity statistics.
    fingerprints = [f for f in fingerprints if f.get("labelled")] or fingerprints
    spacings = np.array([f["canonical_spacing"] for f in fingerprints], dtype=np.float64)
    if cfg.target_spacing == "auto":
        target = np.median(spacings, axis=0)
        if target.max() / target.min() > ANISOTROPY_THRESHOLD:
            # Strongly anisotropic: a median thick-slice spacing would blur the thinner-sliced cases; take
            # the 10th percentile of that axis (nnU-Net's rule), so most cases are upsampled along it.
            thick = int(np.argmax(target))
            target[thick] = np.percentile(spacings[:, thick], 10)
    else:
        target = np.asarray(cfg.target_spacing, dtype=np.float64)
    target = np.round(target, 6)

    schemes = channel_schemes(cfg.normalisation, channels)

    def channel_norm(channel: int) -> dict:
        scheme = schemes[channel]
        if scheme == "auto":
            scheme = "ct" if modality == "CT" else "zscore"
        norm: dict = {"scheme": scheme}
        if scheme == "ct":
            def samples(f):
                return f["foreground_sample"] if channel == 0 else f["channel_foreground_samples"][channel]
            sample = np.concatenate([np.asarray(samples(f), dtype=np.float64) for f in fingerprints])
            norm.update(clip_low=float(np.percentile(sample, 0.5)), clip_high=float(np.percentile(sample, 99.5)),
                        mean=float(sample.mean()), std=float(sample.std()))
        return norm

    norm = channel_norm(0)
    shapes = np.array([np.asarray(f.get("cropped_shape", f["canonical_shape"])) * np.asarray(f["canonical_spacing"])
                       / target for f in fingerprints])
    plan = {
        "target_spacing": [float(t) for t in target],
        "normalisation": norm,
        "image_order": 3 if cfg.image_interpolation == "cubic" else 1,
        "label_mode": cfg.label_interpolation,
        "version": PREPROCESS_VERSION,
    }
    if channels > 1:  # only then: a single-channel plan keeps its plan id
        plan["channel_normalisations"] = [norm] + [channel_norm(c) for c in range(1, channels)]
    plan["plan_id"] = stable_hash(plan, 12)
    plan["median_shape"] = [int(round(s)) for s in np.median(shapes, axis=0)]
    plan["modality"] = modality
    plan["n_cases_planned"] = len(fingerprints)
    plan["spacing_factor"] = 1.0
    return plan


def scaled_plan(plan: dict, factor: float) -> dict:
    """The same plan at a coarser spacing (a cascade's first stage)."""
    if factor == 1.0:
        return plan
    out = json.loads(json.dumps(plan))
    out["target_spacing"] = [round(t * factor, 6) for t in plan["target_spacing"]]
    out["median_shape"] = [max(1, int(round(s / factor))) for s in plan["median_shape"]]
    out["spacing_factor"] = factor
    identity = {k: out[k] for k in ("target_spacing", "normalisation", "image_order", "label_mode", "version",
                                    "channel_normalisations") if k in out}
    out["plan_id"] = stable_hash(identity, 12)
    return out


def channel_schemes(normalisation: str | list[str], channels: int) -> list[str]:
    """`preprocess.normalisation` as one scheme per channel; a list must name one scheme per channel."""
    if not isinstance(normalisation, list):
        return [normalisation] * channels
    if len(normalisation) != channels:
        raise ValueError(f"preprocess.normalisation lists {len(normalisation)} schemes {normalisation} but the "
                         f"cohort's cases have {channels} channel(s): give one scheme per channel")
    return list(normalisation)


def needs_intensity_fingerprint(preprocess_config: PreprocessConfig | dict, modality: str) -> bool:
    scheme = PreprocessConfig.model_validate(preprocess_config).normalisation
    schemes = scheme if isinstance(scheme, list) else [scheme]
    return any(s == "ct" or (s == "auto" and modality == "CT") for s in schemes)


def header_fingerprints(cases_df: pd.DataFrame) -> list[dict]:
    """Canonical spacings straight from the catalog (headers): all a non-CT plan needs."""
    out = []
    for row in cases_df.to_dict("records"):
        perm, _ = canonical_axes(np.asarray(row["direction"], dtype=np.float64).reshape(3, 3))
        out.append({"case_id": row["case_id"], "canonical_spacing": [float(row["spacing_mm"][p]) for p in perm],
                    "canonical_shape": [int(row["size"][p]) for p in perm], "labelled": isinstance(row["label_path"], str)})
    return out


def plan_cohort(store: PreprocessedStore, cases: list[dict], cases_df: pd.DataFrame, modality: str,
                preprocess_config: PreprocessConfig, get_client: Callable,
                progress: bool = True, channels: int = 1,
                ignore_label: int | None = None) -> tuple[dict, int, list[dict]]:
    """Fingerprint (voxels only where the plan needs intensities: CT) and plan. `ignore_label`: the label value
    of unannotated voxels (sparse labels), left out of the foreground intensities.

    Returns (plan, cases fingerprinted in this call, failures as {"case_id", "error", "step": "fingerprint"});
    a failed case is left out of the plan. `get_client()` gives the Dask client, started only when needed."""
    if not needs_intensity_fingerprint(preprocess_config, modality):
        return make_plan(header_fingerprints(cases_df), modality, preprocess_config, channels), 0, []
    todo = [c for c in cases if not store.fingerprint_file(c, ignore_label).exists()]
    failures, fingerprinted = [], 0
    if todo:
        fps = map_cases(fingerprint_case, todo, str(store.fingerprint_dir), 0, ignore_label, client=get_client(),
                        desc="fingerprint", progress=progress)
        failures = [f for f in fps if f["status"] == "failed"]
        fingerprinted = sum(f["status"] == "done" for f in fps)
    failed_ids = {f["case_id"] for f in failures}
    fingerprints = [json.loads(store.fingerprint_file(c, ignore_label).read_text())
                    for c in cases if c["case_id"] not in failed_ids]
    return (make_plan(fingerprints, modality, preprocess_config, channels), fingerprinted,
            [dict(f, step="fingerprint") for f in failures])
