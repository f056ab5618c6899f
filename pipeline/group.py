"""Run the group level: gather the participants' audits into the manifest and the group report."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__, derivatives
from .bids import manifest as mf
from .bids.layout import read_participants, read_sessions, subjects_on_disk
from .config import RunConfig, settings_from
from .errors import InputDataError
from .learn.splits import SplitSettings
from .learn.study import RESULTS, StudySettings, run_study, study_dir
from .learn.train import TrainSettings
from .qc import MAD_TO_SD, MIN_IMAGES_FOR_OUTLIERS, MIN_RELATIVE_SPREAD, SCREENED_METRICS, gather_qc, robust_z
from .reports import figures
from .reports.group_learning import dataset_summary, external_context, learning_context
from .reports.render import write_report
from .reports.subject import write_subject_report

LOGGER = logging.getLogger(__name__)

_REPORT_COLUMNS = (
    "participant_id",
    "session_id",
    "orientation",
    "voxel_size_mm",
    "shape",
    "manufacturer",
    "flags",
    "duplicate_of",
)


def _write_qc(out: Path, qc_table: pd.DataFrame) -> dict[str, Any] | None:
    """Write ``qc.tsv`` (+ ``qc.json``) and return what the group report shows of it."""
    if qc_table.empty:
        return None
    derivatives.write_text(out / "qc.tsv", qc_table.to_csv(sep="\t", index=False, na_rep="n/a"))
    derivatives.write_json(out / "qc.json", {
        "Description": "Image quality metrics of every preprocessed T1w, with robust outlier flags",
        "OutlierRule": f"|x - median| > 3 x max({MAD_TO_SD} x MAD, {MIN_RELATIVE_SPREAD} x |median|), per metric, "
        f"when the metric is measured on at least {MIN_IMAGES_FOR_OUTLIERS} images; qc_outlier = any",
        "ScreenedMetrics": list(SCREENED_METRICS),
    })  # fmt: skip
    metrics = [m for m in SCREENED_METRICS if m in qc_table.columns]
    figure = figures.qc_strips(
        {m: robust_z(qc_table[m]).tolist() for m in metrics},
        {m: qc_table[f"{m}_outlier"].tolist() for m in metrics},
    )
    outliers = qc_table[qc_table["qc_outlier"]]
    verdicts = qc_table["qc_verdict"] if "qc_verdict" in qc_table else pd.Series("n/a", index=qc_table.index)
    return {
        "n_images": len(qc_table),
        "min_images": MIN_IMAGES_FOR_OUTLIERS,
        "failed": [
            {"source": row["source"], "flags": [f for f in str(row["flags"]).split(",") if f]}
            for _, row in qc_table[verdicts == "fail"].iterrows()
        ],
        "verdicts": {v: int(n) for v, n in verdicts.value_counts().items()},
        "figure": "data:image/png;base64," + base64.b64encode(figure).decode(),
        "outliers": [
            {"source": row["source"], "metrics": [m for m in metrics if row[f"{m}_outlier"]]}
            for _, row in outliers.iterrows()
        ],
        "medians": {m: float(qc_table[m].astype(float).median()) for m in metrics},
    }


def _checks(findings: dict[str, Any], qc: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    def check(name: str, items: list[str], *, fail: bool) -> dict[str, Any]:
        if not items:
            return {"name": name, "result": "pass", "css": "pass", "details": []}
        return {
            "name": name,
            "result": "fail" if fail else "warning",
            "css": "fail" if fail else "warn",
            "details": items,
        }

    return [
        check(
            "No identical image under two participant IDs",
            [" = ".join(g) for g in findings["duplicates"]],
            fail=True,
        ),
        check("Every image is readable", findings["unreadable_images"], fail=True),
        check(
            "Every image passed quality control (registration, brain extraction)",
            [
                f"{f['source']}: {', '.join(f['flags'])}; left out of learning unless --include-failed-qc"
                for f in (qc or {}).get("failed", [])
            ],
            fail=True,
        ),
        check("Every participant has images", findings["participants_without_images"], fail=False),
        check("Every image has a participants.tsv row", findings["images_without_participants_row"], fail=False),
        check(
            "No audit flags",
            [f"{src}: {flags}" for src, flags in findings["flagged_images"].items()],
            fail=False,
        ),
    ]


def study_settings(config: RunConfig) -> StudySettings:
    """The learning study the run config asks for (the config is read here, not below)."""
    assert config.target is not None
    return settings_from(
        config,
        StudySettings,
        split=settings_from(config, SplitSettings),
        train=settings_from(config, TrainSettings, n_outputs=0),
        learning_settings=config.learning_settings(),
    )


def _learning_results(
    config: RunConfig,
    table: pd.DataFrame,
    qc_table: pd.DataFrame,
    *,
    work_dir: Path,
    environment: dict[str, Any],
    manifest_sha256: str,
) -> dict[str, Any] | None:
    if config.target is None or config.models:
        return None
    results_path = study_dir(config.output_dir, config.target, config.architecture) / RESULTS
    if config.reports_only:
        if not results_path.exists():
            raise InputDataError(
                f"--reports-only: no training results for --target {config.target} --architecture "
                f"{config.architecture} ({results_path} is missing). Run the group level without --reports-only."
            )
        return json.loads(results_path.read_text())
    return run_study(
        table,
        output_dir=config.output_dir,
        cache_dir=work_dir / "learn_cache",
        qc=qc_table if not qc_table.empty else None,
        settings=study_settings(config),
        config_record=config.to_dict(),
        environment=environment,
        manifest_sha256=manifest_sha256,
    )


def run_group_level(
    config: RunConfig,
    *,
    run_id: str,
    environment: dict[str, Any],
    work_dir: Path | None = None,
    with_t1w: Sequence[str] | None = None,
    folders: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.tsv`` (+ ``manifest.json``), ``group_audit.json``, ``qc.tsv`` and ``group.html``.

    ``with_t1w`` and ``folders``: the labels of the participants with T1w images and of the participant folders
    in BIDS_DIR (from its index); read from BIDS_DIR when not given.

    With ``--target``, also train and evaluate a model (:mod:`pipeline.learn.study`); with ``--model``,
    train nothing but gather the predictions and evaluate them (:mod:`pipeline.learn.external`).
    """
    audit_paths = mf.find_audits(config.output_dir, config.participant_label or None)
    if not audit_paths:
        raise InputDataError(
            f"No participant-level audits found in {config.output_dir}. Run "
            f"'bidsdl {config.bids_dir} {config.output_dir} participant' first."
        )
    audits = [(mf.load_audit(p), p.relative_to(config.output_dir).as_posix()) for p in audit_paths]
    participants = read_participants(config.bids_dir)
    on_disk = list(folders) if folders is not None else subjects_on_disk(config.bids_dir)
    sessions = {f"sub-{s}": t for s in on_disk if (t := read_sessions(config.bids_dir, s)) is not None}
    table, findings = mf.build_manifest(audits, participants=participants, sessions=sessions, subjects_on_disk=on_disk)
    # participants with T1w in BIDS_DIR but no participant-level outputs yet are not "without images"
    if with_t1w is None:
        with_t1w = [pid[4:] for pid in findings["participants_without_images"]
                    if any((config.bids_dir / pid).glob("**/anat/*_T1w.nii*"))]  # fmt: skip
    has_t1w = {f"sub-{s}" for s in with_t1w}
    not_run = [pid for pid in findings["participants_without_images"] if pid in has_t1w]
    findings["participants_not_preprocessed"] = not_run
    findings["participants_without_images"] = [p for p in findings["participants_without_images"] if p not in not_run]
    out = config.output_dir
    derivatives.write_text(out / "manifest.tsv", table.to_csv(sep="\t", index=False, na_rep="n/a"))
    participants_json_path = config.bids_dir / "participants.json"
    participants_json = json.loads(participants_json_path.read_text()) if participants_json_path.exists() else None
    derivatives.write_json(out / "manifest.json", mf.manifest_sidecar(table, participants_json))
    derivatives.write_json(out / "group_audit.json", {**findings, "run_id": run_id, "bidsdl_version": __version__})
    qc_table = gather_qc(out, config.participant_label or None)
    qc_context = _write_qc(out, qc_table)
    for group in findings["duplicates"]:
        LOGGER.warning(
            "Identical voxel data under different participant IDs: %s. One subject may "
            "appear twice; remove the copy before learning.",
            ", ".join(group),
        )
    for pid in not_run:
        LOGGER.warning("%s has T1w images in BIDS_DIR but no participant-level outputs: run the participant level "
                       "for it (--participant-label %s), then the group level again.", pid, pid[4:])  # fmt: skip
    for pid in findings["participants_without_images"]:
        LOGGER.warning("%s has no T1w image in BIDS_DIR.", pid)
    for source in findings["images_without_participants_row"]:
        LOGGER.warning("%s has no row in participants.tsv: add one so its labels are known.", source)
    description = (
        json.loads((config.bids_dir / "dataset_description.json").read_text())
        if (config.bids_dir / "dataset_description.json").exists()
        else {}
    )
    for subject in sorted({pid[4:] for pid in table["participant_id"]}):
        if derivatives.status_path(out, subject).exists():
            write_subject_report(out, subject, qc=qc_table if not qc_table.empty else None)
    manifest_sha256 = hashlib.sha256((out / "manifest.tsv").read_bytes()).hexdigest()
    learning = _learning_results(
        config,
        table,
        qc_table,
        work_dir=work_dir or out / ".bidsdl_work",
        environment=environment,
        manifest_sha256=manifest_sha256,
    )
    if config.fold:  # a fold job: its output is the fold's folder; the assembly run writes the report
        return findings
    external = None
    if config.models:
        from .learn.external import run_external_evaluation

        external = run_external_evaluation(
            table, output_dir=out, model_dirs=list(config.models), target=config.target, seed=config.seed,
            bids_dir=config.bids_dir, labels=config.labels, label_desc=config.label_desc,
        )  # fmt: skip
    rows = table.to_dict(orient="records")
    for row in rows:
        row["flags"] = [f for f in str(row["flags"]).split(",") if f]
    write_report(
        out / "group.html",
        "group.html.j2",
        {
            "dataset_name": description.get("Name", config.bids_dir.name),
            "findings": findings,
            "checks": _checks(findings, qc_context),
            "qc": qc_context,
            "manifest_columns": _REPORT_COLUMNS,
            "manifest_rows": rows,
            "version": __version__,
            "run_id": run_id,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment,
            "config_json": json.dumps(config.to_dict(), indent=2),
            "dataset": dataset_summary(table, config.target),
            "seed": config.seed,
            "manifest_sha256": manifest_sha256,
            "learning": learning_context(learning, out) if learning else None,
            "external": external_context(external) if external else None,
        },
    )
    LOGGER.info("Manifest of %d image(s): %s", len(table), out / "manifest.tsv")
    return findings
