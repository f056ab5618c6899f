"""Who the group level learns from: the manifest's images with a target, and their cached arrays.

The learning input of an image is its model-resolution template-space derivative
(``space-<template>_res-<r>_desc-preproc_T1w.nii.gz``). Reading .nii.gz every epoch is ~10x
slower than a memory-mapped ``.npy``, so each is cached once as ``.npy`` beside a small JSON
record of what it was made from; a cache entry whose source changed, or whose bytes no longer
match their hash, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from .. import derivatives
from ..bids.audit import sha256_file
from ..errors import InputDataError
from ..kinds import DEFAULT_CHANNELS, MORPHOMETRY_CHANNELS
from ..progress import Progress
from .channels import channel_file, channel_sources, missing_morphometry
from .task import Task

__all__ = ["Cohort", "build_cohort", "cache_cohort", "model_input_path", "target_values", "usable_images"]

LOGGER = logging.getLogger(__name__)



def model_input_path(output_dir: Path, source: str, resolution_mm: float) -> Path:
    """The model-resolution derivative of the BIDS image ``source`` (relative to BIDS_DIR)."""
    return derivatives.named_path(output_dir, source, "preproc_model", model_resolution=resolution_mm)


def target_values(manifest: pd.DataFrame, target: str) -> pd.Series:
    """Per-image target: the sessions.tsv value where there is one, else participants.tsv's.

    >>> m = pd.DataFrame({"age": [70.0, 70.0], "session_age": [70.0, None]})
    >>> target_values(m, "age").tolist()
    [70.0, 70.0]
    """
    candidates = [c for c in (f"session_{target}", target, f"participant_{target}") if c in manifest.columns]
    if not candidates:
        described = sorted(
            {
                c.removeprefix("session_").removeprefix("participant_")
                for c in manifest.columns
                if c not in _MANIFEST_OWN
            }
        )
        raise InputDataError(
            f"--target {target!r} is not a column of participants.tsv or sessions.tsv. "
            f"Columns found: {', '.join(described) or 'none'}. Choose one of them."
        )
    values = manifest[candidates[0]].copy()
    for column in candidates[1:]:
        values = values.where(values.notna(), manifest[column])
    return values


_MANIFEST_OWN = frozenset(
    {
        "participant_id", "session_id", "source", "audit", "readable", "file_sha256", "data_sha256", "shape",
        "voxel_size_mm", "orientation", "obliquity_deg", "datatype", "intensity_p50", "intensity_p99", "nan_count",
        "inf_count", "flags", "manufacturer", "field_strength", "duplicate_of", "in_participants_tsv",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Cohort:
    """The images learning uses (one row each) and those left out, with the reason."""

    table: pd.DataFrame
    excluded: list[dict[str, str]]
    classes: list[str]


def usable_images(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    target: str,
    resolution_mm: float,
    qc: pd.DataFrame | None,
    exclude_qc_outliers: bool,
    include_failed_qc: bool = False,
    inputs: Sequence[str] = DEFAULT_CHANNELS,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Join the target to every image and keep those that can be learned from (with ``target``, ``input`` and,
    with more than one channel, ``channel_inputs`` and ``channel_sources`` columns); the others listed with the
    reason. ``inputs``: the image kinds fed as channels (:mod:`pipeline.learn.channels`).

    Images that failed quality control (``qc_verdict`` fail in ``qc``: a failed registration or brain
    extraction) are left out unless ``include_failed_qc``; the group's outliers and the images quality
    control flagged only with ``exclude_qc_outliers``.
    """
    table = manifest.copy()
    table["target"] = target_values(table, target)
    table["input"] = [model_input_path(output_dir, s, resolution_mm) for s in table["source"]]
    outliers: set[str] = set()
    if qc is not None and "qc_outlier" in qc.columns:
        outliers = set(qc.loc[qc["qc_outlier"].astype(bool), "source"])
    verdicts = qc.set_index("source")["qc_verdict"] if qc is not None and "qc_verdict" in qc else pd.Series()
    # "outliers" on request: the group's outliers and the images quality control flagged
    table["qc_outlier"] = table["source"].isin(outliers | set(verdicts.index[verdicts == "flag"]))
    table["qc_failed"] = table["source"].isin(set(verdicts.index[verdicts == "fail"]))
    excluded: list[dict[str, str]] = []

    def drop(mask: pd.Series, reason: str) -> None:
        nonlocal table
        for source in table.loc[mask, "source"]:
            excluded.append({"source": source, "reason": reason})
        table = table.loc[~mask]

    drop(table["target"].isna(), f"no value for {target}")
    drop(~table["input"].map(Path.exists), "no model-resolution derivative (participant level failed or not run)")
    if not include_failed_qc:
        drop(table["qc_failed"], "failed quality control (registration or brain extraction; --include-failed-qc "
             "keeps it)")  # fmt: skip
    if qc is not None and "qc_rating_reason" in qc.columns:  # people's ratings (--qc-ratings): the rule's verdict
        reasons = table["source"].map(qc.set_index("source")["qc_rating_reason"]).fillna("")
        for reason in sorted(set(reasons) - {""}):
            drop(reasons == reason, reason)
    if tuple(inputs) != DEFAULT_CHANNELS:
        table = _with_channels(table, output_dir, resolution_mm, inputs, include_failed_qc, excluded)
    if exclude_qc_outliers:
        drop(table["qc_outlier"], "QC outlier or flagged by quality control (--exclude-qc-outliers)")
    if table.empty:
        raise InputDataError(
            f"No image can be learned from: {len(excluded)} excluded ({_summary(excluded)}). Run the participant "
            "level first and check that participants.tsv gives the target."
        )
    return table, excluded


def _with_channels(table: pd.DataFrame, output_dir: Path, resolution_mm: float, inputs: Sequence[str],
                   include_failed_qc: bool, excluded: list[dict[str, str]]) -> pd.DataFrame:  # fmt: skip
    """The rows whose T1w has every channel (``channel_sources``, ``channel_inputs``: their model-grid images); the
    others appended to ``excluded`` with the reason."""
    keep, sources, paths = [], [], []
    for source in table["source"]:
        found = channel_sources(output_dir, source, inputs)
        files = [channel_file(output_dir, kind, s, resolution_mm)
                 for kind, s in zip(inputs, found.sources or (), strict=False)]  # fmt: skip
        reason = found.left_out(inputs, include_failed_qc)
        missing = [(kind, f) for kind, f in zip(inputs, files, strict=False) if not f.exists()]
        if not reason and missing:
            kind, path = missing[0]
            reason = missing_morphometry(kind, path) if kind in MORPHOMETRY_CHANNELS else (
                "no model-resolution derivative of every channel (participant level failed or not run)")
        if reason:
            excluded.append({"source": source, "reason": reason})
        keep.append(not reason)
        sources.append(list(found.sources or ()))
        paths.append(files)
    out = table.assign(channel_sources=sources, channel_inputs=paths)
    maps = [kind for kind in inputs if kind in MORPHOMETRY_CHANNELS]
    if maps and not any(keep) and len(table):
        example = channel_file(output_dir, maps[0], table["source"].iloc[0], resolution_mm)
        raise InputDataError(f"--inputs {' '.join(inputs)}: no T1w has its {maps[0]} map on the model grid: "
                             f"{missing_morphometry(maps[0], example)}.")  # fmt: skip
    return out.loc[keep]


def build_cohort(
    manifest: pd.DataFrame, *, task: Task, target: str, positive_class: str | None, **selection: Any
) -> Cohort:
    """The usable images (:func:`usable_images`, ``selection`` its options) with the target encoded by ``task``."""
    table, excluded = usable_images(manifest, target=target, **selection)
    table, classes = task.encode_targets(table, target, positive_class)
    return Cohort(table=table.reset_index(drop=True), excluded=excluded, classes=classes)


def _summary(excluded: list[dict[str, str]]) -> str:
    reasons = pd.Series([e["reason"] for e in excluded]).value_counts()
    return "; ".join(f"{n} {r}" for r, n in reasons.items()) or "none usable"


def cache_array(source: Path, cache_dir: Path) -> tuple[Path, str]:
    """The ``.npy`` cache of ``source`` (float32), rebuilt when missing, stale or corrupt.

    Returns the array path and the sha256 of the source file.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = source.name.removesuffix(".nii.gz")
    array_path = cache_dir / f"{stem}.npy"
    record_path = cache_dir / f"{stem}.json"
    stat = source.stat()
    record: dict[str, Any] = {}
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = {}
    same_file = record.get("source_size") == stat.st_size and record.get("source_mtime_ns") == stat.st_mtime_ns
    source_sha = record.get("source_sha256", "") if same_file else sha256_file(source)
    if record.get("source_sha256") == source_sha and array_path.exists():
        try:
            if sha256_file(array_path) == record.get("array_sha256"):
                return array_path, source_sha
            LOGGER.warning("Cache %s does not match its hash (corrupt?): rebuilding it.", array_path)
        except OSError:
            pass
    elif record:
        LOGGER.info("Cache of %s is stale (the derivative changed): rebuilding it.", source.name)
    data = np.asarray(nib.load(source).dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    if not np.isfinite(data).all():
        raise InputDataError(f"{source} holds NaN or infinite values: re-run the participant level for it.")
    with derivatives.atomic_path(array_path) as tmp:
        np.save(tmp, np.ascontiguousarray(data[None]))  # (1, X, Y, Z): the channel axis
    derivatives.write_json(
        record_path,
        {
            "source": str(source),
            "source_sha256": source_sha,
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "array_sha256": sha256_file(array_path),
            "shape": list(data.shape),
        },
    )
    return array_path, source_sha


def cache_channels(sources: Sequence[Path], cache_dir: Path) -> tuple[Path, str]:
    """The ``(C, X, Y, Z)`` cache of several channels' images (:func:`cache_array` each, then stacked), rebuilt
    when any of them changed; returns its path and a hash of the channels' source hashes."""
    cached = [cache_array(Path(s), cache_dir) for s in sources]
    if len(cached) == 1:
        return cached[0]
    digest = hashlib.sha256("|".join(sha for _, sha in cached).encode()).hexdigest()
    stacked = cache_dir / f"{Path(sources[0]).name.removesuffix('.nii.gz')}_channels-{digest[:16]}.npy"
    if not stacked.exists():
        data = np.concatenate([np.load(path) for path, _ in cached])
        with derivatives.atomic_path(stacked) as tmp:
            np.save(tmp, np.ascontiguousarray(data))
    return stacked, digest


def cache_cohort(table: pd.DataFrame, cache_dir: Path) -> pd.DataFrame:
    """Add ``array`` (cached .npy: one channel, or the ``channel_inputs`` stacked) and ``input_sha256`` columns;
    all arrays must share one shape."""
    arrays, hashes, shapes = [], [], set()
    progress = Progress("cohort images cached", len(table), logger=LOGGER)
    channels = table["channel_inputs"] if "channel_inputs" in table else table["input"].map(lambda p: [p])
    for sources in channels:
        array_path, sha = cache_channels([Path(s) for s in sources], cache_dir)
        arrays.append(array_path)
        hashes.append(sha)
        shapes.add(np.load(array_path, mmap_mode="r").shape)
        progress.advance()
    if len(table) > 100:
        progress.finish()
    if len(shapes) > 1:
        raise InputDataError(
            f"The model-resolution derivatives have different shapes ({sorted(shapes)}): they were made with "
            "different --model-resolution values or bidsdl versions. Re-run the participant level with one setting."
        )
    out = table.copy()
    out["array"] = arrays
    out["input_sha256"] = hashes
    return out
