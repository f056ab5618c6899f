"""Affine registration of a brain to the brain-only MNI template (SimpleITK), starting from the brain.

The template is brain-only, so the well-posed problem is brain to brain: the subject's bias-corrected
image is skull-stripped with its own brain mask (from the learned extractor) and registered to the
template brain. The start comes from the extracted brain, not from the head: its centre goes onto
the template brain's centre and its size sets an isotropic scale, so a neck, shoulders or a large
field of view cannot pull the start away (the head's intensity moments did, by 20-40 mm). A few
initial rotations are tried briefly at the coarsest level and the best one is kept, a cheap guard
against local optima. Then a similarity and an affine stage, each multi-resolution, with Mattes
mutual information and regular-step gradient descent. Random metric sampling is seeded and the
metric runs on one thread: the same inputs give the same transform, bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .images import array_to_sitk


@dataclass(frozen=True)
class RegistrationSettings:
    histogram_bins: int = 32
    sampling_percentage: float = 0.2
    #: Sampling at the finest level (the template's 2 mm grid), where samples are many.
    fine_sampling_percentage: float = 0.1
    learning_rate: float = 2.0
    min_step: float = 1e-3
    iterations: int = 100
    relaxation: float = 0.5
    #: Starts tried at the coarsest level: no rotation, and +/- this angle about each axis.
    start_rotation_deg: float = 15.0
    start_iterations: int = 30
    start_shrink: int = 4
    start_smoothing_mm: float = 4.0
    similarity_shrink: tuple[int, ...] = (4, 2)
    similarity_smoothing_mm: tuple[float, ...] = (4.0, 2.0)
    affine_shrink: tuple[int, ...] = (2, 1)
    affine_smoothing_mm: tuple[float, ...] = (2.0, 0.0)
    #: The metric is sampled in the template brain grown by this much (its edge carries the contrast).
    mask_dilation_mm: float = 4.0
    moving_shrink: int = 2


def metric_mask(brain_mask: np.ndarray, affine: np.ndarray, settings: RegistrationSettings) -> sitk.Image:
    """Where the metric is sampled: the template brain, dilated."""
    voxel = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).mean())
    grown = ndimage.binary_dilation(brain_mask, iterations=max(1, round(settings.mask_dilation_mm / voxel)))
    return sitk.Cast(array_to_sitk(grown.astype(np.uint8), affine), sitk.sitkUInt8)


def _centre_and_volume(mask: sitk.Image) -> tuple[np.ndarray, float]:
    """Centre of mass (LPS, mm) and volume (mm³) of a binary mask."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise ValueError("the brain mask is empty: cannot start the registration from it")
    return np.asarray(stats.GetCentroid(1)), float(stats.GetPhysicalSize(1))


def brain_start(
    subject: tuple[np.ndarray, float],
    template: tuple[np.ndarray, float],
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> sitk.Similarity3DTransform:
    """A similarity transform (template points to subject points) putting the template brain's centre
    onto the subject brain's, scaled by the cube root of their volume ratio, rotated about that centre.

    ``subject`` and ``template`` are each brain's centre of mass (LPS, mm) and volume (mm³).

    >>> start = brain_start((np.array([10.0, 0, 0]), 8.0), (np.zeros(3), 1.0))
    >>> start.TransformPoint((1.0, 0.0, 0.0))
    (12.0, 0.0, 0.0)
    """
    (subject_centre, subject_volume), (template_centre, template_volume) = subject, template
    scale = float((subject_volume / template_volume) ** (1 / 3))
    start = sitk.Similarity3DTransform()
    start.SetCenter(template_centre.tolist())
    start.SetTranslation((subject_centre - template_centre).tolist())
    if any(rotation_deg):
        rotation = sitk.Euler3DTransform()
        rotation.SetRotation(*np.radians(rotation_deg).tolist())
        start.SetMatrix(rotation.GetMatrix())
    start.SetScale(scale)
    return start


def mattes_method(*, bins: int, sampling: float, seed: int, fixed_mask: sitk.Image, learning_rate: float,
                  min_step: float, iterations: int, relaxation: float, moving_mask: sitk.Image | None = None
                  ) -> sitk.ImageRegistrationMethod:  # fmt: skip
    """A registration with Mattes mutual information (random, seeded sampling inside ``fixed_mask``; a
    ``moving_mask`` leaves out what lands outside it: cost-function masking), linear interpolation and regular-step
    gradient descent scaled by physical shift: what the template registration and the co-registrations share."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=min_step, numberOfIterations=iterations, relaxationFactor=relaxation
    )
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def _registration(settings: RegistrationSettings, fixed_mask: sitk.Image, seed: int, iterations: int, sampling: float,
                  moving_mask: sitk.Image | None = None) -> sitk.ImageRegistrationMethod:  # fmt: skip
    return mattes_method(bins=settings.histogram_bins, sampling=sampling, seed=seed, fixed_mask=fixed_mask,
                         learning_rate=settings.learning_rate, min_step=settings.min_step, iterations=iterations,
                         relaxation=settings.relaxation, moving_mask=moving_mask)  # fmt: skip


def _multilevel(
    settings: RegistrationSettings,
    fixed_mask: sitk.Image,
    seed: int,
    shrink: tuple[int, ...],
    smoothing_mm: tuple[float, ...],
    moving_mask: sitk.Image | None = None,
) -> sitk.ImageRegistrationMethod:
    """A multi-resolution run with ITK's own pyramid (the affine stage was seen to be unstable when
    its levels were run one by one on pre-shrunk images)."""
    method = _registration(settings, fixed_mask, seed, settings.iterations, settings.sampling_percentage, moving_mask)
    sampling = [settings.sampling_percentage if f > 1 else settings.fine_sampling_percentage for f in shrink]
    method.SetMetricSamplingPercentagePerLevel(sampling, seed)
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def pyramid_level(image: sitk.Image, shrink: int, sigma_mm: float, *, reference_mm: float = 2.0) -> sitk.Image:
    """One level of a registration pyramid: smoothed by ``sigma_mm``, then subsampled to about
    ``shrink`` x ``reference_mm`` voxels (computed once, shared by every run at that level)."""
    if sigma_mm > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    factors = [max(1, round(shrink * reference_mm / z)) for z in image.GetSpacing()]
    return sitk.Shrink(image, factors) if max(factors) > 1 else image


def _run_level(
    settings: RegistrationSettings,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    transform: sitk.Transform,
    *,
    seed: int,
    iterations: int,
    sampling: float,
    moving_mask: sitk.Image | None = None,
) -> sitk.ImageRegistrationMethod:
    """Optimise ``transform`` in place on one pyramid level; returns the method (metric, iterations)."""
    method = _registration(settings, fixed_mask, seed, iterations, sampling, moving_mask)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return method


def start_rotations(angle_deg: float) -> list[tuple[float, float, float]]:
    """No rotation, then +/- ``angle_deg`` about x, y and z (radians are set later).

    >>> start_rotations(15)[:3]
    [(0.0, 0.0, 0.0), (15.0, 0.0, 0.0), (-15.0, 0.0, 0.0)]
    """
    starts = [(0.0, 0.0, 0.0)]
    for axis in range(3):
        for sign in (1.0, -1.0):
            angles = [0.0, 0.0, 0.0]
            angles[axis] = sign * angle_deg
            starts.append((angles[0], angles[1], angles[2]))
    return starts if angle_deg else starts[:1]


def skull_strip(image: sitk.Image, brain_mask: sitk.Image, shrink: int, margin_mm: float = 10.0) -> sitk.Image:
    """The image inside its brain mask (0 outside), cropped to the brain's box plus ``margin_mm`` and
    block-averaged towards the template's 2 mm grid: the neck and the rest of a large field of view go."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = sitk.Cast(brain_mask > 0, sitk.sitkUInt8)
    mask.CopyInformation(image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    box = stats.GetBoundingBox(1)  # start index, then size
    margin = [int(np.ceil(margin_mm / z)) for z in image.GetSpacing()]
    lower = [max(0, box[i] - margin[i]) for i in range(3)]
    upper = [min(image.GetSize()[i], box[i] + box[i + 3] + margin[i]) for i in range(3)]
    size = [u - lo for u, lo in zip(upper, lower, strict=True)]
    brain = sitk.RegionOfInterest(image * sitk.Cast(mask, sitk.sitkFloat32), size, lower)
    factors = [max(1, min(shrink, round(2.0 / z))) for z in image.GetSpacing()]
    return sitk.BinShrink(brain, factors) if max(factors) > 1 else brain


def register_to_template(
    moving: sitk.Image,
    moving_brain_mask: sitk.Image,
    template: sitk.Image,
    template_brain_mask: np.ndarray,
    template_affine: np.ndarray,
    *,
    seed: int = 42,
    settings: RegistrationSettings | None = None,
    lesion_mask: sitk.Image | None = None,
) -> tuple[sitk.AffineTransform, dict[str, Any]]:
    """Affine transform mapping template points to subject points (ITK convention), and a record.

    ``moving`` is the bias-corrected T1w and ``moving_brain_mask`` its brain mask on the same grid.
    Resampling the subject with the transform brings the subject into template space. ``lesion_mask`` (same
    grid) is left out of the metric (cost-function masking, as for lesioned brains in ANTs and fMRIPrep).
    """
    settings = settings or RegistrationSettings()
    # ITK sums the metric over threads in no fixed order: one thread makes the result reproducible
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return _register(moving, moving_brain_mask, template, template_brain_mask, template_affine, seed=seed,
                         settings=settings, lesion_mask=lesion_mask)  # fmt: skip
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register(
    moving: sitk.Image,
    moving_brain_mask: sitk.Image,
    template: sitk.Image,
    template_brain_mask: np.ndarray,
    template_affine: np.ndarray,
    *,
    seed: int,
    settings: RegistrationSettings,
    lesion_mask: sitk.Image | None = None,
) -> tuple[sitk.AffineTransform, dict[str, Any]]:
    fixed_mask = metric_mask(template_brain_mask, template_affine, settings)
    moving_mask = None
    if lesion_mask is not None:
        moving_mask = sitk.Cast(lesion_mask == 0, sitk.sitkUInt8)
        moving_mask.CopyInformation(moving)
    template_mask = sitk.Cast(array_to_sitk(template_brain_mask.astype(np.uint8), template_affine), sitk.sitkUInt8)
    brain = skull_strip(moving, moving_brain_mask, settings.moving_shrink)
    template = sitk.Cast(template, sitk.sitkFloat32)
    subject_brain, template_brain = _centre_and_volume(moving_brain_mask), _centre_and_volume(template_mask)
    levels: dict[tuple[int, float], tuple[sitk.Image, sitk.Image, sitk.Image]] = {}

    def level(shrink: int, sigma: float) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
        # as ITK's pyramids: the template is smoothed and shrunk, the moving image smoothed, and the
        # metric mask stays at full resolution (a shrunk mask was seen to send the affine stage astray)
        if (shrink, sigma) not in levels:
            levels[shrink, sigma] = (pyramid_level(template, shrink, sigma), pyramid_level(brain, 1, sigma), fixed_mask)
        return levels[shrink, sigma]

    # a few short starts at the coarsest level; the best metric wins
    trials = []
    for rotation in start_rotations(settings.start_rotation_deg):
        start = brain_start(subject_brain, template_brain, rotation)
        fixed, moved, mask = level(settings.start_shrink, settings.start_smoothing_mm)
        method = _run_level(settings, fixed, moved, mask, start, seed=seed, iterations=settings.start_iterations,
                            sampling=settings.sampling_percentage, moving_mask=moving_mask)  # fmt: skip
        trials.append((method.GetMetricValue(), rotation, start))
    best_metric, best_rotation, similarity = min(trials, key=lambda t: t[0])

    method = _multilevel(settings, fixed_mask, seed, settings.similarity_shrink, settings.similarity_smoothing_mm,
                         moving_mask)  # fmt: skip
    method.SetInitialTransform(similarity, inPlace=True)
    method.Execute(template, brain)
    similarity_metric, similarity_iterations = method.GetMetricValue(), method.GetOptimizerIteration()

    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    method = _multilevel(settings, fixed_mask, seed, settings.affine_shrink, settings.affine_smoothing_mm, moving_mask)
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(template, brain)
    record = {
        "method": "SimpleITK ImageRegistrationMethod: brain to brain-only template, similarity then affine",
        "metric": "MattesMutualInformation",
        "optimizer": "RegularStepGradientDescent",
        "initialisation": "the extracted brain's centre of mass onto the template brain's, isotropic scale from "
        "their volumes; the best of several starting rotations after a short coarse run",
        "starts": [{"rotation_deg": list(r), "metric": m} for m, r, _ in trials],
        "chosen_start_rotation_deg": list(best_rotation),
        "settings": asdict(settings),
        "seed": seed,
        "lesion_masked": lesion_mask is not None,
        "start_metric": best_metric,
        "similarity_metric": similarity_metric,
        "similarity_iterations": similarity_iterations,
        "final_metric": method.GetMetricValue(),
        "final_iterations": method.GetOptimizerIteration(),
        "stop_condition": method.GetOptimizerStopConditionDescription(),
    }
    return affine, record
