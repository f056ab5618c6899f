"""The rating gallery (``gallery.html`` in OUTPUT_DIR): one strip per image (its mosaic, its quality metrics, the
quality-control verdict and any rating already given), sortable by any metric, with good/doubtful/bad and a comment
per image and keys that rate and move on (``g``, ``d``, ``b``; ``j``/``k`` to move), so that a person can rate
hundreds of images in a sitting; the ratings download as the TSV ``--qc-ratings`` reads.

The figures are linked, not embedded (500 embedded mosaics would make a page of ~150 MB): the gallery opens from
OUTPUT_DIR, offline, beside the participants' ``figures`` folders.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .. import derivatives
from ..qc import SCREENED_METRICS
from ..ratings import RATINGS, RULE

#: The gallery's file in OUTPUT_DIR.
GALLERY = "gallery.html"


def _value(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def gallery_context(output_dir: Path, qc: pd.DataFrame) -> dict[str, Any]:
    """What ``gallery.html.j2`` draws: the metrics it sorts by and a strip per row of ``qc`` (qc.tsv's table)."""
    metrics = [m for m in SCREENED_METRICS if m in qc.columns]
    strips = []
    for _, row in qc.sort_values("source").iterrows():
        figure = derivatives.named_path(output_dir, row["source"], "fig_mosaic")
        strips.append({
            "participant_id": row["participant_id"],
            "source": row["source"],
            "figure": figure.relative_to(output_dir).as_posix() if figure.exists() else None,
            "verdict": row.get("qc_verdict", "n/a"),
            "rating": row.get("qc_rating", "") or "",
            "raters": row.get("qc_raters", "") or "",
            "metrics": {m: _value(row[m]) for m in metrics},
        })  # fmt: skip
    return {"metrics": metrics, "strips": strips, "ratings": RATINGS, "rule": RULE}
