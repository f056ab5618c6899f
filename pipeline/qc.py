"""Group-level quality control: gather every image's IQMs into ``qc.tsv`` with robust outlier flags."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import derivatives

#: Metrics screened for outliers (higher or lower than the group by more than ``k`` robust SDs).
SCREENED_METRICS = (
    "snr_wm", "cnr", "cjv", "efc", "fber", "bias_range", "registration_ncc", "mask_dice", "wm_dice", "brain_volume_ml",
)  # fmt: skip
MAD_TO_SD = 1.4826
#: Least spread used, as a share of the median: differences of a few percent are never outliers,
#: however alike the rest of the group is.
MIN_RELATIVE_SPREAD = 0.02
#: Fewest images a metric needs before any is called an outlier: the median and MAD of fewer are
#: too unstable (with 3 images, one is "beyond 3 robust SDs" by chance alone).
MIN_IMAGES_FOR_OUTLIERS = 5


def iqm_table(records: Sequence[dict]) -> pd.DataFrame:
    rows = []
    for record in records:
        parts = Path(record["source"]).parts
        rows.append({
            "participant_id": parts[0],
            "session_id": parts[1] if len(parts) > 2 and parts[1].startswith("ses-") else "",
            "source": record["source"],
            **record["metrics"],
            "qc_verdict": (record.get("qc") or {}).get("verdict", "n/a"),
            "flags": ",".join(record.get("flags", [])),
        })  # fmt: skip
    return pd.DataFrame(rows)


def robust_outliers(table: pd.DataFrame, metrics: Sequence[str] = SCREENED_METRICS, k: float = 3.0) -> pd.DataFrame:
    """Add ``<metric>_outlier`` and ``qc_outlier``: beyond ``k`` robust SDs of the median.

    The robust SD is 1.4826 x MAD, but at least 2% of the median's magnitude (:func:`robust_z`); a metric
    measured on fewer than :data:`MIN_IMAGES_FOR_OUTLIERS` images flags none.

    >>> t = robust_outliers(pd.DataFrame({"cnr": [1.0, 1.1, 0.9, 1.0, 5.0]}), ["cnr"])
    >>> t["cnr_outlier"].tolist()
    [False, False, False, False, True]
    >>> robust_outliers(pd.DataFrame({"v": [100.0, 100.0, 100.0, 100.0, 103.0]}), ["v"])["v_outlier"].tolist()
    [False, False, False, False, False]
    >>> robust_outliers(pd.DataFrame({"cnr": [1.0, 1.1, 5.0]}), ["cnr"])["cnr_outlier"].tolist()
    [False, False, False]
    """
    table = table.copy()
    outlier_columns = []
    for metric in metrics:
        if metric not in table.columns:
            continue
        z = robust_z(table[metric])
        column = f"{metric}_outlier"
        enough = int(np.isfinite(z).sum()) >= MIN_IMAGES_FOR_OUTLIERS
        table[column] = np.abs(np.nan_to_num(z)) > k if enough else False
        outlier_columns.append(column)
    table["qc_outlier"] = table[outlier_columns].any(axis=1) if outlier_columns else False
    return table


def robust_z(values: Sequence[float] | pd.Series) -> np.ndarray:
    """(x - median) / robust SD, the robust SD being max(1.4826 x MAD, 2% of |median|) (NaN where x is missing;
    0 when the spread is 0). What the outlier rule thresholds and the report's strip plot shows.

    >>> robust_z([10.0, 11.0, 9.0, 10.0, 30.0]).round(2).tolist()
    [0.0, 0.67, -0.67, 0.0, 13.49]
    """
    numbers = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    median = np.nanmedian(numbers) if np.isfinite(numbers).any() else np.nan
    spread = (
        max(MAD_TO_SD * np.nanmedian(np.abs(numbers - median)), MIN_RELATIVE_SPREAD * abs(median))
        if np.isfinite(median)
        else 0.0
    )
    return (numbers - median) / spread if spread > 0 else np.where(np.isfinite(numbers), 0.0, np.nan)


def percentile_of(values: pd.Series, value: float) -> float | None:
    """Share (0-100) of the group at or below ``value``."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    if numbers.empty or value is None or not np.isfinite(value):
        return None
    return float((numbers <= value).mean() * 100)


def load_qc(output_dir: Path) -> pd.DataFrame | None:
    path = derivatives.group_path(output_dir, "qc")
    return pd.read_csv(path, sep="\t") if path.exists() else None


def make_qc_table(records: Sequence[dict]) -> pd.DataFrame:
    """``qc.tsv``'s table: one row per IQM record, with the robust outlier flags (empty without records)."""
    return robust_outliers(iqm_table(records)) if records else pd.DataFrame()
