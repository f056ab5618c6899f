"""N4 bias-field correction (SimpleITK)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import SimpleITK as sitk

#: The field is fitted on a copy block-shrunk to voxels of about this size (mm). 5 mm corrects as well
#: as 4 mm (white-matter CV and CJV within 1% on the real heads and the sample heads) in half the time:
#: the field is smooth, and the fit's cost grows with the voxels in the mask.
FIT_VOXEL_MM = 5.0
N4_DEFAULTS: dict[str, Any] = {"fit_voxel_mm": FIT_VOXEL_MM, "iterations": (50, 50, 30)}
#: How far the brain mask is grown for N4's fit (mm): the field then covers the brain's edge.
MASK_GROWTH_MM = 4.0


def n4_correct(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    fit_voxel_mm: float = FIT_VOXEL_MM,
    iterations: Sequence[int] = (50, 50, 30),
) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """The bias-corrected image, the multiplicative bias field (both at full resolution) and a record
    of the fit (``FittedIn``: where; ``FitVoxelSizeMm``: on what grid).

    The field is fitted on a copy block-shrunk to voxels of about ``fit_voxel_mm`` (an integer factor
    per axis: 3 mm voxels stay 3 mm), inside ``mask`` (the brain mask, grown by
    :data:`MASK_GROWTH_MM`: the tissue whose intensities matter, without the neck and shoulders of a
    large field of view) or, without one, an Otsu foreground; it is brought back to full resolution by
    linear interpolation of its logarithm, which is smooth (extended flat beyond the shrunk grid's
    outermost voxel centres, the image's last few millimetres).
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    factors = [
        max(1, min(math.ceil(fit_voxel_mm / z - 0.25), n // 16))
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
        True,  # nearest-neighbour extrapolation, not a field of 1, at the edge
    )
    field = sitk.Exp(log_field)
    record = {"FittedIn": fitted_in, "FitVoxelSizeMm": [round(float(z), 3) for z in small.GetSpacing()]}
    return sitk.Cast(image / field, sitk.sitkFloat32), sitk.Cast(field, sitk.sitkFloat32), record
