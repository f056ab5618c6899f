"""Run the participant level: execute the graph, then record each participant's status.

One participant's failure never stops the others: Nipype carries on with independent nodes, and
each participant's outcome is read from its own outputs and crash files afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, derivatives
from .bids.layout import AnatImage
from .bids.pairing import Pairing, pair_images
from .config import RunConfig
from .errors import RunInterrupted
from .interfaces import brain_service
from .kinds import REFERENCE_KIND
from .progress import WorkflowProgress
from .qc import load_qc
from .reports.subject import write_subject_report
from .workflows.base import executed_node_names, image_workflow_name, prediction_workflow_name, single_subject_name

LOGGER = logging.getLogger(__name__)


#: The state of an image that is listed but not processed (a FLAIR without a T1w in its session).
NOT_PROCESSED = "not processed"


def _crash_summary(crash_file: Path) -> str:
    """The node and the last line of the traceback in a Nipype text crash file."""
    lines = [ln.strip() for ln in crash_file.read_text(errors="replace").splitlines() if ln.strip()]
    node = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Node:")), crash_file.stem)
    last = lines[-1] if lines else "unknown error"
    return f"step {node} failed: {last} (details: {crash_file})"


def subject_status(
    *,
    subject: str,
    images: Sequence[AnatImage],
    output_dir: Path,
    bids_dir: Path,
    run_id: str,
    config_hash: str,
    started: float,
    finished: float,
    model_hashes: Sequence[str] = (),
) -> dict[str, Any]:
    """The status record of one participant after a run, from its outputs and crash files.

    It is what a re-run compares against (:func:`rerun_reason`): the state, the bidsdl version,
    the config hash, the models' content hashes, every input's sha256 and every output's size.
    """
    image_records, errors, inputs = [], [], []
    pairings = {p.image.path: p for p in pair_images(images)}
    for image in images:
        entry, image_errors = _image_entry(image, pairings.get(image.path), Path(output_dir), bids_dir, started)
        image_records.append(entry)
        errors += image_errors
        if entry.get("audit"):
            inputs.append({"path": entry["source"], "sha256": entry.pop("sha256")})
    crash_dir = derivatives.subject_log_dir(output_dir, subject) / run_id
    crashes = sorted(crash_dir.glob("crash-*.txt")) if crash_dir.exists() else []
    for crash in crashes:
        summary = _crash_summary(crash)
        names = {img.relative_to(bids_dir): [image_workflow_name(img)] for img in images}
        for img in images:
            if img.kind == REFERENCE_KIND:  # its prediction, when it stands beside it
                names[img.relative_to(bids_dir)].append(prediction_workflow_name(img))
        source = next((s for s, wfs in names.items() if any(f".{wf}." in summary for wf in wfs)), None)
        errors.append(f"{source}: {summary}" if source else summary)
    missing = [str(e["source"]) for e in image_records if e["audit"] is None and e["state"] != NOT_PROCESSED]
    if missing and not crashes:
        errors.append(f"no audit was written for {', '.join(missing)}; see the run log.")
    state = "done" if not errors and all(e["state"] in ("done", NOT_PROCESSED) for e in image_records) else "failed"
    return {
        **_status_header(subject, state, run_id=run_id, config_hash=config_hash, started=started),
        "model_hashes": list(model_hashes),
        "finished": _iso(finished),
        "duration_s": round(finished - started, 2),
        "inputs": inputs,
        "images": image_records,
        "outputs": output_records(output_dir, subject),
        "errors": errors,
        "crash_files": [c.relative_to(output_dir).as_posix() for c in crashes],
    }


def _image_entry(image: AnatImage, pairing: Pairing | None, output_dir: Path, bids_dir: Path, started: float
                 ) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """An image's line in the status record (from the records this run wrote), and its errors. An image aligned to
    a T1w names it and why; one without a T1w in its session is listed as not processed, with the reason."""
    entry: dict[str, Any] = {"source": image.relative_to(bids_dir), "kind": image.kind, "audit": None,
                             "state": "failed"}  # fmt: skip
    if pairing is not None and pairing.reference is None:
        return {**entry, "state": NOT_PROCESSED, "reason": pairing.reason}, []
    if pairing is not None and pairing.reference is not None:
        entry.update(reference=pairing.reference.relative_to(bids_dir), pairing=pairing.reason)
    audit_path = derivatives.named_path(output_dir, image.path, "audit")
    if not audit_path.exists() or audit_path.stat().st_mtime < started - 1:
        return entry, []
    record = json.loads(audit_path.read_text())
    entry.update(audit=audit_path.relative_to(output_dir).as_posix(), flags=record["flags"],
                 sha256=record.get("file", {}).get("sha256"))  # fmt: skip
    if not record["readable"]:
        return entry, list(record["errors"])
    entry["state"] = "done"
    verdict = _qc_verdict(derivatives.named_path(output_dir, image.path, "iqm"), started)
    if verdict is not None:
        entry["qc_verdict"] = verdict
        if verdict == "fail":
            entry["state"] = "failed"
    return entry, []


def _qc_verdict(iqm_path: Path, started: float) -> str | None:
    """The quality verdict in an image's IQM record written by this run, if any."""
    try:
        if iqm_path.stat().st_mtime < started - 1:
            return None
        return json.loads(iqm_path.read_text()).get("qc", {}).get("verdict")
    except (OSError, ValueError):
        return None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def output_records(output_dir: Path, subject: str) -> list[dict[str, Any]]:
    """Every derivative of a participant (not its logs nor leftovers), with its size."""
    root = Path(output_dir) / f"sub-{subject}"
    if not root.is_dir():
        return []
    files = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [
        {"path": p.relative_to(output_dir).as_posix(), "size": p.stat().st_size}
        for p in sorted(files)
        if p.relative_to(root).parts[0] != "log"
    ]


def input_records(images: Sequence[AnatImage], bids_dir: Path) -> list[dict[str, Any]]:
    """The selected images with the sha256 of their files, as the audit records them."""
    from .bids.audit import sha256_file

    records = []
    for image in images:
        try:
            digest: str | None = sha256_file(image.path)
        except OSError:
            digest = None
        records.append({"path": image.relative_to(bids_dir), "sha256": digest})
    return records


def rerun_reason(
    previous: Mapping[str, Any] | None,
    *,
    inputs: Sequence[Mapping[str, Any]],
    config_hash: str,
    model_hashes: Sequence[str] = (),
    output_dir: Path,
) -> str | None:
    """Why a participant must run again, or None when its last run is done and still valid.

    Valid means: the same bidsdl version, configuration, models and input files (by sha256), and
    every output of that run still there with its size. Anything else (no record, a failed,
    interrupted or killed run) is a reason to run.
    """
    if previous is None:
        return "never processed into this OUTPUT_DIR"
    state = previous.get("state")
    if state != "done":
        where = f" (run {previous.get('run_id')})" if previous.get("run_id") else ""
        return {
            "running": f"its last run{where} never finished (killed?)",
            "interrupted": f"its last run{where} was interrupted",
        }.get(str(state), f"its last run{where} failed")
    if previous.get("bidsdl_version") != __version__:
        return f"it was processed by bidsdl {previous.get('bidsdl_version')}, this is {__version__}"
    if previous.get("config_hash") != config_hash:
        return "the configuration changed"
    if sorted(previous.get("model_hashes") or []) != sorted(model_hashes):
        return "the models changed"
    before = {i["path"]: i.get("sha256") for i in previous.get("inputs") or []}
    now = {i["path"]: i.get("sha256") for i in inputs}
    if before != now:
        changed = sorted(p for p in before.keys() | now.keys() if before.get(p) != now.get(p) or p not in before)
        return f"its inputs changed: {', '.join(changed)}"
    for record in previous.get("outputs") or []:
        path = Path(output_dir) / record["path"]
        if not path.is_file() or path.stat().st_size != record["size"]:
            return f"an output of its last run is missing or changed: {record['path']}"
    return None


def _remove_leftovers(output_dir: Path, subject: str) -> list[Path]:
    """Temporary files of a killed run of this participant (never a complete-looking name)."""
    candidates = [
        *(Path(output_dir) / f"sub-{subject}").rglob(".*.tmp*"),
        *Path(output_dir).glob(f".sub-{subject}.*.tmp*"),  # its report
    ]
    for path in candidates:
        path.unlink(missing_ok=True)
    return candidates


def check_models(config: RunConfig, subjects: Mapping[str, Sequence[AnatImage]]) -> list[dict[str, Any]]:
    """Before anything runs with ``--model``: the packages are complete and untampered, they expect
    this run's resolution, and no selected image was seen in training (the leakage guard).

    Returns the packages' checked records (``model.json``, in ``--model``'s order: the graph is built
    from them, so each package is read and its weights hashed once per run); raises
    :class:`~pipeline.errors.InputDataError` (65) listing the training subjects found, unless
    ``--allow-training-subjects``.
    """
    from .bids.audit import load_spatial, sha256_array
    from .errors import InputDataError
    from .learn.device import resolve_device
    from .learn.ensemble import check_ensemble, check_registration, check_resolution, training_matches
    from .learn.package import read_package

    resolve_device(config.device)  # --device cuda without a GPU: say so before anything runs
    records = [read_package(folder) for folder in config.models]
    check_ensemble(records, list(config.models))
    if "labels" not in records[0]:  # a segmentation model builds its own grid from the 1 mm derivatives
        check_resolution(records, config.model_resolution, list(config.models))
    check_registration(records, config.registration, list(config.models))
    seen = []
    dataset = derivatives.source_dataset(config.bids_dir)["key"]
    for subject, images in subjects.items():
        hashes = []
        for image in (img for img in images if img.kind == REFERENCE_KIND):  # what models are trained on
            try:
                hashes.append(sha256_array(np.asanyarray(load_spatial(image.path).dataobj)))
            except Exception:  # unreadable: the audit reports it, with what to do
                continue
        seen += training_matches(records, f"sub-{subject}", hashes, dataset=dataset)
    if seen and not config.allow_training_subjects:
        raise InputDataError(
            "The model saw these participants in training or validation: "
            + "; ".join(seen)
            + ". Predictions on them would look better than the model is. Leave them out with --participant-label, "
            "or give --allow-training-subjects to predict them anyway (the outputs are then marked seen-in-training)."
        )
    for reason in seen:
        LOGGER.warning("Predicting with --allow-training-subjects: %s (marked seen-in-training).", reason)
    for folder, record in zip(config.models, records, strict=True):
        LOGGER.info("Model %s (%s, content %s)", folder, record["name"], record["content_sha256"][:8])
    return records


def plan_participants(
    config: RunConfig, subjects: Mapping[str, Sequence[AnatImage]], model_hashes: Sequence[str]
) -> tuple[dict[str, Sequence[AnatImage]], list[dict[str, Any]]]:
    """Split ``subjects`` into those to run and the status records of those already done.

    A re-submitted array job thus redoes only failed, interrupted or changed participants;
    ``--force`` runs every selected one.
    """
    to_run: dict[str, Sequence[AnatImage]] = {}
    skipped: list[dict[str, Any]] = []
    config_hash = config.config_hash()
    for subject, images in subjects.items():
        path = derivatives.status_path(config.output_dir, subject)
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        reason = rerun_reason(
            previous,
            inputs=input_records(images, config.bids_dir),
            config_hash=config_hash,
            model_hashes=model_hashes,
            output_dir=config.output_dir,
        )
        if reason is None and not config.force:
            assert previous is not None
            LOGGER.info(
                "sub-%s is up to date (run %s, same inputs, config and version): skipped. "
                "Give --force to run it again.",
                subject,
                previous.get("run_id"),
            )
            skipped.append({**previous, "skipped": True})
            continue
        if previous is not None:
            LOGGER.info("sub-%s runs again: %s.", subject, "--force" if reason is None else reason)
        to_run[subject] = images
    return to_run, skipped


def start_helpers(config: RunConfig) -> None:
    """Start this process's brain-extraction helper (it loads torch while the dataset is read and indexed)."""
    brain_service.process_helper(config.device)


def run_participant_level(
    config: RunConfig, *, subjects: Mapping[str, Sequence[AnatImage]], run_id: str, work_dir: Path
) -> list[dict[str, Any]]:
    """Build and run the graph for ``subjects``; write and return their status records.

    Participants whose last run is done and still valid are skipped (:func:`plan_participants`).
    Each one to run is marked ``running`` first, so a killed process leaves that behind; a
    termination signal marks them ``interrupted``. A participant another process is running into the
    same OUTPUT_DIR (submitted twice) is left to it and reported as failed here.
    """
    if config.labels is not None:
        LOGGER.warning(
            "--labels %s is read by the group level (segmentation training, or external evaluation with --model); "
            "the participant level does not use it.", config.labels,
        )  # fmt: skip
    models = check_models(config, subjects) if config.models else []
    model_hashes = [record["content_sha256"] for record in models]
    subjects, statuses = plan_participants(config, subjects, model_hashes)
    with contextlib.ExitStack() as locks:
        busy = [s for s in subjects if not locks.enter_context(derivatives.participant_lock(config.output_dir, s))]
        for subject in busy:
            message = (
                f"sub-{subject} is being processed by another bidsdl process into this OUTPUT_DIR (the same "
                "participant submitted twice?); left to it. Re-run once that process has ended."
            )
            LOGGER.error("%s", message)
            statuses.append({"participant_id": f"sub-{subject}", "state": "failed", "errors": [message]})
        subjects = {s: images for s, images in subjects.items() if s not in busy}
        if subjects:
            statuses += _run_locked(config, subjects, run_id=run_id, work_dir=work_dir, models=models)
    return statuses


def _run_locked(
    config: RunConfig,
    subjects: Mapping[str, Sequence[AnatImage]],
    *,
    run_id: str,
    work_dir: Path,
    models: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Run the graph for participants whose locks this process holds, at most ``--nprocs`` of them in flight;
    each participant's status record and report are written as soon as its last step has ended."""
    from .workflows.base import init_bidsdl_wf

    model_hashes = [record["content_sha256"] for record in models]
    finish = _Finisher(config, subjects, run_id=run_id, model_hashes=model_hashes)
    for subject in subjects:
        for leftover in _remove_leftovers(config.output_dir, subject):
            LOGGER.info("Removed a temporary file of an earlier, killed run: %s", leftover)
        finish.write_header(subject, "running")
    # one brain-extraction helper for the process (already loading when the command line started it)
    helper = brain_service.process_helper(config.device)
    workflow = init_bidsdl_wf(config, subjects=subjects, run_id=run_id, work_dir=work_dir,
                              models=models, brain_helper=helper.contact)  # fmt: skip
    owners = {single_subject_name(subject): subject for subject in subjects}
    tracker = WorkflowProgress(executed_node_names(workflow), workflow.name, owners, logger=LOGGER, on_done=finish)
    # Nipype's scheduler runs gc.collect() around every node it starts; with the run's imports frozen
    # out of the collector's sight each one takes milliseconds, not ~0.2 s
    gc.freeze()
    LOGGER.info("Workflow starts: %d participant(s), %s.", len(subjects),
                f"{config.nprocs} processes" if config.nprocs > 1 else "one process")  # fmt: skip
    try:
        workflow.run(plugin=_plugin(config, list(subjects), owners, tracker))
    except RuntimeError as exc:  # Nipype's "Workflow did not execute cleanly"
        LOGGER.debug("Nipype reported failed nodes: %s", exc)
    except RunInterrupted as exc:
        for subject in subjects:
            if subject not in finish.statuses:  # those finished keep their record
                finish.write_header(subject, "interrupted", [f"{exc} after {time.time() - finish.started:.0f} s; "
                                                              "re-run the same command to resume."])  # fmt: skip
        raise
    finally:
        gc.unfreeze()
        tracker.progress.finish()
    for subject in subjects:
        if subject not in finish.statuses:  # failed ones (and, in a Linear run's error path, any left)
            finish(subject)
    return [finish.statuses[subject] for subject in subjects]


def _plugin(config: RunConfig, order: list[str], owners: dict[str, str], tracker: WorkflowProgress) -> Any:
    """The Nipype plugin: participants in turn, at most ``--nprocs`` in flight (one process: one after another)."""
    from .workflows.scheduling import ParticipantsInOrder, ParticipantsInTurn

    rank = {subject: i for i, subject in enumerate(order)}
    position = {owner: rank[subject] for owner, subject in owners.items()}

    def owner(fullname: str) -> int | None:
        parts = fullname.split(".")
        return position.get(parts[1]) if len(parts) > 2 else None

    plugin_args: dict[str, Any] = {"n_procs": config.nprocs, "memory_gb": config.mem_gb, "raise_insufficient": False,
                                   "status_callback": tracker}  # fmt: skip
    if config.nprocs > 1:
        return ParticipantsInTurn(plugin_args, owner=owner, n_participants=len(order), limit=config.nprocs)
    return ParticipantsInOrder(plugin_args, owner=owner)


class _Finisher:
    """Writes a participant's status record and report once its steps have ended (called by the progress
    tracker as each participant finishes, and for the others when the workflow returns)."""

    def __init__(
        self, config: RunConfig, subjects: Mapping[str, Sequence[AnatImage]], *, run_id: str,
        model_hashes: Sequence[str],
    ) -> None:  # fmt: skip
        self.config, self.subjects, self.run_id, self.model_hashes = config, subjects, run_id, model_hashes
        self.config_hash = config.config_hash()
        self.started = time.time()
        self.qc = load_qc(config.output_dir)  # group percentiles in the reports, once a group run exists
        self.statuses: dict[str, dict[str, Any]] = {}

    def write_header(self, subject: str, state: str, errors: Sequence[str] = ()) -> None:
        record = _status_header(subject, state, run_id=self.run_id, config_hash=self.config_hash,
                                started=self.started)  # fmt: skip
        if errors:
            record["errors"] = list(errors)
        derivatives.write_json(derivatives.status_path(self.config.output_dir, subject), record)

    def __call__(self, subject: str) -> None:
        config, images = self.config, self.subjects[subject]
        status = subject_status(
            subject=subject, images=images, output_dir=config.output_dir, bids_dir=config.bids_dir,
            run_id=self.run_id, config_hash=self.config_hash, started=self.started, finished=time.time(),
            model_hashes=self.model_hashes,
        )  # fmt: skip
        derivatives.write_json(derivatives.status_path(config.output_dir, subject), status)
        report = write_subject_report(config.output_dir, subject, qc=self.qc)
        status["report"] = report.name if report else None
        self.statuses[subject] = status
        if status["state"] == "failed":
            LOGGER.error("sub-%s failed:\n  %s", subject, "\n  ".join(status["errors"]))
        else:
            LOGGER.info("sub-%s done (%d image(s)); report: %s", subject, len(images), report)


def _status_header(subject: str, state: str, *, run_id: str, config_hash: str, started: float) -> dict[str, Any]:
    """What every status record starts with; alone, the record of a run in progress (``running``)
    or stopped by a signal (``interrupted``)."""
    return {
        "participant_id": f"sub-{subject}",
        "state": state,
        "run_id": run_id,
        "bidsdl_version": __version__,
        "config_hash": config_hash,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _iso(started),
        "errors": [],
    }
