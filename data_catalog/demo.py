"""Synthetic CT-like phantom cohorts in the Medical Segmentation Decathlon (MSD / nnU-Net v1) layout.

The phantom is an abdomen-like cross-section extruded along the body axis, built in *physical* (LPS, millimetre)
coordinates relative to the patient, then sampled on each scan's own voxel grid:

* air (-1000 HU) outside a body: an elliptic cylinder whose radii wobble slowly along z, of soft tissue
  (~40 HU) with smooth texture, under a thin subcutaneous fat rim (~-100 HU);
* an organ (label 1): a rotated ellipsoid with a smooth low-frequency deformation, 60-80 HU, on the patient's right
  and slightly anterior (so that after reorientation to a canonical orientation it sits in a consistent place),
  its size and exact position varying per patient;
* 0-3 lesions (label 2) inside the organ: slightly elongated spheres of radius 2-6 mm, hypo- or hyper-dense by
  30-60 HU, with a 1 mm partial-volume ramp at their border; lesion voxels are always organ voxels too;
* usually a spine-like bright cylinder (~400 HU) posterior to the organ, a distractor for intensity-only rules;
* per scan: a smooth intensity drift inside the body (offset plus linear gradient), gaussian noise (sigma 10-25 HU),
  spacing jittered around a base spacing, one of several orientations (identity, LPS-like in-plane flips, z flips,
  swapped in-plane axes, coronal and sagittal slice stacks) and a random table position (origin).

Every fifth patient has a follow-up scan of the same anatomy (same organ, lesions grown or shrunk) with its own
grid, orientation and noise, so that splits must group scans by patient. Case ``i`` depends only on ``(seed, i)``:
growing a cohort writes only the new cases. Generation is deterministic and files are written byte-for-byte
reproducibly (gzip with mtime 0) and atomically; a manifest of parameters and per-file sha256 lets a re-run with
the same parameters leave every file untouched.

Volumes are int16 Hounsfield units, labels uint8 {0 background, 1 organ, 2 lesion}.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from unet3d.io import process_alive, write_bytes_atomic

from .hashing import sha256_file

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the phantom or the file encoding changes, so that cached cohorts regenerate
MANIFEST_NAME = "cohort_manifest.json"
LABELS = {"0": "background", "1": "organ", "2": "lesion"}
FOLLOW_UP_EVERY = 5  # patient p gets a second scan when p % FOLLOW_UP_EVERY == FOLLOW_UP_EVERY - 1
MAX_LESIONS = 3

_AIR_HU = -1000.0
_HU_RANGE = (-1024, 3071)
_GZIP_LEVEL = 1  # noisy int16 barely compresses better at higher levels, and level 1 is several times faster
_SLAB_SLICES = 16  # volumes are rendered in slabs along the last index axis to bound peak memory
_SPACING_QUANTUM = 1.0 / 1024.0  # multiples of 2**-10 mm survive NIfTI's float32 header exactly
_ORIGIN_QUANTUM = 1.0 / 64.0

# Direction matrices (column a: the world direction of index axis a, in ITK's LPS world) with draw probabilities.
# All are signed permutations, as scanners write for axial, coronal and sagittal stacks.
_ORIENTATIONS: tuple[tuple[np.ndarray, float], ...] = (
    (np.eye(3), 0.30),  # i -> left, j -> posterior, k -> superior (ITK's identity)
    (np.diag([-1.0, -1.0, 1.0]), 0.30),  # i -> right, j -> anterior (the RAS layout of many NIfTI tools)
    (np.diag([1.0, 1.0, -1.0]), 0.10),  # slices run head to feet
    (np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), 0.10),  # in-plane axes swapped
    (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), 0.10),  # coronal: j -> inferior, k -> posterior
    (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), 0.10),  # sagittal: i -> posterior, k -> left
)


# ----------------------------------------------------------------------------------------------------------------
# Cohort structure: which scan belongs to which patient
# ----------------------------------------------------------------------------------------------------------------


def case_patient(case_index: int) -> tuple[int, int]:
    """(patient index, visit index) of scan `case_index`; independent of the cohort size.

    Patients are enumerated in order; patient p has two visits when p % 5 == 4, so cases 4 and 5 are patient 4's
    baseline and follow-up, cases 10 and 11 patient 9's, and so on.
    """
    if case_index < 0:
        raise ValueError(f"case_index must be >= 0, got {case_index}")
    per_block = FOLLOW_UP_EVERY + 1  # scans per block of FOLLOW_UP_EVERY patients
    block, rest = divmod(case_index, per_block)
    patient = block * FOLLOW_UP_EVERY + min(rest, FOLLOW_UP_EVERY - 1)
    visit = 1 if rest == per_block - 1 else 0
    return patient, visit


# ----------------------------------------------------------------------------------------------------------------
# Phantom description (patient anatomy) and acquisition (scan grid)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lesion:
    centre: np.ndarray  # (3,) mm, patient coordinates
    semi_axes: np.ndarray  # (3,) mm along world axes
    contrast_hu: float


@dataclass(frozen=True)
class _Anatomy:
    """One patient's phantom, in mm relative to the patient centre (world LPS axes)."""

    body_radii: np.ndarray  # (2,) x, y semi-axes of the body ellipse
    body_centre_y: float
    body_wobble: float  # relative radius modulation along z
    body_wobble_period: float
    body_wobble_phase: float
    fat_fraction: float  # inner radius of the fat rim, relative
    soft_tissue_hu: float
    fat_hu: float
    texture_frequencies: np.ndarray  # (K, 3) rad/mm along world x, y, z
    texture_phases: np.ndarray  # (K, 3)
    texture_amplitudes: np.ndarray  # (K,) HU
    organ_centre: np.ndarray  # (3,)
    organ_semi_axes: np.ndarray  # (3,) along the organ's own axes
    organ_rotation: np.ndarray  # (3, 3) columns: organ axes in world coordinates
    organ_hu: float
    deformation_waves: np.ndarray  # (K, 3) in organ-normalised coordinates
    deformation_phases: np.ndarray
    deformation_amplitudes: np.ndarray
    lesions: tuple[_Lesion, ...]
    spine_centre: np.ndarray | None  # (2,) x, y of the spine axis
    spine_radius: float
    spine_hu: float


@dataclass(frozen=True)
class _Scan:
    """One acquisition: its voxel grid and the scanner effects."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # world mm (absolute)
    direction: np.ndarray  # (3, 3)
    patient_position: np.ndarray  # (3,) world position of the patient centre
    noise_sigma: float
    drift_offset: float
    drift_gradient: np.ndarray  # (3,) HU per mm


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from (x, y, z) angles in radians, applied z, then y, then x."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def _random_unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _draw_anatomy(rng: np.random.Generator, field_of_view: np.ndarray) -> _Anatomy:
    """A patient's phantom, scaled to the nominal field of view (mm, world x, y, z)."""
    fov = field_of_view
    body_radii = np.array([fov[0] * rng.uniform(0.38, 0.45), fov[1] * rng.uniform(0.30, 0.36)])
    n_texture = 4
    texture_frequencies = 2 * np.pi / rng.uniform(12.0, 40.0, (n_texture, 3))

    organ_centre = np.array(
        [
            -0.10 * fov[0] + rng.uniform(-0.04, 0.04) * fov[0],  # patient's right is -x in LPS
            -0.05 * fov[1] + rng.uniform(-0.03, 0.03) * fov[1],  # anterior is -y
            rng.uniform(-0.05, 0.05) * fov[2],
        ]
    )
    organ_semi_axes = np.array(
        [fov[0] * rng.uniform(0.14, 0.19), fov[1] * rng.uniform(0.12, 0.17), fov[2] * rng.uniform(0.20, 0.30)]
    )
    organ_rotation = _rotation(np.deg2rad([rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-25, 25)]))
    n_deform = 3
    deformation_waves = _random_unit_vectors(rng, n_deform) * rng.uniform(1.5, 3.5, n_deform)[:, None]
    deformation_phases = rng.uniform(0, 2 * np.pi, n_deform)
    deformation_amplitudes = rng.uniform(0.03, 0.08, n_deform)

    n_lesions = int(rng.choice(MAX_LESIONS + 1, p=[0.3, 0.3, 0.2, 0.2]))
    lesions = []
    for _ in range(n_lesions):
        # centre uniformly inside the inner half of the organ (organ-normalised ball of radius 0.5)
        direction = _random_unit_vectors(rng, 1)[0]
        local = direction * 0.5 * rng.uniform() ** (1 / 3)
        centre = organ_centre + organ_rotation @ (local * organ_semi_axes)
        radius = rng.uniform(2.0, 6.0)
        elongation = rng.uniform(0.8, 1.2, 3)
        sign = -1.0 if rng.uniform() < 0.65 else 1.0  # hypodense lesions are the commoner kind
        contrast = sign * rng.uniform(30.0, 60.0)
        lesions.append(_Lesion(centre=centre, semi_axes=radius * elongation, contrast_hu=contrast))
    has_spine = rng.uniform() < 0.8
    spine_radius = fov[0] * rng.uniform(0.05, 0.065)
    # Posterior of the body centre; the organ stays anterior of it, and voxels shared with the organ go to the organ.
    spine_centre = np.array([rng.uniform(-0.02, 0.02) * fov[0], 0.6 * body_radii[1]]) if has_spine else None

    return _Anatomy(
        body_radii=body_radii,
        body_centre_y=rng.uniform(-0.02, 0.02) * fov[1],
        body_wobble=rng.uniform(0.0, 0.06),
        body_wobble_period=rng.uniform(1.0, 2.5) * fov[2],
        body_wobble_phase=rng.uniform(0, 2 * np.pi),
        fat_fraction=rng.uniform(0.88, 0.94),
        soft_tissue_hu=rng.uniform(30.0, 45.0),
        fat_hu=rng.uniform(-120.0, -80.0),
        texture_frequencies=texture_frequencies,
        texture_phases=rng.uniform(0, 2 * np.pi, (n_texture, 3)),
        texture_amplitudes=rng.uniform(2.0, 5.0, n_texture),
        organ_centre=organ_centre,
        organ_semi_axes=organ_semi_axes,
        organ_rotation=organ_rotation,
        organ_hu=rng.uniform(60.0, 80.0),
        deformation_waves=deformation_waves,
        deformation_phases=deformation_phases,
        deformation_amplitudes=deformation_amplitudes,
        lesions=tuple(lesions),
        spine_centre=spine_centre,
        spine_radius=spine_radius,
        spine_hu=rng.uniform(350.0, 450.0),
    )


def _grow_lesions(anatomy: _Anatomy, rng: np.random.Generator) -> _Anatomy:
    """The same patient at a follow-up visit: each lesion grown or shrunk by up to 40 % (semi-axes 1.6-7.2 mm)."""
    lesions = tuple(
        _Lesion(
            centre=lesion.centre,
            semi_axes=np.clip(lesion.semi_axes * rng.uniform(0.6, 1.4), 1.6, 7.2),
            contrast_hu=lesion.contrast_hu,
        )
        for lesion in anatomy.lesions
    )
    return dataclasses.replace(anatomy, lesions=lesions)


def _quantise(values: np.ndarray, quantum: float) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.asarray(values) / quantum) * quantum)


def _draw_scan(
    rng: np.random.Generator,
    world_shape: Sequence[int],
    base_spacing: Sequence[float],
    spacing_jitter: float,
    field_of_view: np.ndarray,
) -> _Scan:
    """A scan's grid: `world_shape` voxels along world x, y, z, stored in a randomly drawn index order."""
    world_spacing = np.asarray(base_spacing, float) * (1.0 + spacing_jitter * rng.uniform(-1.0, 1.0, 3))
    world_spacing = np.maximum(world_spacing, _SPACING_QUANTUM)
    matrices, probabilities = zip(*_ORIENTATIONS)
    direction = matrices[int(rng.choice(len(matrices), p=probabilities))]
    world_axis_of_index = np.argmax(np.abs(direction), axis=0)  # signed permutation: one world axis per index axis
    size = tuple(int(world_shape[w]) for w in world_axis_of_index)
    spacing = _quantise(world_spacing[world_axis_of_index], _SPACING_QUANTUM)

    patient_position = np.array([rng.uniform(-150, 150), rng.uniform(-150, 150), rng.uniform(-400, 400)])
    grid_centre = patient_position + rng.uniform(-0.04, 0.04, 3) * field_of_view
    half_extent = np.asarray(spacing) * (np.asarray(size) - 1) / 2.0
    origin = _quantise(grid_centre - direction @ half_extent, _ORIGIN_QUANTUM)

    drift_direction = _random_unit_vectors(rng, 1)[0]
    drift_gradient = drift_direction * rng.uniform(0.0, 15.0) / (0.5 * float(np.max(field_of_view)))
    return _Scan(
        size=size,
        spacing=spacing,
        origin=origin,
        direction=direction,
        patient_position=patient_position,
        noise_sigma=float(rng.uniform(10.0, 25.0)),
        drift_offset=float(rng.uniform(-15.0, 15.0)),
        drift_gradient=drift_gradient,
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


# Rendered blocks are laid out in storage order (k, j, i), the (z, y, x) order SimpleITK's arrays use, so that
# slabs along k are contiguous and the finished volume needs no transpose.


def _patient_coordinates(scan: _Scan, index_ranges: Sequence[np.ndarray]) -> list[np.ndarray]:
    """World coordinates (mm, relative to the patient centre) of the block spanned by index ranges (i, j, k), one
    float32 array per world axis x, y, z, shaped to broadcast over the (k, j, i) block.

    Directions are signed permutations, so each world axis runs along exactly one index axis and each coordinate
    array is one-dimensional until combined with the others.
    """
    offset = np.asarray(scan.origin) - scan.patient_position
    coordinates = []
    for w in range(3):
        a = int(np.argmax(np.abs(scan.direction[w])))
        shape = [1, 1, 1]
        shape[2 - a] = len(index_ranges[a])
        step = scan.direction[w, a] * scan.spacing[a]
        coordinates.append((offset[w] + step * index_ranges[a].astype(np.float64)).astype(np.float32).reshape(shape))
    return coordinates


def _box(
    scan: _Scan, coordinates: Sequence[np.ndarray], low: np.ndarray, high: np.ndarray
) -> tuple[slice, ...] | None:
    """Slices of the (k, j, i) block whose voxels lie in the world box [low, high], or None when it is empty."""
    box = [slice(None)] * 3
    for w, coordinate in enumerate(coordinates):
        axis = 2 - int(np.argmax(np.abs(scan.direction[w])))
        values = coordinate.ravel()
        inside = np.flatnonzero((values >= low[w]) & (values <= high[w]))
        if inside.size == 0:
            return None
        box[axis] = slice(int(inside[0]), int(inside[-1]) + 1)
    return tuple(box)


def _crop(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """`array[box]` for arrays that broadcast over the block (length-1 axes are kept whole)."""
    return array[tuple(s if n > 1 else slice(None) for n, s in zip(array.shape, box))]


def _separable_texture(coordinates: Sequence[np.ndarray], anatomy: _Anatomy) -> np.ndarray:
    """Smooth tissue texture: a sum of products of cosines along x, y and z (cheap under broadcasting)."""
    total = np.float32(0.0)
    for frequencies, phases, amplitude in zip(
        anatomy.texture_frequencies, anatomy.texture_phases, anatomy.texture_amplitudes
    ):
        factors = [np.cos(c * np.float32(f) + np.float32(p)) for c, f, p in zip(coordinates, frequencies, phases)]
        total = total + np.float32(amplitude) * (factors[0] * factors[1]) * factors[2]
    return total


def _organ_extent(anatomy: _Anatomy) -> np.ndarray:
    """Half-widths (mm, world axes) of a box that holds the deformed organ."""
    largest_radius = 1.0 / (1.0 - float(np.sum(anatomy.deformation_amplitudes)))
    rotated = anatomy.organ_rotation * anatomy.organ_semi_axes[None, :]
    return np.sqrt(np.sum(rotated**2, axis=1)) * largest_radius + 1.0


def _render_slab(
    anatomy: _Anatomy, scan: _Scan, index_ranges: Sequence[np.ndarray], noise_rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU image (int16), label (uint8) and per-lesion voxel counts of the block spanned by index ranges (i, j, k),
    as (k, j, i) arrays."""
    f32 = np.float32
    shape = tuple(len(r) for r in reversed(index_ranges))
    coordinates = _patient_coordinates(scan, index_ranges)
    x, y, z = coordinates

    wobble = f32(1.0) + f32(anatomy.body_wobble) * np.sin(
        z * f32(2 * np.pi / anatomy.body_wobble_period) + f32(anatomy.body_wobble_phase)
    )
    in_plane_r2 = (x / f32(anatomy.body_radii[0])) ** 2 + (
        (y - f32(anatomy.body_centre_y)) / f32(anatomy.body_radii[1])
    ) ** 2
    body_r2 = np.broadcast_to(in_plane_r2 / wobble**2, shape)
    body = body_r2 < 1.0
    fat = body & (body_r2 > f32(anatomy.fat_fraction**2))
    texture = np.broadcast_to(_separable_texture(coordinates, anatomy), shape)

    hu = np.where(body, f32(anatomy.soft_tissue_hu) + texture, f32(_AIR_HU))
    hu[fat] = f32(anatomy.fat_hu) + f32(0.5) * texture[fat]

    # Organ: normalised coordinates in the organ's own frame, radius modulated by smooth waves; only its box is
    # evaluated.
    organ = np.zeros(shape, bool)
    extent = _organ_extent(anatomy)
    organ_box = _box(scan, coordinates, anatomy.organ_centre - extent, anatomy.organ_centre + extent)
    if organ_box is not None:
        offsets = [_crop(c, organ_box) - f32(anatomy.organ_centre[w]) for w, c in enumerate(coordinates)]
        rotation = anatomy.organ_rotation
        local = [
            (offsets[0] * f32(rotation[0, j]) + offsets[1] * f32(rotation[1, j]) + offsets[2] * f32(rotation[2, j]))
            / f32(anatomy.organ_semi_axes[j])
            for j in range(3)
        ]
        radius = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
        deformation = f32(1.0)
        for wave, phase, amplitude in zip(
            anatomy.deformation_waves, anatomy.deformation_phases, anatomy.deformation_amplitudes
        ):
            argument = local[0] * f32(wave[0]) + local[1] * f32(wave[1]) + local[2] * f32(wave[2]) + f32(phase)
            deformation = deformation + f32(amplitude) * np.sin(argument)
        organ[organ_box] = (radius * deformation < 1.0) & body[organ_box] & ~fat[organ_box]

    if anatomy.spine_centre is not None:
        spine_r2 = (x - f32(anatomy.spine_centre[0])) ** 2 + (y - f32(anatomy.spine_centre[1])) ** 2
        spine = np.broadcast_to(spine_r2 < f32(anatomy.spine_radius**2), shape) & body & ~organ
        hu[spine] = f32(anatomy.spine_hu) + texture[spine]

    hu[organ] = f32(anatomy.organ_hu) + f32(0.5) * texture[organ]
    label = organ.astype(np.uint8)

    lesion_voxels = np.zeros(len(anatomy.lesions), np.int64)
    ramp_mm = 1.0  # partial-volume transition at the lesion border
    for n, lesion in enumerate(anatomy.lesions):
        smallest = float(np.min(lesion.semi_axes))
        # the intensity ramp reaches out to distance 1 + ramp / (2 * smallest semi-axis)
        reach = lesion.semi_axes * (1.0 + 0.5 * ramp_mm / smallest) + 0.5
        box = _box(scan, coordinates, lesion.centre - reach, lesion.centre + reach)
        if box is None:
            continue
        distance = np.sqrt(
            sum(
                ((_crop(c, box) - f32(lesion.centre[w])) / f32(lesion.semi_axes[w])) ** 2
                for w, c in enumerate(coordinates)
            )
        )
        in_organ = organ[box]
        inside = (distance < 1.0) & in_organ
        lesion_voxels[n] = int(np.count_nonzero(inside))
        weight = np.clip((f32(1.0) - distance) * f32(smallest / ramp_mm) + f32(0.5), 0.0, 1.0)
        hu[box] += np.where(in_organ, f32(lesion.contrast_hu) * weight, f32(0.0))
        label[box][inside] = 2

    drift = (
        f32(scan.drift_offset)
        + x * f32(scan.drift_gradient[0])
        + y * f32(scan.drift_gradient[1])
        + z * f32(scan.drift_gradient[2])
    )
    hu += np.where(body, drift, f32(0.0))
    hu += f32(scan.noise_sigma) * noise_rng.standard_normal(shape, dtype=np.float32)
    np.rint(hu, out=hu)
    np.clip(hu, *_HU_RANGE, out=hu)
    return hu.astype(np.int16), label, lesion_voxels


def _case_streams(seed: int, case_index: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent random streams for the patient's anatomy, the scan geometry and the scan's noise."""
    patient, _ = case_patient(case_index)
    anatomy_rng = np.random.default_rng(np.random.SeedSequence([seed, 1, patient]))
    scan_rng = np.random.default_rng(np.random.SeedSequence([seed, 2, case_index]))
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 3, case_index]))
    return anatomy_rng, scan_rng, noise_rng


def render_case(
    seed: int,
    case_index: int,
    shape: Sequence[int] = (64, 64, 40),
    base_spacing: Sequence[float] = (1.5, 1.5, 3.0),
    spacing_jitter: float = 0.15,
) -> tuple[sitk.Image, sitk.Image, dict]:
    """Render scan `case_index` of the cohort `seed` as (int16 HU image, uint8 label, info) SimpleITK images.

    `shape` and `base_spacing` are along the world (patient) axes x (right to left), y (anterior to posterior),
    z (inferior to superior); the stored index order follows the scan's orientation, so a coronal scan of
    shape (64, 64, 40) is stored with size (64, 40, 64). info: {"visit": 0 baseline / 1 follow-up,
    "n_lesions": lesions with at least one labelled voxel}.
    """
    _, visit = case_patient(case_index)
    field_of_view = np.asarray(shape, float) * np.asarray(base_spacing, float)
    anatomy_rng, scan_rng, noise_rng = _case_streams(seed, case_index)
    anatomy = _draw_anatomy(anatomy_rng, field_of_view)
    if visit > 0:
        anatomy = _grow_lesions(anatomy, np.random.default_rng(np.random.SeedSequence([seed, 4, case_index])))
    scan = _draw_scan(scan_rng, shape, base_spacing, spacing_jitter, field_of_view)

    # Filled slab by slab along k in storage (k, j, i) order; the noise stream is consumed in that fixed order.
    image = np.empty(scan.size[::-1], np.int16)
    label = np.empty(scan.size[::-1], np.uint8)
    lesion_voxels = np.zeros(len(anatomy.lesions), np.int64)
    ranges = [np.arange(scan.size[0]), np.arange(scan.size[1])]
    for k0 in range(0, scan.size[2], _SLAB_SLICES):
        k1 = min(k0 + _SLAB_SLICES, scan.size[2])
        slab_image, slab_label, slab_lesions = _render_slab(anatomy, scan, ranges + [np.arange(k0, k1)], noise_rng)
        image[k0:k1] = slab_image
        label[k0:k1] = slab_label
        lesion_voxels += slab_lesions

    images = []
    for array in (image, label):
        itk_image = sitk.GetImageFromArray(array)
        itk_image.SetSpacing(scan.spacing)
        itk_image.SetOrigin(scan.origin)
        itk_image.SetDirection(tuple(float(v) for v in scan.direction.ravel()))
        images.append(itk_image)
    info = {"visit": visit, "n_lesions": int(np.count_nonzero(lesion_voxels))}
    return images[0], images[1], info


# ----------------------------------------------------------------------------------------------------------------
# Deterministic, atomic file output
# ----------------------------------------------------------------------------------------------------------------


def _nifti_gz_bytes(image: sitk.Image) -> bytes:
    """The image as .nii.gz bytes that depend only on its content (ITK's own gzip stream embeds no mtime we can
    pin, so ITK writes plain NIfTI and we compress with mtime 0 and no file name)."""
    with tempfile.TemporaryDirectory(prefix="unet3d-demo-") as tmp:
        path = os.path.join(tmp, "volume.nii")
        sitk.WriteImage(image, path, False)
        with open(path, "rb") as f:
            raw = f.read()
    return gzip.compress(raw, compresslevel=_GZIP_LEVEL, mtime=0)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write `data` unless the file already holds exactly these bytes; True when written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    write_bytes_atomic(path, data)
    return True


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _remove_stale_partials(directory: Path) -> None:
    """Drop `.<name>.<pid>.partial` temporaries of a killed generation: the names this module wrote before it
    moved to atomic_path (which removes its own leftovers), so a cohort folder of an older run is cleaned too."""
    for stale in directory.glob(".*.partial"):
        try:
            pid = int(stale.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not process_alive(pid):
            stale.unlink(missing_ok=True)


    return True


# ----------------------------------------------------------------------------------------------------------------
# Cohorts
# ----------------------------------------------------------------------------------------------------------------


def _load_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("cases"), dict) else None


def _validated_parameters(
    n_cases: int, seed: int, shape: Sequence[int], base_spacing: Sequence[float], spacing_jitter: float
) -> dict:
    if int(n_cases) < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if len(shape) != 3 or any(int(s) < 4 for s in shape):
        raise ValueError(f"shape must be three sizes >= 4, got {tuple(shape)}")
    if len(base_spacing) != 3 or any(float(s) <= 0 for s in base_spacing):
        raise ValueError(f"base_spacing must be three positive millimetre values, got {tuple(base_spacing)}")
    if not 0.0 <= float(spacing_jitter) < 1.0:
        raise ValueError(f"spacing_jitter must be in [0, 1), got {spacing_jitter}")
    return {
        "seed": int(seed),
        "shape": [int(s) for s in shape],
        "base_spacing": [float(s) for s in base_spacing],
        "spacing_jitter": float(spacing_jitter),
    }


def _generate_cohort(
    out_dir: str | Path,
    n_cases: int,
    seed: int,
    shape: Sequence[int],
    base_spacing: Sequence[float],
    spacing_jitter: float,
    case_prefix: str,
    name: str,
    description: str,
    channels: int = 1,
) -> Path:
    out_dir = Path(out_dir)
    parameters = _validated_parameters(n_cases, seed, shape, base_spacing, spacing_jitter)
    parameters.update(generator_version=GENERATOR_VERSION, case_prefix=case_prefix)
    if int(channels) < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if channels > 1:  # a one-channel cohort keeps its manifest (and so its files) exactly as before
        parameters["channels"] = int(channels)

    def channel_paths(cid: str) -> list[Path]:
        if channels == 1:
            return [images_dir / f"{cid}.nii.gz"]
        return [images_dir / f"{cid}_{c:04d}.nii.gz" for c in range(channels)]
    images_dir, labels_dir = out_dir / "imagesTr", out_dir / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(images_dir)
    _remove_stale_partials(labels_dir)

    manifest_path = out_dir / MANIFEST_NAME
    previous = _load_manifest(manifest_path)
    case_ids = [f"{case_prefix}_{i:03d}" for i in range(n_cases)]

    # Cases of an earlier, larger cohort that this one no longer lists are ours to remove.
    if previous is not None:
        for stale_id in sorted(set(previous["cases"]) - set(case_ids)):
            channel_files = images_dir.glob(f"{stale_id}_[0-9][0-9][0-9][0-9].nii.gz")
            for stale in [images_dir / f"{stale_id}.nii.gz", *channel_files]:
                stale.unlink(missing_ok=True)
            (labels_dir / f"{stale_id}.nii.gz").unlink(missing_ok=True)

    # Recorded hashes are trusted only for the same parameters; they say what each deterministic file must hold.
    known = previous["cases"] if previous is not None and previous.get("parameters") == parameters else {}
    cases: dict[str, dict] = {cid: known[cid] for cid in case_ids if cid in known}

    def manifest_bytes() -> bytes:
        return _json_bytes({"parameters": parameters, "cases": {cid: cases[cid] for cid in sorted(cases)}})

    if known and set(known) != set(cases):
        _write_if_changed(manifest_path, manifest_bytes())  # forget the removed cases straight away

    for index, case_id in enumerate(case_ids):
        image_paths, label_path = channel_paths(case_id), labels_dir / f"{case_id}.nii.gz"
        # files of the other layout (a cohort regenerated with another channel count) would be taken for channels
        for other in [images_dir / f"{case_id}.nii.gz", *images_dir.glob(f"{case_id}_[0-9][0-9][0-9][0-9].nii.gz")]:
            if other not in image_paths:
                other.unlink(missing_ok=True)
        entry = cases.get(case_id)
        if (
            entry is not None
            and [_sha256_file(p) for p in image_paths] == entry.get("channel_sha256", [entry["image_sha256"]])
            and _sha256_file(label_path) == entry["label_sha256"]
        ):
            continue
        image, label, info = render_case(seed, index, shape, base_spacing, spacing_jitter)
        channel_bytes = [_nifti_gz_bytes(derived_channel(image, c)) for c in range(channels)]
        image_bytes, label_bytes = channel_bytes[0], _nifti_gz_bytes(label)
        for path, data in zip(image_paths, channel_bytes):
            _write_if_changed(path, data)
        _write_if_changed(label_path, label_bytes)
        patient, visit = case_patient(index)
        new_entry = {
            "patient_id": f"{case_prefix}_patient_{patient:03d}",
            "visit": visit,
            "n_lesions": info["n_lesions"],
            "size": list(image.GetSize()),
            "spacing": list(image.GetSpacing()),
            "direction": list(image.GetDirection()),
            "image_sha256": _sha256_bytes(image_bytes),
            "label_sha256": _sha256_bytes(label_bytes),
        }
        if channels > 1:
            new_entry["channel_sha256"] = [_sha256_bytes(b) for b in channel_bytes]
        logger.info("phantom %s written (%d lesions)", case_id, info["n_lesions"])
        if entry != new_entry:
            cases[case_id] = new_entry
            # Recorded after the case's files, so a killed run never vouches for files it did not finish.
            _write_if_changed(manifest_path, manifest_bytes())

    dataset = {
        "name": name,
        "description": description,
        "reference": "synthetic phantom generated by data_catalog.demo",
        "licence": "CC0-1.0",
        "release": f"generator v{GENERATOR_VERSION}, seed {int(seed)}",
        "tensorImageSize": "3D",
        "modality": {str(c): DERIVED_CHANNEL_NAMES[min(c, 2)] for c in range(channels)},
        "labels": dict(LABELS),
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [
            {
                "image": f"./imagesTr/{cid}.nii.gz",
                "label": f"./labelsTr/{cid}.nii.gz",
                "patient_id": cases[cid]["patient_id"],
            }
            for cid in case_ids
        ],
        "test": [],
    }
    _write_if_changed(out_dir / "dataset.json", _json_bytes(dataset))
    _write_if_changed(manifest_path, manifest_bytes())
    return out_dir


# Channel 0 is the CT phantom; further channels are computed from it, so they are co-registered by construction.
DERIVED_CHANNEL_NAMES = ("CT", "gradient", "blurred")


def derived_channel(image: sitk.Image, channel: int) -> sitk.Image:
    """Channel `channel` of a multi-channel phantom: 0 the CT image itself, 1 its gradient magnitude (edges, as a
    second MRI sequence shows other contrast), 2+ the CT blurred by a Gaussian of `channel - 1` mm (as PET is)."""
    if channel == 0:
        return image
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), float(max(channel - 1, 1)))
    out = sitk.GradientMagnitude(smooth) if channel == 1 else smooth
    out = sitk.Cast(out, sitk.sitkFloat32)
    out.CopyInformation(image)
    return out


def generate_demo_cohort(
    out_dir: str | Path,
    n_cases: int = 12,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 40),
    base_spacing: Sequence[float] = (1.5, 1.5, 3.0),
    spacing_jitter: float = 0.15,
    channels: int = 1,
) -> Path:
    """Write (or verify) the small synthetic CT phantom cohort used by `unet3d demo`; returns `out_dir`.

    Layout: `dataset.json`, `imagesTr/demo_XXX.nii.gz` (int16 HU), `labelsTr/demo_XXX.nii.gz` (uint8: 0 background,
    1 organ, 2 lesion) and `cohort_manifest.json` (parameters and per-file sha256). Every fifth patient has a
    follow-up scan; the training entries carry a "patient_id" key. `shape` and `base_spacing` are along the world
    axes (x right to left, y anterior to posterior, z inferior to superior); see the module docstring for the
    phantom. A re-run with the same parameters rewrites nothing; a larger `n_cases` adds only the new cases.
    `channels` > 1: each case is `imagesTr/demo_XXX_0000.nii.gz` (the CT), `_0001` (its gradient magnitude),
    `_0002`... (blurred), nnU-Net's multi-channel layout, declared in dataset.json's `modality`.
    """
    return _generate_cohort(
        out_dir,
        n_cases,
        seed,
        shape,
        base_spacing,
        spacing_jitter,
        case_prefix="demo",
        name="unet3d-demo-phantom",
        description="Synthetic abdominal CT phantoms: organ (1) with 0-3 lesions (2); small volumes for the demo.",
        channels=channels,
    )


def generate_ct_sized_cohort(
    out_dir: str | Path,
    n_cases: int = 40,
    seed: int = 0,
    shape: Sequence[int] = (512, 512, 120),
    base_spacing: Sequence[float] = (0.7, 0.7, 2.5),
    spacing_jitter: float = 0.15,
) -> Path:
    """The same phantom generator at clinical CT size (512 x 512 x 120 voxels of ~0.7 x 0.7 x 2.5 mm), labels kept,
    for benchmarking ingestion, preprocessing and inference at realistic volume sizes; case ids `ctsim_XXX`.
    Same layout, determinism and re-run behaviour as `generate_demo_cohort`.
    """
    return _generate_cohort(
        out_dir,
        n_cases,
        seed,
        shape,
        base_spacing,
        spacing_jitter,
        case_prefix="ctsim",
        name="unet3d-ct-sized-phantom",
        description="Synthetic abdominal CT phantoms at clinical size: organ (1) with 0-3 lesions (2).",
    )
