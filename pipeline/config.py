"""The effective configuration of one invocation: a frozen dataclass, loaded and saved as data.

Only the command line (:mod:`pipeline.cli`) and the top-level workflow builder read a
:class:`RunConfig`; everything below them takes plain arguments. Importing this module has no
side effects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError


def _learning(default: Any) -> Any:
    """A field that decides what the group level learns (a resumed training must not change it)."""
    return dataclasses.field(default=default, metadata={"learning": True})


#: Keys a config file may hold that the command line always decides.
POSITIONAL_KEYS = ("bids_dir", "output_dir", "analysis_level")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``bidsdl`` invocation was asked to do, with defaults resolved."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    participant_index: int | None = None
    list_participants: bool = False
    plan: bool = False  # measure one representative job and write SLURM scripts sized from it (pipeline.plan)
    skip_bids_validation: bool = False
    work_dir: Path | None = None
    bids_database_dir: Path | None = None  # the BIDS index (default: WORK_DIR/bids_index)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float = 1.0
    model_resolution: float = _learning(2.0)
    lesion_masks: Path | None = None  # a derivatives dataset of lesion masks (desc-lesion_mask) in each T1w's grid
    registration: str = "syn"  # "syn": the affine, then ANTs SyN and morphometry; "affine": the affine alone
    warp_resolution: int = 2  # the SyN field's grid (mm)
    stop_on_first_crash: bool = False
    force: bool = False
    seed: int = _learning(42)
    verbosity: int = 0
    config_file: Path | None = None
    # group level: learning (without a target, the group level only gathers and reports)
    target: str | None = _learning(None)
    task: str = _learning("auto")
    # the image kinds fed as channels, in order; None: decided from the outputs (channels.default_inputs)
    inputs: tuple[str, ...] | None = _learning(None)
    positive_class: str | None = _learning(None)
    exclude_qc_outliers: bool = _learning(False)
    include_failed_qc: bool = _learning(False)
    stratify: tuple[str, ...] = _learning(())
    test_size: float = _learning(0.2)
    n_folds: int = _learning(5)
    # nested cross-validation: K outer test folds (0: one held-out test set; None: chosen from the cohort's size)
    outer_folds: int | None = _learning(None)
    val_size: float = _learning(0.2)
    architecture: str = _learning("conv5fc3")
    epochs: int = _learning(30)
    batch_size: int = _learning(8)
    lr: float = _learning(1e-3)
    weight_decay: float = _learning(1e-4)
    patience: int = _learning(10)
    selection_metric: str = _learning("loss")
    class_weighting: str = _learning("loss")
    augment: tuple[str, ...] = _learning(())
    # segmentation: reference labels (a BIDS derivatives dataset) and the training patch
    labels: Path | None = None
    label_desc: str | None = _learning(None)
    patch_size: int = _learning(64)
    ema: bool = _learning(False)
    # trust: a linear model beside every whole-image model, the same study on shuffled targets, transfer from a
    # model package (its layers frozen or not), a random search of N trials scored on validation folds only
    baseline: bool = _learning(True)
    permutation_control: bool = _learning(False)
    init_from: Path | None = _learning(None)  # noqa: RUF009 - a plain default, marked as a learning field
    qc_ratings: Path | None = _learning(None)  # noqa: RUF009 - people's ratings (pipeline.ratings)
    freeze: bool = _learning(False)
    search: int = _learning(0)
    device: str = "auto"
    amp: bool | None = _learning(None)  # None: bf16 training steps on CUDA GPUs with bf16, fp32 elsewhere
    resume: bool = False
    reports_only: bool = False
    resplit: bool = False
    tensorboard: bool = False
    compile: bool = False  # torch.compile the training step (for GPUs)
    fold: tuple[int, ...] = ()  # only these folds (fold-parallel jobs); none: all, then the assembly
    outer_fold: tuple[int, ...] = ()  # only these outer folds (array jobs); none: all, then the nested assembly
    trial: tuple[int, ...] = ()  # only these search trials (array jobs); none: all, then the refit
    time_limit: float | None = None  # seconds this job may run (--time-limit; SLURM's end time is read as well)
    # inference (participant level) and external evaluation (group level)
    models: tuple[Path, ...] = ()
    allow_training_subjects: bool = False
    # group level: re-render the subject reports with the group's percentiles (None: up to
    # SUBJECT_REPORT_REFRESH_MAX participants)
    refresh_subject_reports: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict whose keys mirror the long options (usable again with ``--config``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out

    def learning_settings(self) -> dict[str, Any]:
        """The settings that decide what the group level learns."""
        values = self.to_dict()
        return {k: values[k] for k in LEARNING_FIELDS}

    def config_hash(self) -> str:
        """sha256 of the settings that determine a subject's outputs."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        blob = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


#: The most participants whose subject reports the group level re-renders unless told (~0.06 s and ~2 MB each).
SUBJECT_REPORT_REFRESH_MAX = 500

#: Fields that decide what the group level learns, in declaration order.
LEARNING_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("learning"))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}

#: Fields that change how fast a run goes or what it selects, not what it computes for a subject.
#: (``omp_nthreads`` is hashed: N4's result depends, in the last bits, on its thread count.)
_NOT_HASHED = frozenset(
    {
        "bids_dir",
        "output_dir",
        "analysis_level",
        "participant_label",
        "session_label",
        "participant_index",
        "list_participants",
        "plan",
        "work_dir",
        "bids_database_dir",
        "nprocs",
        "mem_gb",
        "verbosity",
        "config_file",
        "stop_on_first_crash",
        "force",
        *(f for f in LEARNING_FIELDS if f not in ("seed", "model_resolution")),
        "device",
        "resume",
        "reports_only",
        "resplit",
        "tensorboard",
        "compile",
        "fold",
        "outer_fold",
        "trial",
        "time_limit",
        "labels",
        "refresh_subject_reports",
    }
)


def default(name: str) -> Any:
    """The default of a :class:`RunConfig` field (settings objects below the config reuse it).

    >>> default("epochs")
    30
    """
    return _DEFAULTS[name]


def settings_from(config: RunConfig, cls: type[Any], **values: Any) -> Any:
    """A settings dataclass filled from the config fields of the same name (``values`` win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)} | values)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict with ``snake_case`` keys.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.yml"
    >>> _ = p.write_text("nprocs: 2\\nparticipant-label: ['01']\\n")
    >>> load_config_file(p)
    {'nprocs': 2, 'participant_label': ['01']}
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(
            f"Cannot read the config file {path}: {exc.strerror or exc}. Check the path given to --config."
        ) from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UsageError(
            f"The config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
            f"{exc}. Fix its syntax; keys mirror the long options (e.g. 'nprocs: 2')."
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"The config file {path} must hold a mapping of option names to values, "
            f"not a {type(data).__name__}. Example: 'participant_label: [\"01\"]'."
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def save_config(config: RunConfig, path: Path) -> None:
    """Write the effective config as JSON, atomically."""
    from .derivatives import write_json

    write_json(path, config.to_dict())


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 4.0
