"""Nonlinear registration to the template (ANTs SyN, as fMRIPrep runs it), its Jacobian and its quality.

The brain-first affine (:mod:`pipeline.ops.registration`) stays the start and the QC reference; SyN then refines
it: the skull-stripped, bias-corrected T1w against the brain-only template, Mattes mutual information, on the
template's 2 mm grid (on 2 cores SyN at 1 mm took 100 s per head, at 2 mm 15-26 s: the warp field lives on the
2 mm grid and every output is resampled through it at its own resolution). The result is one ITK composite
transform (the affine, then the displacement field) that maps template points to T1w points, as the affine alone
did: every resampling routine that took the affine takes it unchanged, and ANTs' ``antsApplyTransforms`` reads
the ``.h5`` file.

The Jacobian determinant of that whole mapping (affine included) is the T1w's volume per template volume at each
template point: tissue maps multiplied by it keep the tissue's volume (modulation, as in VBM), and the volumes of
the template atlas's regions are the integrals of it over each region.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class WarpSettings:
    """What SyN runs with (recorded in every warp's sidecar)."""

    #: The template grid the warp field lives on (mm).
    resolution_mm: float = 2.0
    #: antspyx's SyN default (Mattes mutual information, 32 bins)
    metric: str = "mattes"
    sampling: int = 32
    #: Iterations per level, coarse to fine (antspyx's SyNOnly default; the finest level at the field's grid).
    iterations: tuple[int, ...] = (40, 20, 0)
    gradient_step: float = 0.2
    #: Smoothing of the update and the total field (voxels): SyN's regularisation.
    flow_sigma: float = 3.0
    total_sigma: float = 0.0


def _to_ants(image: sitk.Image) -> Any:
    import ants

    return ants.from_numpy(
        sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32),
        origin=list(image.GetOrigin()), spacing=list(image.GetSpacing()),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
    )  # fmt: skip


@contextlib.contextmanager
def _ants_threads(n: int) -> Iterator[None]:
    """ITK's thread count inside ANTs (its own ITK, not SimpleITK's), read from the environment when it runs."""
    old = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(n)))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = old


def syn_register(
    brain: sitk.Image,
    template: sitk.Image,
    affine: sitk.Transform,
    *,
    seed: int,
    threads: int = 1,
    settings: WarpSettings | None = None,
    moving_mask: sitk.Image | None = None,
) -> tuple[sitk.CompositeTransform, sitk.Image, dict[str, Any]]:
    """SyN from ``affine`` (template points to T1w points): the composite transform (same direction), the
    displacement field (on ``template``'s grid, LPS mm) and a record.

    ``brain`` is the skull-stripped, bias-corrected T1w; ``template`` the brain-only template on the warp's grid;
    ``moving_mask`` (the T1w's grid) limits the metric (a lesion left out). The same inputs, seed and threads give
    the same field, bit for bit (checked: two runs at 2 threads).
    """
    import ants

    settings = settings or WarpSettings()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bidsdl_syn_") as folder, _ants_threads(threads):
        start = Path(folder) / "affine.mat"
        sitk.WriteTransform(affine, str(start))
        result = ants.registration(
            _to_ants(template), _to_ants(brain), type_of_transform="SyNOnly", initial_transform=str(start),
            syn_metric=settings.metric, syn_sampling=settings.sampling, reg_iterations=settings.iterations,
            grad_step=settings.gradient_step, flow_sigma=settings.flow_sigma, total_sigma=settings.total_sigma,
            moving_mask=None if moving_mask is None else _to_ants(sitk.Cast(moving_mask, sitk.sitkFloat32)),
            random_seed=seed, outprefix=str(Path(folder) / "syn_"),
        )  # fmt: skip
        warp_file = next(f for f in result["fwdtransforms"] if f.endswith("Warp.nii.gz"))
        field = sitk.ReadImage(warp_file, sitk.sitkVectorFloat64)
    composite = compose(affine, field)
    record = {
        "Method": "ANTs SyN (antspyx ants.registration, SyNOnly) from the brain-first affine",
        "Software": f"antspyx {ants_version()}",
        "Settings": asdict(settings),
        "Seed": seed,
        "Threads": int(threads),
        "FieldGrid": {"Size": list(field.GetSize()), "Spacing": list(field.GetSpacing())},
        "LesionMasked": moving_mask is not None,
        "Seconds": round(time.monotonic() - started, 2),
    }
    return composite, field, record


def ants_version() -> str:
    from importlib.metadata import version

    return version("antspyx")


def compose(affine: sitk.Transform, field: sitk.Image) -> sitk.CompositeTransform:
    """Template points to T1w points: the displacement field first, then the affine (the order ANTs applies its
    ``[Warp, Affine]`` list in; checked against ANTs' own warped image)."""
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(field))])


def inverse_field(field: sitk.Image) -> sitk.Image:
    """The inverse displacement field (fixed-point iteration, on the same grid)."""
    inverse = sitk.InvertDisplacementFieldImageFilter()
    inverse.SetMaximumNumberOfIterations(20)
    inverse.SetMeanErrorToleranceThreshold(1e-3)
    inverse.SetMaxErrorToleranceThreshold(0.1)
    inverse.EnforceBoundaryConditionOn()
    return inverse.Execute(sitk.Cast(field, sitk.sitkVectorFloat64))


def inverse_composite(affine: sitk.Transform, field: sitk.Image) -> sitk.CompositeTransform:
    """T1w points to template points: the affine's inverse first, then the inverse displacement field."""
    inverse = sitk.DisplacementFieldTransform(inverse_field(field))
    return sitk.CompositeTransform([inverse, affine.GetInverse()])


def jacobian_determinant(field: sitk.Image, affine_matrix: np.ndarray | None = None) -> np.ndarray:
    """det of the Jacobian of ``x -> A (x + u(x))`` at every voxel of the field's grid (i-j-k order, as
    :func:`~pipeline.ops.images.sitk_to_array`): the T1w's volume per template volume.

    ``u`` is in physical (LPS) mm; derivatives are taken along the grid's axes (central differences) and turned
    into physical ones through the grid's direction and spacing, so a flipped or oblique grid gives the same
    determinant. ``affine_matrix``: the 3x3 linear part of the affine (LPS), or None for the field alone.

    >>> grid = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    >>> grid.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1)); grid.SetSpacing((2.0, 2.0, 2.0))
    >>> x = np.array([grid.TransformIndexToPhysicalPoint((i, j, k)) for k in range(8) for j in range(8)
    ...               for i in range(8)])
    >>> u = np.stack([0.1 * x[:, 0], np.zeros(len(x)), -0.2 * x[:, 2]], axis=1).reshape(8, 8, 8, 3)
    >>> field = sitk.GetImageFromArray(u, isVector=True); field.CopyInformation(grid)
    >>> det = jacobian_determinant(field, np.diag([2.0, 1.0, 1.0]))
    >>> round(float(det.mean()), 6)  # (1.1 * 1 * 0.8) * 2
    1.76
    """
    u = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3).astype(np.float64)  # i, j, k, component
    direction = np.asarray(field.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(field.GetSpacing()))  # physical -> index
    grads = np.stack([np.stack(list(np.gradient(u[..., c], axis=(0, 1, 2))), axis=-1) for c in range(3)], axis=-2)
    jac = np.eye(3) + grads @ to_index  # d u_c / d x_phys
    det = np.linalg.det(jac)
    if affine_matrix is not None:
        det = det * float(np.linalg.det(affine_matrix))
    return det.astype(np.float32)


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 3x3 linear part (LPS) of an affine-like SimpleITK transform."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    return np.stack([np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)], axis=1)


#: Limits of a warp (see :data:`pipeline.ops.iqm.QC_CHECKS`): a share of folded voxels (det <= 0) in the template
#: brain, the 99.9th percentile of |log det| of the nonlinear part there (log 4: a fourfold local change beyond
#: what the affine explains), and the template-brain overlap after the warp against the affine's.
FOLDED_FAIL, FOLDED_FLAG = 0.005, 0.001


def warp_quality(
    field: sitk.Image,
    template_brain: np.ndarray,
    *,
    dice_affine: float,
    dice_warp: float,
) -> dict[str, Any]:
    """The warp's quality metrics on the field's grid (``template_brain``: the template's brain mask there).

    >>> grid = sitk.Image([6, 6, 6], sitk.sitkVectorFloat64, 3)
    >>> q = warp_quality(grid, np.ones((6, 6, 6), bool), dice_affine=0.95, dice_warp=0.97)
    >>> q["warp_folded_share"], q["warp_logjac_p999"], round(q["warp_dice_gain"], 3)
    (0.0, 0.0, 0.02)
    """
    det = jacobian_determinant(field)[template_brain]
    folded = float((det <= 0).mean()) if det.size else float("nan")
    logs = np.log(np.clip(det[det > 0], 1e-6, None))
    return {
        "warp_folded_share": folded,
        "warp_logjac_p999": float(np.percentile(np.abs(logs), 99.9)) if logs.size else float("nan"),
        "warp_logjac_range": [float(logs.min()), float(logs.max())] if logs.size else None,
        "warp_dice_affine": float(dice_affine),
        "warp_dice": float(dice_warp),
        "warp_dice_gain": float(dice_warp - dice_affine),
    }
