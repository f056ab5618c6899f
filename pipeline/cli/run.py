"""``bidsdl BIDS_DIR OUTPUT_DIR {participant,group}``: dispatch, logging and exit codes.

This is the only place that turns errors into exit codes (BIDS execution specification).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..bids.files import AnatImage
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
from ..learn.walltime import mark_start
from ..processes import guard_forks, interrupt_on_signals, terminate_descendants
from ..progress import ConsoleHandler
from .parser import parse_args

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
    if config.lesion_masks is not None and not (config.lesion_masks / "dataset_description.json").is_file():
        raise UsageError(
            f"--lesion-masks {config.lesion_masks} is not a BIDS derivatives dataset (no dataset_description.json). "
            "Give the folder that holds sub-<label>/.../*_desc-lesion_mask.nii.gz and its dataset_description.json."
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
    console = ConsoleHandler(sys.stderr)
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


def _whole_dataset(config: RunConfig) -> bool:
    """Whether the run looks at every participant (so the index is checked file by file), not a few of them."""
    chosen = bool(config.participant_label) or config.participant_index is not None
    return config.list_participants or config.analysis_level == "group" or not chosen


def _index(config: RunConfig, work_dir: Path):
    """The index of BIDS_DIR (built, or reused when BIDS_DIR has not changed)."""
    from ..bids.index import default_location, open_index

    location = config.bids_database_dir or default_location(work_dir)
    index = open_index(config.bids_dir, location, full=_whole_dataset(config))
    if config.participant_index is not None and index.participant_list_changed():
        LOGGER.warning(
            "The participants of BIDS_DIR changed since the index was last built, so --participant-index %d counts "
            "in the new list (%d participants). An array job sized from the old list may skip or repeat participants: "
            "re-run --list-participants, and re-submit the array (finished participants are skipped).",
            config.participant_index, len(index.participants(config.session_label)),
        )  # fmt: skip
    return index


def _select(config: RunConfig, index) -> list[str]:
    """The selected participants (labels, then the array index), read again when they are a few of them."""
    from ..bids.index import describe
    from ..bids.layout import select_participants
    from ..errors import NoDataSelected

    available = index.participants(config.session_label)
    selected = select_participants(available, requested=config.participant_label, index=config.participant_index)
    if _whole_dataset(config):
        return selected
    changes = index.refresh(selected)
    if changes:
        LOGGER.info("Changed since BIDS_DIR was indexed: %s; read again.", describe(changes))
    gone = sorted(set(selected) - set(index.participants(config.session_label)))
    if gone:
        raise NoDataSelected(f"No T1w images for participant(s) {', '.join(f'sub-{s}' for s in gone)} any more "
                             "(removed since BIDS_DIR was indexed). Re-run --list-participants to size the array.")
    return selected


def _validated_subjects(config: RunConfig, *, work_dir: Path, log_dir: Path | None, check_headers: bool):
    """Index BIDS_DIR (or reuse its index), select the participants and validate: the dataset as the index
    recorded it, the selected participants' files read again, and their T1w headers (warnings: a bad image fails
    its own participant). Problems are logged and, with ``log_dir``, recorded; errors raise
    :class:`BidsValidationError` (exit 16) unless ``--skip-bids-validation``."""
    from .. import derivatives
    from ..bids.validation import check_images
    from ..errors import NoDataSelected

    index = _index(config, work_dir)
    whole = _whole_dataset(config)
    try:
        selected = _select(config, index)
    except NoDataSelected:
        # the dataset first: a derivatives dataset or one without participants is said so, not "no T1w found"
        errors = [p for p in index.problems(None if whole else []) if p.severity == "error"]
        if errors and not config.skip_bids_validation:
            raise BidsValidationError(errors) from None
        raise
    subjects: dict[str, list[AnatImage]] = {s: [] for s in selected}
    for image in index.images(selected, config.session_label):  # T1w and the kinds aligned to them
        subjects[image.subject].append(image)
    if config.skip_bids_validation:
        LOGGER.warning("BIDS validation skipped (--skip-bids-validation).")
        return subjects, index
    problems = index.problems(None if whole else selected)
    others = 0 if whole else index.other_warnings(selected)
    if check_headers:
        problems += check_images(config.bids_dir, [img.path for imgs in subjects.values() for img in imgs])
    if log_dir is not None:
        derivatives.write_json(log_dir / "bids_validation.json", {
            "problems": [p.as_dict() for p in problems], "other_participants_warnings": others,
            "index": index.record(),
        })  # fmt: skip
    for problem in problems:
        if problem.severity != "error":
            LOGGER.warning("BIDS: %s", problem)
    if others:
        LOGGER.info("%d BIDS warning(s) about other participants' files are not repeated here (a run over the whole "
                    "dataset, or --list-participants -v, lists them).", others)  # fmt: skip
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise BidsValidationError(errors)
    return subjects, index


def run(config: RunConfig, argv: Sequence[str]) -> int:
    work_dir = check_paths(config)
    if config.list_participants:  # the dataset's validation as in a run; only the index is written
        setup_logging(config.verbosity, None)  # messages on stderr: stdout is the list
        subjects, _ = _validated_subjects(config, work_dir=work_dir, log_dir=None, check_headers=False)
        for subject in subjects:
            print(subject)
        return EXIT_OK
    if config.analysis_level == "group" and (rank := _join_distributed(config)) is not None:
        return _serve(config, *rank)  # another rank of a distributed run: trains what rank 0 shares, writes nothing

    from .. import derivatives

    if config.analysis_level == "participant" and not config.plan:
        from ..participant import start_helpers

        start_helpers(config)  # the brain-extraction helper loads torch while the dataset is read
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

    subjects, index = _validated_subjects(
        config, work_dir=work_dir, log_dir=log_dir, check_headers=config.analysis_level == "participant"
    )

    description = derivatives.dataset_description(
        bids_dir=config.bids_dir,
        source_description=_read_description(config.bids_dir),
        container=detect_container(),
    )
    derivatives.ensure_dataset_description(config.output_dir, description)

    if config.plan:  # a representative job measured in a scratch folder; plan/ written from it
        from ..bids.index import default_location
        from ..plan import run_plan

        return run_plan(config, subjects, work_dir=work_dir,
                        index_dir=config.bids_database_dir or default_location(work_dir))  # fmt: skip
    if config.analysis_level == "participant":
        return _participants(config, subjects, run_id=run_id, work_dir=work_dir)

    from ..group import run_group

    run_group(config, run_id=run_id, environment=environment, work_dir=work_dir, with_t1w=list(subjects),
              folders=index.folders())  # fmt: skip
    if not config.fold:
        LOGGER.info("Group report: %s", config.output_dir / derivatives.GROUP_REPORT)
    return EXIT_OK


def _participants(
    config: RunConfig, subjects: Mapping[str, Sequence[AnatImage]], *, run_id: str, work_dir: Path
) -> int:
    """The participant level over ``subjects``; the exit code (a failed participant: 1, the others finished)."""
    from ..participant import run_participant_level

    LOGGER.info("Participants: %s", ", ".join(f"sub-{s}" for s in subjects))
    statuses = run_participant_level(config, subjects=subjects, run_id=run_id, work_dir=work_dir)
    failed = [s["participant_id"] for s in statuses if s["state"] == "failed"]
    if failed:
        LOGGER.error(
            "%d of %d participant(s) failed: %s. Their status records and crash files are in "
            "<OUTPUT_DIR>/sub-<label>/log/.", len(failed), len(statuses), ", ".join(failed),
        )  # fmt: skip
        return EXIT_PARTICIPANT_FAILED
    skipped = sum(bool(s.get("skipped")) for s in statuses)
    LOGGER.info(
        "All %d participant(s) finished%s. Outputs: %s", len(statuses),
        f" ({skipped} already up to date, skipped)" if skipped else "", config.output_dir,
    )  # fmt: skip
    return EXIT_OK


def _join_distributed(config: RunConfig) -> tuple[int, int] | None:
    """Under torchrun or an srun step of several tasks, join the process group; for the ranks other than 0, their
    rank and the number of ranks (None for rank 0 and a run of one process)."""
    from ..group import join_distributed

    return join_distributed(config)


def _serve(config: RunConfig, rank: int, size: int) -> int:
    """Another rank of a distributed run: its log lines prefixed with its rank; it trains what rank 0 shares."""
    from ..group import serve_rank

    setup_logging(config.verbosity, None, prefix=f"[rank {rank}] ")
    fitted = serve_rank(config)
    LOGGER.info("Rank %d of %d: trained %d fold(s) with rank 0; wrote nothing (rank 0 writes).", rank, size,
                fitted)  # fmt: skip
    return EXIT_OK


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
    mark_start()  # --time-limit counts from here
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
    guard_forks()  # workers die with this process, even when it is killed outright
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
