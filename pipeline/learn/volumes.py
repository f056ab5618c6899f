"""Regional volumes as learning features: each T1w's ``desc-volumes`` table (the participant level's morphometry,
``--registration syn``) as one row of features, with the participant's age and sex when participants.tsv has them.

The field's classic biomarkers (hippocampal and ventricular volumes) are among the atlas's regions; a linear model on
them is the second baseline beside every whole-image study (:func:`pipeline.learn.controls.baseline_study`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import derivatives

#: participants.tsv columns added to the volumes when present (and not the target): numbers as they are, a
#: categorical column (sex) as one indicator per value but the first.
COVARIATES = ("age", "sex")


def read_volumes(path: Path) -> dict[str, float]:
    """region -> volume (ml; NaN where the table says ``n/a``) of one ``desc-volumes`` table.

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> text = "index\\tregion\\tvolume_ml\\n17\\tLeft-Hippocampus\\t4.1\\n53\\tRight\\tn/a\\n"
    >>> _ = (folder / "v.tsv").write_text(text)
    >>> read_volumes(folder / "v.tsv")
    {'Left-Hippocampus': 4.1, 'Right': nan}
    """
    with open(path, newline="") as handle:
        return {row["region"]: float("nan") if row["volume_ml"] in ("n/a", "") else float(row["volume_ml"])
                for row in csv.DictReader(handle, delimiter="\t")}  # fmt: skip


def volume_features(
    output_dir: Path, images: pd.DataFrame, *, target: str, covariates: Sequence[str] = COVARIATES
) -> tuple[np.ndarray, list[str], str] | tuple[None, list[str], str]:
    """One row of features per image of ``images`` (its regional volumes, then the covariates), their names, and
    what they are (for the report); or None, the images without a table and why there are no features."""
    paths = [derivatives.named_path(output_dir, source, "volumes") for source in images["source"]]
    missing = [source for source, path in zip(images["source"], paths, strict=True) if not path.exists()]
    if missing:
        return None, missing, (
            f"{len(missing)} of {len(paths)} T1w have no regional volumes (desc-volumes: the participant level's "
            "morphometry, --registration syn, the default); e.g. " + missing[0]
        )
    tables = [read_volumes(p) for p in paths]
    names = list(dict.fromkeys(name for table in tables for name in table))
    columns = [np.array([table.get(name, np.nan) for table in tables]) for name in names]
    used = []
    for column in covariates:
        if column == target or column not in images.columns:
            continue
        values = images[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() >= max(2, values.notna().sum()):  # a numeric column
            columns.append(numeric.to_numpy(dtype=float))
            names.append(column)
        else:
            levels = sorted(values.dropna().astype(str).unique())
            for level in levels[1:]:
                columns.append(np.where(values.isna(), np.nan, (values.astype(str) == level).astype(float)))
                names.append(f"{column}={level}")
        used.append(column)
    described = (f"the {len(names) - sum(1 for n in names if n.split('=')[0] in used)} regional volumes (ml) of each "
                 "T1w's desc-volumes table (atlas regions, GM, WM, CSF, TIV)"
                 + (f", with {' and '.join(used)} from participants.tsv" if used else "")
                 + "; each fold's gaps filled with its training median, columns standardised on its training rows")
    return np.stack(columns, axis=1), names, described
