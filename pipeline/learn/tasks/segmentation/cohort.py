"""The segmentation cohort: the images with reference labels, brought onto the grid and cached."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .... import derivatives
from ....bids.audit import load_spatial, sha256_file
from ....derivatives import source_suffix
from ....errors import InputDataError, UsageError
from ....kinds import DEFAULT_CHANNELS, MORPHOMETRY_CHANNELS, REFERENCE_KIND
from ...channels import channel_sources
from ...labels import LabelTable, check_labels_dataset, find_label, find_table, load_label
from .grid import image_on_grid, labels_on_grid, model_grid, read_transform

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class References:
    """The reference labels: a BIDS derivatives folder (``--labels``) and their ``desc-`` (``--label-desc``)."""

    folder: Path
    desc: str


@dataclass(frozen=True)
class LabelledCohort:
    table: pd.DataFrame
    excluded: list[dict[str, str]]
    label_table: LabelTable


def build_cohort(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    bids_dir: Path,
    references: References,
    resolution_mm: float,
    cache_dir: Path,
    qc: pd.DataFrame | None,
    exclude_qc_outliers: bool,
    include_failed_qc: bool,
    inputs: Sequence[str] = DEFAULT_CHANNELS,
) -> LabelledCohort:
    """The images with reference labels, each brought onto the segmentation grid and cached as ``.npy``; with
    several ``inputs`` (image kinds, in order), the T1w's and its aligned images' arrays stacked as channels."""
    _refuse_maps(inputs)
    labels_dir, label_desc = references.folder, references.desc
    check_labels_dataset(labels_dir)
    table = find_table(labels_dir, label_desc)
    verdicts = qc.set_index("source")["qc_verdict"] if qc is not None and "qc_verdict" in qc else pd.Series()
    outliers = set(qc.loc[qc["qc_outlier"].astype(bool), "source"]) if qc is not None and "qc_outlier" in qc else set()
    if exclude_qc_outliers:  # "outliers" on request: the group's outliers and the images quality control flagged
        outliers |= set(verdicts.index[verdicts == "flag"])
    failed = set() if include_failed_qc else set(verdicts.index[verdicts == "fail"])
    grid, shape = model_grid(resolution_mm)
    rows, excluded = [], []
    problems = []
    for _, image in manifest.iterrows():
        source = image["source"]
        label = find_label(labels_dir, source, label_desc)
        xfm = derivatives.named_path(output_dir, source, "xfm")
        channels = channel_sources(output_dir, source, inputs)
        images = _channel_images(output_dir, channels.sources or (source,))
        reason = _left_out(source, label, (xfm, *[p for pair in images for p in pair]), failed=failed,
                           outliers=outliers if exclude_qc_outliers else set(), where=f"desc-{label_desc}_dseg or "
                           f"_mask in {labels_dir}") or channels.left_out(inputs, include_failed_qc)  # fmt: skip
        if reason:
            excluded.append({"source": source, "reason": reason})
            continue
        assert label is not None
        try:
            array, labels, sha = _cache(cache_dir, bids_dir / source, label, images, xfm, table, grid, shape,
                                        resolution_mm)  # fmt: skip
        except InputDataError as exc:
            problems.append(str(exc))
            excluded.append({"source": source, "reason": str(exc)})
            continue
        rows.append({**image.to_dict(), "target": label_desc, "y": 1.0, "array": array, "label_array": labels,
                     "input_sha256": sha, "label_file": str(label), "label_names": json.dumps(table.names),
                     "grid_mm": resolution_mm})  # fmt: skip
    for problem in problems:
        LOGGER.error("%s", problem)
    if not rows:
        reasons = "; ".join(sorted({e["reason"] for e in excluded})) or "no images"
        raise InputDataError(
            f"No image can be learned from for segmentation: {len(excluded)} left out ({reasons}). Run the "
            f"participant level first and check --labels {labels_dir} --label-desc {label_desc}."
        )
    out = pd.DataFrame(rows)
    return LabelledCohort(out.reset_index(drop=True), excluded, table)


def _refuse_maps(inputs: Sequence[str]) -> None:
    maps = [kind for kind in inputs if kind in MORPHOMETRY_CHANNELS]
    if maps:
        raise UsageError(
            f"--inputs {' '.join(inputs)}: {', '.join(maps)} are model-grid maps of whole-image studies "
            "(classification, regression); a segmentation learns from images on their own grid. Name image kinds only "
            "(e.g. T1w FLAIR)."
        )


def _channel_images(output_dir: Path, sources: Sequence[str]) -> list[tuple[Path, Path]]:
    """Each channel's bias-corrected image on its T1w's grid and its template-space image (whose sidecar holds the
    channel's normalisation): the T1w's own (``preproc``), an aligned image's ``preproc_reference``."""
    pairs = []
    for source in sources:
        on_t1w_grid = "preproc" if source_suffix(source) == REFERENCE_KIND else "preproc_reference"
        pairs.append((derivatives.named_path(output_dir, source, on_t1w_grid),
                      derivatives.named_path(output_dir, source, "preproc_template")))  # fmt: skip
    return pairs


def _left_out(
    source: str, label: Path | None, inputs: Sequence[Path], *, failed: set[str], outliers: set[str], where: str
) -> str | None:
    """Why an image is not learned from (None: it is)."""
    if label is None:
        return f"no reference labels ({where})"
    if not all(path.exists() for path in inputs):
        return "no preprocessed image (participant level failed or not run)"
    if source in failed:
        return "failed quality control (registration or brain extraction; --include-failed-qc keeps it)"
    if source in outliers:
        return "QC outlier or flagged by quality control (--exclude-qc-outliers)"
    return None


def _cache(
    cache_dir: Path,
    t1w: Path,
    label: Path,
    images: Sequence[tuple[Path, Path]],
    xfm: Path,
    table: LabelTable,
    grid: np.ndarray,
    shape: Sequence[int],
    resolution_mm: float,
) -> tuple[Path, Path, str]:
    """The image (one channel per entry of ``images``) and label arrays of one case on the grid, rebuilt when any
    input changed."""
    key_parts = [sha256_file(p) for p in (*[image for image, _ in images], xfm, label)]
    key_parts += [f"{resolution_mm:g}", json.dumps(table.names)]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "segmentation"
    folder.mkdir(parents=True, exist_ok=True)
    stem = images[0][0].name.removesuffix(".nii.gz")
    array_path, label_path = folder / f"{stem}_{key}.npy", folder / f"{stem}_{key}_dseg.npy"
    channel_hashes = key_parts[: len(images)]
    input_sha = channel_hashes[0] if len(images) == 1 else hashlib.sha256("|".join(channel_hashes).encode()).hexdigest()
    if array_path.exists() and label_path.exists():
        return array_path, label_path, input_sha
    labels = load_label(label, t1w, table)
    t1w_img = nib.load(t1w)
    transform = read_transform(xfm)
    channels = []
    for image, template in images:
        normalisation = json.loads(derivatives.sidecar_of(template).read_text())["IntensityNormalization"]
        channels.append(image_on_grid(load_spatial(image), transform, grid, shape, normalisation))
    on_grid = labels_on_grid(labels, t1w_img.affine, transform, grid, shape)  # type: ignore[attr-defined]
    if not (set(np.unique(on_grid).tolist()) - {0}):
        raise InputDataError(
            f"The labels {label} fall outside the brain grid once registered: check the registration in the "
            "participant's report."
        )
    with derivatives.atomic_path(array_path) as tmp:
        np.save(tmp, np.stack(channels))
    with derivatives.atomic_path(label_path) as tmp:
        np.save(tmp, on_grid)
    return array_path, label_path, input_sha
