"""Rigid co-registration of another contrast (FLAIR, T2w, PDw) to the session's T1w, and its quality.

The T1w is the fixed image: bias-corrected, with its brain mask (grown a little, so that the brain's
edge and the CSF around it carry the alignment) as the metric's mask, which is cost-function masking:
what lies outside it (neck, a different field of view, a lesion mask removed from it) does not pull.
The other image moves rigidly (6 parameters): a head moved between two scans of one session. The
images share the scanner's frame, so the start is the identity; a few rotated and shifted starts are
tried briefly at the coarsest level and the best metric wins (a guard against local optima, as the
template registration does). Then a multi-resolution run with Mattes mutual information (the contrasts
differ), physical smoothing (robust to 3 mm slices), seeded random sampling on one thread: the same
inputs give the same transform, bit for bit.

Its quality is measured independently of the optimised metric: the correlation of the two images'
gradient magnitudes inside the brain (edges sit in the same places whatever the contrast), and the share
of the T1w brain that the other image's field of view covers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .registration import mattes_method, start_rotations


@dataclass(frozen=True)
class CoregistrationSettings:
    histogram_bins: int = 32
    sampling_percentage: float = 0.25
    fine_sampling_percentage: float = 0.1
    learning_rate: float = 1.0
    min_step: float = 1e-3
    iterations: int = 100
    relaxation: float = 0.5
    #: Starts (:func:`start_transforms`): the identity, the intensity centres aligned, and +/- this rotation about
    #: each axis (degrees); each run this many iterations at the coarsest level before the best goes on.
    start_rotation_deg: float = 10.0
    start_iterations: int = 25
    start_shrink: int = 4
    start_smoothing_mm: float = 4.0
    shrink: tuple[int, ...] = (4, 2, 1)
    smoothing_mm: tuple[float, ...] = (4.0, 2.0, 1.0)
    #: The metric is sampled in the T1w brain grown by this much.
    mask_dilation_mm: float = 6.0
    #: The fixed image is cropped to the grown brain plus this margin and block-averaged to about this voxel.
    crop_margin_mm: float = 12.0
    fixed_voxel_mm: float = 2.0


def _crop_fixed(fixed: sitk.Image, mask: sitk.Image, settings: CoregistrationSettings) -> tuple[sitk.Image, sitk.Image]:
    """The T1w and its metric mask cropped to the grown brain's box, block-averaged towards
    ``fixed_voxel_mm`` (the metric's cost grows with its voxels; 1.5 mm keeps sub-millimetre accuracy)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        raise ValueError("the T1w brain mask is empty: nothing to co-register to")
    box = stats.GetBoundingBox(1)
    margin = [int(np.ceil(settings.crop_margin_mm / z)) for z in fixed.GetSpacing()]
    lower = [max(0, box[i] - margin[i]) for i in range(3)]
    upper = [min(fixed.GetSize()[i], box[i] + box[i + 3] + margin[i]) for i in range(3)]
    size = [u - lo for u, lo in zip(upper, lower, strict=True)]
    fixed, mask = sitk.RegionOfInterest(fixed, size, lower), sitk.RegionOfInterest(mask, size, lower)
    factors = [max(1, round(settings.fixed_voxel_mm / z)) for z in fixed.GetSpacing()]
    if max(factors) > 1:
        fixed = sitk.BinShrink(fixed, factors)
        mask = sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), factors) > 0.5, sitk.sitkUInt8)
    return fixed, mask


def metric_mask(brain_mask: sitk.Image, exclude: sitk.Image | None, settings: CoregistrationSettings) -> sitk.Image:
    """Where the metric is sampled: the brain grown by ``mask_dilation_mm``, without ``exclude`` (a lesion)."""
    brain = sitk.Cast(brain_mask > 0, sitk.sitkUInt8)
    radius = [max(1, round(settings.mask_dilation_mm / z)) for z in brain.GetSpacing()]
    grown = sitk.BinaryDilate(brain, radius)
    if exclude is not None:
        exclude = sitk.Cast(exclude > 0, sitk.sitkUInt8)
        exclude.CopyInformation(grown)
        grown = sitk.And(grown, sitk.Not(exclude))
    return sitk.Cast(grown, sitk.sitkUInt8)


def _method(
    settings: CoregistrationSettings, mask: sitk.Image, seed: int, iterations: int
) -> sitk.ImageRegistrationMethod:
    return mattes_method(bins=settings.histogram_bins, sampling=settings.sampling_percentage, seed=seed,
                         fixed_mask=mask, learning_rate=settings.learning_rate, min_step=settings.min_step,
                         iterations=iterations, relaxation=settings.relaxation)  # fmt: skip


def start_transforms(fixed: sitk.Image, moving: sitk.Image, centre: tuple[float, ...], angle_deg: float
                     ) -> list[tuple[str, sitk.Euler3DTransform]]:  # fmt: skip
    """The starts tried: the identity (one scanner frame), the intensity centres aligned, and +/- ``angle_deg``
    about each axis through ``centre`` (the fixed brain's centre, LPS mm)."""
    starts = []
    identity = sitk.Euler3DTransform()
    identity.SetCenter(centre)
    starts.append(("identity", identity))
    moments = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)  # fmt: skip
    shift = sitk.Euler3DTransform(moments)
    offset = np.subtract(shift.TransformPoint(centre), centre)
    centred = sitk.Euler3DTransform()
    centred.SetCenter(centre)
    centred.SetTranslation(offset.tolist())
    starts.append(("intensity centres", centred))
    for angles in start_rotations(angle_deg)[1:]:
        rotated = sitk.Euler3DTransform()
        rotated.SetCenter(centre)
        rotated.SetRotation(*np.radians(angles).tolist())
        axis = int(np.flatnonzero(angles)[0])
        starts.append((f"{'xyz'[axis]} {angles[axis]:+g} deg", rotated))
    return starts


def coregister(
    fixed: sitk.Image,
    fixed_brain_mask: sitk.Image,
    moving: sitk.Image,
    *,
    exclude: sitk.Image | None = None,
    seed: int = 42,
    settings: CoregistrationSettings | None = None,
) -> tuple[sitk.Euler3DTransform, dict[str, Any]]:
    """Rigid transform mapping T1w points to the other image's points (ITK convention: resampling the other
    image with it brings it onto the T1w grid), and a record of the run.

    ``fixed`` is the bias-corrected T1w, ``fixed_brain_mask`` its brain mask on its grid; ``exclude`` (same
    grid) is left out of the metric (a lesion mask).
    """
    settings = settings or CoregistrationSettings()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # reproducible metric sums
    try:
        return _coregister(fixed, fixed_brain_mask, moving, exclude, seed, settings)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _coregister(
    fixed: sitk.Image,
    brain_mask: sitk.Image,
    moving: sitk.Image,
    exclude: sitk.Image | None,
    seed: int,
    settings: CoregistrationSettings,
) -> tuple[sitk.Euler3DTransform, dict[str, Any]]:
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    brain_mask = sitk.Cast(brain_mask > 0, sitk.sitkUInt8)
    brain_mask.CopyInformation(fixed)
    mask = metric_mask(brain_mask, exclude, settings)
    fixed, mask = _crop_fixed(fixed, mask, settings)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    centre = stats.GetCentroid(1)
    coarse_fixed = sitk.SmoothingRecursiveGaussian(fixed, settings.start_smoothing_mm)
    coarse_fixed = sitk.Shrink(coarse_fixed, [max(1, round(settings.start_shrink * settings.fixed_voxel_mm / 2 / z))
                                              for z in coarse_fixed.GetSpacing()])  # fmt: skip
    coarse_moving = sitk.SmoothingRecursiveGaussian(moving, settings.start_smoothing_mm)
    trials = []
    for name, start in start_transforms(fixed, moving, centre, settings.start_rotation_deg):
        method = _method(settings, mask, seed, settings.start_iterations)
        method.SetInitialTransform(start, inPlace=True)
        method.Execute(coarse_fixed, coarse_moving)
        trials.append((method.GetMetricValue(), name, start))
    best_metric, best_name, transform = min(trials, key=lambda t: t[0])
    method = _method(settings, mask, seed, settings.iterations)
    sampling = [settings.sampling_percentage if f > 1 else settings.fine_sampling_percentage for f in settings.shrink]
    method.SetMetricSamplingPercentagePerLevel(sampling, seed)
    method.SetShrinkFactorsPerLevel(list(settings.shrink))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    record = {
        "method": "SimpleITK ImageRegistrationMethod: rigid (6 parameters), the other image onto the T1w",
        "metric": "MattesMutualInformation",
        "optimizer": "RegularStepGradientDescent",
        "cost_function_mask": f"the T1w brain mask grown by {settings.mask_dilation_mm:g} mm"
        + (", without the lesion mask" if exclude is not None else ""),
        "lesion_masked": exclude is not None,
        "starts": [{"start": n, "metric": m} for m, n, _ in trials],
        "chosen_start": best_name,
        "settings": asdict(settings),
        "seed": seed,
        "start_metric": best_metric,
        "final_metric": method.GetMetricValue(),
        "final_iterations": method.GetOptimizerIteration(),
        "stop_condition": method.GetOptimizerStopConditionDescription(),
        "rotation_deg": [float(np.degrees(a)) for a in (transform.GetAngleX(), transform.GetAngleY(),
                                                         transform.GetAngleZ())],
        "translation_mm": list(transform.GetTranslation()),
    }  # fmt: skip
    return transform, record


def edge_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray, voxel_mm: float, sigma_mm: float = 1.5) -> float:
    """Correlation of the two images' gradient magnitudes inside ``mask``: near 1 when their edges lie in the
    same places, whatever the contrast (a dark-on-bright edge counts as a bright-on-dark one).

    >>> x = np.zeros((20, 20, 20), np.float32); x[5:15, 5:15, 5:15] = 1
    >>> round(edge_correlation(x, 3 - 2 * x, np.ones_like(x, bool), 1.0), 3)
    1.0
    >>> edge_correlation(x, np.roll(x, 4, axis=0), np.ones_like(x, bool), 1.0) < 0.6
    True
    """
    sigma = sigma_mm / voxel_mm
    ga = ndimage.gaussian_gradient_magnitude(np.asarray(a, np.float32), sigma)[mask]
    gb = ndimage.gaussian_gradient_magnitude(np.asarray(b, np.float32), sigma)[mask]
    if ga.size < 2 or ga.std() == 0 or gb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ga, gb)[0, 1])


def coregistration_metrics(t1w: np.ndarray, other: np.ndarray, coverage: np.ndarray, brain: np.ndarray,
                           voxel_mm: float) -> dict[str, float]:  # fmt: skip
    """Quality of a co-registration, on the T1w grid: ``coreg_edge_corr`` (:func:`edge_correlation` inside the
    brain grown by 3 mm, where the other image was acquired) and ``coreg_brain_coverage`` (the share of the
    T1w brain inside the other image's field of view)."""
    grown = ndimage.binary_dilation(brain, iterations=max(1, round(3.0 / voxel_mm)))
    covered = coverage > 0.5
    return {
        "coreg_edge_corr": edge_correlation(t1w, other, grown & covered, voxel_mm),
        "coreg_brain_coverage": float(covered[brain].mean()) if brain.any() else float("nan"),
    }
