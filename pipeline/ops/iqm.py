"""Image quality metrics (IQMs) of a T1w, as pure functions on arrays.

Definitions follow MRIQC's documentation (Esteban et al., 2017) where it has one:
SNR, CNR, CJV, EFC and FBER; plus the bias-field range, registration quality (normalised
cross-correlation with the template inside its brain), the agreement of two independent brain masks
(the learned extractor's, and the template's brought through the registration), volumes, and how much
of the brain touches the field of view's edge.

:func:`assess` turns the metrics into a verdict through :data:`QC_CHECKS`: an image beyond a check's
*fail* limit has failed (its participant fails; the group level leaves it out of learning), one beyond
a *flag* limit is flagged and shown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .tissues import TissueMasks


def snr(values: np.ndarray) -> float:
    """Mean over standard deviation (unbiased) of a tissue's voxels.

    >>> round(snr(np.array([9.0, 11.0, 9.0, 11.0])), 3)
    8.66
    """
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean() / values.std(ddof=1))


def cnr(gm: np.ndarray, wm: np.ndarray, air: np.ndarray) -> float:
    """|mean(WM) - mean(GM)| / sqrt(var(air) + var(GM) + var(WM)); no air (a field of view filled by the
    head, or no background) counts as no air noise.

    >>> round(cnr(np.array([1.0, 3.0]), np.array([9.0, 11.0]), np.array([0.0, 0.0])), 3)  # 8 / sqrt(2)
    5.657
    >>> round(cnr(np.array([1.0, 3.0]), np.array([9.0, 11.0]), np.array([])), 3)
    5.657
    """
    gm, wm, air = (np.asarray(v, dtype=np.float64) for v in (gm, wm, air))
    air_variance = air.var() if air.size else 0.0
    return float(abs(wm.mean() - gm.mean()) / np.sqrt(air_variance + gm.var() + wm.var()))


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


def head_and_air(data: np.ndarray, brain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Head (foreground, closed) and air (at least ~8 voxels outside the head) masks.

    The foreground is above a tenth of the brain's median intensity when the brain mask is given (a
    bright neck or fat cannot then push the threshold above the head, as it does Otsu's), else above
    Otsu's threshold. Morphology runs on a copy at half resolution: these masks only need to be
    roughly right.
    """
    small = np.ascontiguousarray(data[::2, ::2, ::2], dtype=np.float32)
    if brain is not None and brain.any():
        threshold = 0.1 * float(np.median(data[brain]))
    else:
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(sitk.GetImageFromArray(small))
        threshold = otsu.GetThreshold()
    head_small = ndimage.binary_closing(small > threshold, iterations=1)
    air_small = ~ndimage.binary_dilation(head_small, iterations=4)
    index = np.ix_(*(np.arange(n) // 2 for n in data.shape))
    return head_small[index], air_small[index]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1: identical; 0: disjoint or both empty).

    >>> dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    0.6666666666666666
    """
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


#: The faces of an RAS array: (axis, side, name).
_FACES = ((0, 0, "left"), (0, -1, "right"), (1, 0, "posterior"), (1, -1, "anterior"), (2, 0, "inferior"),
          (2, -1, "superior"))  # fmt: skip


def fov_contact_mm2(mask: np.ndarray, zooms: tuple[float, ...]) -> dict[str, float]:
    """Area (mm²) of the mask on each face of an RAS-oriented field of view.

    >>> m = np.zeros((4, 4, 4), bool); m[1:3, 1:3, 2:] = True
    >>> fov_contact_mm2(m, (1.0, 1.0, 2.0))["superior"], fov_contact_mm2(m, (1.0, 1.0, 2.0))["left"]
    (4.0, 0.0)
    """
    areas = {}
    for axis, side, name in _FACES:
        face = mask[(slice(None),) * axis + (side,)]  # a view (np.take would copy the volume)
        pixel = float(np.prod([z for i, z in enumerate(zooms[:3]) if i != axis]))
        areas[name] = float(face.sum()) * pixel
    return areas


def compute_iqms(
    *,
    raw: np.ndarray,
    corrected: np.ndarray,
    bias_field: np.ndarray,
    brain: np.ndarray,
    template_brain_t1w: np.ndarray,
    template_wm_t1w: np.ndarray,
    tissues: TissueMasks,
    tissue_volumes_ml: dict[str, float],
    zooms: tuple[float, ...],
    registered: np.ndarray,
    template: np.ndarray,
    template_brain: np.ndarray,
) -> dict[str, Any]:
    """All IQMs of one image; masks are boolean arrays on the (RAS) subject grid.

    ``brain`` is the extracted brain mask, ``template_brain_t1w`` and ``template_wm_t1w`` the template's
    brain mask and white matter (probability > 0.5) brought through the registration, ``tissues`` the
    subject's pure CSF/GM/WM (its coherent classes give the contrast metrics, its voxel-exact white
    matter the registration check). Tissue contrast (SNR, CNR, CJV) is measured on
    the bias-corrected image, so that it is not the bias field again (that has its own metric); EFC
    and FBER on the image as acquired.
    """
    head, air = head_and_air(raw, brain)
    tissue = corrected
    gm, wm = tissues.coherent["gm"], tissues.coherent["wm"]
    voxel_ml = float(np.prod(zooms[:3])) / 1000.0
    contact = fov_contact_mm2(brain, zooms)
    metrics: dict[str, Any] = {
        "snr_wm": snr(tissue[wm]) if wm.sum() > 1 else None,
        "snr_gm": snr(tissue[gm]) if gm.sum() > 1 else None,
        "cnr": cnr(tissue[gm], tissue[wm], tissue[air]) if gm.any() and wm.any() else None,
        "cjv": cjv(tissue[gm], tissue[wm]) if gm.any() and wm.any() else None,
        "efc": efc(raw),
        "fber": fber(raw[head], raw[air]),
        "registration_ncc": ncc(registered[template_brain], template[template_brain]),
        "mask_dice": dice(brain, template_brain_t1w),
        "wm_dice": dice(tissues.pure["wm"], template_wm_t1w),
        "brain_volume_ml": float(brain.sum()) * voxel_ml,
        "template_mask_volume_ml": float(template_brain_t1w.sum()) * voxel_ml,
        "gm_volume_ml": tissue_volumes_ml["gm"],
        "wm_volume_ml": tissue_volumes_ml["wm"],
        "csf_volume_ml": tissue_volumes_ml["csf"],
        "gm_wm_ratio": tissue_volumes_ml["gm"] / tissue_volumes_ml["wm"] if tissue_volumes_ml["wm"] > 0 else None,
        "brain_fov_edge_mm2": max(area for face, area in contact.items() if face != "inferior"),
        "brain_fov_bottom_mm2": contact["inferior"],
    }
    field = bias_field[brain] if brain.any() else bias_field.ravel()
    low, high = np.percentile(field, [1, 99])
    metrics.update(bias_p1=float(low), bias_p99=float(high), bias_range=float(high - low))
    return metrics


@dataclass(frozen=True)
class Check:
    """One quality check: a metric, its limits, the flag it raises, what it means and what to try.

    Beyond ``fail_below``/``fail_above`` the image has failed; beyond ``flag_below``/``flag_above``
    it is flagged. A missing limit is not checked.
    """

    metric: str
    flag: str
    label: str
    meaning: str
    advice: str
    fail_below: float | None = None
    fail_above: float | None = None
    flag_below: float | None = None
    flag_above: float | None = None

    def result(self, value: float | None) -> str:
        if value is None or not np.isfinite(value):
            return "not measured"
        if (self.fail_below is not None and value < self.fail_below) or (
            self.fail_above is not None and value > self.fail_above
        ):
            return "fail"
        if (self.flag_below is not None and value < self.flag_below) or (
            self.flag_above is not None and value > self.flag_above
        ):
            return "flag"
        return "pass"

    def limits(self) -> str:
        """The limits in words, e.g. ``fail < 0.6, flag < 0.75``."""
        parts = [f"{kind} {sign} {limit:g}" for kind, sign, limit in (
            ("fail", "<", self.fail_below), ("fail", ">", self.fail_above),
            ("flag", "<", self.flag_below), ("flag", ">", self.flag_above)) if limit is not None]  # fmt: skip
        return ", ".join(parts)


_REGISTRATION_ADVICE = (
    "Look at the report's registration check and brain-extraction figure. A wrong orientation in the header "
    "(flipped or swapped axes), a partial field of view or an image that is not a whole-brain T1w are the usual "
    "causes: fix the header or exclude the image."
)
_WARP_ADVICE = (
    "Look at the report's nonlinear-registration figures (the warped T1w under the template's edges, the Jacobian "
    "map). A lesion or resection that the warp tried to close (give its mask with --lesion-masks), a failed affine "
    "start or an image that is not a whole-brain T1w are the usual causes; --registration affine runs without the "
    "warp (and without morphometry)."
)
#: The checks behind the verdict. Calibrated on the real heads of the development set (whole heads with
#: necks, a 27-scan average, a skull-stripped contrast-enhanced image; each also re-stored in three other
#: axis orders, rotated up to 12 degrees and shifted up to 15 mm): registered right they give NCC
#: 0.44-0.61 and mask Dice 0.958-0.970. Their correct transforms moved on purpose by 5 mm or 5 degrees
#: give Dice 0.93-0.945 and NCC 0.38-0.44; by 10 mm or 10 degrees Dice 0.88-0.91 and NCC 0.26-0.30; by
#: 20 mm or 20 degrees Dice 0.78-0.85 and NCC 0.17-0.21. NCC depends on the contrast (the
#: contrast-enhanced image gives 0.44 when right), so it only fails what no contrast explains. The
#: white-matter Dice is 0.38-0.60 when right, 0.28-0.49 at 10 degrees off, and 0.20-0.23 for sample
#: heads stored upside down or with swapped axes (whose outlines still give a mask Dice of 0.80-0.90).
QC_CHECKS: tuple[Check, ...] = (
    Check("registration_ncc", "poor_registration", "Registration: correlation with the template inside its brain",
          "the image does not line up with the template", _REGISTRATION_ADVICE,
          fail_below=0.25, flag_below=0.40),
    Check("mask_dice", "brain_masks_disagree",
          "Brain masks agree: Dice of the extracted mask and the template's brought through the registration",
          "the brain extraction or the registration failed (two independent masks disagree)",
          _REGISTRATION_ADVICE + " If the extracted mask is wrong, the image may not be a T1w of a head.",
          fail_below=0.90, flag_below=0.94),
    Check("wm_dice", "white_matter_misplaced",
          "White matter agrees: Dice of the subject's white matter (its own tissue classes) and the template's "
          "through the registration", "the brain's inside does not line up with the template's (an outline can "
          "match a brain that is upside down or turned; its white matter cannot)", _REGISTRATION_ADVICE,
          fail_below=0.25, flag_below=0.33),
    Check("brain_volume_ml", "unusual_brain_volume", "Brain-mask volume in the human range (ml)",
          "the brain mask is too small or too large to be a human brain",
          "Check the brain-extraction figure; check the voxel size in the header (a wrong unit or voxel size "
          "scales every volume).", fail_below=400.0, fail_above=3000.0, flag_below=900.0, flag_above=2100.0),
    Check("brain_fov_edge_mm2", "brain_at_fov_edge", "Brain mask on the field of view's edge (mm², worst side)",
          "part of the brain may lie outside the field of view (cut at the top, front, back or a side)",
          "Check the mosaic; if the brain is cut, regions near the edge are missing from every output.",
          flag_above=100.0),
    Check("cjv", "low_contrast", "Grey/white coefficient of joint variation (CJV)",
          "grey and white matter are hard to tell apart",
          "Check the image; motion, a non-T1 contrast or heavy noise lower the contrast.", flag_above=1.0),
    Check("snr_wm", "low_snr", "White-matter SNR", "the image is noisy", "Check the image for noise or motion.",
          flag_below=5.0),
    Check("warp_folded_share", "warp_folded", "Nonlinear registration: share of the template brain where the warp "
          "folds (Jacobian determinant <= 0)", "the nonlinear registration folded space (it is not a valid "
          "deformation there)", _WARP_ADVICE, fail_above=0.005, flag_above=0.001),
    Check("warp_logjac_p999", "warp_extreme", "Nonlinear registration: 99.9th percentile of |log Jacobian| of the "
          "warp in the template brain", "the warp stretches or shrinks tissue far beyond anatomy (a diverged "
          "registration)", _WARP_ADVICE, fail_above=2.3, flag_above=1.4),
    Check("warp_dice_gain", "warp_worse_than_affine", "Nonlinear registration: template-brain Dice after the warp "
          "minus after the affine alone", "the warp aligned the brain worse than the affine it started from",
          _WARP_ADVICE, fail_below=-0.04, flag_below=-0.02),
    Check("gm_wm_ratio", "implausible_tissue_classes", "Grey/white matter volume ratio of the tissue classes",
          "the tissue classes look wrong: grey and white matter volumes far from a brain's",
          "The contrast metrics (CJV, SNR, CNR) and the white-matter check rest on these classes: read them with "
          "care. Averages of many scans, heavy post-processing or a non-T1w contrast can do this.",
          flag_below=0.5, flag_above=5.0),
)  # fmt: skip


#: The three independent signals of a registration: when all three are beyond their flag limits, the
#: image has failed (one bad number can be the image's nature; three agreeing are the registration).
REGISTRATION_SIGNALS = ("registration_ncc", "mask_dice", "wm_dice")


def assess(metrics: dict[str, Any]) -> dict[str, Any]:
    """The verdict (``pass``, ``flag`` or ``fail``), each check's result and the flags.

    An image fails when a check fails, or when every one of :data:`REGISTRATION_SIGNALS` is flagged. The
    white-matter check is not applied to an image without grey/white contrast (low_contrast): its white
    matter cannot be found by intensity.
    """
    low_contrast = next(c for c in QC_CHECKS if c.flag == "low_contrast").result(metrics.get("cjv")) != "pass"
    results = []
    for check in QC_CHECKS:
        value = metrics.get(check.metric)
        result = check.result(value)
        if check.metric == "wm_dice" and low_contrast and result != "not measured":
            result = "not measured (no grey/white contrast)"
        results.append({**asdict(check), "value": value, "result": result, "limits": check.limits()})
    by_metric = {r["metric"]: r for r in results}
    if all(by_metric[m]["result"] in ("flag", "fail") for m in REGISTRATION_SIGNALS):
        for metric in REGISTRATION_SIGNALS:
            if by_metric[metric]["result"] == "flag":
                by_metric[metric]["result"] = "fail"
                by_metric[metric]["meaning"] += " (with the other registration signals also beyond their flag limits)"
    flags = [r["flag"] for r in results if r["result"] in ("flag", "fail")]
    verdict = "fail" if any(r["result"] == "fail" for r in results) else "flag" if flags else "pass"
    return {"verdict": verdict, "checks": results, "flags": flags}


_COREGISTRATION_ADVICE = (
    "Look at the report's co-registration check (the T1w's edges over both images, in turn). A wrong orientation "
    "in either header, an image of another participant or session, or heavy motion are the usual causes: fix the "
    "header or exclude the image. The T1w's own outputs are not affected."
)
#: The checks of a co-registered image (FLAIR, T2w, PDw). Calibrated on the sample's 2D FLAIRs (3 mm slices, the
#: head moved up to 5 degrees and 6 mm): aligned right (error 0.2-0.4 mm) the edge correlation is 0.83-0.90; the
#: same transforms moved on purpose by 3 mm give 0.48-0.57, by 6 mm 0.24-0.31, by 10 mm 0.20-0.27. Real FLAIRs
#: (lesions, other contrast weights) are expected lower when right: the fail limit leaves room for that.
COREGISTRATION_CHECKS: tuple[Check, ...] = (
    Check("coreg_edge_corr", "poor_coregistration",
          "Co-registration: correlation of the image's edges with the T1w's inside the brain",
          "the image does not line up with its T1w", _COREGISTRATION_ADVICE, fail_below=0.3, flag_below=0.5),
    Check("coreg_brain_coverage", "partial_coverage", "Share of the T1w brain inside the image's field of view",
          "the image covers only part of the brain (a partial field of view, or a failed co-registration)",
          "Check the co-registration figure; regions outside the field of view are empty in every output.",
          fail_below=0.5, flag_below=0.9),
    Check("cjv", "low_contrast", "Grey/white coefficient of joint variation (CJV), in the T1w's tissue classes",
          "grey and white matter are hard to tell apart", "Check the image for motion or noise.", flag_above=2.0),
)  # fmt: skip


def assess_coregistered(metrics: dict[str, Any]) -> dict[str, Any]:
    """The verdict of a co-registered image from :data:`COREGISTRATION_CHECKS` (as :func:`assess`)."""
    results = []
    for check in COREGISTRATION_CHECKS:
        value = metrics.get(check.metric)
        results.append({**asdict(check), "value": value, "result": check.result(value), "limits": check.limits()})
    flags = [r["flag"] for r in results if r["result"] in ("flag", "fail")]
    verdict = "fail" if any(r["result"] == "fail" for r in results) else "flag" if flags else "pass"
    return {"verdict": verdict, "checks": results, "flags": flags}


def intensity_iqms(raw: np.ndarray, corrected: np.ndarray, tissues: TissueMasks) -> dict[str, Any]:
    """The contrast metrics of an image on the grid of ``tissues`` (another image's classes: a FLAIR's in its T1w's)
    and the EFC of the image as acquired (``raw``, any grid)."""
    gm, wm = tissues.coherent["gm"], tissues.coherent["wm"]
    ok = lambda mask: mask.sum() > 1  # noqa: E731
    return {
        "snr_wm": snr(corrected[wm]) if ok(wm) else None,
        "snr_gm": snr(corrected[gm]) if ok(gm) else None,
        "cjv": cjv(corrected[gm], corrected[wm]) if ok(gm) and ok(wm) else None,
        "efc": efc(raw),
    }


def failure_message(source: str, assessment: dict[str, Any]) -> str:
    """What a failed image's participant reports: the image, what looked wrong, what to try."""
    failed = [c for c in assessment["checks"] if c["result"] == "fail"]
    what = "; ".join(f"{c['meaning']} ({c['metric']} {c['value']:.3g}, {c['limits']})" for c in failed)
    advices = list(dict.fromkeys(c["advice"] for c in failed))
    advice = " ".join(a for a in advices if not any(a != other and a in other for other in advices))
    return (
        f"{source}: failed quality control: {what}. {advice} Its outputs are kept for inspection but marked failed: "
        "the group level leaves it out of learning unless --include-failed-qc."
    )
