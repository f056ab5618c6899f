"""Run the group level: gather the participants' audits into the manifest and the group report."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import __version__, derivatives
from .bids import manifest as mf
from .bids.layout import read_participants, read_sessions, subjects_on_disk
from .config import SUBJECT_REPORT_REFRESH_MAX, RunConfig, available_cpus, settings_from
from .errors import InputDataError, ReportFailed
from .kinds import DEFAULT_CHANNELS, REFERENCE_KIND, package_channels
from .learn import distributed
from .learn.channels import default_inputs
from .learn.device import seed_everything
from .learn.external import run_external_evaluation
from .learn.package import read_package
from .learn.registry import get_task
from .learn.splits import SplitSettings
from .learn.study import StudySettings, resolve_design, run_nested, run_study, serve_jobs
from .learn.train import TrainSettings
from .progress import Progress, timed
from .qc import MAD_TO_SD, MIN_IMAGES_FOR_OUTLIERS, MIN_RELATIVE_SPREAD, SCREENED_METRICS, make_qc_table, robust_z
from .ratings import RULE, apply_ratings, read_ratings
from .reports import figures
from .reports.gallery import GALLERY, gallery_context
from .reports.group_learning import dataset_summary, external_context, learning_context
from .reports.group_tables import LIST_ITEMS, capped, manifest_rows
from .reports.methods import (
    Methods,
    external_methods,
    participant_methods,
    study_methods,
    subject_images,
    write_methods,
)
from .reports.render import write_fallback_report, write_report
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
    derivatives.write_text(derivatives.group_path(out, "qc"), qc_table.to_csv(sep="\t", index=False, na_rep="n/a"))
    derivatives.write_json(out / "qc.json", {
        "Description": "Image quality metrics of every preprocessed T1w, with robust outlier flags",
        "OutlierRule": f"|x - median| > 3 x max({MAD_TO_SD} x MAD, {MIN_RELATIVE_SPREAD} x |median|), per metric, "
        f"when the metric is measured on at least {MIN_IMAGES_FOR_OUTLIERS} images; qc_outlier = any",
        "ScreenedMetrics": list(SCREENED_METRICS),
        **({"qc_rating": f"people's ratings (--qc-ratings) combined: bad, doubtful or good; rule: {RULE}",
            "qc_raters": "each rater's rating", "qc_rating_reason": "why the image is left out of learning"}
           if "qc_rating" in qc_table.columns else {}),
    })  # fmt: skip
    metrics = [m for m in SCREENED_METRICS if m in qc_table.columns]
    figure = figures.qc_strips(
        {m: robust_z(qc_table[m]).tolist() for m in metrics},
        {m: qc_table[f"{m}_outlier"].tolist() for m in metrics},
    )
    outliers = qc_table[qc_table["qc_outlier"]]
    verdicts = qc_table["qc_verdict"] if "qc_verdict" in qc_table else pd.Series("n/a", index=qc_table.index)
    failed = qc_table[verdicts == "fail"]
    return {
        "n_images": len(qc_table),
        "min_images": MIN_IMAGES_FOR_OUTLIERS,
        "failed": capped([
            {"source": row["source"], "flags": [f for f in str(row["flags"]).split(",") if f]}
            for row in failed.head(LIST_ITEMS).to_dict(orient="records")
        ], "qc.tsv") | {"more": max(len(failed) - LIST_ITEMS, 0)},
        "verdicts": {v: int(n) for v, n in verdicts.value_counts().items()},
        "figure": "data:image/png;base64," + base64.b64encode(figure).decode(),
        "outliers": capped([
            {"source": row["source"], "metrics": [m for m in metrics if row[f"{m}_outlier"]]}
            for row in outliers.head(LIST_ITEMS).to_dict(orient="records")
        ], "qc.tsv") | {"more": max(len(outliers) - LIST_ITEMS, 0)},
        "medians": {m: float(qc_table[m].astype(float).median()) for m in metrics},
    }


def _checks(findings: dict[str, Any], qc: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    def check(name: str, items: list[str], *, fail: bool, where: str = "group_audit.json") -> dict[str, Any]:
        shown = capped(items, where)
        if not items:
            return {"name": name, "result": "pass", "css": "pass", "details": [], "more": 0, "where": where}
        return {
            "name": name,
            "result": "fail" if fail else "warning",
            "css": "fail" if fail else "warn",
            "details": shown["shown"],
            "more": shown["more"],
            "where": where,
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
                for f in (qc or {}).get("failed", {}).get("shown", [])
            ],
            fail=True,
            where="qc.tsv",
        ),
        check("Every participant has images", findings["participants_without_images"], fail=False),
        check("Every image has a participants.tsv row", findings["images_without_participants_row"], fail=False),
        check(
            "No audit flags",
            [f"{src}: {flags}" for src, flags in findings["flagged_images"].items()],
            where="manifest.tsv",
            fail=False,
        ),
        *([_ratings_check(check, findings["qc_ratings"])] if findings.get("qc_ratings") else []),
    ]


def _ratings_check(check: Any, ratings: dict[str, Any]) -> dict[str, Any]:
    """The report's line on people's ratings: the images left out by the rule, the raters who disagree, the rows
    ignored."""
    details = [f"{r['source']}: left out of learning, {r['reason']}" for r in ratings["left_out"]]
    details += [f"{d['source']}: the raters disagree ({d['raters']}): {d['decision']}"
                for d in ratings["disagreements"]]  # fmt: skip
    details += [f"{ratings['file']} row {r['row']} ({r['participant_id']} {r['source']}): ignored, {r['reason']}"
                for r in ratings["ignored"]]  # fmt: skip
    name = (f"No image rated bad by people ({ratings['n_images_rated']} image(s) rated by "
            f"{', '.join(ratings['raters'])}; rule: {ratings['rule']})")  # fmt: skip
    return check(name, details, fail=False, where="qc.tsv (qc_rating, qc_raters) and group_audit.json")


def _read_records(paths: Sequence[Path], what: str) -> list[dict[str, Any]]:
    """The JSON records at ``paths``, read with progress (ten thousand of them take a while on a network disk)."""
    progress = Progress(what, len(paths), logger=LOGGER)
    records = []
    for path in paths:
        records.append(json.loads(path.read_text()))
        progress.advance()
    if len(paths) > 1000:
        progress.finish()
    return records


def _gather(
    config: RunConfig, *, with_t1w: Sequence[str] | None, folders: Sequence[str] | None
) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """The participants' audits and quality records, joined with participants.tsv and sessions.tsv: the manifest,
    the dataset's findings and the QC table."""
    subjects = config.participant_label or None
    audit_paths = mf.find_audits(config.output_dir, subjects)
    if not audit_paths:
        raise InputDataError(
            f"No participant-level audits found in {config.output_dir}. Run "
            f"'bidsdl {config.bids_dir} {config.output_dir} participant' first."
        )
    records = _read_records(audit_paths, "audits read")
    audits = [(record, p.relative_to(config.output_dir).as_posix()) for record, p in zip(records, audit_paths,
                                                                                         strict=True)]  # fmt: skip
    participants = read_participants(config.bids_dir)
    on_disk = list(folders) if folders is not None else subjects_on_disk(config.bids_dir)
    sessions = {f"sub-{s}": t for s in on_disk if (t := read_sessions(config.bids_dir, s)) is not None}
    table, findings = mf.build_manifest(audits, participants=participants, sessions=sessions, subjects_on_disk=on_disk)
    # participants with T1w in BIDS_DIR but no participant-level outputs yet are not "without images"
    if with_t1w is None:
        with_t1w = [pid[4:] for pid in findings["participants_without_images"]
                    if any((config.bids_dir / pid).glob(f"**/anat/*_{REFERENCE_KIND}.nii*"))]  # fmt: skip
    has_t1w = {f"sub-{s}" for s in with_t1w}
    not_run = [pid for pid in findings["participants_without_images"] if pid in has_t1w]
    findings["participants_not_preprocessed"] = not_run
    findings["participants_without_images"] = [p for p in findings["participants_without_images"] if p not in not_run]
    qc = make_qc_table(_read_records(mf.find_records(config.output_dir, "iqm", subjects), "quality records read"))
    if config.qc_ratings is not None:  # people's ratings: into qc.tsv, and the images rated bad out of learning
        qc, findings["qc_ratings"] = apply_ratings(qc, read_ratings(config.qc_ratings), path=config.qc_ratings)
    return table, findings, qc


def _log_findings(findings: dict[str, Any]) -> None:
    for group in findings["duplicates"]:
        LOGGER.warning(
            "Identical voxel data under different participant IDs: %s. One subject may "
            "appear twice; remove the copy before learning.",
            ", ".join(group),
        )
    for pid in findings["participants_not_preprocessed"]:
        LOGGER.warning("%s has %s images in BIDS_DIR but no participant-level outputs: run the participant level "
                       "for it (--participant-label %s), then the group level again.", pid, REFERENCE_KIND,
                       pid[4:])  # fmt: skip
    for pid in findings["participants_without_images"]:
        LOGGER.warning("%s has no %s image in BIDS_DIR.", pid, REFERENCE_KIND)
    for source in findings["images_without_participants_row"]:
        LOGGER.warning("%s has no row in participants.tsv: add one so its labels are known.", source)


def _refresh_subject_reports(
    config: RunConfig, out: Path, subjects: Sequence[str], qc_table: pd.DataFrame
) -> dict[str, Any]:
    """Re-render the subject reports with this group's percentiles, when asked or the group is small enough;
    returns what the group report says of it."""
    refresh = config.refresh_subject_reports
    if refresh is None:
        refresh = len(subjects) <= SUBJECT_REPORT_REFRESH_MAX
    if not refresh:
        LOGGER.info("Subject reports not re-rendered (%d participants; more than %d unless "
                    "--refresh-subject-reports): each shows the percentiles of its participant run.",
                    len(subjects), SUBJECT_REPORT_REFRESH_MAX)  # fmt: skip
        return {"refreshed": False, "n": len(subjects), "max": SUBJECT_REPORT_REFRESH_MAX}
    with_status = [s for s in subjects if derivatives.status_path(out, s).exists()]
    progress = Progress("subject reports", len(with_status), logger=LOGGER)
    for subject in with_status:
        write_subject_report(out, subject, qc=qc_table if not qc_table.empty else None)
        progress.advance()
    progress.finish()
    return {"refreshed": True, "n": len(with_status), "max": SUBJECT_REPORT_REFRESH_MAX}


def study_settings(config: RunConfig) -> StudySettings:
    """The learning study the run config asks for (the config is read here, not below)."""
    assert config.target is not None
    return settings_from(
        config,
        StudySettings,
        split=settings_from(config, SplitSettings),
        train=settings_from(config, TrainSettings, n_outputs=0),
        learning_settings=config.learning_settings(),
        inputs=config.inputs or DEFAULT_CHANNELS,  # until with_inputs decides
    )


def with_inputs(
    settings: StudySettings, table: pd.DataFrame, *, requested: tuple[str, ...] | None, output_dir: Path
) -> StudySettings:
    """The study's settings with its inputs decided: ``--inputs`` as ``requested``; else a transfer's source
    model's; else, for a whole-image study, :func:`~pipeline.learn.channels.default_inputs` over the processed
    T1w; a segmentation's T1w. The choice and its reason go into the study's ``design``."""
    if requested:
        inputs, chosen, why = tuple(requested), "--inputs", f"--inputs {' '.join(requested)}"
    elif settings.init_from:
        inputs = tuple(package_channels(read_package(settings.init_from)))
        chosen, why = "--init-from", f"the inputs of the source model ({', '.join(inputs)})"
    elif settings.task != "auto" and get_task(settings.task).learns_labels:
        inputs, chosen, why = DEFAULT_CHANNELS, "default", "a segmentation learns from the T1w unless told"
    else:
        chosen = "default"
        inputs, why = default_inputs(output_dir, list(table["source"]), settings.model_resolution)
        LOGGER.info("Inputs: %s", why)
    return dataclasses.replace(
        settings, inputs=inputs, learning_settings={**settings.learning_settings, "inputs": list(inputs)},
        design={**(settings.design or {}), "inputs": list(inputs), "inputs_chosen_by": chosen, "inputs_reason": why},
    )  # fmt: skip


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
    settings = with_inputs(study_settings(config), table, requested=config.inputs, output_dir=config.output_dir)
    results_file = derivatives.results_path(config.output_dir, config.target, config.architecture, settings.inputs)
    if config.reports_only:
        if not results_file.exists():
            raise InputDataError(
                f"--reports-only: no training results for --target {config.target} --architecture "
                f"{config.architecture} ({results_file} is missing). Run the group level without --reports-only."
            )
        return json.loads(results_file.read_text())
    qc = qc_table if not qc_table.empty else None
    settings = resolve_design(table, settings=settings, requested=config.outer_folds, output_dir=config.output_dir,
                              qc=qc)  # fmt: skip
    study = run_nested if settings.split.outer_folds else run_study  # every participant tested once, or one test set
    return study(
        table,
        output_dir=config.output_dir,
        cache_dir=work_dir / "learn_cache",
        qc=qc,
        settings=settings,
        config_record=config.to_dict(),
        environment=environment,
        manifest_sha256=manifest_sha256,
    )


def run_group(config: RunConfig, **kwargs: Any) -> None:
    """The group level as the command line runs it (``kwargs``: :func:`run_group_level`'s): training threads set,
    and under torchrun a rank that fails ends this one with a message."""
    use_training_threads(config)
    with distributed.peers_guard():
        run_group_level(config, **kwargs)


def join_distributed(config: RunConfig) -> tuple[int, int] | None:
    """Under torchrun or an srun step of several tasks, join the process group (the ranks' settings checked
    alike); for the ranks other than 0, their rank and the number of ranks (None for rank 0 and one process)."""
    world = distributed.detect()
    if not world.active:
        return None
    distributed.start(world, distributed.device_for(world, config.device))
    shared = {**config.learning_settings(), **{k: config.to_dict()[k] for k in _SAME_ON_EVERY_RANK}}
    distributed.check_same_settings(shared, world)
    return None if world.main else (world.rank, world.size)


#: Options (besides the learning settings) every process of a distributed run must share.
_SAME_ON_EVERY_RANK = ("fold", "resume", "resplit", "reports_only", "models", "device", "participant_label")


def serve_rank(config: RunConfig) -> int:
    """Another rank of a distributed run: fit each fold rank 0 shares, write nothing; the number of folds fitted."""
    world = distributed.current()
    seed_everything(config.seed)
    use_training_threads(config)
    with distributed.peers_guard():
        return serve_jobs(distributed.device_for(world, config.device))


def use_training_threads(config: RunConfig) -> None:
    """Training uses ``--omp-nthreads`` threads per process, at most this process's share of the node's CPUs
    (a fold-array task of one CPU, or four processes of torchrun on one node, do not oversubscribe the cores)."""
    share = max(1, available_cpus() // distributed.processes_on_node())
    torch.set_num_threads(max(1, min(config.omp_nthreads, share)))


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
    out = config.output_dir
    with timed("gathering", LOGGER):
        table, findings, qc_table = _gather(config, with_t1w=with_t1w, folders=folders)
    with timed("writing the manifest and QC table", LOGGER):
        qc_context = _write_tables(config, table, findings, qc_table, run_id=run_id)
    _log_findings(findings)
    description = (
        json.loads((config.bids_dir / "dataset_description.json").read_text())
        if (config.bids_dir / "dataset_description.json").exists()
        else {}
    )
    if not qc_table.empty:  # one strip per image to rate (linked figures: it opens from OUTPUT_DIR)
        write_report(out / GALLERY, "gallery.html.j2", {"dataset_name": description.get("Name", config.bids_dir.name),
                                                        **gallery_context(out, qc_table)})  # fmt: skip
    with timed("subject reports", LOGGER):
        reports = _refresh_subject_reports(config, out, sorted({pid[4:] for pid in table["participant_id"]}), qc_table)
    manifest_sha256 = hashlib.sha256(derivatives.group_path(out, "manifest").read_bytes()).hexdigest()
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
    external = _external_results(config, table) if config.models else None
    methods = _write_methods(out, sorted({pid[4:] for pid in table["participant_id"]}), learning, external)
    with timed("group report", LOGGER):
        _write_group_report(config, out, {
            "description": description, "findings": findings, "qc_context": qc_context, "table": table,
            "reports": reports, "run_id": run_id, "environment": environment, "manifest_sha256": manifest_sha256,
            "learning": learning, "external": external, "methods": methods,
        })  # fmt: skip
    LOGGER.info("Manifest of %d image(s): %s", len(table), derivatives.group_path(out, "manifest"))
    return findings


def _write_methods(
    out: Path, subjects: Sequence[str], learning: dict[str, Any] | None, external: dict[str, Any] | None
) -> Methods:
    """``methods.md`` and ``references.bib`` in OUTPUT_DIR (this run: the participant level's outputs it gathered,
    the study or the external evaluation), and a copy in the study's folder that later runs leave alone."""
    methods = participant_methods([image for s in subjects for image in subject_images(out, s)])
    if learning:
        package = read_package(out / learning["package"])
        study_methods(learning, package, methods)
        write_methods(methods, derivatives.study_dir(out, learning["target"], learning["architecture"],
                                                     learning["inputs"]))  # fmt: skip
    if external:
        external_methods(external, methods)
    path = write_methods(methods, out)
    LOGGER.info("Methods text (with its references.bib): %s", path)
    return methods


def _write_tables(
    config: RunConfig, table: pd.DataFrame, findings: dict[str, Any], qc_table: pd.DataFrame, *, run_id: str
) -> dict[str, Any] | None:
    """``manifest.tsv`` with its sidecar, ``group_audit.json`` and the QC table; what the report shows of QC."""
    out = config.output_dir
    derivatives.write_text(derivatives.group_path(out, "manifest"), table.to_csv(sep="\t", index=False, na_rep="n/a"))
    participants_json_path = config.bids_dir / "participants.json"
    participants_json = json.loads(participants_json_path.read_text()) if participants_json_path.exists() else None
    derivatives.write_json(derivatives.group_path(out, "manifest_record"), mf.manifest_sidecar(table,
                                                                                               participants_json))
    derivatives.write_json(derivatives.group_path(out, "group_audit"),
                           {**findings, "run_id": run_id, "bidsdl_version": __version__})  # fmt: skip
    return _write_qc(out, qc_table)


def _external_results(config: RunConfig, table: pd.DataFrame) -> dict[str, Any]:
    """``group --model``: the participant level's predictions gathered and evaluated by the models' own task."""
    task = get_task(read_package(config.models[0])["task"])  # resolved once, here
    return run_external_evaluation(
        table, task=task, output_dir=config.output_dir, model_dirs=list(config.models), target=config.target,
        seed=config.seed, bids_dir=config.bids_dir, labels=config.labels, label_desc=config.label_desc,
    )  # fmt: skip


def _write_group_report(config: RunConfig, out: Path, parts: dict[str, Any]) -> None:
    """``group.html``; when its template cannot be rendered, a plain page in its place and :class:`ReportFailed`."""
    findings, table, learning, external = parts["findings"], parts["table"], parts["learning"], parts["external"]
    environment, run_id = parts["environment"], parts["run_id"]
    written = write_report(
        out / derivatives.GROUP_REPORT,
        "group.html.j2",
        {
            "dataset_name": parts["description"].get("Name", config.bids_dir.name),
            "findings": findings,
            "checks": _checks(findings, parts["qc_context"]),
            "qc": parts["qc_context"],
            "manifest_columns": _REPORT_COLUMNS,
            "manifest": manifest_rows(table),
            "subject_reports": parts["reports"],
            "version": __version__,
            "run_id": run_id,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment,
            "config_json": json.dumps(config.to_dict(), indent=2),
            "dataset": dataset_summary(table, config.target),
            "seed": config.seed,
            "manifest_sha256": parts["manifest_sha256"],
            "learning": learning_context(learning, out, get_task(learning["task"])) if learning else None,
            "external": external_context(external, get_task(external["task"])) if external else None,
            "methods": parts["methods"].context(),
        },
    )
    if written is None:
        reason = "its template could not be rendered (the error is in the log)"
        checks = _checks(findings, parts["qc_context"])
        write_fallback_report(out / derivatives.GROUP_REPORT, f"Group report of run {run_id}", reason,
                              [f"{c['name']}: {c['result']}" for c in checks if c["result"] != "pass"])  # fmt: skip
        raise ReportFailed(
            f"The group report {out / 'group.html'} could not be made ({reason}); a plain page stands in its place. "
            "manifest.tsv, qc.tsv and any model package are complete. Please report this as a bug of bidsdl with "
            "the run's log."
        )
