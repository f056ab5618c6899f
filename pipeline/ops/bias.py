"""N4 bias-field correction (SimpleITK)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import SimpleITK as sitk

N4_DEFAULTS: dict[str, Any] = {"shrink_factor": 4, "iterations": (50, 50, 30), "mask": "Otsu foreground"}


def n4_correct(
    image: sitk.Image, *, shrink_factor: int = 4, iterations: Sequence[int] = (50, 50, 30)
) -> tuple[sitk.Image, sitk.Image]:
    """The bias-corrected image and the multiplicative bias field, both at full resolution.

    The field is fitted on a copy shrunk ``shrink_factor`` times (inside an Otsu foreground mask)
    and brought back to full resolution by linear interpolation of its logarithm, which is smooth.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    # shrink to ~4 mm voxels whatever the input's voxel size (a coarse image is not shrunk further)
    factors = [
        max(1, min(shrink_factor, round(4.0 / z), n // 16))
        for z, n in zip(image.GetSpacing(), image.GetSize(), strict=True)
    ]
    small = sitk.Shrink(image, factors)
    mask = sitk.OtsuThreshold(small, 0, 1, 200)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, mask)
    log_field = sitk.Resample(
        corrector.GetLogBiasFieldAsImage(small),
        image,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    field = sitk.Exp(log_field)
    return sitk.Cast(image / field, sitk.sitkFloat32), sitk.Cast(field, sitk.sitkFloat32)
