"""N4 bias-field correction (SimpleITK)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import SimpleITK as sitk

N4_DEFAULTS: dict[str, Any] = {"shrink_factor": 4, "iterations": (50, 50, 30)}
#: How far the brain mask is grown for N4's fit (mm): the field then covers the brain's edge.
MASK_GROWTH_MM = 4.0


def n4_correct(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
) -> tuple[sitk.Image, sitk.Image, str]:
    """The bias-corrected image, the multiplicative bias field (both at full resolution) and what
    the field was fitted in.

    The field is fitted on a copy shrunk to ~4 mm voxels, inside ``mask`` (the brain mask, grown by
    :data:`MASK_GROWTH_MM`: the tissue whose intensities matter, without the neck and shoulders of a
    large field of view) or, without one, an Otsu foreground; it is brought back to full resolution by
    linear interpolation of its logarithm, which is smooth.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    # shrink to voxels of at least ~4 mm whatever the input's (3 mm ones become 6 mm: the field is smooth)
    factors = [
        max(1, min(shrink_factor, math.ceil(4.0 / z - 0.25), n // 16))
        for z, n in zip(image.GetSpacing(), image.GetSize(), strict=True)
    ]
    small = sitk.Shrink(image, factors)
    if mask is not None:
        mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
        mask.CopyInformation(image)  # same grid; headers may differ in the last digits
        fit_mask = sitk.Shrink(mask, factors)
        radius = [max(1, round(MASK_GROWTH_MM / z)) for z in fit_mask.GetSpacing()]
        fit_mask = sitk.BinaryDilate(fit_mask, radius)
        fitted_in = f"the brain mask grown by {MASK_GROWTH_MM:g} mm"
    else:
        fit_mask = sitk.OtsuThreshold(small, 0, 1, 200)
        fitted_in = "the Otsu foreground"
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, fit_mask)
    log_field = sitk.Resample(
        corrector.GetLogBiasFieldAsImage(small),
        image,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    field = sitk.Exp(log_field)
    return sitk.Cast(image / field, sitk.sitkFloat32), sitk.Cast(field, sitk.sitkFloat32), fitted_in
