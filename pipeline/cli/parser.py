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
    load_config_file,
)
from ..errors import UnknownAnalysisLevel, UsageError
from ..learn import ARCHITECTURE_NAMES, SEGMENTATION_ARCHITECTURE_NAMES
from ..learn.tasks import (
    METRIC_DIRECTIONS,
    SEGMENTATION_RESOLUTION_MM,
    SELECTION_METRICS,
    TASK_DEFAULTS,
    TASK_NAMES,
)

ANALYSIS_LEVELS = ("participant", "group")
TASKS = ("auto", *TASK_NAMES)
CLASS_WEIGHTING = ("none", "loss", "sampler")
AUGMENTATIONS = ("affine", "intensity", "noise", "flip")
DEFAULT_AUGMENT = ("affine", "intensity", "noise")
DEVICES = ("auto", "cpu", "cuda")
#: Group-level options that change how a training runs, not what it learns.
_GROUP_RUN_FIELDS = ("device", "resume", "resplit", "reports_only", "tensorboard", "compile", "fold")
#: Options a --config file may not set (they describe the invocation, not the analysis).
_NOT_IN_CONFIG = frozenset({"config", "help", "version"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. Run 'bidsdl --help' for the usage.")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``suppress_defaults`` only options actually given appear in the result."""
    parser = _Parser(
        prog="bidsdl",
        description="bidsdl: reproducible deep learning on brain MRI, as a BIDS App.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit codes: 0 success; 1 a participant failed; 16 BIDS validation failed; "
        "17 unknown analysis level; 18 the filters selected no data; 64 usage error; "
        "65 input data error; 66 BIDS_DIR missing; 73 OUTPUT_DIR not writable.",
    )
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (read only; never written)")
    parser.add_argument("output_dir", type=Path, help="where derivatives, reports and logs go")
    parser.add_argument("analysis_level", help="'participant' (per subject) or 'group'")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="L",
        help="participants to process ('01' or 'sub-01'); default all",
    )
    sel.add_argument("--session-label", nargs="+", metavar="S", help="sessions to process; default all")
    sel.add_argument(
        "--participant-index",
        type=_non_negative_int,
        metavar="I",
        help="0-based index into the sorted selected participants, e.g. $SLURM_ARRAY_TASK_ID",
    )
    sel.add_argument(
        "--list-participants",
        action="store_true",
        help="print the selected participant labels, one a line, and exit",
    )
    sel.add_argument(
        "--skip-bids-validation",
        action="store_true",
        help="do not validate BIDS_DIR (problems may then surface later)",
    )

    proc = parser.add_argument_group("preprocessing")
    proc.add_argument(
        "--model-resolution",
        type=_positive_float,
        metavar="MM",
        help="voxel size of the cropped template-space array that learning uses (default 2)",
    )

    gather = parser.add_argument_group("group level: gathering and reports")
    gather.add_argument(
        "--refresh-subject-reports",
        action=argparse.BooleanOptionalAction,
        help="re-render every subject report with this group's quality percentiles; default: when the group has at "
        f"most {SUBJECT_REPORT_REFRESH_MAX} participants (each report is ~2 MB: 10,000 of them take ~10 min)",
    )
    learn = parser.add_argument_group("group level: learning (without --target, only gather and report)")
    learn.add_argument("--target", metavar="COLUMN", help="participants.tsv/sessions.tsv column to predict")
    learn.add_argument("--task", choices=TASKS, help="auto: categorical -> classification, numeric -> regression")
    learn.add_argument("--positive-class", metavar="LABEL", help="positive class (default: the rarest class)")
    learn.add_argument(
        "--exclude-qc-outliers",
        action="store_true",
        help="leave out the group's outliers in qc.tsv and the images quality control flagged",
    )
    learn.add_argument(
        "--include-failed-qc",
        action="store_true",
        help="learn also from images that failed quality control (a failed registration or brain extraction; "
        "left out by default)",
    )
    learn.add_argument(
        "--stratify", nargs="+", metavar="COLUMN", help="columns to stratify the splits by (default: the target)"
    )
    learn.add_argument("--test-size", type=_fraction, metavar="F", help="held-out test fraction (default 0.2)")
    learn.add_argument(
        "--n-folds", type=_positive_int, metavar="K", help="cross-validation folds; 1: one split by --val-size"
    )
    learn.add_argument("--val-size", type=_fraction, metavar="F", help="validation fraction with --n-folds 1")
    learn.add_argument("--architecture", choices=ARCHITECTURE_NAMES, help="network (default conv5fc3)")
    learn.add_argument("--epochs", type=_positive_int, metavar="N", help="maximum epochs (default 30)")
    learn.add_argument("--batch-size", type=_positive_int, metavar="N", help="batch size (default 8)")
    learn.add_argument("--lr", type=_positive_float, metavar="X", help="learning rate of AdamW (default 1e-3)")
    learn.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay (default 1e-4)")
    learn.add_argument(
        "--patience", type=_positive_int, metavar="N", help="stop after N epochs without improvement (default 10)"
    )
    learn.add_argument(
        "--selection-metric",
        choices=SELECTION_METRICS,
        help="validation metric that picks the kept model (default loss)",
    )
    learn.add_argument(
        "--class-weighting", choices=CLASS_WEIGHTING, help="balance classes in the loss or by sampling (default loss)"
    )
    learn.add_argument(
        "--augment",
        nargs="*",
        choices=AUGMENTATIONS,
        metavar="KIND",
        help=f"training augmentation; alone: {' '.join(DEFAULT_AUGMENT)} (add 'flip' for left-right flips)",
    )
    learn.add_argument(
        "--labels",
        type=Path,
        metavar="DIR",
        help="--task segmentation: a BIDS derivatives dataset of reference labels in each T1w's grid "
        "(e.g. BIDS_DIR/derivatives/<name>); read only",
    )
    learn.add_argument(
        "--label-desc",
        metavar="NAME",
        help="the labels' desc entity: sub-<l>[_ses-<s>]..._desc-NAME_dseg.nii.gz (or _mask), table desc-NAME_dseg.tsv",
    )
    learn.add_argument(
        "--patch-size", type=_positive_int, metavar="N", help="segmentation: training patch edge in voxels (default 64)"
    )
    learn.add_argument(
        "--ema",
        action="store_true",
        help="validate, keep and package an exponential moving average of the weights (decay 0.99 per step)",
    )
    learn.add_argument("--device", choices=DEVICES, help="auto: cuda when available, else cpu")
    learn.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="mixed-precision training steps (bf16; fp16 on GPUs without bf16); --no-amp: fp32. Default: bf16 on "
        "CUDA GPUs that have it, fp32 on CPUs (bf16 there is faster on CPUs with bf16 units but not bit-for-bit "
        "reproducible). Validation, evaluation and inference are always fp32",
    )
    learn.add_argument("--resume", action="store_true", help="continue an interrupted training from its checkpoints")
    learn.add_argument("--resplit", action="store_true", help="make new splits when the data changed since")
    learn.add_argument(
        "--fold",
        action="append",
        type=_non_negative_int,
        metavar="K",
        help="train only fold K (0 to --n-folds - 1; repeatable), e.g. one SLURM array task per fold; a later "
        "run without --fold reuses the finished folds (same settings and splits) and assembles the model",
    )
    learn.add_argument("--reports-only", action="store_true", help="rebuild the reports from existing outputs")
    learn.add_argument("--tensorboard", action="store_true", help="also log training to TensorBoard")
    learn.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step: for GPUs (measured on CPU here: no faster, ~40 s of compiling)",
    )

    infer = parser.add_argument_group("inference (participant) and external evaluation (group)")
    infer.add_argument(
        "--model",
        dest="models",
        action="append",
        type=Path,
        metavar="MODEL_DIR",
        help="a model package (OUTPUT_DIR/models/<name>); repeat for an ensemble. Participant: predict each "
        "image; group: gather the predictions and evaluate them against --target (no training)",
    )
    infer.add_argument(
        "--allow-training-subjects",
        action="store_true",
        help="predict subjects the model saw in training or validation (marked so) instead of refusing",
    )

    res = parser.add_argument_group("resources")
    res.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="Nipype working folder, reused by re-runs to skip finished steps; never "
        "inside BIDS_DIR (default: OUTPUT_DIR/.bidsdl_work)",
    )
    res.add_argument(
        "--bids-database-dir",
        type=Path,
        metavar="DIR",
        help="where the index of BIDS_DIR is kept: built once (by --list-participants or the first run), shared "
        "by every run and array task, rebuilt when BIDS_DIR changes (default: WORK_DIR/bids_index)",
    )
    res.add_argument(
        "--nprocs",
        "--n-cpus",
        type=_positive_int,
        metavar="N",
        help="processes to run at once (default: all available cores)",
    )
    res.add_argument(
        "--omp-nthreads",
        type=_positive_int,
        metavar="N",
        help="threads per process; at the group level, the training's threads per process, at most its share "
        "of the node's CPUs (default: min(8, nprocs))",
    )
    res.add_argument(
        "--mem-gb",
        type=_positive_float,
        metavar="X",
        help="memory budget in GB (default: the machine's memory)",
    )

    res.add_argument(
        "--stop-on-first-crash", action="store_true", help="stop at the first failed step instead of going on"
    )
    res.add_argument(
        "--force",
        action="store_true",
        help="participant: run the selected participants again even when their status record says they are "
        "done with the same inputs, config and version (the work dir still skips unchanged steps)",
    )

    other = parser.add_argument_group("other")
    other.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML or JSON file whose keys mirror the long options; the command line wins",
    )
    other.add_argument("--seed", type=int, help="random seed (default 42)")
    other.add_argument("-v", "--verbose", dest="verbosity", action="count", help="more log output (repeatable)")
    other.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    other.add_argument("--version", action="version", version=f"bidsdl {__version__}")
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
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
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
    argv = list(argv)
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

    level = merged["analysis_level"]
    if level not in ANALYSIS_LEVELS:
        raise UnknownAnalysisLevel(f"Unknown analysis level {level!r}: use one of {', '.join(ANALYSIS_LEVELS)}.")
    nprocs = merged.get("nprocs") or available_cpus()
    verbosity = merged.get("verbosity") or 0
    if merged.get("quiet"):
        verbosity = -1
    return RunConfig(
        bids_dir=Path(merged["bids_dir"]).absolute(),
        output_dir=Path(merged["output_dir"]).absolute(),
        analysis_level=level,
        participant_label=tuple(sorted({normalize_label(x, "sub") for x in merged.get("participant_label") or ()})),
        session_label=tuple(sorted({normalize_label(x, "ses") for x in merged.get("session_label") or ()})),
        participant_index=merged.get("participant_index"),
        list_participants=bool(merged.get("list_participants")),
        skip_bids_validation=bool(merged.get("skip_bids_validation")),
        work_dir=Path(merged["work_dir"]).absolute() if merged.get("work_dir") else None,
        bids_database_dir=Path(merged["bids_database_dir"]).absolute() if merged.get("bids_database_dir") else None,
        nprocs=nprocs,
        omp_nthreads=merged.get("omp_nthreads") or min(8, nprocs),
        mem_gb=merged.get("mem_gb") or round(available_memory_gb(), 1),
        model_resolution=merged.get("model_resolution")
        or (SEGMENTATION_RESOLUTION_MM if merged.get("task") == "segmentation" and level == "group" else 2.0),
        stop_on_first_crash=bool(merged.get("stop_on_first_crash")),
        force=bool(merged.get("force")),
        seed=merged["seed"] if merged.get("seed") is not None else 42,
        verbosity=verbosity,
        config_file=Path(merged["config"]).absolute() if merged.get("config") else None,
        models=tuple(Path(m).absolute() for m in merged.get("models") or ()),
        allow_training_subjects=bool(merged.get("allow_training_subjects")),
        labels=Path(merged["labels"]).absolute() if merged.get("labels") else None,
        refresh_subject_reports=merged.get("refresh_subject_reports"),
        **_learning_options(merged),
    )


def _learning_options(merged: dict[str, Any]) -> dict[str, Any]:
    defaults = RunConfig(Path(), Path(), "group")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    options: dict[str, Any] = {}
    for name in (*LEARNING_FIELDS, *_GROUP_RUN_FIELDS):
        if name in ("seed", "model_resolution", "stratify", "augment"):
            continue  # resolved by parse_args, or below
        if fields[name].type == "bool":
            options[name] = bool(merged.get(name))
        elif merged.get(name) is not None:
            options[name] = merged[name]
    if merged.get("stratify"):
        options["stratify"] = tuple(dict.fromkeys(merged["stratify"]))
    if merged.get("augment") is not None:  # '--augment' alone: the anatomically safe default set
        options["augment"] = tuple(sorted(set(merged["augment"] or DEFAULT_AUGMENT)))
    task = options.get("task", defaults.task)
    metric = options.get("selection_metric", defaults.selection_metric)
    if task in METRIC_DIRECTIONS and metric not in METRIC_DIRECTIONS[task]:
        needs = [t for t, metrics in METRIC_DIRECTIONS.items() if metric in metrics]
        raise UsageError(
            f"--selection-metric {metric} needs {' or '.join(needs)}; use {', '.join(METRIC_DIRECTIONS[task])} "
            f"for {task}."
        )
    segmentation = task == "segmentation"
    architecture = options.get("architecture")
    if segmentation:
        if not merged.get("labels") or not options.get("label_desc"):
            raise UsageError(
                "--task segmentation needs --labels DIR (a BIDS derivatives dataset of label images) and "
                "--label-desc NAME (their desc entity), e.g. --labels BIDS_DIR/derivatives/labels --label-desc aseg."
            )
        if options.get("target") not in (None, options["label_desc"]):
            raise UsageError("--task segmentation learns the labels of --label-desc: leave out --target.")
        options["target"] = options["label_desc"]
    if architecture is not None and (architecture in SEGMENTATION_ARCHITECTURE_NAMES) != segmentation:
        kind = "segments" if architecture in SEGMENTATION_ARCHITECTURE_NAMES else "predicts one value per image"
        raise UsageError(
            f"--architecture {architecture} {kind}: it does not fit --task {task}. Segmentation networks: "
            f"{', '.join(SEGMENTATION_ARCHITECTURE_NAMES)}; the others are for classification and regression."
        )
    if merged.get("fold"):
        options["fold"] = tuple(sorted(set(merged["fold"])))
        n_folds = options.get("n_folds", defaults.n_folds)
        if max(options["fold"]) >= n_folds:
            raise UsageError(
                f"--fold {max(options['fold'])} is out of range: --n-folds {n_folds} makes folds 0 to {n_folds - 1}."
            )
        if not options.get("target") or merged.get("models") or options.get("reports_only"):
            raise UsageError("--fold trains some folds of a study: use it with --target (or --task segmentation).")
    for name, value in TASK_DEFAULTS.get(task, {}).items():
        options.setdefault(name, value)
    if options.get("n_folds", defaults.n_folds) == 1 and "val_size" not in options:
        options["val_size"] = defaults.val_size
    return options
