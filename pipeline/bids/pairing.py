"""Which T1w each image of another kind (FLAIR, T2w, PDw) is aligned to, and why.

BIDS ties the images of one visit by their session: a FLAIR is paired with a T1w of its own session, never
another's (the head, the scanner and the anatomy may differ between visits). Within the session, a T1w of
the same run is chosen, then one of the same acquisition, then the first by name; the reason is recorded
and shown in the report. An image whose session has no T1w is listed, not processed, with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..derivatives import derivative_path
from ..kinds import IMAGE_EXTENSIONS, REFERENCE_KIND, image_kind
from .files import AnatImage

#: A lesion mask beside its T1w, as fMRIPrep reads it (BIDS does not define it yet: list it in .bidsignore).
LESION_ROI = "label-lesion_roi"
#: The ``desc`` of a lesion mask in a derivatives dataset (``--lesion-masks``).
LESION_DESC = "lesion"


@dataclass(frozen=True)
class Pairing:
    """An image of a co-registered kind, its reference T1w (None when it has none) and why."""

    image: AnatImage
    reference: AnatImage | None
    reason: str


def _session(image: AnatImage) -> str:
    return f"ses-{image.session}" if image.session else "the participant's only session"


def pair_images(images: Sequence[AnatImage]) -> list[Pairing]:
    """The pairing of every co-registered image among ``images`` (one participant's, or several's).

    >>> from pathlib import Path
    >>> t1 = AnatImage(Path("sub-1_ses-a_run-1_T1w.nii.gz"), "1", "a", {"run": "1"})
    >>> t2 = AnatImage(Path("sub-1_ses-a_run-2_T1w.nii.gz"), "1", "a", {"run": "2"})
    >>> fl = AnatImage(Path("sub-1_ses-a_run-2_FLAIR.nii.gz"), "1", "a", {"run": "2"}, kind="FLAIR")
    >>> lone = AnatImage(Path("sub-1_ses-b_FLAIR.nii.gz"), "1", "b", {}, kind="FLAIR")
    >>> [(p.reference and p.reference.path.name, p.reason) for p in pair_images([t1, t2, fl, lone])]
    [('sub-1_ses-a_run-2_T1w.nii.gz', 'the T1w of the same session and run (run-2)'), (None, 'no T1w in ses-b')]
    """
    references: dict[tuple[str, str | None], list[AnatImage]] = {}
    for image in images:
        if image.kind == REFERENCE_KIND:
            references.setdefault((image.subject, image.session), []).append(image)
    pairings = []
    for image in sorted(images, key=lambda img: str(img.path)):
        kind = image_kind(image.kind)
        if kind is None or kind.role != "coregistered":
            continue
        candidates = sorted(references.get((image.subject, image.session), []), key=lambda img: str(img.path))
        pairings.append(_choose(image, candidates))
    return pairings


def _choose(image: AnatImage, candidates: list[AnatImage]) -> Pairing:
    if not candidates:
        return Pairing(image, None, f"no {REFERENCE_KIND} in {_session(image)}")
    if len(candidates) == 1:
        return Pairing(image, candidates[0], f"the only {REFERENCE_KIND} of {_session(image)}")
    for entity, short in (("run", "run"), ("acquisition", "acq")):
        value = image.entities.get(entity)
        same = [c for c in candidates if value is not None and c.entities.get(entity) == value]
        if same:
            word = "acquisition" if short == "acq" else "run"
            return Pairing(image, same[0], f"the {REFERENCE_KIND} of the same session and {word} ({short}-{value})")
    return Pairing(image, candidates[0], f"the first by name of the {len(candidates)} {REFERENCE_KIND} of "
                                         f"{_session(image)} (none shares its run or acquisition)")  # fmt: skip


def lesion_mask(image: AnatImage, bids_dir: Path, lesion_dir: Path | None = None) -> tuple[Path, str] | None:
    """The lesion mask of a T1w and where it comes from (a BIDS URI for its sidecars), or None: beside the T1w
    (``<entities>_label-lesion_roi.nii[.gz]``) first, then in ``lesion_dir`` (``<entities>_desc-lesion_mask``)."""
    name = image.path.name
    for extension in IMAGE_EXTENSIONS[::-1]:
        name = name.removesuffix(extension)
    stem = name.removesuffix(f"_{image.kind}")
    for extension in IMAGE_EXTENSIONS[::-1]:
        beside = image.path.with_name(f"{stem}_{LESION_ROI}{extension}")
        if beside.is_file():
            return beside, f"bids:raw:{beside.relative_to(bids_dir).as_posix()}"
    if lesion_dir is not None:
        rel = image.path.relative_to(bids_dir)
        derived = derivative_path(lesion_dir, rel, suffix="mask", extension=".nii.gz", desc=LESION_DESC)
        if derived.is_file():
            inside = derived.resolve().is_relative_to(Path(bids_dir).resolve())
            where = f"bids:raw:{derived.resolve().relative_to(Path(bids_dir).resolve()).as_posix()}" if inside else (
                derived.resolve().as_uri())  # fmt: skip
            return derived, where
    return None
