"""Segmentation scores per case and structure (Dice, HD95, volumes) and their summary with bootstrap CIs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from .... import derivatives
from ... import evaluate

LOGGER = logging.getLogger(__name__)


#: Percentile of the surface distances reported as the Hausdorff distance.
HAUSDORFF_PERCENTILE = 95


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], percentile: float) -> float:
    """The larger of the two directed ``percentile`` surface distances (mm), as MONAI computes it."""
    if not pred.any() or not ref.any():
        return float("nan")
    sp, sr = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(to_ref[sp], percentile), np.percentile(to_pred[sr], percentile)))


def _crop(*masks: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    union = np.zeros(masks[0].shape, dtype=bool)
    for m in masks:
        union |= m
    idx = np.argwhere(union)
    if not len(idx):
        return tuple(slice(0, 0) for _ in masks[0].shape)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, masks[0].shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def structure_scores(
    pred: np.ndarray, ref: np.ndarray, names: dict[int, str], spacing: Sequence[float]
) -> list[dict[str, Any]]:
    """Per structure: Dice, HD95 (mm), reference and predicted volume (ml) and their difference.

    >>> ref = np.zeros((8, 8, 8), np.uint8); ref[2:6, 2:6, 2:6] = 1
    >>> [round(s["dice"], 3) for s in structure_scores(ref, ref, {1: "a"}, (1, 1, 1))]
    [1.0]
    """
    voxel_ml = float(np.prod(spacing)) / 1000
    out = []
    for index, name in sorted(names.items()):
        p, r = pred == index, ref == index
        box = _crop(p, r)
        p, r = p[box], r[box]
        n_p, n_r = int(p.sum()), int(r.sum())
        dice = 2 * int((p & r).sum()) / (n_p + n_r) if n_p + n_r else float("nan")
        out.append(
            {
                "structure": name,
                "dice": float(dice),
                "hd95_mm": hausdorff(p, r, spacing, HAUSDORFF_PERCENTILE) if n_p + n_r else float("nan"),
                "volume_ref_ml": n_r * voxel_ml,
                "volume_pred_ml": n_p * voxel_ml,
                "volume_difference_ml": (n_p - n_r) * voxel_ml,
            }
        )
    return out


def dice_scores(pred: np.ndarray, ref: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Dice per index (NaN where both are empty)."""
    out = []
    for index in indices:
        p, r = pred == index, ref == index
        total = int(p.sum()) + int(r.sum())
        out.append(2 * int((p & r).sum()) / total if total else np.nan)
    return np.asarray(out, dtype=float)


def finite_mean(values: np.ndarray) -> float:
    """The mean of the finite values (NaN when there are none: e.g. HD95 of a structure never predicted)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if len(finite) else float("nan")


def summarise_cases(cases: pd.DataFrame, *, seed: int, ci: bool) -> dict[str, Any]:
    """Mean (and SD, bootstrap CI over participants) of the case-wise scores, overall and per structure."""
    per_case = cases.groupby("source", sort=False).agg(
        participant_id=("participant_id", "first"),
        dice=("dice", "mean"),
        hd95_mm=("hd95_mm", "mean"),
        abs_volume_difference_ml=("volume_difference_ml", lambda v: float(np.mean(np.abs(v)))),
    )
    structures = list(dict.fromkeys(cases["structure"]))
    wide = {s: cases[cases["structure"] == s].set_index("source").reindex(per_case.index) for s in structures}

    def compute(idx: np.ndarray) -> dict[str, float]:
        out = {
            "dice": finite_mean(per_case["dice"].to_numpy()[idx]),
            "hd95_mm": finite_mean(per_case["hd95_mm"].to_numpy()[idx]),
            "abs_volume_difference_ml": finite_mean(per_case["abs_volume_difference_ml"].to_numpy()[idx]),
        }
        for s in structures:
            key = derivatives.bids_label(s)
            out[f"dice_{key}"] = finite_mean(wide[s]["dice"].to_numpy()[idx])
            out[f"hd95_{key}"] = finite_mean(wide[s]["hd95_mm"].to_numpy()[idx])
            out[f"voldiff_{key}"] = finite_mean(wide[s]["volume_difference_ml"].to_numpy()[idx])
        return out

    everything = np.arange(len(per_case))
    result: dict[str, Any] = {
        "n": len(per_case),
        "n_subjects": int(per_case["participant_id"].nunique()),
        "metrics": compute(everything),
        "sd": {
            "dice": float(per_case["dice"].std(ddof=1)) if len(per_case) > 1 else float("nan"),
            "hd95_mm": float(per_case["hd95_mm"].std(ddof=1)) if len(per_case) > 1 else float("nan"),
        },
        "structures": structures,
    }
    if ci:
        result["ci"] = evaluate.bootstrap_ci(compute, per_case["participant_id"].tolist(), seed=seed)
    return result
