"""Resampling between subject and template grids, and robust intensity normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputDataError
from .images import array_to_sitk, reference_image, sitk_to_array


def resample(
    image: sitk.Image,
    transform: sitk.Transform,
    affine: np.ndarray,
    shape: Sequence[int],
    *,
    interpolation: int = sitk.sitkLinear,
) -> np.ndarray:
    """Values of ``image`` on a grid; ``transform`` maps grid points (LPS) to ``image`` points."""
    out = sitk.Resample(image, reference_image(affine, shape), transform, interpolation, 0.0, sitk.sitkFloat32)
    return sitk_to_array(out)


def resample_maps(
    maps: Sequence[np.ndarray],
    affine: np.ndarray,
    transform: sitk.Transform,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
) -> list[np.ndarray]:
    """Several maps on one grid (``affine``) resampled onto another (linear) in one pass: the transform (a warp's
    displacement field is the costly part) is evaluated once per target voxel for all of them.

    >>> ramp = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    >>> same = resample_maps([ramp, 2 * ramp], np.eye(4), sitk.Transform(3, sitk.sitkIdentity), np.eye(4), (3, 3, 3))
    >>> bool(np.allclose(same[1], 2 * ramp))
    True
    """
    stacked = sitk.Compose([array_to_sitk(np.asarray(m, dtype=np.float32), affine) for m in maps])
    out = sitk.Resample(stacked, reference_image(target_affine, target_shape), transform, sitk.sitkLinear, 0.0,
                        sitk.sitkVectorFloat32)  # fmt: skip
    values = sitk.GetArrayFromImage(out).transpose(2, 1, 0, 3)
    return [np.ascontiguousarray(values[..., k]) for k in range(len(maps))]


def to_subject(
    data: np.ndarray,
    affine: np.ndarray,
    transform: sitk.Transform,
    subject_affine: np.ndarray,
    subject_shape: Sequence[int],
) -> np.ndarray:
    """Bring a template-space map (mask, tissue probability) onto the subject grid (linear)."""
    image = array_to_sitk(np.asarray(data, dtype=np.float32), affine)
    return resample(image, transform.GetInverse(), subject_affine, subject_shape)


def robust_normalize(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """(x - median) / IQR, with the median and IQR of the voxels in ``mask``.

    >>> x = np.arange(1, 6, dtype=np.float32)
    >>> out, info = robust_normalize(x, x > 0)
    >>> out.tolist(), info["median"], info["iqr"]
    ([-1.0, -0.5, 0.0, 0.5, 1.0], 3.0, 2.0)
    """
    values = data[mask]
    if values.size == 0:
        raise ValueError("the brain mask is empty: cannot normalise intensities")
    p25, median, p75 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    iqr = p75 - p25
    if not iqr > 0:
        raise ValueError(f"no intensity contrast inside the brain mask (IQR {iqr:g}): cannot normalise")
    out = ((data - median) / iqr).astype(np.float32)
    return out, {
        "method": "robust z-score inside the brain mask: (x - median) / IQR",
        "median": median,
        "iqr": iqr,
        "p25": p25,
        "p75": p75,
        "n_voxels": int(values.size),
    }


def template_space_outputs(
    corrected: sitk.Image,
    brain_mask: sitk.Image,
    transform: sitk.Transform,
    *,
    template_t1: np.ndarray,
    template_mask: np.ndarray,
    template_affine: np.ndarray,
    model_resolution: float,
) -> dict[str, Any]:
    """The subject and its brain mask in template space, at 1 mm and on the cropped model grid.

    Normalisation numbers come from the 1 mm image inside the subject's own brain mask (brought into
    template space) and are applied to both resolutions, so the two differ only by resampling.
    """
    from .template import cropped_grid

    shape_1mm = template_t1.shape
    coverage = brain_coverage(corrected, transform, template_mask, template_affine)
    if coverage < MIN_BRAIN_COVERAGE:
        size = [round(n * z) for n, z in zip(corrected.GetSize(), corrected.GetSpacing(), strict=True)]
        raise InputDataError(
            f"after registration the image covers {coverage:.0%} of the template brain (field of view "
            f"{size[0]} x {size[1]} x {size[2]} mm). bidsdl needs a whole-brain T1w: check the image "
            "(a partial field of view, or not a brain image), or exclude it."
        )
    brain = sitk.Cast(brain_mask, sitk.sitkFloat32)
    model_affine, model_shape = cropped_grid(template_mask, template_affine, model_resolution)
    mask_1mm = resample(brain, transform, template_affine, shape_1mm) > 0.5
    mask_model = resample(brain, transform, model_affine, model_shape) > 0.5
    t1w_1mm = resample(corrected, transform, template_affine, shape_1mm)
    t1w_1mm, normalisation = robust_normalize(t1w_1mm, mask_1mm)
    t1w_model = resample(corrected, transform, model_affine, model_shape)
    t1w_model = ((t1w_model - normalisation["median"]) / normalisation["iqr"]).astype(np.float32)
    return {
        "t1w_1mm": t1w_1mm,
        "affine_1mm": template_affine,
        "mask_1mm": mask_1mm,
        "t1w_model": t1w_model,
        "mask_model": mask_model,
        "affine_model": model_affine,
        "normalisation": {
            **normalisation,
            "mask": "the subject's brain mask in template space",
            "brain_coverage": coverage,
        },
    }


#: Least share of the template brain the registered image must cover.
MIN_BRAIN_COVERAGE = 0.8


def brain_coverage(
    image: sitk.Image, transform: sitk.Transform, template_mask: np.ndarray, affine: np.ndarray
) -> float:
    """Share of the template brain that falls inside the image's field of view after registration."""
    ones = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(image)
    inside = resample(ones, transform, affine, template_mask.shape, interpolation=sitk.sitkNearestNeighbor)
    return float((inside[template_mask] > 0.5).mean())
