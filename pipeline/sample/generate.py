"""Write a realistic sample BIDS dataset with known ground truth (``bidsdl-sample``).

Each subject is nilearn's MNI152 brain inside a synthetic head with a neck, deformed by its labels
(diagnosis: ventricles and hippocampi; age: a smaller effect), placed in the scanner with a
random rigid misplacement, sampled on a grid with a random header orientation (sometimes
oblique) and voxel size, sometimes with a large field of view reaching the shoulders, then given
a smooth bias field, a per-site intensity scale and Rician noise. The true T1w-to-template
transform and the true brain mask of every image are written under ``sourcedata/truth/``.
The same options and seed give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .. import __version__
from ..derivatives import BIDS_VERSION, atomic_path, write_json, write_text
from ..learn.labels import label_path, write_labels_dataset
from . import anatomy

LOGGER = logging.getLogger(__name__)

#: Where the sample's reference labels go (a derivatives dataset inside the sample), and their ``desc``.
LABELS_DIR = Path("derivatives") / "labels"
LABEL_DESC = "structures"
#: Where the lesion masks of the sample's participants with lesions go, and their ``desc``.
LESIONS_DIR = Path("derivatives") / "lesions"
LESION_DESC = "lesion"

#: Per-site scanner metadata (sidecars) and acquisition character (scale, noise).
SITES: dict[str, dict[str, Any]] = {
    "siteA": {
        "Manufacturer": "Siemens",
        "ManufacturersModelName": "Prisma_fit",
        "MagneticFieldStrength": 3,
        "RepetitionTime": 2.3,
        "EchoTime": 0.00226,
        "InversionTime": 0.9,
        "FlipAngle": 8,
        "scale": 900.0,
        "noise": 0.025,
    },
    "siteB": {
        "Manufacturer": "GE",
        "ManufacturersModelName": "DISCOVERY MR750",
        "MagneticFieldStrength": 3,
        "RepetitionTime": 0.0073,
        "EchoTime": 0.003,
        "InversionTime": 0.4,
        "FlipAngle": 11,
        "scale": 1600.0,
        "noise": 0.03,
    },
    "siteC": {
        "Manufacturer": "Philips",
        "ManufacturersModelName": "Ingenia",
        "MagneticFieldStrength": 1.5,
        "RepetitionTime": 0.0081,
        "EchoTime": 0.0037,
        "InversionTime": 1.0,
        "FlipAngle": 8,
        "scale": 450.0,
        "noise": 0.04,
    },
}
ORIENTATIONS = ("RAS", "LAS", "LPS", "LPI", "RPI", "PIR", "LIA", "ASL", "RSP")
#: Voxel sizes (mm, along the voxel axes) and how often each is drawn.
VOXEL_SIZES = ((1.0, 1.0, 1.0), (1.0, 1.0, 1.3), (1.2, 1.2, 1.2))
VOXEL_SIZE_WEIGHTS = (0.6, 0.2, 0.2)
#: Field of view along the world axes (LR, AP, SI), mm; the head's centre in template mm.
FOV_MM = (200.0, 236.0, 212.0)
HEAD_CENTRE_MM = (0.0, -18.0, 6.0)
#: A large field of view (head, neck and the top of the shoulders, as in UK Biobank or ADNI sagittal
#: scans): the same top, reaching this far down.
LARGE_FOV_SI_MM = 270.0


@dataclass(frozen=True)
class SampleOptions:
    """What ``bidsdl-sample`` makes. ``effect_strength`` scales the diagnosis effect."""

    n_subjects: int = 10
    seed: int = 42
    effect_strength: float = 1.0
    two_session_fraction: float = 0.3
    max_rotation_deg: float = 15.0
    max_translation_mm: float = 20.0
    large_fov_fraction: float = 0.3
    duplicate_subject: bool = False
    confound_site: bool = False
    corrupt_subject: bool = False
    voxel_scale: float = 1.0
    label_prefix: str = ""
    #: Share of the participants whose anatomy disagrees with their recorded diagnosis (a CN with the disease's
    #: effect, an AD without it): label noise, so that no model can reach an AUC of 1. The effect of the others is
    #: graded (a severity drawn between SEVERITY_RANGE): the learning cohort can be failed.
    label_noise: float = 0.1
    #: Share of the participants whose sessions also have a 2D FLAIR (thick slices, the head moved).
    flair_fraction: float = 0.0
    #: Share of the participants with white-matter lesions (the same in each of their sessions); their masks go
    #: into the derivatives dataset ``derivatives/lesions`` (``desc-lesion_mask``, each T1w's grid).
    lesion_fraction: float = 0.0
    #: Images unlike every other, one extra participant each (kinds of :data:`~pipeline.sample.anatomy.UNFAMILIAR`):
    #: what a model's distribution check (or, for the grossest, quality control) must catch.
    unfamiliar: tuple[str, ...] = ()
    #: How much individuals differ from one another apart from the disease (0: every head is the template's; 1: head
    #: size by sex, the ventricles' and hippocampi's own sizes and a smooth shape of each head, as in
    #: :data:`INDIVIDUAL`): what makes a small effect hard to see across people.
    individual_variation: float = 1.0
    n_jobs: int = 1


@dataclass(frozen=True)
class ImageSpec:
    subject: str
    session: str
    age: float
    diagnosis: str
    site: str
    seed: int
    ventricles: float
    hippocampi: float
    compressed: bool = True
    flair: bool = False
    #: Seed of the participant's lesions (0: none).
    lesion_seed: int = 0
    #: A kind of :data:`~pipeline.sample.anatomy.UNFAMILIAR` ("": a T1w like the others).
    unfamiliar: str = ""
    #: The individual's head size (linear, relative to the template) and shape (:func:`~.anatomy.individual_shape`'s
    #: seed and size in mm; 0: the template's shape); the same in each of a participant's sessions.
    head_scale: float = 1.0
    shape_seed: int = 0
    shape_mm: float = 0.0

    @property
    def shape(self) -> anatomy.Shape | None:
        return anatomy.individual_shape(self.shape_seed, self.shape_mm) if self.shape_seed else None

    @property
    def stem(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}_T1w"

    @property
    def flair_relpath(self) -> Path:
        return self.relpath.with_name(f"sub-{self.subject}_ses-{self.session}_acq-2d_FLAIR.nii.gz")

    @property
    def relpath(self) -> Path:
        ext = ".nii.gz" if self.compressed else ".nii"
        return Path(f"sub-{self.subject}") / f"ses-{self.session}" / "anat" / f"{self.stem}{ext}"


#: The disease's severity in an affected participant, drawn uniformly (1: the full effect).
SEVERITY_RANGE = (0.3, 1.0)
#: How individuals differ at ``individual_variation`` 1: head size (linear scale: mean by sex, and its SD), the SD
#: of the ventricles' and hippocampi's own sizes (as strengths of :func:`~.anatomy.deform`; the disease's full effect
#: is 0.22) and the root mean square of the head's shape (:func:`~.anatomy.individual_shape`, mm). The template is
#: larger than most heads (its brain mask holds 1.93 l; intracranial volume is ~1.35 l in women and ~1.55 l in men,
#: SD ~10%); ventricular volume varies several-fold between elderly people, the hippocampus's by ~10-15%.
HEAD_SCALE_MEAN = {"F": 0.89, "M": 0.93}
INDIVIDUAL = {"head_scale_sd": 0.03, "ventricles_sd": 0.10, "hippocampi_sd": 0.04, "shape_rms_mm": anatomy.SHAPE_RMS_MM}


def _labels_effects(rng: np.random.Generator, severity: float, age: float, strength: float,
                    own: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:  # fmt: skip
    """Ventricular expansion and hippocampal shrinkage for a subject of a disease severity (0: none) at an age, from
    the individual's ``own`` sizes (:func:`_individual`)."""
    ventricles = own[0] + strength * 0.22 * severity + 0.005 * (age - 70) + rng.normal(0, 0.02)
    hippocampi = own[1] + strength * 0.22 * severity + 0.003 * (age - 70) + rng.normal(0, 0.02)
    return float(np.clip(ventricles, -0.2, 0.45)), float(np.clip(hippocampi, -0.15, 0.45))


def _individual(rng: np.random.Generator, sex: str, variation: float) -> dict[str, Any]:
    """One person's anatomy apart from the disease (:data:`INDIVIDUAL` scaled by ``variation``): head size, own
    ventricle and hippocampus sizes, the seed of the head's shape."""
    draws = rng.standard_normal(3)
    seed = int(rng.integers(1, 2**31))
    return {
        "head_scale": round(1.0 + variation * (HEAD_SCALE_MEAN[sex] - 1.0
                                               + INDIVIDUAL["head_scale_sd"] * draws[0]), 4),
        "own": (variation * INDIVIDUAL["ventricles_sd"] * draws[1], variation * INDIVIDUAL["hippocampi_sd"] * draws[2]),
        "shape_seed": seed if variation > 0 else 0,
        "shape_mm": round(variation * INDIVIDUAL["shape_rms_mm"], 4),
    }  # fmt: skip


def plan_dataset(options: SampleOptions) -> tuple[list[dict[str, Any]], list[ImageSpec]]:
    """Participants and images, drawn in a fixed order from the seed (independent of n_jobs)."""
    rng = np.random.default_rng(options.seed)
    width = max(2, len(str(options.n_subjects + len(options.unfamiliar) + 1)))
    sites = sorted(SITES)
    participants, images = [], []
    # drawn apart from the rest, so that the T1w images do not depend on flair_fraction
    with_flair = np.random.default_rng([options.seed, 1]).random(options.n_subjects) < options.flair_fraction
    lesion_rng = np.random.default_rng([options.seed, 3])
    lesion_seeds = [int(lesion_rng.integers(1, 2**31)) if lesion_rng.random() < options.lesion_fraction else 0
                    for _ in range(options.n_subjects)]  # fmt: skip
    # drawn apart from the rest too: the graded, noisy effect leaves every other draw as it was
    effect_rng = np.random.default_rng([options.seed, 5])
    effects = [(effect_rng.random() < options.label_noise, effect_rng.uniform(*SEVERITY_RANGE))
               for _ in range(options.n_subjects)]  # fmt: skip
    individual_rng = np.random.default_rng([options.seed, 11])  # apart too: how people differ besides the disease
    for index in range(options.n_subjects):
        label = f"{options.label_prefix}{index + 1:0{width}d}"
        if options.confound_site:
            site = sites[index % len(sites)]
            p_ad = {sites[0]: 0.1, sites[-1]: 0.9}.get(site, 0.5)
        else:
            site, p_ad = sites[int(rng.integers(len(sites)))], 0.45
        diagnosis = "AD" if rng.random() < p_ad else "CN"
        age = float(np.clip(rng.normal(73 if diagnosis == "AD" else 68, 7), 55, 90))
        sex = "F" if rng.random() < 0.5 else "M"
        n_sessions = 2 if rng.random() < options.two_session_fraction else 1
        flipped, drawn = effects[index]
        affected = (diagnosis == "AD") != bool(flipped)
        severity = float(drawn) if affected else 0.0
        # the severity is the truth, not written into participants.tsv
        participants.append({"participant_id": f"sub-{label}", "age": round(age, 1), "sex": sex, "site": site,
                             "diagnosis": diagnosis, "severity": round(severity, 4)})  # fmt: skip
        person = _individual(individual_rng, sex, options.individual_variation)
        subject_rng = np.random.default_rng(rng.integers(2**32))
        for session in range(1, n_sessions + 1):
            session_age = age + (0.0 if session == 1 else float(subject_rng.uniform(1.0, 2.5)))
            ventricles, hippocampi = _labels_effects(subject_rng, severity, session_age, options.effect_strength,
                                                     person["own"])  # fmt: skip
            images.append(ImageSpec(
                subject=label, session=f"{session:02d}", age=round(session_age, 1), diagnosis=diagnosis, site=site,
                seed=int(rng.integers(2**32)), ventricles=ventricles, hippocampi=hippocampi,
                compressed=(index % 10 != 4),  # every tenth subject has an uncompressed .nii
                flair=bool(with_flair[index]), lesion_seed=lesion_seeds[index], head_scale=person["head_scale"],
                shape_seed=person["shape_seed"], shape_mm=person["shape_mm"],
            ))  # fmt: skip
    _plan_unfamiliar(options, width, participants, images)
    return participants, images


def _plan_unfamiliar(
    options: SampleOptions, width: int, participants: list[dict[str, Any]], images: list[ImageSpec]
) -> None:
    """One more participant (one session) per kind of ``options.unfamiliar``, drawn apart from the rest so that the
    other participants do not depend on them."""
    rng = np.random.default_rng([options.seed, 9])
    sites = sorted(SITES)
    for offset, kind in enumerate(options.unfamiliar):
        if kind not in anatomy.UNFAMILIAR:
            raise ValueError(f"unknown kind of unfamiliar image {kind!r}: choose from {', '.join(anatomy.UNFAMILIAR)}")
        label = f"{options.label_prefix}{options.n_subjects + offset + 1:0{width}d}"
        diagnosis = "AD" if rng.random() < 0.45 else "CN"
        age = round(float(np.clip(rng.normal(70, 7), 55, 90)), 1)
        site = sites[int(rng.integers(len(sites)))]
        severity = float(rng.uniform(*SEVERITY_RANGE)) if diagnosis == "AD" else 0.0
        participants.append({"participant_id": f"sub-{label}", "age": age, "sex": "F" if rng.random() < 0.5 else "M",
                             "site": site, "diagnosis": diagnosis, "severity": round(severity, 4)})  # fmt: skip
        ventricles, hippocampi = _labels_effects(rng, severity, age, options.effect_strength)
        images.append(ImageSpec(subject=label, session="01", age=age, diagnosis=diagnosis, site=site,
                                seed=int(rng.integers(2**32)), ventricles=ventricles, hippocampi=hippocampi,
                                flair=bool(rng.random() < options.flair_fraction), unfamiliar=kind))  # fmt: skip


def draw_acquisition(rng: np.random.Generator, options: SampleOptions) -> dict[str, Any]:
    """The random placement, grid and artefacts of one image."""
    oblique = rng.random() < 0.25
    return {
        "rotation_deg": rng.uniform(-options.max_rotation_deg, options.max_rotation_deg, 3).round(3).tolist(),
        "translation_mm": rng.uniform(-options.max_translation_mm, options.max_translation_mm, 3).round(3).tolist(),
        "orientation": str(rng.choice(ORIENTATIONS)),
        "voxel_size_mm": list(VOXEL_SIZES[int(rng.choice(len(VOXEL_SIZES), p=VOXEL_SIZE_WEIGHTS))]),
        "oblique_deg": (rng.uniform(-12, 12, 3) * (rng.random(3) < 0.5)).round(3).tolist() if oblique else [0.0] * 3,
        "fov_jitter_mm": rng.uniform(-5, 5, 3).round(3).tolist(),
        "large_fov": bool(rng.random() < options.large_fov_fraction),
        "bias_coefficients": rng.normal(0, 0.15, 9).round(4).tolist(),
        "scale_jitter": float(rng.uniform(0.95, 1.05)),
        "noise_jitter": float(rng.uniform(0.8, 1.2)),
    }


def make_image(
    spec: ImageSpec, head: anatomy.Head, options: SampleOptions, lesions: np.ndarray | None = None
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image, dict[str, Any]]:
    """The T1w of one image, its true brain mask and structure labels (same grid) and its ground truth;
    ``lesions`` (:func:`~pipeline.sample.anatomy.lesion_map`) darken the white matter."""
    rng = np.random.default_rng(spec.seed)
    acq = draw_acquisition(rng, options)
    deform = lambda image: anatomy.deform(  # noqa: E731
        image, head.affine, ventricles=spec.ventricles, hippocampi=spec.hippocampi
    )
    contrast = head.data if lesions is None else anatomy.with_lesions(head.data, lesions, anatomy.LESION_T1)
    if spec.unfamiliar:
        contrast = anatomy.unfamiliar_contrast(head, spec.unfamiliar)
    anatomy_img = deform(contrast)
    pose = np.eye(4)  # template world -> scanner world
    pose[:3, :3] = anatomy.rotation_matrix(acq["rotation_deg"]) * anatomy.UNFAMILIAR.get(spec.unfamiliar, 1.0)
    pose[:3, :3] *= spec.head_scale  # the individual's head size
    pose[:3, 3] = acq["translation_mm"]
    grid, shape = _acquisition_grid(acq, pose, options)
    to_template = np.linalg.inv(pose)
    shape_of = spec.shape  # the individual's shape: where each voxel samples the head, found once
    person = None if shape_of is None else anatomy.shape_coordinates(head.affine, grid, shape, to_template, shape_of)
    signal = anatomy.resample_into(anatomy_img, head.affine, grid, shape, to_template, displacement=person)
    brain = anatomy.resample_into(deform(head.brain.astype(np.float32)), head.affine, grid, shape, to_template,
                                  displacement=person) > 0.5  # fmt: skip
    moved = anatomy.deform(head.labels, head.affine, ventricles=spec.ventricles, hippocampi=spec.hippocampi, order=0)
    structures = anatomy.resample_into(moved, head.affine, grid, shape, to_template, order=0, displacement=person)
    site = SITES[spec.site]
    scale = site["scale"] * acq["scale_jitter"]
    signal *= anatomy.bias_field(shape, acq["bias_coefficients"])
    signal *= np.float32(scale)
    sigma = site["noise"] * acq["noise_jitter"] * scale
    signal = anatomy.rician(signal, sigma, rng)
    img = _scanner_image(np.clip(np.rint(signal), 0, np.iinfo(np.int16).max).astype(np.int16), grid)
    truth = {
        "Description": "Ground truth of a synthetic T1w (bidsdl-sample).",
        "Template": anatomy.TEMPLATE_SPACE,
        "T1wToTemplate": to_template.round(8).tolist(),
        "TemplateToT1w": pose.round(8).tolist(),
        "TransformConvention": "4x4 RAS+ world-to-world (mm): x_template = T1wToTemplate @ x_T1w",
        **_best_affine(head, pose, shape_of),
        **acq,
        "shape": shape,
        "BrainMask": mask_name(spec),
        "BrainVolumeMl": round(float(brain.sum() * abs(np.linalg.det(grid[:3, :3]))) / 1000, 3),
        "site_scale": scale,
        "noise_sigma": sigma,
        "deformation": {"ventricles": spec.ventricles, "hippocampi": spec.hippocampi},
        "individual": {"head_scale": spec.head_scale, "shape_seed": spec.shape_seed, "shape_rms_mm": spec.shape_mm},
        "age": spec.age,
        "diagnosis": spec.diagnosis,
        "site": spec.site,
        "Unfamiliar": spec.unfamiliar or None,
    }
    truth["StructureVolumesMl"] = {
        name: round(float((structures == index).sum() * abs(np.linalg.det(grid[:3, :3]))) / 1000, 4)
        for index, name in anatomy.STRUCTURES.items()
    }
    return img, _scanner_image(brain.astype(np.uint8), grid, None), _scanner_image(structures.astype(np.uint8), grid,
                                                                                   None), truth  # fmt: skip


def _best_affine(head: anatomy.Head, pose: np.ndarray, shape: anatomy.Shape | None) -> dict[str, Any]:
    """With an individual's shape the true template -> T1w mapping is not affine: its least-squares affine over the
    template's brain (what an affine registration should find) and the distance (mm, RMS and 95th percentile over
    the brain) between the two, the floor of any affine registration's error. Without a shape, the pose itself."""
    if shape is None:
        return {"TemplateToT1wBestAffine": pose.round(8).tolist(), "AffineResidualMm": {"rms": 0.0, "p95": 0.0}}
    ijk = np.argwhere(head.brain)[::97].T.astype(np.float64)
    template = head.affine[:3, :3] @ ijk + head.affine[:3, 3:4]
    point = template.copy()
    for _ in range(20):  # the person's point y whose anatomy is the template's t: y + d(y) = t
        point = template - shape(point)
    scanner = pose[:3, :3] @ point + pose[:3, 3:4]
    design = np.vstack([template, np.ones(template.shape[1])]).T
    solution, *_ = np.linalg.lstsq(design, scanner.T, rcond=None)
    fit = np.eye(4)
    fit[:3, :] = solution.T
    distance = np.linalg.norm(design @ solution - scanner.T, axis=1)
    return {"TemplateToT1wBestAffine": fit.round(8).tolist(),
            "AffineResidualMm": {"rms": round(float(np.sqrt(np.mean(distance**2))), 3),
                                 "p95": round(float(np.percentile(distance, 95)), 3)}}  # fmt: skip


def _acquisition_grid(acq: dict[str, Any], pose: np.ndarray, options: SampleOptions) -> tuple[np.ndarray, list[int]]:
    """The image's grid (voxel -> scanner world) and shape: the field of view around the posed head, the drawn
    orientation, voxel size (scaled by ``voxel_scale``, written back into ``acq``), tilt and jitter."""
    world_axis = np.abs(anatomy.orientation_matrix(acq["orientation"])).argmax(axis=0)  # world axis of each voxel axis
    acq["voxel_size_mm"] = [z * options.voxel_scale for z in acq["voxel_size_mm"]]
    fov = (*FOV_MM[:2], LARGE_FOV_SI_MM) if acq["large_fov"] else FOV_MM
    shape = [round(fov[w] / z) for w, z in zip(world_axis, acq["voxel_size_mm"], strict=True)]
    head_centre = np.add(HEAD_CENTRE_MM, (0.0, 0.0, (FOV_MM[2] - fov[2]) / 2))  # the same top
    centre = pose[:3, :3] @ head_centre + pose[:3, 3] + acq["fov_jitter_mm"]
    grid = anatomy.grid_affine(orientation=acq["orientation"], voxel_size=acq["voxel_size_mm"], shape=shape,
                               centre_mm=centre, oblique_deg=acq["oblique_deg"])  # fmt: skip
    return grid, shape


def _scanner_image(data: np.ndarray, grid: np.ndarray, time_unit: str | None = "sec") -> nib.Nifti1Image:
    """A NIfTI image on ``grid`` with both qform and sform set (scanner), in mm (and ``time_unit``)."""
    img = nib.Nifti1Image(data, grid)
    if time_unit:
        img.header.set_xyzt_units("mm", time_unit)
    else:
        img.header.set_xyzt_units("mm")
    img.set_qform(grid, code=1)
    img.set_sform(grid, code=1)
    return img


#: The 2D FLAIR: axial slices (the third voxel axis runs foot to head), thick, covering the brain.
FLAIR_VOXEL_MM = (0.9, 0.9, 3.0)
FLAIR_FOV_MM = (216.0, 234.0, 165.0)
FLAIR_ORIENTATIONS = ("RAS", "LAS", "LPS", "RPS")
#: The head's motion between the T1w and the FLAIR: up to this rotation (degrees) and shift (mm) per axis.
FLAIR_MOTION_DEG = 5.0
FLAIR_MOTION_MM = 6.0


def make_flair(spec: ImageSpec, head: anatomy.Head, pose: np.ndarray, options: SampleOptions,
               lesions: np.ndarray | None = None) -> tuple[nib.Nifti1Image, dict[str, Any]]:  # fmt: skip
    """The 2D FLAIR of one session and its ground truth: the head of the session's T1w (``pose``: template
    world -> scanner world) moved rigidly, on a grid of thick axial slices (each the mean of three 1 mm
    samples across its thickness, as a slice integrates its slab)."""
    rng = np.random.default_rng([spec.seed, 2])
    rotation = rng.uniform(-FLAIR_MOTION_DEG, FLAIR_MOTION_DEG, 3).round(3)
    translation = rng.uniform(-FLAIR_MOTION_MM, FLAIR_MOTION_MM, 3).round(3)
    centre = pose[:3, :3] @ np.asarray(HEAD_CENTRE_MM) + pose[:3, 3]  # the head's centre in the scanner
    motion = np.eye(4)  # the head moves about its centre: scanner world (T1w) -> scanner world (FLAIR)
    motion[:3, :3] = anatomy.rotation_matrix(rotation.tolist())
    motion[:3, 3] = centre + translation - motion[:3, :3] @ centre
    flair_pose = motion @ pose
    orientation = str(rng.choice(FLAIR_ORIENTATIONS))
    voxel = [z * options.voxel_scale for z in FLAIR_VOXEL_MM]
    shape = [round(f / z) for f, z in zip(FLAIR_FOV_MM, voxel, strict=True)]
    fine_voxel, fine_shape = [*voxel[:2], voxel[2] / 3], [*shape[:2], shape[2] * 3]
    grid_centre = centre + np.array([0.0, 0.0, 12.0])  # the slab is centred on the brain, above the head's centre
    fine = anatomy.grid_affine(orientation=orientation, voxel_size=fine_voxel, shape=fine_shape, centre_mm=grid_centre)
    grid = anatomy.grid_affine(orientation=orientation, voxel_size=voxel, shape=shape, centre_mm=grid_centre)
    contrast = anatomy.flair_contrast(head)
    if lesions is not None:
        contrast = anatomy.with_lesions(contrast, lesions, anatomy.LESION_FLAIR)
    deformed = anatomy.deform(contrast, head.affine, ventricles=spec.ventricles, hippocampi=spec.hippocampi)
    signal = anatomy.resample_into(deformed, head.affine, fine, fine_shape, np.linalg.inv(flair_pose),
                                   displacement=spec.shape)  # fmt: skip
    signal = signal.reshape(*shape[:2], shape[2], 3).mean(axis=3)
    site = SITES[spec.site]
    scale = 0.8 * site["scale"]
    signal *= anatomy.bias_field(shape, rng.normal(0, 0.1, 9).round(4).tolist())
    signal *= np.float32(scale)
    sigma = site["noise"] * scale
    data = np.clip(np.rint(anatomy.rician(signal.astype(np.float32), sigma, rng)), 0, np.iinfo(np.int16).max)
    img = nib.Nifti1Image(data.astype(np.int16), grid)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(grid, code=1)
    img.set_sform(grid, code=1)
    truth = {
        "Description": "Ground truth of a synthetic 2D FLAIR (bidsdl-sample): the head of the session's T1w, moved.",
        "T1w": spec.relpath.name,
        "FLAIRToT1w": np.linalg.inv(motion).round(8).tolist(),
        "TransformConvention": "4x4 RAS+ world-to-world (mm): x_T1w = FLAIRToT1w @ x_FLAIR",
        "motion_rotation_deg": rotation.tolist(),
        "motion_translation_mm": translation.tolist(),
        "orientation": orientation,
        "voxel_size_mm": voxel,
        "shape": shape,
    }
    return img, truth


def flair_sidecar(site: str, voxel_scale: float = 1.0) -> dict[str, Any]:
    keep = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength")
    return {k: SITES[site][k] for k in keep} | {
        "InstitutionName": f"bidsdl sample {site}",
        "MRAcquisitionType": "2D",
        "RepetitionTime": 9.0,
        "EchoTime": 0.09,
        "InversionTime": 2.5,
        "SliceThickness": FLAIR_VOXEL_MM[2] * voxel_scale,
        "PulseSequenceType": "FLAIR (synthetic)",
    }


def mask_name(spec: ImageSpec) -> str:
    """The file name of an image's true brain mask in ``sourcedata/truth/``."""
    return f"{spec.stem.removesuffix('_T1w')}_desc-brain_mask.nii.gz"


def sidecar(site: str) -> dict[str, Any]:
    return {k: v for k, v in SITES[site].items() if k not in ("scale", "noise")} | {
        "InstitutionName": f"bidsdl sample {site}",
        "MRAcquisitionType": "3D",
        "PulseSequenceType": "MPRAGE-like (synthetic)",
    }


# The head model is built once in the parent and inherited by forked workers.
_SHARED: dict[str, Any] = {}


def _write_image(job: tuple[Path, ImageSpec, SampleOptions]) -> dict[str, Any]:
    out_dir, spec, options = job
    head = _SHARED["head"]
    lesions = anatomy.lesion_map(head, np.random.default_rng(spec.lesion_seed)) if spec.lesion_seed else None
    img, mask, labels, truth = make_image(spec, head, options, lesions)
    target = out_dir / spec.relpath
    with atomic_path(target) as tmp:
        img.to_filename(tmp)
    write_json(target.with_name(f"{spec.stem}.json"), sidecar(spec.site))
    truth_dir = out_dir / "sourcedata" / "truth"
    with atomic_path(truth_dir / mask_name(spec)) as tmp:
        mask.to_filename(tmp)
    write_json(truth_dir / f"{spec.stem}.json", truth)
    if lesions is not None:
        truth["LesionVolumeMl"] = _write_lesion_mask(out_dir, spec, head, lesions, img, truth)
        write_json(truth_dir / f"{spec.stem}.json", truth)
    if spec.flair:
        flair, flair_truth = make_flair(spec, head, np.asarray(truth["TemplateToT1w"]), options, lesions)
        target = out_dir / spec.flair_relpath
        with atomic_path(target) as tmp:
            flair.to_filename(tmp)
        stem = target.name.removesuffix(".nii.gz")
        write_json(target.with_name(f"{stem}.json"), flair_sidecar(spec.site, options.voxel_scale))
        write_json(truth_dir / f"{stem}.json", flair_truth)
    with atomic_path(label_path(out_dir / LABELS_DIR, spec.relpath, LABEL_DESC)) as tmp:
        labels.to_filename(tmp)
    return truth


def _write_lesion_mask(out_dir: Path, spec: ImageSpec, head: anatomy.Head, lesions: np.ndarray,
                       t1w: nib.Nifti1Image, truth: dict[str, Any]) -> float:  # fmt: skip
    """The true lesion mask in the T1w's grid, in the lesions' derivatives dataset; returns its volume (ml)."""
    moved = anatomy.deform(lesions, head.affine, ventricles=spec.ventricles, hippocampi=spec.hippocampi)
    on_grid = anatomy.resample_into(moved, head.affine, t1w.affine, truth["shape"], np.asarray(truth["T1wToTemplate"]),
                                    displacement=spec.shape)  # fmt: skip
    mask = nib.Nifti1Image((on_grid > 0.5).astype(np.uint8), t1w.affine)
    mask.set_qform(t1w.affine, code=1)
    mask.set_sform(t1w.affine, code=1)
    mask.header.set_xyzt_units("mm")
    with atomic_path(label_path(out_dir / LESIONS_DIR, spec.relpath, LESION_DESC, suffix="mask")) as tmp:
        mask.to_filename(tmp)
    return round(float((on_grid > 0.5).sum() * abs(np.linalg.det(t1w.affine[:3, :3]))) / 1000, 4)


def _write_tables(out_dir: Path, participants: list[dict[str, Any]], images: list[ImageSpec]) -> None:
    columns = ["participant_id", "age", "sex", "site", "diagnosis"]
    rows = ["\t".join(columns)] + ["\t".join(str(p[c]) for c in columns) for p in participants]
    write_text(out_dir / "participants.tsv", "\n".join(rows) + "\n")
    write_json(
        out_dir / "participants.json",
        {
            "age": {"Description": "Age at the first session", "Units": "year"},
            "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
            "site": {
                "Description": "Acquisition site",
                "Levels": {s: SITES[s]["Manufacturer"] for s in SITES},
            },
            "diagnosis": {
                "Description": "Clinical group (synthetic: drives ventricular enlargement and hippocampal shrinkage)",
                "Levels": {"CN": "cognitively normal", "AD": "Alzheimer's disease"},
            },
        },
    )
    # the sessions tables' columns, for every subject (BIDS inheritance from the dataset root)
    write_json(out_dir / "sessions.json", {"age": {"Description": "Age at the session", "Units": "year"}})
    by_subject: dict[str, list[ImageSpec]] = {}
    for spec in images:
        by_subject.setdefault(spec.subject, []).append(spec)
    for subject, specs in by_subject.items():
        lines = ["session_id\tage"] + [f"ses-{s.session}\t{s.age}" for s in specs]
        write_text(out_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", "\n".join(lines) + "\n")


def _plant_problems(
    out_dir: Path, options: SampleOptions, participants: list[dict[str, Any]], images: list[ImageSpec]
) -> dict[str, Any]:
    planted: dict[str, Any] = {}
    if options.duplicate_subject:
        source = images[0]
        width = len(source.subject)
        label = f"{options.label_prefix}{options.n_subjects + 1:0{width}d}"
        copy = ImageSpec(**{**asdict(source), "subject": label, "session": "01"})
        (out_dir / copy.relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / source.relpath, out_dir / copy.relpath)
        shutil.copyfile(
            out_dir / source.relpath.with_name(f"{source.stem}.json"),
            out_dir / copy.relpath.with_name(f"{copy.stem}.json"),
        )
        row = next(p for p in participants if p["participant_id"] == f"sub-{source.subject}")
        participants.append({**row, "participant_id": f"sub-{label}"})
        images.append(copy)
        planted["duplicate_subject"] = {"original": f"sub-{source.subject}", "copy": f"sub-{label}"}
    if options.corrupt_subject:
        victim = next(
            s for s in reversed(images) if s.subject != planted.get("duplicate_subject", {}).get("copy", "")[4:]
        )
        path = out_dir / victim.relpath
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 3])
        planted["corrupt_file"] = victim.relpath.as_posix()
    if options.confound_site:
        planted["confound_site"] = "site predicts diagnosis: siteA mostly CN, siteC mostly AD"
    return planted


def write_sample_dataset(out_dir: Path, options: SampleOptions) -> dict[str, Any]:
    """Write the dataset into ``out_dir`` (must be empty or absent); returns a summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(out_dir)
    participants, images = plan_dataset(options)
    _SHARED.update(head=anatomy.default_head())
    jobs = [(out_dir, spec, options) for spec in images]
    if options.n_jobs > 1:
        with multiprocessing.get_context("fork").Pool(options.n_jobs) as pool:
            truths = pool.map(_write_image, jobs, chunksize=1)
    else:
        truths = [_write_image(job) for job in jobs]
    _SHARED.clear()
    planted = _plant_problems(out_dir, options, participants, images)
    _write_tables(out_dir, participants, images)
    write_json(
        out_dir / "dataset_description.json",
        {
            "Name": f"bidsdl sample dataset (synthetic, seed {options.seed})",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "Derived from the MNI ICBM152 2009a template; see README",
            "Authors": ["bidsdl-sample"],
            "GeneratedBy": [{"Name": "bidsdl-sample", "Version": __version__}],
        },
    )
    write_text(out_dir / "README", _readme(options, planted))
    write_labels_dataset(
        out_dir / LABELS_DIR, LABEL_DESC, anatomy.STRUCTURES, generated_by="bidsdl-sample", version=__version__
    )
    if any(spec.lesion_seed for spec in images):
        write_labels_dataset(out_dir / LESIONS_DIR, LESION_DESC, {1: "lesion"}, generated_by="bidsdl-sample",
                             version=__version__)  # fmt: skip
    write_json(
        out_dir / "sourcedata" / "generation.json",
        {
            "bidsdl_version": __version__,
            "options": _recorded_options(options),
            "planted": planted,
            "images": [spec.relpath.as_posix() for spec in images],
            "learning_truth": learning_truth(participants, options, images, truths),
            "unfamiliar": {f"sub-{s.subject}": s.unfamiliar for s in images if s.unfamiliar},
        },
    )
    LOGGER.info("Wrote %d images of %d participants to %s", len(images), len(participants), out_dir)
    return {
        "participants": len(participants),
        "images": len(images),
        "planted": planted,
        "truth_files": len(truths),
    }


def learning_truth(
    participants: list[dict[str, Any]], options: SampleOptions, images: Sequence[ImageSpec] = (),
    truths: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:  # fmt: skip
    """What a model of the diagnosis could at best achieve: each participant's true severity, and the ROC AUC of the
    severity against the recorded diagnosis (no image-based model can rank the participants better); and the
    morphometric ceiling: what a model of the true volumes (ventricles, hippocampi, brain: known only here) reaches."""
    from sklearn.metrics import roc_auc_score

    y = np.array([p["diagnosis"] == "AD" for p in participants], dtype=int)
    severity = np.array([p["severity"] for p in participants])
    best = float(roc_auc_score(y, severity)) if 0 < y.sum() < len(y) else float("nan")
    out = {
        "label_noise": options.label_noise,
        "severity_range": list(SEVERITY_RANGE),
        "best_possible_auc": round(best, 4),
        "severity": {p["participant_id"]: p["severity"] for p in participants},
    }
    if truths:
        out["morphometric_ceiling"] = morphometric_ceiling(participants, images, truths, seed=options.seed)
    return out


#: The true volumes the morphometric ceiling's model learns from (per participant, first session).
CEILING_FEATURES = ("ventricles", "hippocampi", "brain")


def morphometric_ceiling(
    participants: list[dict[str, Any]], images: Sequence[ImageSpec], truths: Sequence[dict[str, Any]], *, seed: int
) -> dict[str, Any]:
    """A logistic model of the diagnosis on each participant's true regional volumes (both lateral ventricles, both
    hippocampi, the brain: what the generator made, before any scanner or preprocessing), cross-validated so that
    every participant is predicted once (stratified, at most 5 folds); its ROC-AUC is the ceiling a volumetric
    pipeline could reach on this cohort."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    first: dict[str, dict[str, float]] = {}
    # the images drawn (a planted duplicate, added after them, has no truth of its own)
    for spec, truth in zip(images[: len(truths)], truths, strict=True):
        key = f"sub-{spec.subject}"
        if key in first or spec.unfamiliar:
            continue
        volumes = truth["StructureVolumesMl"]
        first[key] = {
            "ventricles": volumes["Left-Lateral-Ventricle"] + volumes["Right-Lateral-Ventricle"],
            "hippocampi": volumes["Left-Hippocampus"] + volumes["Right-Hippocampus"],
            "brain": truth["BrainVolumeMl"],
        }
    ids = [p["participant_id"] for p in participants if p["participant_id"] in first]
    y = np.array([next(p["diagnosis"] for p in participants if p["participant_id"] == i) == "AD" for i in ids], int)
    x = np.array([[first[i][f] for f in CEILING_FEATURES] for i in ids])
    k = int(min(5, np.bincount(y, minlength=2).min())) if len(y) else 0
    record: dict[str, Any] = {"features": list(CEILING_FEATURES), "model": "standardised L2 logistic regression (C=1)",
                              "volumes_ml": first}  # fmt: skip
    if k < 2:
        return {**record, "auc": None, "note": "too few participants of a class to cross-validate"}
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return {**record, "auc": round(float(roc_auc_score(y, scores)), 4), "folds": k,
            "validation": f"{k}-fold stratified cross-validation, every participant predicted once"}  # fmt: skip


def _recorded_options(options: SampleOptions) -> dict[str, Any]:
    """The options that shape the data (not how many processes wrote it)."""
    return {k: v for k, v in asdict(options).items() if k != "n_jobs"}


def _readme(options: SampleOptions, planted: dict[str, Any]) -> str:
    lines = [
        "# bidsdl sample dataset",
        "",
        "Synthetic T1w images made by `bidsdl-sample` from nilearn's bundled MNI152 2009a template",
        "(McConnell Brain Imaging Centre; see its copyright notice), placed in a synthetic head.",
        "Diagnosis (CN/AD) enlarges the ventricles and shrinks the hippocampi, by a severity that varies between",
        f"participants; {options.label_noise:.0%} of them have anatomy that disagrees with their recorded diagnosis",
        "(label noise: `sourcedata/generation.json` gives the best possible AUC); age has a smaller effect.",
        "Some images have a large field of view reaching the neck and shoulders.",
        "With --flair-fraction, sessions also hold a 2D FLAIR (3 mm axial slices) of the head moved against the T1w;",
        "with --lesion-fraction, some participants have white-matter lesions (dark on the T1w, bright on the FLAIR)",
        f"whose masks, in each T1w's grid, are the derivatives dataset `{LESIONS_DIR.as_posix()}/` "
        f"(`desc-{LESION_DESC}_mask`).",
        "With --unfamiliar, extra participants have images unlike the others (a FLAIR stored as T1w, an inverted",
        "contrast, an infant's smaller head with white matter as bright as grey, another scanner's non-linear",
        "intensity response): `sourcedata/generation.json` names them.",
        "Every image's true T1w-to-template transform, artefacts and brain mask are in `sourcedata/truth/`.",
        f"Reference labels of six structures ({', '.join(anatomy.STRUCTURES.values())}) in each T1w's grid: the",
        f"derivatives dataset `{LABELS_DIR.as_posix()}/` (`desc-{LABEL_DESC}_dseg`), for `--task segmentation`.",
        "",
        f"Options: `{json.dumps(_recorded_options(options))}`",
        f"Planted problems: `{json.dumps(planted)}`",
        "",
        "Not real patients. For testing software only.",
    ]
    return "\n".join(lines) + "\n"
