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


#: The scores of a case (or a structure) empty in the reference and in the prediction: perfect, as the challenges'
#: code scores it.
BOTH_EMPTY = {"lesion_recall": 1.0, "lesion_precision": 1.0, "lesion_f1": 1.0, "avd_percent": 0.0}


def lesion_scores(pred: np.ndarray, ref: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Lesion-wise scores as the WMH segmentation challenge reports them (Kuijf et al. 2019): a lesion is a
    26-connected component; recall: the reference lesions that a predicted voxel touches, over the reference
    lesions; precision: the predicted lesions that touch a reference voxel, over the predicted ones; F1 their
    harmonic mean; the absolute volume difference in % of the reference volume; the lesion counts.

    A case with no lesion in the reference nor in the prediction scores as a perfect one, as the lesion
    challenges' code scores it (Shifts' lesion F1; MONAI's and BraTS' Dice with empty cases kept): recall,
    precision and F1 1, volume difference 0 (:data:`BOTH_EMPTY`). When only one is empty, F1 is 0, the ratio with
    nothing to count is undefined (NaN: recall without reference lesions, precision without predicted ones, the
    volume difference against a zero reference volume) and the other 0.

    >>> ref = np.zeros((12, 12, 12), bool); ref[1:3, 1:3, 1:3] = True; ref[8:10, 8:10, 8:10] = True
    >>> pred = np.zeros_like(ref); pred[1:3, 1:3, 1:3] = True; pred[5, 5, 5] = True
    >>> s = lesion_scores(pred, ref, 0.001); s["lesion_recall"], s["lesion_precision"], s["lesion_f1"]
    (0.5, 0.5, 0.5)
    >>> s["n_lesions_ref"], s["n_lesions_pred"], round(s["avd_percent"], 2)
    (2, 2, 43.75)
    >>> empty = lesion_scores(np.zeros_like(ref), np.zeros_like(ref), 0.001)
    >>> empty["lesion_recall"], empty["lesion_precision"], empty["lesion_f1"], empty["avd_percent"]
    (1.0, 1.0, 1.0, 0.0)
    >>> missed = lesion_scores(np.zeros_like(ref), ref, 0.001); missed["lesion_recall"], missed["lesion_f1"]
    (0.0, 0.0)
    """
    connectivity = np.ones((3, 3, 3))
    ref_components, n_ref = ndimage.label(ref, structure=connectivity)
    pred_components, n_pred = ndimage.label(pred, structure=connectivity)
    found = len(set(np.unique(ref_components[pred]).tolist()) - {0})
    true_pred = len(set(np.unique(pred_components[ref]).tolist()) - {0})
    volume_ref, volume_pred = float(ref.sum()) * voxel_ml, float(pred.sum()) * voxel_ml
    if not n_ref and not n_pred:
        return {**BOTH_EMPTY, "n_lesions_ref": 0, "n_lesions_pred": 0}
    recall = found / n_ref if n_ref else float("nan")
    precision = true_pred / n_pred if n_pred else float("nan")
    f1 = 2 * recall * precision / (recall + precision) if n_ref and n_pred and recall + precision else 0.0
    return {
        "lesion_recall": recall, "lesion_precision": precision, "lesion_f1": float(f1),
        "avd_percent": abs(volume_pred - volume_ref) / volume_ref * 100 if volume_ref else float("nan"),
        "n_lesions_ref": int(n_ref), "n_lesions_pred": int(n_pred),
    }  # fmt: skip


def structure_scores(
    pred: np.ndarray, ref: np.ndarray, names: dict[int, str], spacing: Sequence[float]
) -> list[dict[str, Any]]:
    """Per structure: Dice, HD95 (mm), reference and predicted volume (ml) and their difference; with one
    structure (lesions), the lesion-wise scores too (:func:`lesion_scores`). A structure absent from both the
    reference and the prediction scores Dice 1 and HD95 0 (BraTS' rule; MONAI's Dice with ``ignore_empty=False``);
    absent from one only, Dice 0 and HD95 undefined (NaN, left out of means).

    >>> ref = np.zeros((8, 8, 8), np.uint8); ref[2:6, 2:6, 2:6] = 1
    >>> [round(s["dice"], 3) for s in structure_scores(ref, ref, {1: "a"}, (1, 1, 1))]
    [1.0]
    >>> [(s["dice"], s["hd95_mm"]) for s in structure_scores(ref, ref, {2: "absent"}, (1, 1, 1))]
    [(1.0, 0.0)]
    """
    voxel_ml = float(np.prod(spacing)) / 1000
    out = []
    for index, name in sorted(names.items()):
        p, r = pred == index, ref == index
        lesions = lesion_scores(p, r, voxel_ml) if len(names) == 1 else {}
        box = _crop(p, r)
        p, r = p[box], r[box]
        n_p, n_r = int(p.sum()), int(r.sum())
        dice = 2 * int((p & r).sum()) / (n_p + n_r) if n_p + n_r else 1.0
        out.append(
            {
                "structure": name,
                "dice": float(dice),
                "hd95_mm": hausdorff(p, r, spacing, HAUSDORFF_PERCENTILE) if n_p + n_r else 0.0,
                "volume_ref_ml": n_r * voxel_ml,
                "volume_pred_ml": n_p * voxel_ml,
                "volume_difference_ml": (n_p - n_r) * voxel_ml,
                **lesions,
            }
        )
    return out


def dice_scores(pred: np.ndarray, ref: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Dice per index, NaN where both are empty: what training's choices (the best epoch, the post-processing) average
    with ``nanmean``, so that an empty case neither helps nor hurts them; the reported case scores
    (:func:`structure_scores`) count it as perfect, as the challenges do."""
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


#: The lesion-wise case scores (:func:`lesion_scores`) that a one-structure evaluation summarises.
LESION_METRICS = ("lesion_recall", "lesion_precision", "lesion_f1", "avd_percent")


def summarise_cases(cases: pd.DataFrame, *, seed: int, ci: bool) -> dict[str, Any]:
    """Mean (and SD, bootstrap CI over participants) of the case-wise scores, overall and per structure (and the
    lesion-wise ones when the cases have them)."""
    lesion_metrics = [m for m in LESION_METRICS if m in cases.columns]
    per_case = cases.groupby("source", sort=False).agg(
        participant_id=("participant_id", "first"),
        dice=("dice", "mean"),
        hd95_mm=("hd95_mm", "mean"),
        abs_volume_difference_ml=("volume_difference_ml", lambda v: float(np.mean(np.abs(v)))),
        **{m: (m, "mean") for m in lesion_metrics},
    )
    structures = list(dict.fromkeys(cases["structure"]))
    wide = {s: cases[cases["structure"] == s].set_index("source").reindex(per_case.index) for s in structures}

    def compute(idx: np.ndarray) -> dict[str, float]:
        out = {
            "dice": finite_mean(per_case["dice"].to_numpy()[idx]),
            "hd95_mm": finite_mean(per_case["hd95_mm"].to_numpy()[idx]),
            "abs_volume_difference_ml": finite_mean(per_case["abs_volume_difference_ml"].to_numpy()[idx]),
            **{m: finite_mean(per_case[m].to_numpy()[idx]) for m in lesion_metrics},
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
