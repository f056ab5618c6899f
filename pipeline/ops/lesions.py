"""Lesion masks given with the data: checked against their T1w's grid, made RAS like it, measured."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputDataError

#: Largest difference (mm) between a lesion mask's affine and its T1w's that still counts as the same grid.
GRID_TOLERANCE_MM = 1e-3


def prepare_lesion_mask(mask: nib.spatialimages.SpatialImage, t1w: nib.spatialimages.SpatialImage, *, name: str,
                        t1w_name: str) -> tuple[nib.Nifti1Image, dict[str, Any]]:  # fmt: skip
    """The lesion mask (uint8, 0/1) reoriented to RAS as :func:`~pipeline.ops.orient.prepare_t1w` does its T1w,
    and a record (voxels, volume). A mask on another grid than its T1w is refused with both named: it is never
    resampled silently, nor ignored.

    >>> t1 = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([-1.0, 1, 1, 1]))
    >>> lesion = np.zeros((4, 4, 4), np.uint8); lesion[0, 1, 1] = 1
    >>> out, record = prepare_lesion_mask(nib.Nifti1Image(lesion, t1.affine), t1, name="m", t1w_name="t")
    >>> int(out.get_fdata()[3, 1, 1]), record["voxels"]
    (1, 1)
    """
    shape, ref_shape = tuple(mask.shape[:3]), tuple(t1w.shape[:3])
    same = shape == ref_shape and len(mask.shape) == 3 and np.allclose(mask.affine, t1w.affine, atol=GRID_TOLERANCE_MM)
    if not same:
        raise InputDataError(
            f"The lesion mask {name} is not on the grid of its T1w {t1w_name}: shape {tuple(mask.shape)} vs "
            f"{ref_shape}, affine {np.round(mask.affine, 3).tolist()} vs {np.round(t1w.affine, 3).tolist()}. A "
            "lesion mask must be drawn on its T1w's own voxel grid: resample it onto the T1w (nearest neighbour) "
            "or fix its header, or remove it to process the T1w without one."
        )
    data = np.asanyarray(mask.dataobj)
    if not np.all(np.isfinite(data)):
        raise InputDataError(f"The lesion mask {name} holds NaN or infinite values: fix or remove it.")
    binary = nib.Nifti1Image((data > 0).astype(np.uint8), mask.affine)
    ras = nib.as_closest_canonical(binary)
    voxels = int(np.count_nonzero(data > 0))
    voxel_ml = float(abs(np.linalg.det(mask.affine[:3, :3]))) / 1000
    out = nib.Nifti1Image(np.asanyarray(ras.dataobj).astype(np.uint8), ras.affine)
    return out, {"voxels": voxels, "volume_ml": round(voxels * voxel_ml, 4), "empty": voxels == 0}
