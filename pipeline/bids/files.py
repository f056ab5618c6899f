"""The bottom of the BIDS layer: the images bidsdl reads, their labels, and the dataset's tables.

Nothing here reads the index; :mod:`.scan`, :mod:`.validation`, :mod:`.index` and :mod:`.layout` build on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputDataError, UsageError
from ..kinds import IMAGE_EXTENSIONS, REFERENCE_KIND

#: Kept for readers of the old name: the image extensions of :mod:`pipeline.kinds`.
T1W_EXTENSIONS = IMAGE_EXTENSIONS
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class AnatImage:
    """One anatomical image of the dataset (its kind: :mod:`pipeline.kinds`) and what BIDS says about it."""

    path: Path
    subject: str
    session: str | None
    entities: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    kind: str = REFERENCE_KIND

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


def subjects_on_disk(bids_dir: Path) -> list[str]:
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


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
