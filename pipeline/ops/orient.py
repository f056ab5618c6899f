"""Make an anatomical image safe to process: 3D, finite, RAS-oriented, without resampling."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputDataError
from ..kinds import REFERENCE_KIND, image_kind, kind_of_file


def prepare_t1w(img: nib.spatialimages.SpatialImage, *, name: str) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Reorient to RAS (no resampling), squeeze a singleton 4th axis, zero non-finite voxels.

    Returns the float32 image and a record of what was done, with the original header's geometry.
    Raises :class:`InputDataError` for what cannot be an anatomical image (2D, several volumes).
    """
    kind = kind_of_file(name) if image_kind(kind_of_file(name)) else REFERENCE_KIND
    shape = img.shape
    if len(shape) < 3:
        raise InputDataError(f"{name}: has {len(shape)} dimensions; a {kind} must be a 3D volume. Check the file.")
    if len(shape) > 3:
        if any(n != 1 for n in shape[3:]):
            raise InputDataError(
                f"{name}: holds {int(np.prod(shape[3:]))} volumes (shape {tuple(shape)}); a {kind} must be one "
                "3D volume. Average or pick one volume before running bidsdl, or exclude this image."
            )
        img = nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(shape[:3]), img.affine, img.header)
    original = "".join(nib.aff2axcodes(img.affine))
    ras = nib.as_closest_canonical(img)
    data = np.asanyarray(ras.dataobj, dtype=np.float32)
    non_finite = ~np.isfinite(data)
    n_non_finite = int(non_finite.sum())
    if n_non_finite:
        data = np.where(non_finite, np.float32(0), data)
    out = nib.Nifti1Image(data, ras.affine)
    out.header.set_xyzt_units("mm")
    record = {
        "original_orientation": original,
        "original_affine": np.asarray(img.affine).round(6).tolist(),
        "original_shape": [int(n) for n in shape],
        "reoriented": original != "RAS",
        "non_finite_voxels_zeroed": n_non_finite,
        "squeezed_4d": len(shape) > 3,
    }
    return out, record
