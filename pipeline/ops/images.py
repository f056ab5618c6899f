"""Conversions between nibabel (RAS, i-j-k arrays) and SimpleITK (LPS, k-j-i arrays) images."""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

_LPS = np.diag([-1.0, -1.0, 1.0])


def array_to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of a 3D array on an RAS voxel-to-world affine.

    >>> img = array_to_sitk(np.zeros((2, 3, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> img.GetSize(), img.GetSpacing()
    ((2, 3, 4), (2.0, 2.0, 2.0))
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing(zooms.tolist())
    image.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    image.SetDirection((_LPS @ (affine[:3, :3] / zooms)).flatten().tolist())
    return image


def nib_to_sitk(img: nib.spatialimages.SpatialImage, dtype: type = np.float32) -> sitk.Image:
    return array_to_sitk(np.asanyarray(img.dataobj, dtype=dtype), img.affine)


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS @ np.asarray(image.GetOrigin())
    return affine


def sitk_to_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def sitk_to_nib(image: sitk.Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(sitk_to_array(image), sitk_affine(image))


def reference_image(affine: np.ndarray, shape: Sequence[int]) -> sitk.Image:
    """An empty SimpleITK image defining a grid to resample onto."""
    reference = sitk.Image([int(n) for n in shape], sitk.sitkUInt8)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    reference.SetSpacing(zooms.tolist())
    reference.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    reference.SetDirection((_LPS @ (affine[:3, :3] / zooms)).flatten().tolist())
    return reference


def transform_matrix_ras(transform: sitk.Transform) -> np.ndarray:
    """4x4 RAS matrix of an affine-like SimpleITK transform (maps RAS points as it maps LPS ones)."""
    if transform.GetDimension() != 3:
        raise ValueError("a 3D transform is needed")
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)]
    lps = np.eye(4)
    lps[:3, :3] = np.stack(columns, axis=1)
    lps[:3, 3] = origin
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip
