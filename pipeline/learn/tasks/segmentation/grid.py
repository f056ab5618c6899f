"""The segmentation grid: the template cropped to the brain, and images and labels brought onto it and back."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ....ops.images import array_to_sitk
from ....ops.resample import resample
from ....ops.template import cropped_grid, load_template

LOGGER = logging.getLogger(__name__)


#: Default voxel size (mm) of the segmentation grid: small structures need finer voxels than a diagnosis.
DEFAULT_RESOLUTION_MM = 1.5


def model_grid(resolution_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The segmentation grid: the 1 mm template's brain box + 4 mm, at ``resolution_mm``."""
    template = load_template(1)
    return cropped_grid(template.brain_mask, template.affine, resolution_mm)


def read_transform(path: Path) -> sitk.Transform:
    """The participant level's T1w -> template affine (maps template points to T1w points)."""
    return sitk.ReadTransform(str(path))


def image_on_grid(
    t1w: nib.spatialimages.SpatialImage, transform: sitk.Transform, grid: np.ndarray, shape: Sequence[int],
    normalisation: dict[str, Any],
) -> np.ndarray:  # fmt: skip
    """The bias-corrected T1w on the grid (linear), normalised with its template-space median and IQR."""
    data = np.asanyarray(t1w.dataobj, dtype=np.float32)
    values = resample(array_to_sitk(data, t1w.affine), transform, grid, shape)
    return ((values - float(normalisation["median"])) / float(normalisation["iqr"])).astype(np.float32)


def labels_on_grid(
    labels: np.ndarray, affine: np.ndarray, transform: sitk.Transform, grid: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """A T1w-grid label image on the model grid (nearest neighbour)."""
    image = array_to_sitk(labels.astype(np.float32), affine)
    return resample(image, transform, grid, shape, interpolation=sitk.sitkNearestNeighbor).astype(np.uint8)


def probabilities_to_native(
    probabilities: np.ndarray,
    grid: np.ndarray,
    transform: sitk.Transform,
    affine: np.ndarray,
    shape: Sequence[int],
) -> np.ndarray:
    """Model-grid class probabilities ``(K, X, Y, Z)`` -> the labels on a T1w's grid (resample, then argmax).

    Outside the model grid the background wins.
    """
    inverse = transform.GetInverse()
    best = np.zeros(tuple(shape), dtype=np.float32)
    labels = np.zeros(tuple(shape), dtype=np.uint8)
    for k in range(probabilities.shape[0]):
        channel = array_to_sitk(np.asarray(probabilities[k], dtype=np.float32), grid)
        values = resample(channel, inverse, affine, shape)
        if k == 0:  # the background: 1 outside the grid
            ones = array_to_sitk(np.ones(probabilities.shape[1:], dtype=np.float32), grid)
            values = values + (1 - resample(ones, inverse, affine, shape))
        better = values > best
        labels[better] = k
        best[better] = values[better]
    return labels


def map_to_native(
    volume: np.ndarray, grid: np.ndarray, transform: sitk.Transform, affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """A model-grid map (e.g. the uncertainty) on a T1w's grid (linear; 0 outside the model grid)."""
    image = array_to_sitk(np.asarray(volume, dtype=np.float32), grid)
    return resample(image, transform.GetInverse(), affine, shape).astype(np.float32)


# --- metrics -------------------------------------------------------------------------------------------------
