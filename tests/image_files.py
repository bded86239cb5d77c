"""Writing small test images with a chosen geometry (shared by the ingestion and hostile-input tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=None, direction=None,
          vector: bool = False) -> Path:
    """array in (x, y, z) order ((x, y, z, components) with `vector`), written with SimpleITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T if not vector else array.transpose(2, 1, 0, 3)),
                                   isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path
