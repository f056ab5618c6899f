"""The subject report ``sub-<label>.html``: gathered from the derivatives on disk, then rendered.

Built at the end of the participant level and again by the group level, which adds each metric's
group percentile. A report that cannot be written is logged; the subject's outputs stand.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from .. import __version__, derivatives
from ..ops.template import TEMPLATE_SPACE
from ..qc import percentile_of
from .methods import participant_methods, subject_images
from .render import write_fallback_report, write_report

LOGGER = logging.getLogger(__name__)

#: Metrics shown in the report, with a label and which direction is better.
METRICS = (
    ("snr_wm", "SNR (white matter)", "higher"),
    ("snr_gm", "SNR (grey matter)", "higher"),
    ("cnr", "CNR (GM/WM)", "higher"),
    ("cjv", "CJV", "lower"),
    ("efc", "EFC", "lower"),
    ("fber", "FBER", "higher"),
    ("bias_range", "Bias-field range (p1-p99 in brain)", "lower"),
    ("registration_ncc", "Registration NCC with template", "higher"),
    ("mask_dice", "Brain-mask agreement (Dice, deepbet vs template)", "higher"),
    ("wm_dice", "White-matter agreement with the template (Dice)", "higher"),
    ("brain_volume_ml", "Brain-mask volume (ml)", "—"),
    ("gm_volume_ml", "Grey matter (ml)", "—"),
    ("wm_volume_ml", "White matter (ml)", "—"),
    ("csf_volume_ml", "CSF inside the brain mask (ml)", "—"),
    ("gm_wm_ratio", "Grey/white matter volume ratio", "—"),
    ("brain_fov_edge_mm2", "Brain mask on the FOV edge (mm², worst side)", "lower"),
    ("warp_folded_share", "Nonlinear registration: folded share of the template brain", "lower"),
    ("warp_logjac_p999", "Nonlinear registration: |log Jacobian|, 99.9th percentile", "lower"),
    ("warp_dice_gain", "Nonlinear registration: brain Dice gain over the affine", "higher"),
    ("coreg_edge_corr", "Co-registration: edge correlation with the T1w", "higher"),
    ("coreg_brain_coverage", "Share of the T1w brain in the field of view", "higher"),
)


#: The figures of one image (``fig_<desc>`` in :data:`~pipeline.derivatives.DERIVATIVES`).
FIGURES = (
    "mosaic",
    "brainmask",
    "regsubject",
    "regtemplate",
    "warp",
    "jacobian",
    "biasfield",
    "mesh",
    "attribution",
    "segmentation",
    "segmentationmesh",
    "uncertainty",
    "coregimage",
    "coregreference",
    "lesions",
)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _png(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.exists() else None


def _image_context(output_dir: Path, entry: dict[str, Any], qc: pd.DataFrame | None) -> dict[str, Any]:
    source = entry["source"]
    find = lambda name: derivatives.named_path(output_dir, source, name)  # noqa: E731
    audit = _read_json(find("audit")) or {}
    iqm_record = _read_json(find("iqm")) or {}
    registration = _read_json(derivatives.sidecar_of(find("xfm"))) or {}
    coregistration = _read_json(derivatives.sidecar_of(find("xfm_reference"))) or {}
    lesion = _read_json(derivatives.sidecar_of(find("lesion_mask")))
    template = _read_json(derivatives.sidecar_of(find("preproc_template"))) or {}
    warp = _read_json(derivatives.sidecar_of(find("xfm_warp")))
    morphometry = _read_json(find("morphometry"))
    figure = lambda desc: _png(find(f"fig_{desc}"))  # noqa: E731
    metrics = []
    for key, label, better in METRICS:
        value = iqm_record.get("metrics", {}).get(key)
        percentile = None
        if qc is not None and key in qc.columns and value is not None:
            percentile = percentile_of(qc[key], value)
        outlier = False
        if qc is not None and f"{key}_outlier" in qc.columns:
            rows = qc.loc[qc["source"] == source, f"{key}_outlier"]
            outlier = bool(rows.iloc[0]) if len(rows) else False
        metrics.append({"key": key, "label": label, "better": better, "value": value, "percentile": percentile,
                        "outlier": outlier})  # fmt: skip
    prediction = _read_json(find("prediction"))
    mesh = find("mesh")
    surface = (_read_json(derivatives.sidecar_of(mesh)) or {}).get("Surface")
    # an unreadable image has an audit without header or intensity: the report says so, it does not fail
    header: dict[str, Any] = dict.fromkeys(("shape", "voxel_size_mm", "orientation", "obliquity_deg", "datatype"))
    header.update(audit.get("header") or {})
    header["readable"] = bool(audit.get("header"))
    intensity = {"percentiles": None, "nan_count": None, "inf_count": None, **(audit.get("intensity") or {})}
    audit = {"errors": [], **audit}
    return {
        "source": source,
        "state": entry.get("state", "unknown"),
        "kind": entry.get("kind", derivatives.source_suffix(source)),
        "reason": entry.get("reason"),
        "reference": entry.get("reference"),
        "pairing": entry.get("pairing"),
        "coregistration": coregistration.get("Coregistration", {}),
        "lesion": lesion,
        "audit": audit,
        "header": header,
        "intensity": intensity,
        "flags": sorted(set(audit.get("flags", [])) | set(iqm_record.get("flags", []))),
        "qc": iqm_record.get("qc"),
        "mask_dice": iqm_record.get("metrics", {}).get("mask_dice"),
        "brain_extraction": iqm_record.get("brain_extraction"),
        "preparation": iqm_record.get("preparation", {}),
        "registration": registration.get("Registration", {}),
        "warp": warp,
        "morphometry": morphometry,
        "normalisation": template.get("IntensityNormalization", {}),
        "metrics": metrics,
        "figures": {desc: figure(desc) for desc in FIGURES},
        "prediction": prediction,
        "surface": surface,
        "mesh_file": mesh.relative_to(output_dir).as_posix(),
    }


def subject_context(output_dir: Path, subject: str, *, qc: pd.DataFrame | None = None) -> dict[str, Any]:
    output_dir = Path(output_dir)
    status = _read_json(derivatives.status_path(output_dir, subject)) or {}
    run_dir = output_dir / "logs" / status.get("run_id", "")
    config = _read_json(run_dir / "config.json") if status.get("run_id") else None
    environment = _read_json(run_dir / "environment.json") if status.get("run_id") else None
    images = [_image_context(output_dir, entry, qc) for entry in status.get("images", [])]
    sessions = sorted(
        {Path(img["source"]).parts[1] for img in images if Path(img["source"]).parts[1].startswith("ses-")}
    )
    warnings = [f"{img['source']}: {', '.join(img['flags'])}" for img in images if img["flags"]]
    crash_dir = derivatives.subject_log_dir(output_dir, subject) / status.get("run_id", "")
    crashes = [_crash(p, output_dir) for p in sorted(crash_dir.glob("crash-*.txt"))] if status.get("run_id") else []
    return {
        "subject": f"sub-{subject}",
        "status": status,
        "images": images,
        "sessions": sessions,
        "warnings": warnings,
        "crashes": crashes,
        "config_json": json.dumps(config, indent=2) if config else "not recorded",
        "environment": environment or {},
        "group_available": qc is not None,
        "predictions": any(img["prediction"] for img in images),
        "methods": participant_methods(subject_images(output_dir, subject)).context(),
        "version": __version__,
        "template_space": TEMPLATE_SPACE,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


#: Lines of a crash file shown in the report (its end: the exception and the message).
CRASH_LINES = 60


def _crash(path: Path, output_dir: Path) -> dict[str, Any]:
    lines = path.read_text(errors="replace").splitlines()
    return {
        "file": path.relative_to(output_dir).as_posix(),
        "text": "\n".join(lines[-CRASH_LINES:]),
        "cut": len(lines) > CRASH_LINES,
        "lines": CRASH_LINES,
    }


def write_subject_report(output_dir: Path, subject: str, *, qc: pd.DataFrame | None = None) -> Path | None:
    """Write ``OUTPUT_DIR/sub-<label>.html``; returns its path, or None when not even a fallback page could
    be written. When the report cannot be gathered or rendered, the error is logged and a plain page
    saying so (with the participant's errors) takes its place: never a silent absence."""
    path = derivatives.subject_report_path(output_dir, subject)
    try:
        context = subject_context(output_dir, subject, qc=qc)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        LOGGER.error("Could not gather the report of sub-%s: %s", subject, exc)
        return write_fallback_report(path, f"sub-{subject}", f"its records could not be gathered: {exc}",
                                     _errors_of(output_dir, subject))  # fmt: skip
    written = write_report(path, "subject.html.j2", context)
    if written is None:
        return write_fallback_report(path, f"sub-{subject}", "the report template could not be rendered (see the log)",
                                     context["status"].get("errors", []))  # fmt: skip
    return written


def _errors_of(output_dir: Path, subject: str) -> list[str]:
    return list((_read_json(derivatives.status_path(Path(output_dir), subject)) or {}).get("errors", []))
