"""The anatomical images bidsdl knows, as data: one row per kind, and what differs between kinds.

Discovery, the audit, derivative names, reports and cohorts ask this table; none of them spells a
suffix where any anatomical kind would do (pybids keeps its entities in a config file the same way).
A kind is processed when :attr:`ImageKind.processed` is set. A ``coregistered`` kind is paired with a T1w of
its session (:func:`pipeline.bids.pairing.pair_images`) and rigidly aligned to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: The image file extensions bidsdl reads.
IMAGE_EXTENSIONS = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ImageKind:
    """One kind of anatomical image (a BIDS suffix) and how bidsdl treats it."""

    #: The BIDS suffix (``T1w``, ``FLAIR`` ...).
    suffix: str
    #: ``reference``: registered to the template itself; ``coregistered``: aligned to the session's reference.
    role: str
    #: Where its brain mask comes from: ``deepbet`` on the image itself, or ``reference`` (the reference's mask).
    brain_extraction: str
    #: The image quality metrics computed for it (names of :mod:`pipeline.ops.iqm`'s metrics).
    iqms: tuple[str, ...]
    #: The sections of its subject report, in order (the template's section names).
    report_sections: tuple[str, ...]
    #: Whether the participant level preprocesses it today.
    processed: bool = False
    #: Human words for reports and messages.
    description: str = ""


#: Intensity metrics, for every anatomical kind (MRIQC's anatomical IQMs).
_INTENSITY_IQMS = ("snr_wm", "snr_gm", "cnr", "cjv", "efc", "fber")
#: What a co-registered kind has: intensity metrics in the reference's tissue classes, and the co-registration's.
_COREGISTERED_IQMS = ("snr_wm", "snr_gm", "cjv", "efc", "coreg_edge_corr", "coreg_brain_coverage")
#: What only the reference has: its own registration, brain mask, tissues and field of view.
_REFERENCE_IQMS = (*_INTENSITY_IQMS, "registration_ncc", "mask_dice", "wm_dice", "brain_volume_ml", "gm_volume_ml",
                   "wm_volume_ml", "csf_volume_ml", "gm_wm_ratio", "brain_fov_edge_mm2", "brain_fov_bottom_mm2")

#: The anatomical kinds, reference first (the order in which reports show them).
IMAGE_KINDS: Mapping[str, ImageKind] = {
    kind.suffix: kind
    for kind in (
        ImageKind("T1w", "reference", "deepbet", _REFERENCE_IQMS,
                  ("audit", "brainmask", "registration", "biasfield", "mesh", "prediction"), processed=True,
                  description="T1-weighted"),
        ImageKind("T2w", "coregistered", "reference", _COREGISTERED_IQMS, ("audit", "coregistration"), processed=True,
                  description="T2-weighted"),
        ImageKind("FLAIR", "coregistered", "reference", _COREGISTERED_IQMS, ("audit", "coregistration"), processed=True,
                  description="fluid-attenuated inversion recovery"),
        ImageKind("PDw", "coregistered", "reference", _COREGISTERED_IQMS, ("audit", "coregistration"), processed=True,
                  description="proton-density weighted"),
    )
}  # fmt: skip

#: Entities that mark a variant of a kind, and what it means (a ``ce-`` T1w keeps the T1w's row; the audit
#: and the report say what differs).
VARIANT_ENTITIES: Mapping[str, str] = {
    "ce": "contrast-enhanced: intensity-based quality metrics are not comparable with unenhanced images",
    "rec": "a reconstruction other than the scanner's default",
}

#: The kind every participant-level run is anchored on: the one kind with the ``reference`` role.
REFERENCE_KIND = next(k.suffix for k in IMAGE_KINDS.values() if k.role == "reference")
#: The kinds aligned to a reference image of their session, in table order.
COREGISTERED_KINDS = tuple(k.suffix for k in IMAGE_KINDS.values() if k.role == "coregistered")
#: The kinds the participant level preprocesses, in table order.
PROCESSED_KINDS = tuple(k.suffix for k in IMAGE_KINDS.values() if k.processed)
#: The learning inputs when none are named: one channel, the reference kind.
DEFAULT_CHANNELS = (REFERENCE_KIND,)


def package_channels(record: Mapping) -> list[str]:
    """The image kinds a model package (its ``model.json`` record) takes as channels, in order: its
    ``input.channels``, or :data:`DEFAULT_CHANNELS` for packages made before channels were recorded. Every reader of a
    package's channels goes through this.

    >>> package_channels({"input": {"channels": ["T1w", "FLAIR"]}}), package_channels({"input": {}})
    (['T1w', 'FLAIR'], ['T1w'])
    """
    return list(record.get("input", {}).get("channels", DEFAULT_CHANNELS))
#: Learning inputs that are maps of the reference image itself on the model grid, made by the participant level's
#: morphometry (``--registration syn``): the input's name -> the derivative (a key of
#: :data:`pipeline.derivatives.DERIVATIVES`) and the tissue it is of (None: not a tissue map).
MORPHOMETRY_CHANNELS: Mapping[str, tuple[str, str | None]] = {
    "GM": ("tissue_modulated", "GM"),
    "WM": ("tissue_modulated", "WM"),
    "CSF": ("tissue_modulated", "CSF"),
    "logjacobian": ("logjacobian", None),
}
#: The inputs of a whole-image study without ``--inputs`` when every processed T1w has its morphometry maps: the
#: modulated grey matter and the log-Jacobian (VBM's and TBM's maps), chosen over the T1w intensities by
#: ``benchmarks/small_cohort.py`` on generated cohorts of tens of participants (docs/learning.md has the figures).
MORPHOMETRY_INPUTS = ("GM", "logjacobian")
#: Every name ``--inputs`` takes: the processed image kinds, then the morphometry maps.
INPUT_CHANNELS = (*PROCESSED_KINDS, *MORPHOMETRY_CHANNELS)


def image_kind(suffix: str) -> ImageKind | None:
    """The row of ``suffix``, or None when bidsdl does not know it.

    >>> image_kind("FLAIR").role
    'coregistered'
    >>> image_kind("bold") is None
    True
    """
    return IMAGE_KINDS.get(suffix)


def variants(entities: Mapping[str, str]) -> dict[str, str]:
    """The variant entities of an image's entities and what each means.

    >>> list(variants({"sub": "01", "ce": "gadolinium"}))
    ['ce']
    """
    return {key: VARIANT_ENTITIES[key] for key in entities if key in VARIANT_ENTITIES}


def kind_of_file(path: str | Path) -> str:
    """The kind (the BIDS suffix) of an image file's name.

    >>> kind_of_file("sub-01/anat/sub-01_ce-gd_T1w.nii.gz"), kind_of_file("sub-01_FLAIR.nii")
    ('T1w', 'FLAIR')
    """
    name = Path(path).name
    for extension in IMAGE_EXTENSIONS[::-1]:  # .nii.gz before .nii
        name = name.removesuffix(extension)
    return name.rsplit("_", 1)[-1]
