"""Reference labels for segmentation: a BIDS derivatives dataset of label images in each T1w's own grid.

``--labels DIR --label-desc NAME``: for a T1w ``sub-01/anat/sub-01_T1w.nii.gz`` of BIDS_DIR, its labels are
``DIR/sub-01/anat/sub-01_desc-NAME_dseg.nii.gz`` (integer indices) or ``..._desc-NAME_mask.nii.gz`` (a binary
mask: one foreground class), with the names of the indices in the BIDS lookup table ``desc-NAME_dseg.tsv``
(columns ``index`` and ``name``) beside the image or at DIR's root. Nothing is ever written into DIR.

Torch-free: the command line, the group level and the sample generator import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..derivatives import derivative_path, write_json, write_text
from ..errors import InputDataError, UsageError

#: Largest difference (mm) between a label image's affine and its T1w's that still counts as the same grid.
GRID_TOLERANCE_MM = 1e-3


def label_path(labels_dir: Path, source: Path | str, desc: str, suffix: str = "dseg") -> Path:
    """Where the labels of the BIDS T1w ``source`` (relative to BIDS_DIR) lie in ``labels_dir``.

    >>> label_path(Path("L"), "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz", "aseg").as_posix()
    'L/sub-01/ses-1/anat/sub-01_ses-1_run-2_desc-aseg_dseg.nii.gz'
    """
    return derivative_path(Path(labels_dir), source, suffix=suffix, extension=".nii.gz", desc=desc)


def table_name(desc: str) -> str:
    return f"desc-{desc}_dseg.tsv"


def write_labels_dataset(
    labels_dir: Path, desc: str, names: dict[int, str], *, generated_by: str, version: str
) -> None:
    """The dataset files of a labels derivatives dataset: its description and the lookup table at the root."""
    write_json(
        labels_dir / "dataset_description.json",
        {
            "Name": f"Reference labels ({desc})",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": generated_by, "Version": version}],
        },
    )
    rows = "".join(f"{index}\t{name}\n" for index, name in sorted(names.items()))
    write_text(labels_dir / table_name(desc), "index\tname\n" + rows)


def check_labels_dataset(labels_dir: Path) -> None:
    """``labels_dir`` must be a BIDS derivatives dataset (read only: nothing is written into it)."""
    description = Path(labels_dir) / "dataset_description.json"
    if not Path(labels_dir).is_dir():
        raise UsageError(f"--labels {labels_dir} is not a folder. Give the BIDS derivatives dataset of the labels.")
    try:
        kind = json.loads(description.read_text()).get("DatasetType")
    except (OSError, ValueError) as exc:
        raise InputDataError(
            f"--labels {labels_dir} is not a BIDS derivatives dataset: {description} is missing or not JSON "
            f'({exc.__class__.__name__}). Add a dataset_description.json with "DatasetType": "derivative".'
        ) from exc
    if kind != "derivative":
        raise InputDataError(
            f"--labels {labels_dir}: its dataset_description.json says DatasetType {kind!r}, not 'derivative'. "
            "Labels are derivatives of the raw images: give (or make) a derivatives dataset holding them."
        )


@dataclass(frozen=True)
class LabelTable:
    """Index -> structure name (index 0, the background, is not listed)."""

    names: dict[int, str]
    path: Path | None

    @property
    def structures(self) -> list[str]:
        return [self.names[i] for i in sorted(self.names)]

    def to_records(self) -> list[dict[str, object]]:
        return [{"index": i, "name": n} for i, n in sorted(self.names.items())]


def read_table(path: Path) -> LabelTable:
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as exc:
        raise InputDataError(
            f"The lookup table {path} cannot be read ({exc}). It needs columns index and name."
        ) from exc
    if not {"index", "name"} <= set(table.columns):
        raise InputDataError(
            f"The lookup table {path} has columns {', '.join(map(str, table.columns))}; BIDS needs 'index' and 'name'."
        )
    names = {int(i): str(n) for i, n in zip(table["index"], table["name"], strict=True) if int(i) != 0}
    if not names:
        raise InputDataError(f"The lookup table {path} names no structure (only the background, or nothing).")
    return LabelTable(names, path)


def find_table(labels_dir: Path, desc: str, near: Path | None = None) -> LabelTable:
    """The lookup table of ``desc``: beside ``near`` (a label image) first, then at the dataset's root."""
    candidates = []
    if near is not None:
        stem = near.name.removesuffix(".nii.gz").removesuffix(".nii")
        candidates.append(near.with_name(stem + ".tsv"))
    candidates.append(Path(labels_dir) / table_name(desc))
    for path in candidates:
        if path.exists():
            return read_table(path)
    raise InputDataError(
        f"No lookup table for --label-desc {desc}: looked for {' and '.join(str(c) for c in candidates)}. Add "
        f"{table_name(desc)} (columns index and name) at the root of {labels_dir}."
    )


def find_label(labels_dir: Path, source: str, desc: str) -> Path | None:
    """The label image of ``source``: a ``dseg``, else a binary ``mask``; None when there is none."""
    for suffix in ("dseg", "mask"):
        path = label_path(labels_dir, source, desc, suffix)
        if path.exists():
            return path
    return None


def load_label(path: Path, t1w: Path, table: LabelTable) -> np.ndarray:
    """The label array of ``path`` (uint8), checked against its T1w's grid and the lookup table."""
    img = nib.load(path)
    ref = nib.load(t1w)
    shape, ref_shape = tuple(img.shape[:3]), tuple(ref.shape[:3])  # type: ignore[attr-defined]
    if shape != ref_shape or not np.allclose(img.affine, ref.affine, atol=GRID_TOLERANCE_MM):  # type: ignore[attr-defined]
        raise InputDataError(
            f"The labels {path} are not on the grid of their T1w {t1w}: shape {shape} vs {ref_shape}, affine "
            f"{np.round(img.affine, 3).tolist()} vs {np.round(ref.affine, 3).tolist()}. Labels must be in the "  # type: ignore[attr-defined]
            "T1w's own voxel grid: resample them onto it (nearest neighbour), or fix the header."
        )
    data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]
    if not np.all(np.isfinite(data)) or not np.all(np.equal(np.mod(data, 1), 0)):
        raise InputDataError(f"The labels {path} hold non-integer values: a label image holds structure indices.")
    data = data.astype(np.int64)
    if path.name.endswith("_mask.nii.gz"):
        data = (data > 0).astype(np.int64)
    indices = set(np.unique(data).tolist()) - {0}
    unknown = sorted(indices - set(table.names))
    if unknown:
        raise InputDataError(
            f"The labels {path} hold indices {unknown} that the lookup table {table.path} does not name. Add them "
            "to the table, or fix the label image."
        )
    if not indices:
        raise InputDataError(f"The labels {path} are empty (all background). Remove the file, or fix it.")
    return data.astype(np.uint8)
