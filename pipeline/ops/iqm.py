"""Image quality metrics (IQMs) of a T1w, as pure functions on arrays.

Definitions follow MRIQC's documentation (Esteban et al., 2017) where it has one:
SNR, CNR, CJV, EFC and FBER; plus the bias-field range, registration quality (normalised
cross-correlation with the template inside its brain) and brain volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: Thresholds of the quality flags (recorded with the metrics). Calibrated on real heads, whose NCC
#: with the (averaged) template is ~0.5-0.6 and whose CJV with affinely propagated tissue maps is ~2;
#: a contrast-inverted image gives a negative NCC. The group's robust outliers are the finer screen.
QC_THRESHOLDS = {"registration_ncc_min": 0.4, "cjv_max": 3.0, "snr_wm_min": 3.0}


def snr(values: np.ndarray) -> float:
    """Mean over standard deviation (unbiased) of a tissue's voxels.

    >>> round(snr(np.array([9.0, 11.0, 9.0, 11.0])), 3)
    8.66
    """
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean() / values.std(ddof=1))


def cnr(gm: np.ndarray, wm: np.ndarray, air: np.ndarray) -> float:
    """|mean(WM) - mean(GM)| / sqrt(var(air) + var(GM) + var(WM)).

    >>> round(cnr(np.array([1.0, 3.0]), np.array([9.0, 11.0]), np.array([0.0, 0.0])), 3)  # 8 / sqrt(2)
    5.657
    """
    gm, wm, air = (np.asarray(v, dtype=np.float64) for v in (gm, wm, air))
    return float(abs(wm.mean() - gm.mean()) / np.sqrt(air.var() + gm.var() + wm.var()))


def cjv(gm: np.ndarray, wm: np.ndarray) -> float:
    """Coefficient of joint variation: (sd(WM) + sd(GM)) / |mean(WM) - mean(GM)|; lower is better.

    >>> cjv(np.array([1.0, 3.0]), np.array([9.0, 11.0]))
    0.25
    """
    gm, wm = (np.asarray(v, dtype=np.float64) for v in (gm, wm))
    return float((wm.std() + gm.std()) / abs(wm.mean() - gm.mean()))


def efc(data: np.ndarray) -> float:
    """Entropy focus criterion, normalised to [0, 1]: 1 for a uniform image, 0 for one bright voxel.

    >>> round(efc(np.ones(1000)), 6), round(efc(np.eye(10).ravel()[:11]), 6) < 1
    (1.0, True)
    """
    x = np.clip(np.asarray(data, dtype=np.float64).ravel(), 0, None)
    n = x.size
    b_max = np.sqrt((x**2).sum())
    if b_max == 0:
        return 0.0
    p = x[x > 0] / b_max
    entropy = -(p * np.log(p)).sum()
    entropy_max = np.sqrt(n) * np.log(np.sqrt(n))
    return float(entropy / entropy_max)


def fber(foreground: np.ndarray, background: np.ndarray) -> float | None:
    """Foreground-background energy ratio: median(|fg|²) / median(|bg|²); None without background energy.

    >>> fber(np.full(10, 10.0), np.full(10, 1.0))
    100.0
    """
    bg = float(np.median(np.abs(background) ** 2)) if background.size else 0.0
    if bg == 0:
        return None
    return float(np.median(np.abs(foreground) ** 2) / bg)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson's r) of two sets of voxels.

    >>> ncc(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    1.0
    """
    a, b = (np.asarray(v, dtype=np.float64).ravel() for v in (a, b))
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def head_and_air(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head (Otsu foreground, closed) and air (at least ~8 voxels outside the head) masks.

    Morphology runs on a copy at half resolution: these masks only need to be roughly right.
    """
    small = np.ascontiguousarray(data[::2, ::2, ::2], dtype=np.float32)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(small))
    head_small = ndimage.binary_closing(small > otsu.GetThreshold(), iterations=1)
    air_small = ~ndimage.binary_dilation(head_small, iterations=4)
    index = np.ix_(*(np.arange(n) // 2 for n in data.shape))
    return head_small[index], air_small[index]


#: Tissue probabilities (template maps brought into T1w space) above which a voxel counts as GM / WM.
TISSUE_THRESHOLDS = {"gm": 0.7, "wm": 0.9}


def compute_iqms(
    *,
    raw: np.ndarray,
    corrected: np.ndarray,
    bias_field: np.ndarray,
    brain: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    voxel_volume_mm3: float,
    registered: np.ndarray,
    template: np.ndarray,
    template_brain: np.ndarray,
) -> dict[str, Any]:
    """All IQMs of one image; tissue masks are boolean arrays on the subject grid.

    Tissue contrast (SNR, CNR, CJV) is measured on the bias-corrected image, so that it is not the
    bias field again (that has its own metric); EFC and FBER on the image as acquired.
    """
    head, air = head_and_air(raw)
    tissue = corrected
    metrics: dict[str, Any] = {
        "snr_wm": snr(tissue[wm]) if wm.sum() > 1 else None,
        "snr_gm": snr(tissue[gm]) if gm.sum() > 1 else None,
        "cnr": cnr(tissue[gm], tissue[wm], tissue[air]) if gm.any() and wm.any() else None,
        "cjv": cjv(tissue[gm], tissue[wm]) if gm.any() and wm.any() else None,
        "efc": efc(raw),
        "fber": fber(raw[head], raw[air]),
        "registration_ncc": ncc(registered[template_brain], template[template_brain]),
        "brain_volume_ml": float(brain.sum() * voxel_volume_mm3 / 1000.0),
    }
    field = bias_field[brain] if brain.any() else bias_field.ravel()
    low, high = np.percentile(field, [1, 99])
    metrics.update(bias_p1=float(low), bias_p99=float(high), bias_range=float(high - low))
    return metrics


def qc_flags(metrics: dict[str, Any]) -> list[str]:
    """Flags for metrics beyond the thresholds in :data:`QC_THRESHOLDS`."""
    flags = []
    if (
        metrics.get("registration_ncc") is not None
        and metrics["registration_ncc"] < QC_THRESHOLDS["registration_ncc_min"]
    ):
        flags.append("poor_registration")
    if metrics.get("cjv") is not None and metrics["cjv"] > QC_THRESHOLDS["cjv_max"]:
        flags.append("low_contrast")
    if metrics.get("snr_wm") is not None and metrics["snr_wm"] < QC_THRESHOLDS["snr_wm_min"]:
        flags.append("low_snr")
    return flags
