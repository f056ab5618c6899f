"""Find what a BIDS dataset holds: subjects, sessions, T1w images, their metadata and tables.

Indexing is done by pybids, never writing into BIDS_DIR (no database file is created there).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..derivatives import PYBIDS_ENTITIES
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
    """A pybids layout of BIDS_DIR.

    pybids' own validation is off (ours reports problems by file) and so is its metadata indexing,
    which stops on the first broken sidecar; :func:`sidecar_metadata` reads metadata per image.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
    return BIDSLayout(str(bids_dir), validate=False, derivatives=False, indexer=indexer)


def sidecar_metadata(bids_dir: Path, image: Path) -> tuple[dict[str, Any], list[str]]:
    """Metadata of ``image`` by the BIDS inheritance principle, and the sidecars that failed to read.

    Sidecars from the dataset root down to the image's folder apply when their entities are a
    subset of the image's and their suffix matches; deeper and more specific ones win.
    """
    from ..derivatives import parse_bids_name

    bids_dir = Path(bids_dir)
    entities, suffix, _ = parse_bids_name(image.name)
    parts = image.parent.relative_to(bids_dir).parts
    folders = [bids_dir] + [bids_dir.joinpath(*parts[: i + 1]) for i in range(len(parts))]
    metadata: dict[str, Any] = {}
    problems: list[str] = []
    for folder in folders:
        candidates = []
        for sidecar in sorted(folder.glob(f"*{suffix}.json")):
            try:
                side_entities, side_suffix, _ = parse_bids_name(sidecar.name)
            except InputDataError:
                continue
            if side_suffix == suffix and side_entities.items() <= entities.items():
                candidates.append((len(side_entities), sidecar))
        for _, sidecar in sorted(candidates):
            try:
                metadata.update(json.loads(sidecar.read_text()))
            except (OSError, ValueError) as exc:
                problems.append(f"{sidecar.relative_to(bids_dir)}: not valid JSON ({exc})")
    return metadata, problems


def subjects_on_disk(bids_dir: Path) -> list[str]:
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def collect_t1w(
    layout, *, subjects: Sequence[str] | None = None, sessions: Sequence[str] | None = None
) -> list[T1wImage]:
    """Every T1w image (``.nii``/``.nii.gz``; any session, run, acquisition), sorted by path."""
    query: dict[str, Any] = {
        "suffix": "T1w",
        "datatype": "anat",
        "extension": list(T1W_EXTENSIONS),
        "return_type": "object",
    }
    if subjects:
        query["subject"] = list(subjects)
    if sessions:
        query["session"] = list(sessions)
    images = []
    for bids_file in layout.get(**query):
        entities = {k: str(v) for k, v in bids_file.get_entities().items() if k in PYBIDS_ENTITIES}
        if "subject" not in entities:  # a template's T1w (tpl-*), not a participant's
            continue
        metadata, problems = sidecar_metadata(Path(layout.root), Path(bids_file.path))
        for problem in problems:
            LOGGER.warning("Sidecar metadata skipped: %s. Fix the JSON syntax.", problem)
        images.append(
            T1wImage(
                path=Path(bids_file.path),
                subject=entities["subject"],
                session=entities.get("session"),
                entities=entities,
                metadata=metadata,
            )
        )
    return sorted(images, key=lambda img: str(img.path))


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
