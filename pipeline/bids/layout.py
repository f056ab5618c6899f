"""Find what a BIDS dataset holds: subjects, sessions, T1w images, their metadata and tables.

The dataset is read once into an index (:mod:`pipeline.bids.index`), never written into BIDS_DIR.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputDataError, NoDataSelected, UsageError

LOGGER = logging.getLogger(__name__)

T1W_EXTENSIONS = (".nii", ".nii.gz")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class T1wImage:
    """One T1w file of the dataset and what BIDS says about it."""

    path: Path
    subject: str
    session: str | None
    entities: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def relative_to(self, bids_dir: Path) -> str:
        return self.path.relative_to(bids_dir).as_posix()


def normalize_label(label: str, prefix: str) -> str:
    """Strip an optional ``sub-``/``ses-`` prefix and refuse anything but letters and digits.

    >>> normalize_label("sub-01", "sub")
    '01'
    >>> normalize_label("../x", "sub")
    Traceback (most recent call last):
    ...
    pipeline.errors.UsageError: Invalid sub label '../x': BIDS labels hold only letters and digits...
    """
    raw = str(label)
    value = raw[len(prefix) + 1 :] if raw.startswith(f"{prefix}-") else raw
    if not _LABEL_RE.match(value):
        raise UsageError(
            f"Invalid {prefix} label {raw!r}: BIDS labels hold only letters and digits. Use e.g. '01' or '{prefix}-01'."
        )
    return value


def index_dataset(bids_dir: Path):
    """An index of BIDS_DIR in memory (:class:`pipeline.bids.index.BidsIndex`): what a run keeps on disk and
    shares, made here for this caller alone."""
    from .index import open_index

    return open_index(bids_dir, None)


def sidecar_metadata(bids_dir: Path, image: Path) -> tuple[dict[str, Any], list[str]]:
    """Metadata of ``image`` by the BIDS inheritance principle, and the sidecars that failed to read.

    Sidecars from the dataset root down to the image's folder apply when their entities are a
    subset of the image's and their suffix matches; deeper and more specific ones win.
    """
    from .scan import inherited_metadata, read_json

    bids_dir = Path(bids_dir)

    def sidecars_in(folder: str) -> list[str]:
        return [p.relative_to(bids_dir).as_posix() for p in sorted((bids_dir / folder).glob("*.json"))]

    rel = image.relative_to(bids_dir).as_posix()
    return inherited_metadata(rel, sidecars_in, lambda sidecar: read_json(bids_dir / sidecar))


def subjects_on_disk(bids_dir: Path) -> list[str]:
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def collect_t1w(
    index, *, subjects: Sequence[str] | None = None, sessions: Sequence[str] | None = None
) -> list[T1wImage]:
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
                f"No T1w images for participant(s) {', '.join(f'sub-{s}' for s in missing)}. "
                f"Participants with T1w images: {known}."
            )
        selected = sorted(set(requested))
    if not selected:
        raise NoDataSelected(
            "The filters selected no T1w images. Check --participant-label/--session-label, "
            "and that images are named sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_T1w.nii[.gz]."
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


def read_tsv(path: Path) -> pd.DataFrame:
    """Read a BIDS TSV as strings ('n/a' kept as missing)."""
    try:
        return pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputDataError(
            f"{path} is not a readable tab-separated table ({exc}). Fix its format "
            "(tabs between columns, a header row)."
        ) from exc


def read_participants(bids_dir: Path) -> pd.DataFrame | None:
    """participants.tsv with ``participant_id`` as ``sub-<label>``, or None when absent."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        return None
    table = read_tsv(path)
    if "participant_id" not in table.columns:
        raise InputDataError(
            f"{path} has no 'participant_id' column (columns: {', '.join(table.columns)}). "
            "Its first column must be participant_id with values like 'sub-01'."
        )
    table["participant_id"] = [pid if str(pid).startswith("sub-") else f"sub-{pid}" for pid in table["participant_id"]]
    return table


def read_sessions(bids_dir: Path, subject: str) -> pd.DataFrame | None:
    path = Path(bids_dir) / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    return read_tsv(path) if path.exists() else None
