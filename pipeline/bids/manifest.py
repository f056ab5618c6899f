"""The group-level manifest: one row per audited image, labels joined, dataset problems flagged."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..derivatives import DERIVATIVES
from ..kinds import REFERENCE_KIND

#: Manifest columns and their descriptions (written as the manifest's JSON sidecar).
COLUMNS: dict[str, str] = {
    "participant_id": "Participant (sub-<label>)",
    "session_id": "Session (ses-<label>), empty without sessions",
    "source": "T1w path relative to BIDS_DIR",
    "audit": "Audit record relative to OUTPUT_DIR",
    "readable": "Whether the image could be read",
    "file_sha256": "sha256 of the file",
    "data_sha256": "sha256 of the voxel values (format-independent)",
    "shape": "Array shape",
    "voxel_size_mm": "Voxel size (mm)",
    "orientation": "Axis codes of the voxel axes (e.g. RAS, LIA)",
    "obliquity_deg": "Largest angle between a voxel axis and a world axis",
    "datatype": "Stored data type",
    "intensity_p50": "Median intensity",
    "intensity_p99": "99th percentile intensity",
    "nan_count": "NaN voxels",
    "inf_count": "Infinite voxels",
    "flags": "Audit flags, comma-separated",
    "manufacturer": "Manufacturer (sidecar)",
    "field_strength": "MagneticFieldStrength (sidecar), tesla",
    "duplicate_of": "Other participants whose image has identical voxel data",
    "in_participants_tsv": "Whether participants.tsv has a row for the participant",
}


def find_records(output_dir: Path, kind: str, subjects: Iterable[str] | None = None) -> list[Path]:
    """The per-image records of ``kind`` (a name of :data:`~pipeline.derivatives.DERIVATIVES`) of every participant's
    reference images (T1w: the rows of the manifest and of learning; a co-registered image belongs to its T1w), or
    of ``subjects``: ``sub-<label>/[ses-<label>/]anat/`` only, not every folder of every participant."""
    output_dir = Path(output_dir)
    names = DERIVATIVES[kind].patterns_of((REFERENCE_KIND,))
    wanted = {f"sub-{s}" for s in subjects} if subjects else None
    found: list[Path] = []
    for participant in os.scandir(output_dir):
        if not participant.name.startswith("sub-") or not participant.is_dir():
            continue
        if wanted is not None and participant.name not in wanted:
            continue
        folders = [Path(participant.path) / "anat"]
        folders += [Path(e.path) / "anat" for e in os.scandir(participant.path) if e.name.startswith("ses-")]
        for folder in folders:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                found += [Path(e.path) for e in os.scandir(folder)
                          if any(fnmatch.fnmatchcase(e.name, name) for name in names)]  # fmt: skip
    return sorted(found)


def find_audits(output_dir: Path, subjects: Iterable[str] | None = None) -> list[Path]:
    return find_records(output_dir, "audit", subjects)


def _row(record: dict[str, Any], audit_rel: str) -> dict[str, Any]:
    parts = Path(record["source"]).parts
    header = record.get("header", {})
    intensity = record.get("intensity", {})
    metadata = record.get("metadata", {})
    percentiles = intensity.get("percentiles", {})
    return {
        "participant_id": parts[0],
        "session_id": parts[1] if len(parts) > 1 and parts[1].startswith("ses-") else "",
        "source": record["source"],
        "audit": audit_rel,
        "readable": record["readable"],
        "file_sha256": record.get("file", {}).get("sha256", ""),
        "data_sha256": intensity.get("data_sha256", ""),
        "shape": "x".join(map(str, header.get("shape", []))),
        "voxel_size_mm": "x".join(f"{z:g}" for z in header.get("voxel_size_mm", [])),
        "orientation": header.get("orientation", ""),
        "obliquity_deg": header.get("obliquity_deg"),
        "datatype": header.get("datatype", ""),
        "intensity_p50": percentiles.get("p50"),
        "intensity_p99": percentiles.get("p99"),
        "nan_count": intensity.get("nan_count"),
        "inf_count": intensity.get("inf_count"),
        "flags": ",".join(record.get("flags", [])),
        "manufacturer": metadata.get("Manufacturer", ""),
        "field_strength": metadata.get("MagneticFieldStrength"),
    }


def duplicate_groups(rows: pd.DataFrame) -> list[list[str]]:
    """Groups of participants whose images share a voxel-data hash.

    >>> df = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"], "data_sha256": ["a", "a", "b"]})
    >>> duplicate_groups(df)
    [['sub-1', 'sub-2']]
    """
    groups = []
    hashed = rows[rows["data_sha256"].astype(bool)]
    hashed = hashed[hashed.duplicated("data_sha256", keep=False)]  # only hashes seen twice can be duplicates
    for _, group in hashed.groupby("data_sha256", sort=True):
        subjects = sorted(set(group["participant_id"]))
        if len(subjects) > 1:
            groups.append(subjects)
    return groups


def build_manifest(
    audits: Sequence[tuple[dict[str, Any], str]],
    *,
    participants: pd.DataFrame | None,
    sessions: dict[str, pd.DataFrame] | None = None,
    subjects_on_disk: Sequence[str] = (),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest table and the dataset findings.

    ``audits`` are (record, path relative to OUTPUT_DIR) pairs. participants.tsv columns are
    joined by participant; sessions.tsv columns are joined by session with a ``session_`` prefix.
    Findings: duplicate images under different participant IDs, participants without images,
    images without a participants.tsv row, unreadable and flagged images.
    """
    table = pd.DataFrame([_row(rec, rel) for rec, rel in audits], columns=list(COLUMNS)[:-2])
    table = table.sort_values(["participant_id", "session_id", "source"], ignore_index=True)
    groups = duplicate_groups(table)
    shared = table[table["data_sha256"].astype(bool) & table.duplicated("data_sha256", keep=False)]
    owners = shared.groupby("data_sha256")["participant_id"].agg(set)
    table["duplicate_of"] = [
        ",".join(sorted(owners.get(h, set()) - {pid})) if h else ""
        for pid, h in zip(table["participant_id"], table["data_sha256"], strict=True)
    ]
    for column in ("nan_count", "inf_count"):
        table[column] = table[column].astype("Int64")
    listed = set(participants["participant_id"]) if participants is not None else set()
    table["in_participants_tsv"] = table["participant_id"].isin(listed)
    if participants is not None:
        extra = participants.drop_duplicates("participant_id")
        extra = extra.rename(
            columns={c: f"participant_{c}" for c in extra.columns if c in table.columns and c != "participant_id"}
        )
        table = table.merge(extra, on="participant_id", how="left")
    per_session = [t.assign(participant_id=subject) for subject, t in (sessions or {}).items()
                   if "session_id" in t.columns]  # fmt: skip
    if per_session:  # one join, not a lookup per row (ten thousand sessions.tsv files)
        joined = pd.concat(per_session, ignore_index=True)
        joined = joined.drop_duplicates(["participant_id", "session_id"], keep="last")
        joined = joined.rename(columns={c: f"session_{c}" for c in joined.columns
                                        if c not in ("participant_id", "session_id")})  # fmt: skip
        table = table.merge(joined, on=["participant_id", "session_id"], how="left")
    with_images = set(table["participant_id"])
    findings = {
        "n_images": len(table),
        "n_participants": len(with_images),
        "duplicates": groups,
        "participants_without_images": sorted(({f"sub-{s}" for s in subjects_on_disk} | listed) - with_images),
        "images_without_participants_row": sorted(table.loc[~table["in_participants_tsv"], "source"].tolist())
        if participants is not None
        else [],
        "unreadable_images": sorted(table.loc[~table["readable"].astype(bool), "source"].tolist()),
        "flagged_images": {src: flags for src, flags in zip(table["source"], table["flags"], strict=True) if flags},
    }
    return table, findings


def manifest_sidecar(table: pd.DataFrame, participants_json: dict[str, Any] | None) -> dict[str, Any]:
    sidecar: dict[str, Any] = {c: {"Description": d} for c, d in COLUMNS.items() if c in table.columns}
    for column in table.columns:
        if column not in sidecar:
            base = column.removeprefix("session_").removeprefix("participant_")
            described = (participants_json or {}).get(base)
            sidecar[column] = described if isinstance(described, dict) else {"Description": f"From {_table_of(column)}"}
    return sidecar


def _table_of(column: str) -> str:
    return "sessions.tsv" if column.startswith("session_") else "participants.tsv"


def load_audit(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
