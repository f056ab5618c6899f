"""``bidsdl BIDS_DIR OUTPUT_DIR {participant,group}``: dispatch, logging and exit codes.

This is the only place that turns errors into exit codes (BIDS execution specification).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..config import RunConfig, save_config
from ..errors import (
    EXIT_OK,
    EXIT_PARTICIPANT_FAILED,
    BidsDirMissing,
    BidsdlError,
    BidsValidationError,
    RunInterrupted,
    UsageError,
)
from .parser import parse_args
from .signals import interrupt_on_signals, terminate_descendants

LOGGER = logging.getLogger("pipeline.cli")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def check_paths(config: RunConfig) -> Path:
    """Refuse impossible folder combinations; return the work dir to use."""
    bids_dir = config.bids_dir
    if not bids_dir.is_dir():
        raise BidsDirMissing(
            f"BIDS_DIR {bids_dir} does not exist or is not a folder. Check the path"
            " (in a container, check that it is mounted, e.g. -v /data/bids:/data:ro)."
        )
    bids_real = bids_dir.resolve()
    output_real = config.output_dir.resolve()
    if output_real == bids_real or output_real.is_relative_to(bids_real):
        raise UsageError(
            f"OUTPUT_DIR {config.output_dir} is BIDS_DIR or inside it; bidsdl never writes into the "
            f"input dataset. Choose a folder outside {bids_dir} (e.g. {bids_dir.parent / 'derivatives'})."
        )
    work_dir = config.work_dir or config.output_dir / ".bidsdl_work"
    if work_dir.resolve().is_relative_to(bids_real):
        raise UsageError(f"--work-dir {work_dir} is inside BIDS_DIR {bids_dir}; choose another folder.")
    return work_dir


def setup_logging(verbosity: int, log_file: Path | None, *, prefix: str = "") -> None:
    """bidsdl's messages to the console by verbosity; everything to the run's log file.

    Nipype logs through its own loggers and a console handler of its own; its console output is
    kept to warnings unless ``-vv``, while the log file gets its INFO messages too.
    """
    from nipype import logging as nipype_logging  # noqa: F401 - sets up Nipype's handlers first

    console_level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    # Nipype's own console output (tracebacks of failed nodes) is noise next to bidsdl's summary;
    # all of it is in the log file and the crash files.
    nipype_console_level = {1: logging.WARNING}.get(verbosity, logging.INFO if verbosity >= 2 else logging.CRITICAL)
    ours = logging.getLogger("pipeline")
    ours.setLevel(logging.DEBUG)
    ours.propagate = False
    _close_log_files()
    for handler in list(ours.handlers):
        ours.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter(prefix + "%(levelname)s: %(message)s"))
    ours.addHandler(console)
    for handler in logging.getLogger("nipype").handlers:  # Nipype's own console handler
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(nipype_console_level)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        ours.addHandler(file_handler)
        logging.getLogger("nipype").addHandler(file_handler)


def _discover(config: RunConfig):
    from ..bids.layout import collect_t1w, index_dataset, select_participants

    layout = index_dataset(config.bids_dir)
    images = collect_t1w(layout, subjects=config.participant_label or None, sessions=config.session_label or None)
    with_images = sorted({img.subject for img in images})
    selected = select_participants(with_images, requested=config.participant_label, index=config.participant_index)
    return {s: [img for img in images if img.subject == s] for s in selected}


def _validated_subjects(config: RunConfig, *, log_dir: Path | None, check_headers: bool):
    """Validate BIDS_DIR (unless --skip-bids-validation), then find the selected participants' T1w and
    check their headers (warnings: a bad image fails its own participant). Problems are logged and,
    with ``log_dir``, recorded; errors raise :class:`BidsValidationError` (exit 16)."""
    from .. import derivatives
    from ..bids.validation import check_images, validate_dataset

    if config.skip_bids_validation:
        LOGGER.warning("BIDS validation skipped (--skip-bids-validation).")
        return _discover(config)
    # the dataset first: a derivatives dataset or one without participants is said so, not "no T1w found"
    problems = validate_dataset(config.bids_dir)
    errors = [p for p in problems if p.severity == "error"]
    subjects = {}
    if not errors:
        subjects = _discover(config)
        if check_headers:
            problems += check_images(config.bids_dir, [img.path for imgs in subjects.values() for img in imgs])
    if log_dir is not None:
        derivatives.write_json(log_dir / "bids_validation.json", {"problems": [p.as_dict() for p in problems]})
    for problem in problems:
        if problem.severity != "error":
            LOGGER.warning("BIDS: %s", problem)
    if errors:
        raise BidsValidationError(errors)
    return subjects


def run(config: RunConfig, argv: Sequence[str]) -> int:
    work_dir = check_paths(config)
    if config.list_participants:  # the dataset's validation as in a run, nothing written
        for subject in _validated_subjects(config, log_dir=None, check_headers=False):
            print(subject)
        return EXIT_OK
    if config.analysis_level == "group" and _join_distributed(config):
        return _serve(config)  # another rank of a distributed run: trains what rank 0 shares, writes nothing

    from .. import derivatives

    if config.analysis_level == "participant":
        from ..interfaces.brain_service import process_helper

        process_helper(config.device)  # the brain-extraction helper loads torch while the dataset is read
    from ..environment import detect_container, environment_record

    derivatives.check_writable(config.output_dir)
    run_id = f"{datetime.now():%Y%m%d-%H%M%S}_{config.analysis_level}_{uuid.uuid4().hex[:8]}"
    log_dir = config.output_dir / "logs" / run_id
    setup_logging(config.verbosity, log_dir / "bidsdl.log")
    environment = environment_record(list(argv))
    save_config(config, log_dir / "config.json")
    derivatives.write_json(log_dir / "environment.json", environment)
    LOGGER.info("bidsdl %s, %s level, run %s", __version__, config.analysis_level, run_id)
    LOGGER.info("Log, effective config and environment: %s", log_dir)

    subjects = _validated_subjects(config, log_dir=log_dir, check_headers=config.analysis_level == "participant")

    description = derivatives.dataset_description(
        bids_dir=config.bids_dir,
        source_description=_read_description(config.bids_dir),
        container=detect_container(),
    )
    derivatives.ensure_dataset_description(config.output_dir, description)

    if config.analysis_level == "participant":
        from ..participant import run_participant_level

        LOGGER.info("Participants: %s", ", ".join(f"sub-{s}" for s in subjects))
        statuses = run_participant_level(config, subjects=subjects, run_id=run_id, work_dir=work_dir)
        failed = [s["participant_id"] for s in statuses if s["state"] == "failed"]
        if failed:
            LOGGER.error(
                "%d of %d participant(s) failed: %s. Their status records and crash files are "
                "in <OUTPUT_DIR>/sub-<label>/log/.",
                len(failed),
                len(statuses),
                ", ".join(failed),
            )
            return EXIT_PARTICIPANT_FAILED
        skipped = sum(bool(s.get("skipped")) for s in statuses)
        LOGGER.info(
            "All %d participant(s) finished%s. Outputs: %s",
            len(statuses),
            f" ({skipped} already up to date, skipped)" if skipped else "",
            config.output_dir,
        )
        return EXIT_OK

    from ..group import run_group_level
    from ..learn import distributed

    _use_training_threads(config)
    with distributed.peers_guard():  # under torchrun/srun: another rank that fails ends this one with a message
        run_group_level(config, run_id=run_id, environment=environment, work_dir=work_dir)
    if not config.fold:
        LOGGER.info("Group report: %s", config.output_dir / "group.html")
    return EXIT_OK


def _join_distributed(config: RunConfig) -> bool:
    """Under torchrun or an srun step of several tasks, join the process group; True for the ranks other than 0."""
    from ..learn import distributed

    world = distributed.detect()
    if not world.active:
        return False
    distributed.start(world, distributed.device_for(world, config.device))
    shared = {**config.learning_settings(), **{k: config.to_dict()[k] for k in _SAME_ON_EVERY_RANK}}
    distributed.check_same_settings(shared, world)
    return not world.main


#: Options (besides the learning settings) every process of a distributed run must share.
_SAME_ON_EVERY_RANK = ("fold", "resume", "resplit", "reports_only", "models", "device", "participant_label")


def _serve(config: RunConfig) -> int:
    from ..learn import distributed
    from ..learn.study import serve_jobs
    from ..learn.train import seed_everything

    world = distributed.current()
    setup_logging(config.verbosity, None, prefix=f"[rank {world.rank}] ")
    seed_everything(config.seed)
    _use_training_threads(config)
    with distributed.peers_guard():
        fitted = serve_jobs(distributed.device_for(world, config.device))
    LOGGER.info("Rank %d of %d: trained %d fold(s) with rank 0; wrote nothing (rank 0 writes).", world.rank,
                world.size, fitted)  # fmt: skip
    return EXIT_OK


def _use_training_threads(config: RunConfig) -> None:
    """Training uses ``--omp-nthreads`` threads per process, at most this process's share of the node's CPUs
    (a fold-array task of one CPU, or four processes of torchrun on one node, do not oversubscribe the cores)."""
    import torch

    from ..config import available_cpus
    from ..learn import distributed

    share = max(1, available_cpus() // distributed.processes_on_node())
    torch.set_num_threads(max(1, min(config.omp_nthreads, share)))


def _end_distributed(error: BidsdlError | None) -> None:
    """Tell the other ranks (when they wait for a job) that rank 0 ended; leave the process group."""
    distributed = sys.modules.get("pipeline.learn.distributed")
    if distributed is None:  # never imported: not a distributed run
        return
    distributed.end(error)
    distributed.stop()


def _leave_distributed() -> None:
    """Leave the process group without a word to the others (they notice: their collectives fail at once)."""
    distributed = sys.modules.get("pipeline.learn.distributed")
    if distributed is not None:
        distributed.stop()


def _read_description(bids_dir: Path) -> dict | None:
    import json

    try:
        return json.loads((bids_dir / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bidsdl`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
    try:
        config = parse_args(argv)
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    except BidsdlError as exc:
        print(f"bidsdl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        with interrupt_on_signals():
            code = run(config, argv)
        _end_distributed(None)
        return code
    except RunInterrupted as exc:
        stopped = terminate_descendants()
        message = (
            f"{exc}: stopped {len(stopped)} worker process(es). What was running is marked 'interrupted' in "
            "its status record; re-run the same command to resume"
            + (" (group level: add --resume to continue training)." if config.analysis_level == "group" else ".")
        )
        if logging.getLogger("pipeline").handlers:
            LOGGER.error("%s", message)
        else:
            print(f"bidsdl: {message}", file=sys.stderr)
        return exc.exit_code
    except BidsdlError as exc:
        if logging.getLogger("pipeline").handlers:
            LOGGER.error("%s", exc)
        else:
            print(f"bidsdl: error: {exc}", file=sys.stderr)
        _end_distributed(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bidsdl: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130
    finally:
        _leave_distributed()
        _release_logging()


def console() -> int:
    """The ``bidsdl`` console script: :func:`main`, then an exit that skips the interpreter's last
    garbage collection over every object the run loaded (~1 s; nothing left needs it)."""
    code = main()
    gc.freeze()
    return code


def _release_logging() -> None:
    """Leave logging as it was before :func:`main` (a later call in the same process, a test or a
    notebook, must not write to this run's handlers): log files closed, bidsdl's console handler gone."""
    _close_log_files()
    ours = logging.getLogger("pipeline")
    for handler in list(ours.handlers):
        ours.removeHandler(handler)
    ours.propagate = True


def _close_log_files() -> None:
    for name in ("pipeline", "nipype"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                handler.close()


if __name__ == "__main__":
    sys.exit(console())
