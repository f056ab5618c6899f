"""Find what a BIDS dataset holds: subjects, sessions, anatomical images, their metadata and tables.

The top of the BIDS layer (files -> scan/validation -> index -> layout): the dataset is read once into an
index (:mod:`pipeline.bids.index`), never written into BIDS_DIR.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import NoDataSelected, Problem
from ..kinds import REFERENCE_KIND
from .files import (  # noqa: F401 - the layer's public names, re-exported for callers above it
    AnatImage,
    normalize_label,
    read_participants,
    read_sessions,
    read_tsv,
    subjects_on_disk,
)
from .index import BidsIndex, open_index
from .scan import inherited_metadata, read_json
from .validation import check_images

LOGGER = logging.getLogger(__name__)


def index_dataset(bids_dir: Path) -> BidsIndex:
    """An index of BIDS_DIR in memory (:class:`pipeline.bids.index.BidsIndex`): what a run keeps on disk and
    shares, made here for this caller alone."""
    return open_index(bids_dir, None)


def sidecar_metadata(bids_dir: Path, image: Path) -> tuple[dict[str, Any], list[str]]:
    """Metadata of ``image`` by the BIDS inheritance principle, and the sidecars that failed to read.

    Sidecars from the dataset root down to the image's folder apply when their entities are a
    subset of the image's and their suffix matches; deeper and more specific ones win.
    """
    bids_dir = Path(bids_dir)

    def sidecars_in(folder: str) -> list[str]:
        return [p.relative_to(bids_dir).as_posix() for p in sorted((bids_dir / folder).glob("*.json"))]

    rel = image.relative_to(bids_dir).as_posix()
    return inherited_metadata(rel, sidecars_in, lambda sidecar: read_json(bids_dir / sidecar))


def collect_t1w(
    index: BidsIndex, *, subjects: Sequence[str] | None = None, sessions: Sequence[str] | None = None
) -> list[AnatImage]:
    """Every T1w image (``.nii``/``.nii.gz``; any session, run, acquisition) in ``index``, sorted by path."""
    return index.t1w(subjects, sessions or ())


def select_participants(
    available: Sequence[str],
    *,
    requested: Sequence[str] = (),
    index: int | None = None,
) -> list[str]:
    """The sorted participants to process, after labels and then the array index.

    >>> select_participants(["02", "01", "03"], index=1)
    ['02']
    >>> select_participants(["01"], requested=["05"])
    Traceback (most recent call last):
    ...
    pipeline.errors.NoDataSelected: No T1w images for participant(s) sub-05. Participants with T1w...
    """
    selected = sorted(set(available))
    if requested:
        missing = sorted(set(requested) - set(selected))
        if missing:
            known = ", ".join(f"sub-{s}" for s in selected) or "none"
            raise NoDataSelected(
                f"No {REFERENCE_KIND} images for participant(s) {', '.join(f'sub-{s}' for s in missing)}. "
                f"Participants with {REFERENCE_KIND} images: {known}."
            )
        selected = sorted(set(requested))
    if not selected:
        raise NoDataSelected(
            f"The filters selected no {REFERENCE_KIND} images. Check --participant-label/--session-label, "
            f"and that images are named sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_{REFERENCE_KIND}"
            ".nii[.gz]."
        )
    if index is not None:
        if not 0 <= index < len(selected):
            raise NoDataSelected(
                f"--participant-index {index} is out of range: {len(selected)} participant(s) are "
                f"selected, so valid indices are 0..{len(selected) - 1}. Use --list-participants "
                "to size the array job."
            )
        selected = [selected[index]]
    return selected




def validate_dataset(bids_dir: Path, *, t1w_paths: Iterable[Path] = ()) -> list[Problem]:
    """Every problem found in BIDS_DIR; those with severity 'error' stop the run (exit 16).

    A derivatives dataset or one without participants gets that one problem (not one line per file).
    The checks are those an index of BIDS_DIR records (:mod:`pipeline.bids.index`), plus the headers of
    ``t1w_paths``.
    """
    return open_index(bids_dir, None).problems() + check_images(bids_dir, t1w_paths)
