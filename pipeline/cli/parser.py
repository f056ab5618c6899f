"""The ``bidsdl`` command-line contract, parsed into a :class:`~pipeline.config.RunConfig`.

Pure: no filesystem checks beyond reading a ``--config`` file, and it never exits. Usage
problems raise :class:`~pipeline.errors.UsageError` (exit 64), so argparse's exit code 2 cannot
leak out. Precedence: built-in defaults < ``--config`` file < the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..bids.layout import normalize_label
from ..config import (
    LEARNING_FIELDS,
    POSITIONAL_KEYS,
    SUBJECT_REPORT_REFRESH_MAX,
    RunConfig,
    available_cpus,
    available_memory_gb,
    default,
    load_config_file,
)
from ..errors import EXIT_CODES, UnknownAnalysisLevel, UsageError
from ..kinds import INPUT_CHANNELS, MORPHOMETRY_CHANNELS, MORPHOMETRY_INPUTS
from ..learn.registry import auto_task_names, get_task, task_names
from ..learn.walltime import parse_duration

ANALYSIS_LEVELS = ("participant", "group")
CLASS_WEIGHTING = ("none", "loss", "sampler")
AUGMENTATIONS = ("affine", "intensity", "noise", "flip")
DEFAULT_AUGMENT = ("affine", "intensity", "noise")
DEVICES = ("auto", "cpu", "cuda")
#: Group-level options that change how a training runs, not what it learns.
_GROUP_RUN_FIELDS = ("device", "resume", "resplit", "reports_only", "tensorboard", "compile", "fold", "outer_fold",
                     "trial", "time_limit")
#: Options a --config file may not set (they describe the invocation, not the analysis).
_NOT_IN_CONFIG = frozenset({"config", "help", "version"})
_EXIT_CODES = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. Run 'bidsdl --help' for the usage.")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _tasks() -> dict[str, Any]:
    """Every task object by name (imports the task modules: only for ``--help`` and options that name a task)."""
    return {name: get_task(name) for name in task_names()}


def _default_text(dest: str) -> str:
    """A learning option's default as ``--help`` shows it: :class:`RunConfig`'s, then each task's own (generated
    from the task objects, never written into a help string); for ``--architecture``, which networks fit which
    task."""
    tasks = _tasks()
    fits = {
        "architecture": "; ".join(f"{name}: {', '.join(t.architectures)}" for name, t in tasks.items()),
        "task": f"tasks: {', '.join(tasks)}",
        "selection_metric": "; ".join(f"{name}: {', '.join(t.direction)}" for name, t in tasks.items()),
    }.get(dest, "")
    value = default(dest)
    if value in (None, ()) or isinstance(value, bool):
        return fits
    shown = [f"default {value:g}" if isinstance(value, float) else f"default {value}"]
    shown += [f"{name} {t.defaults[dest]:g}" if isinstance(t.defaults[dest], float) else f"{name} {t.defaults[dest]}"
              for name, t in tasks.items() if dest in t.defaults]  # fmt: skip
    return "; ".join([", ".join(shown), fits] if fits else [", ".join(shown)])


class _HelpFormatter(argparse.HelpFormatter):
    """Help with the learning options' defaults generated from :class:`RunConfig` and the task objects."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.dest in LEARNING_FIELDS:
            generated = _default_text(action.dest).replace("%", "%%")
            return f"{text} ({generated})" if generated else text
        return text


def _option(*flags: str, **settings: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, settings


#: The command line as declarations, by group: each option's flags and argparse settings. Learning options' defaults
#: are not written here: ``--help`` generates them (:func:`_default_text`).
OPTIONS: dict[str, list[tuple[tuple[str, ...], dict[str, Any]]]] = {
    "selecting data": [
        _option("--participant-label", "--participant_label", nargs="+", metavar="L",
                help="participants to process ('01' or 'sub-01'); default all"),
        _option("--session-label", nargs="+", metavar="S", help="sessions to process; default all"),
        _option("--participant-index", type=_non_negative_int, metavar="I",
                help="0-based index into the sorted selected participants, e.g. $SLURM_ARRAY_TASK_ID"),
        _option("--list-participants", action="store_true",
                help="print the selected participant labels, one a line, and exit"),
        _option("--plan", action="store_true",
                help="measure one representative job (participant: the participant with the most voxels; group: "
                "the study with one epoch) in a scratch folder, then write OUTPUT_DIR/plan/: the measurements (peak "
                "memory of every process, wall and CPU time, disk) and SLURM scripts with --mem, --time and "
                "--cpus-per-task derived from them; prints the summary"),
        _option("--skip-bids-validation", action="store_true",
                help="do not validate BIDS_DIR (problems may then surface later)"),
    ],
    "preprocessing": [
        _option("--model-resolution", type=_positive_float, metavar="MM",
                help="voxel size of the cropped template-space array that learning uses"),
        _option("--registration", choices=("syn", "affine"),
                help="syn: the affine registration, then a nonlinear one (ANTs SyN) with tissue maps, modulated maps, "
                "the log-Jacobian (the learning inputs GM, WM, CSF, logjacobian) and the atlas's regional volumes (the "
                "second linear baseline's features); "
                "affine: the affine registration alone (faster; no morphometry)"),
        _option("--warp-resolution", type=int, choices=(2, 3, 4), metavar="MM",
                help="the grid of the nonlinear registration's field (2, 3 or 4 mm; every output is resampled through "
                "it at its own resolution)"),
        _option("--lesion-masks", type=Path, metavar="DIR",
                help="a BIDS derivatives dataset of lesion masks in each T1w's grid (sub-<l>[_ses-<s>]..._desc-lesion_"
                "mask.nii.gz), left out of the registrations' metrics and drawn in the report; a mask beside the T1w "
                "(..._label-lesion_roi.nii.gz, as fMRIPrep reads it) is always used"),
    ],
    "group level: gathering and reports": [
        _option("--refresh-subject-reports", action=argparse.BooleanOptionalAction,
                help="re-render every subject report with this group's quality percentiles; default: when the group "
                f"has at most {SUBJECT_REPORT_REFRESH_MAX} participants (each report is ~2 MB: 10,000 of them take "
                "~10 min)"),
    ],
    "group level: learning (without --target, only gather and report)": [
        _option("--target", metavar="COLUMN", help="participants.tsv/sessions.tsv column to predict"),
        _option("--task", metavar="TASK", help="auto: categorical -> classification, numeric -> regression; or "
                "one of the tasks"),
        _option("--positive-class", metavar="LABEL", help="positive class (default: the rarest class)"),
        _option("--inputs", nargs="+", choices=INPUT_CHANNELS, metavar="KIND",
                help="the image kinds fed as channels, in order (e.g. T1w FLAIR): each T1w with the images of the "
                "other kinds aligned to it at the participant level; a T1w without one is left out with the reason. "
                f"Morphometry maps of the T1w on the model grid ({', '.join(MORPHOMETRY_CHANNELS)}: the modulated "
                "tissue maps and the log-Jacobian of --registration syn) are channels too (e.g. GM logjacobian). "
                f"Default: {' '.join(MORPHOMETRY_INPUTS)} when every processed T1w has them, else T1w (a "
                "segmentation: T1w; --init-from: the source model's)"),
        _option("--exclude-qc-outliers", action="store_true",
                help="leave out the group's outliers in qc.tsv and the images quality control flagged"),
        _option("--qc-ratings", type=Path, metavar="FILE",
                help="people's quality ratings: a TSV of participant_id, rating (good, doubtful, bad) and optionally "
                "source (the image), rater and comment; several raters allowed. An image at least half of whose "
                "raters rated it bad is left out of learning with their reason; rows naming unknown participants or "
                "images are listed and ignored"),
        _option("--include-failed-qc", action="store_true",
                help="learn also from images that failed quality control (a failed registration or brain "
                "extraction; left out by default)"),
        _option("--stratify", nargs="+", metavar="COLUMN", help="columns to stratify the splits by (default: the "
                "target)"),
        _option("--test-size", type=_fraction, metavar="F", help="held-out test fraction"),
        _option("--n-folds", type=_positive_int, metavar="K", help="cross-validation folds; 1: one split by "
                "--val-size"),
        _option("--val-size", type=_fraction, metavar="F", help="validation fraction with --n-folds 1"),
        _option("--outer-folds", type=_non_negative_int, metavar="K",
                help="nested cross-validation: K outer folds, each participant in one outer test fold, the study "
                "(--n-folds inner folds, thresholds and early stopping on validation only) run once per outer fold; "
                "predictions for every participant, metrics with CIs over all of them (0: one held-out --test-size "
                "test set; default: 5 below 300 participants, fewer where a class is rare, else 0)"),
        _option("--architecture", metavar="NAME", help="network"),
        _option("--epochs", type=_positive_int, metavar="N", help="maximum epochs"),
        _option("--batch-size", type=_positive_int, metavar="N", help="batch size"),
        _option("--lr", type=_positive_float, metavar="X", help="learning rate of AdamW"),
        _option("--weight-decay", type=float, metavar="X", help="AdamW weight decay"),
        _option("--patience", type=_positive_int, metavar="N", help="stop after N epochs without improvement"),
        _option("--selection-metric", metavar="METRIC", help="validation metric that picks the kept model"),
        _option("--class-weighting", choices=CLASS_WEIGHTING, help="balance classes in the loss or by sampling"),
        _option("--augment", nargs="*", choices=AUGMENTATIONS, metavar="KIND",
                help=f"training augmentation; alone: {' '.join(DEFAULT_AUGMENT)} (add 'flip' for left-right flips)"),
        _option("--labels", type=Path, metavar="DIR",
                help="a segmentation task: a BIDS derivatives dataset of reference labels in each image's grid "
                "(e.g. BIDS_DIR/derivatives/<name>); read only"),
        _option("--label-desc", metavar="NAME", help="the labels' desc entity: sub-<l>[_ses-<s>]..._desc-NAME_dseg."
                "nii.gz (or _mask), table desc-NAME_dseg.tsv"),
        _option("--patch-size", type=_positive_int, metavar="N", help="segmentation: training patch edge in voxels"),
        _option("--ema", action="store_true", help="validate, keep and package an exponential moving average of "
                "the weights (decay 0.99 per step)"),
        _option("--no-baseline", dest="baseline", action="store_false",
                help="skip the linear baseline (logistic regression or ridge on the same voxels, in the same splits, "
                "its regularisation chosen by inner cross-validation on each fold's training data) trained beside "
                "every whole-image model"),
        _option("--permutation-control", action="store_true",
                help="also run the study on shuffled training targets (test targets untouched): its test score should "
                "sit at chance, shown beside the real one"),
        _option("--init-from", type=Path, metavar="MODEL_DIR",
                help="transfer learning: start from a model package's weights (same network; a new output layer where "
                "the targets differ; pretrained layers learn at a tenth of --lr). Participants the source model "
                "trained or validated on (by ID or image hash) are kept out of the test set"),
        _option("--freeze", action="store_true", help="with --init-from: freeze the network's encoder (every layer "
                "but the head) at the source's weights"),
        _option("--search", type=_non_negative_int, metavar="N",
                help="random search of N trials (learning rate, weight decay, width, dropout, augmentation strength), "
                "each scored on the validation folds only; the best is trained again and tested once"),
        _option("--trial", action="append", type=_non_negative_int, metavar="K",
                help="with --search: run only trial K (repeatable), e.g. one SLURM array task per trial; a later run "
                "without --trial reuses the finished trials and trains the best"),
        _option("--time-limit", type=_duration, metavar="DURATION",
                help="stop training cleanly before this wall time (90m, 2h, 1:30:00) with its checkpoint, exit 75: run "
                "again with --resume. Under SLURM the job's own end time (SLURM_JOB_END_TIME) is honoured as well"),
        _option("--device", choices=DEVICES, help="auto: cuda when available, else cpu"),
        _option("--amp", action=argparse.BooleanOptionalAction,
                help="mixed-precision training steps (bf16; fp16 on GPUs without bf16); --no-amp: fp32. Default: "
                "bf16 on CUDA GPUs that have it, fp32 on CPUs (bf16 there is faster on CPUs with bf16 units but not "
                "bit-for-bit reproducible). Validation, evaluation and inference are always fp32"),
        _option("--resume", action="store_true", help="continue an interrupted training from its checkpoints"),
        _option("--resplit", action="store_true", help="make new splits when the data changed since"),
        _option("--fold", action="append", type=_non_negative_int, metavar="K",
                help="train only fold K (0 to --n-folds - 1; repeatable), e.g. one SLURM array task per fold; a "
                "later run without --fold reuses the finished folds (same settings and splits) and assembles the "
                "model"),
        _option("--outer-fold", action="append", type=_non_negative_int, metavar="K",
                help="with --outer-folds: run only outer fold K (repeatable), e.g. one SLURM array task per outer "
                "fold; a later run without --outer-fold reuses the finished ones and assembles the nested evaluation"),
        _option("--reports-only", action="store_true", help="rebuild the reports from existing outputs"),
        _option("--tensorboard", action="store_true", help="also log training to TensorBoard"),
        _option("--compile", action="store_true", help="torch.compile the training step: for GPUs (measured on CPU "
                "here: no faster, ~40 s of compiling)"),
    ],
    "inference (participant) and external evaluation (group)": [
        _option("--model", dest="models", action="append", type=Path, metavar="MODEL_DIR",
                help="a model package (OUTPUT_DIR/models/<name>); repeat for an ensemble. Participant: predict each "
                "image; group: gather the predictions and evaluate them against --target (no training)"),
        _option("--allow-training-subjects", action="store_true",
                help="predict subjects the model saw in training or validation (marked so) instead of refusing"),
    ],
    "resources": [
        _option("-w", "--work-dir", type=Path, metavar="DIR",
                help="Nipype working folder, reused by re-runs to skip finished steps; never inside BIDS_DIR "
                "(default: OUTPUT_DIR/.bidsdl_work)"),
        _option("--bids-database-dir", type=Path, metavar="DIR",
                help="where the index of BIDS_DIR is kept: built once (by --list-participants or the first run), "
                "shared by every run and array task, rebuilt when BIDS_DIR changes (default: WORK_DIR/bids_index)"),
        _option("--nprocs", "--n-cpus", type=_positive_int, metavar="N",
                help="processes to run at once (default: all available cores)"),
        _option("--omp-nthreads", type=_positive_int, metavar="N",
                help="threads per process; at the group level, the training's threads per process, at most its "
                "share of the node's CPUs (default: min(8, nprocs))"),
        _option("--mem-gb", type=_positive_float, metavar="X", help="memory budget in GB (default: the machine's "
                "memory)"),
        _option("--stop-on-first-crash", action="store_true", help="stop at the first failed step instead of going "
                "on"),
        _option("--force", action="store_true",
                help="participant: run the selected participants again even when their status record says they are "
                "done with the same inputs, config and version (the work dir still skips unchanged steps)"),
    ],
    "other": [
        _option("--config", type=Path, metavar="FILE",
                help="YAML or JSON file whose keys mirror the long options; the command line wins"),
        _option("--seed", type=int, help="random seed of splits, training, resampling and registrations"),
        _option("-v", "--verbose", dest="verbosity", action="count", help="more log output (repeatable)"),
        _option("-q", "--quiet", action="store_true", help="only warnings and errors"),
        _option("--version", action="version", version=f"bidsdl {__version__}"),
    ],
}  # fmt: skip


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The parser of :data:`OPTIONS`; with ``suppress_defaults`` only options actually given appear in the result."""
    parser = _Parser(
        prog="bidsdl",
        description="bidsdl: reproducible deep learning on brain MRI, as a BIDS App.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=_HelpFormatter,
        epilog=_EXIT_CODES,
    )
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (read only; never written)")
    parser.add_argument("output_dir", type=Path, help="where derivatives, reports and logs go")
    parser.add_argument("analysis_level", help="'participant' (per subject) or 'group'")
    for title, options in OPTIONS.items():
        group = parser.add_argument_group(title)
        for flags, settings in options:
            group.add_argument(*flags, **settings)
    return parser


def _config_to_argv(values: dict[str, Any], parser: argparse.ArgumentParser, source: Path) -> list[str]:
    """Turn config-file values into command-line tokens, so one parser checks both."""
    options = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in values.items():
        action = options.get(key)
        if key in _NOT_IN_CONFIG or action is None:
            known = sorted(k for k in options if k not in _NOT_IN_CONFIG)
            raise UsageError(f"Unknown option {key!r} in the config file {source}. Known options: {', '.join(known)}.")
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse.BooleanOptionalAction):  # --amp / --no-amp: True, False or None (default)
            positive = min(action.option_strings, key=len)
            argv += [] if value is None else [positive if value else positive.replace("--", "--no-", 1)]
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(action, argparse._StoreFalseAction):
            argv += [] if value else [flag]
        elif isinstance(action, argparse._CountAction):
            argv += [flag] * int(value) if int(value) >= 0 else ["--quiet"]
        elif isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list | tuple) else [value]
            argv += [token for item in items for token in (flag, str(item))]
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: Sequence[str]) -> RunConfig:
    """Parse ``argv`` (and its ``--config`` file) into the effective configuration."""
    merged = _given_options(list(argv))
    level = merged["analysis_level"]
    if level not in ANALYSIS_LEVELS:
        raise UnknownAnalysisLevel(f"Unknown analysis level {level!r}: use one of {', '.join(ANALYSIS_LEVELS)}.")
    learning = _learning_options(merged, level)
    if merged.get("plan") and merged.get("list_participants"):
        raise UsageError("--plan measures a job and --list-participants only lists: give one of them.")
    nprocs = merged.get("nprocs") or available_cpus()
    verbosity = -1 if merged.get("quiet") else merged.get("verbosity") or 0
    return RunConfig(
        bids_dir=Path(merged["bids_dir"]).absolute(),
        output_dir=Path(merged["output_dir"]).absolute(),
        analysis_level=level,
        participant_label=tuple(sorted({normalize_label(x, "sub") for x in merged.get("participant_label") or ()})),
        session_label=tuple(sorted({normalize_label(x, "ses") for x in merged.get("session_label") or ()})),
        participant_index=merged.get("participant_index"),
        list_participants=bool(merged.get("list_participants")),
        plan=bool(merged.get("plan")),
        skip_bids_validation=bool(merged.get("skip_bids_validation")),
        work_dir=_absolute(merged.get("work_dir")),
        bids_database_dir=_absolute(merged.get("bids_database_dir")),
        lesion_masks=_absolute(merged.get("lesion_masks")),
        registration=merged.get("registration") or RunConfig.registration,
        warp_resolution=merged.get("warp_resolution") or RunConfig.warp_resolution,
        nprocs=nprocs,
        omp_nthreads=merged.get("omp_nthreads") or min(8, nprocs),
        mem_gb=merged.get("mem_gb") or round(available_memory_gb(), 1),
        stop_on_first_crash=bool(merged.get("stop_on_first_crash")),
        force=bool(merged.get("force")),
        seed=merged["seed"] if merged.get("seed") is not None else default("seed"),
        verbosity=verbosity,
        config_file=_absolute(merged.get("config")),
        models=tuple(Path(m).absolute() for m in merged.get("models") or ()),
        allow_training_subjects=bool(merged.get("allow_training_subjects")),
        labels=_absolute(merged.get("labels")),
        refresh_subject_reports=merged.get("refresh_subject_reports"),
        **learning,
    )


def _absolute(path: Any) -> Path | None:
    return Path(path).absolute() if path else None


def _given_options(argv: list[str]) -> dict[str, Any]:
    """The options given on the command line over those of its ``--config`` file (built-in defaults left out)."""
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    merged: dict[str, Any] = {}
    if given.get("config"):
        values = load_config_file(given["config"])
        for key in (*POSITIONAL_KEYS, "config_file"):
            values.pop(key, None)  # the command line always names the data and the config file
        positionals = [str(given[k]) for k in POSITIONAL_KEYS]
        from_file = build_parser(suppress_defaults=True).parse_args(
            positionals + _config_to_argv(values, build_parser(), given["config"])
        )
        merged.update(vars(from_file))
    merged.update(given)
    return merged


def _learning_options(merged: dict[str, Any], level: str) -> dict[str, Any]:
    """The learning and group-run fields given, checked against the task, with the task's own defaults filled in
    at the group level (``--help`` shows them)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    options: dict[str, Any] = {}
    for name in (*LEARNING_FIELDS, *_GROUP_RUN_FIELDS):
        if name in ("seed", "stratify", "augment", "inputs", "baseline", "init_from", "trial", "outer_fold",
                    "qc_ratings"):
            continue  # resolved by parse_args, or below
        if fields[name].type == "bool":
            options[name] = bool(merged.get(name))
        elif merged.get(name) is not None:
            options[name] = merged[name]
    if merged.get("stratify"):
        options["stratify"] = tuple(dict.fromkeys(merged["stratify"]))
    if merged.get("inputs"):
        if len(set(merged["inputs"])) != len(merged["inputs"]):
            raise UsageError(f"--inputs {' '.join(merged['inputs'])}: each kind once (a channel per image kind).")
        options["inputs"] = tuple(merged["inputs"])
    if merged.get("augment") is not None:  # '--augment' alone: the anatomically safe default set
        options["augment"] = tuple(sorted(set(merged["augment"] or DEFAULT_AUGMENT)))
    task = options.get("task", default("task"))
    if task != "auto" and task not in task_names():
        raise UsageError(f"--task {task}: unknown task; choose auto or one of {', '.join(task_names())}.")
    # the task objects (and torch with them) only where a group-level option depends on the task
    depends = task != "auto" or "selection_metric" in options or "architecture" in options
    tasks = _named_tasks(task) if level == "group" and depends else []
    if tasks:
        _check_task_options(options, merged, tasks)
    if merged.get("fold"):
        options["fold"] = _folds(merged, options)
    _check_trust_options(merged, options)
    if level == "group" and len(tasks) == 1:
        for name, value in tasks[0].defaults.items():
            options.setdefault(name, value)
    if options.get("n_folds", default("n_folds")) == 1 and "val_size" not in options:
        options["val_size"] = default("val_size")
    return options


def _named_tasks(name: str) -> list[Any]:
    """The task objects ``--task`` may mean: the one it names, or those ``auto`` chooses between."""
    return [get_task(n) for n in ((name,) if name != "auto" else auto_task_names())]


def _check_task_options(options: dict[str, Any], merged: dict[str, Any], tasks: list[Any]) -> None:
    """Refuse a selection metric or network that no task it may be fits, and labels a voxel-wise task lacks."""
    metric = options.get("selection_metric", default("selection_metric"))
    if not any(metric in t.direction for t in tasks):
        fits = [name for name, t in _tasks().items() if metric in t.direction]
        raise UsageError(f"--selection-metric {metric} needs {' or '.join(fits) or 'another metric'}; use "
                         f"{', '.join(dict.fromkeys(m for t in tasks for m in t.direction))} for "
                         f"{' or '.join(t.name for t in tasks)}.")  # fmt: skip
    architecture = options.get("architecture")
    if architecture is not None and not any(architecture in t.architectures for t in tasks):
        fits = [name for name, t in _tasks().items() if architecture in t.architectures]
        raise UsageError(f"--architecture {architecture} does not fit --task {options.get('task', 'auto')}: "
                         + (f"it is a network for {' or '.join(fits)}. " if fits else "no such network. ")
                         + "Networks: " + "; ".join(f"{t.name}: {', '.join(t.architectures)}" for t in tasks) + ".")
    if len(tasks) == 1 and tasks[0].learns_labels:
        task = tasks[0].name
        if not merged.get("labels") or not options.get("label_desc"):
            raise UsageError(
                f"--task {task} needs --labels DIR (a BIDS derivatives dataset of label images) and --label-desc NAME "
                f"(their desc entity), e.g. --labels BIDS_DIR/derivatives/labels --label-desc aseg."
            )
        if options.get("permutation_control"):
            raise UsageError(f"--permutation-control shuffles one target per participant; --task {task} learns label "
                             "images: leave it out.")  # fmt: skip
        if options.get("target") not in (None, options["label_desc"]):
            raise UsageError(f"--task {task} learns the labels of --label-desc: leave out --target.")
        options["target"] = options["label_desc"]


def _check_trust_options(merged: dict[str, Any], options: dict[str, Any]) -> None:
    """``--trial``, ``--freeze`` and ``--init-from`` need their companions; paths made absolute."""
    if merged.get("baseline") is False:
        options["baseline"] = False
    elif "baseline" in options:
        options["baseline"] = True
    if merged.get("init_from"):
        options["init_from"] = Path(merged["init_from"]).absolute()
    if merged.get("qc_ratings"):
        options["qc_ratings"] = Path(merged["qc_ratings"]).absolute()
    if options.get("freeze") and not options.get("init_from"):
        raise UsageError("--freeze keeps pretrained layers as they are: use it with --init-from MODEL_DIR.")
    if merged.get("trial"):
        trials = tuple(sorted(set(merged["trial"])))
        n = options.get("search", 0)
        if not n:
            raise UsageError("--trial K runs one trial of a search: use it with --search N.")
        if max(trials) >= n:
            raise UsageError(f"--trial {max(trials)} is out of range: --search {n} makes trials 0 to {n - 1}.")
        options["trial"] = trials
    if merged.get("outer_fold"):
        outer = tuple(sorted(set(merged["outer_fold"])))
        n = options.get("outer_folds", 0)
        if not n:
            raise UsageError("--outer-fold K runs one outer fold of a nested cross-validation: use it with "
                             "--outer-folds N.")  # fmt: skip
        if max(outer) >= n:
            raise UsageError(f"--outer-fold {max(outer)} is out of range: --outer-folds {n} makes outer folds 0 to "
                             f"{n - 1}.")  # fmt: skip
        options["outer_fold"] = outer
    if options.get("outer_folds") == 1:
        raise UsageError("--outer-folds 1 would test everyone on a model trained on nobody: use 2 or more (5 is "
                         "usual), or 0 for one held-out test set.")
    if options.get("search") and merged.get("fold"):
        raise UsageError("--fold cannot be combined with --search: a trial trains every fold, and the best trial's "
                         "folds are the study's. Run trials in parallel with --trial K instead.")


def _folds(merged: dict[str, Any], options: dict[str, Any]) -> tuple[int, ...]:
    folds = tuple(sorted(set(merged["fold"])))
    n_folds = options.get("n_folds", default("n_folds"))
    if max(folds) >= n_folds:
        raise UsageError(f"--fold {max(folds)} is out of range: --n-folds {n_folds} makes folds 0 to {n_folds - 1}.")
    if not options.get("target") or merged.get("models") or options.get("reports_only"):
        raise UsageError("--fold trains some folds of a study: use it with --target (or a segmentation --task).")
    return folds
