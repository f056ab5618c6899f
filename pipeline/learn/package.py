"""The model package: one self-describing folder that rebuilds and checks the model alone.

``model.json`` (architecture, input contract, labels, threshold, training subjects and image
hashes for the leakage guard, metrics, provenance) + ``fold-<k>.safetensors`` (never pickle) +
the effective config, environment, splits and training logs. ``content_sha256`` in
``model.json`` covers the record and, through their listed hashes, the weights; a package whose
files do not match it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .. import __version__, derivatives
from ..bids.audit import sha256_file
from ..errors import InputDataError
from .models import ModelConfig, build_model

#: The package formats this bidsdl reads, and what each changed (``model.json``'s ``format_version``). A package of
#: an older format is read with the fallbacks its readers keep (named here); a newer one is refused.
FORMAT_CHANGES: dict[int, str] = {
    1: "the first format",
    2: "'dataset' (the training dataset's identity: whose participant IDs the training subjects are) and each "
    "training subject's 'dataset'; the distribution check's calibration records the validation scores' 'mean' and "
    "'sd' (each fold's score joined by the Cauchy combination). Format 1 is read with participant IDs matched "
    "whatever their dataset (said in each match) and the folds' scores averaged, as it was calibrated",
}
FORMAT_VERSION = max(FORMAT_CHANGES)
MODEL_JSON = derivatives.STUDY_OUTPUTS["model_record"]

_NONE = type(None)
_NUMBER = (int, float)
_JSON_NAMES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
               dict: "an object", _NONE: "null"}  # fmt: skip


@dataclass(frozen=True)
class Field:
    """One field of ``model.json``: the JSON types it may take, whether every package has it, and what it says."""

    types: tuple[type, ...]
    meaning: str
    required: bool = False


#: ``model.json``, field by field: one schema for the writer (:func:`write_package` refuses a record with a field
#: missing, mistyped or not listed here) and every reader (:func:`read_package` refuses a package whose required
#: fields are missing or mistyped, naming them). Grouped by what the fields are for.
MODEL_FIELDS: dict[str, Field] = {
    # what the model predicts
    "name": Field((str,), "the package's name: <target>_<architecture>", required=True),
    "task": Field((str,), "the learning task (pipeline.learn.tasks), resolved by name when the package loads",
                  required=True),
    "target": Field((str,), "the participants.tsv column, or the labels' desc for segmentation", required=True),
    "classes": Field((list, _NONE), "the class names in output order (segmentation: the structures)", required=True),
    "positive_class": Field((str, _NONE), "the positive class of a binary classification"),
    "labels": Field((list,), "segmentation: each output label's index and name"),
    "label_desc": Field((str,), "segmentation: the desc- of the reference labels it learned"),
    # the network and what it is fed
    "model": Field((dict,), "the architecture and its arguments (pipeline.learn.models.ModelConfig)", required=True),
    "input": Field((dict,), "the input contract: channels, space, resolution, grid shape, normalisation",
                   required=True),
    "patch_size": Field((int,), "segmentation: the training patch and inference window (voxels)"),
    "loss": Field((str,), "segmentation: the loss"),
    "patch_sampling": Field((str,), "segmentation: how training patches were drawn"),
    "inference": Field((dict,), "segmentation: the sliding window and how its outputs become labels"),
    "postprocessing": Field((dict,), "segmentation: the post-processing chosen on validation images"),
    "ensemble": Field((str,), "how the folds' outputs are combined"),
    "threshold": Field((*_NUMBER, _NONE), "the decision threshold of the ensemble, chosen on validation"),
    "fold_thresholds": Field((list,), "each fold's threshold, chosen on its validation participants"),
    "target_scale": Field((list, _NONE), "each fold's target mean and SD (regression), else null"),
    "selection_metric": Field((str,), "the validation metric whose best epoch each fold keeps"),
    # whom it learned from: the leakage guard of inference and transfer
    "dataset": Field((dict,), "the training dataset's identity (dataset_description's DOI, else Name: the key)"),
    "training_subjects": Field((list,), "every training and validation participant, with its images' hashes",
                               required=True),
    "test_subjects": Field((list,), "the held-out test participants"),
    "transfer": Field((dict,), "--init-from: the source package, what was loaded and frozen, who it saw"),
    # how well it did, beside what
    "metrics": Field((dict,), "validation folds, test folds and the ensemble's test evaluation"),
    "baseline": Field((dict,), "the linear baseline on the same voxels: its score and the paired comparison"),
    "volumes_baseline": Field((dict,), "the linear model on regional volumes: its score and the paired comparison"),
    "permutation_control": Field((dict,), "the same folds on shuffled targets: their headline scores"),
    "search": Field((dict,), "--search: the trials' metric and the best trial's values"),
    "distribution": Field((dict, _NONE), "the training features' description and calibrated threshold (ood)"),
    "data": Field((dict,), "the manifest's and splits' hashes, the numbers of images and participants"),
    "learning_settings": Field((dict,), "every setting that changes what is learned"),
    "model_card": Field((dict,), "intended use and limitations"),
    # the package itself (write_package adds these)
    "format_version": Field((int,), "the package format (FORMAT_CHANGES)", required=True),
    "bidsdl_version": Field((str,), "the bidsdl that made it", required=True),
    "weights": Field((list,), "each fold's safetensors file and its sha256", required=True),
    "content_sha256": Field((str,), "sha256 of this record without this field: any edit shows", required=True),
}


def record_problems(record: dict[str, Any], *, writing: bool = False) -> list[str]:
    """What in ``record`` does not follow :data:`MODEL_FIELDS`: required fields missing, fields of another type and,
    when ``writing``, fields the schema does not list (a reader ignores those: a later format may add fields).

    >>> record_problems({"name": "x", "classes": "AD"})[:2]
    ["'task' is missing", "'target' is missing"]
    >>> record_problems({"name": "x", "classes": "AD", "extra": 1}, writing=True)[-2:]
    ["'classes' is a string, not a list or null", "'extra' is not a field of model.json (MODEL_FIELDS)"]
    """
    problems = [f"{name!r} is missing" for name, field in MODEL_FIELDS.items() if field.required and name not in record]
    for name, value in record.items():
        field = MODEL_FIELDS.get(name)
        if field is None:
            if writing:
                problems.append(f"{name!r} is not a field of {MODEL_JSON} (MODEL_FIELDS)")
        elif not isinstance(value, field.types) or (isinstance(value, bool) and bool not in field.types):
            allowed = " or ".join(dict.fromkeys(_JSON_NAMES[t] for t in field.types))
            problems.append(f"{name!r} is {_JSON_NAMES.get(type(value), type(value).__name__)}, not {allowed}")
    return problems


def content_hash(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``record`` without its own ``content_sha256``."""
    body = {k: v for k, v in record.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hardware_record() -> dict[str, Any]:
    """CPU model, GPU / driver / CUDA when present, and torch's build."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    record: dict[str, Any] = {
        "cpu_model": cpu,
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record["gpu"] = {
            "name": props.name,
            "memory_gb": round(props.total_memory / 1024**3, 1),
            "capability": f"{props.major}.{props.minor}",
            "driver": _nvidia_driver(),
        }
    return record


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("  ")[1].strip() or None
    except (OSError, IndexError):
        return None


def write_package(
    models_dir: Path,
    *,
    record: dict[str, Any],
    weights: dict[str, Path],
    files: dict[str, Path | str | dict[str, Any]],
) -> Path:
    """Assemble the package in a hidden folder, then rename it into place (atomic for readers).

    ``weights``: package file name -> trained weights; ``files``: package file name -> a file to
    copy, text, or a JSON-ready dict. Returns the package folder, named
    ``<target>_<architecture>_<first 8 of content_sha256>``.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        listed = []
        for name, source in sorted(weights.items()):
            shutil.copyfile(source, staging / name)
            listed.append({"file": name, "sha256": sha256_file(staging / name)})
        record = {**record, "format_version": FORMAT_VERSION, "bidsdl_version": __version__, "weights": listed}
        record["content_sha256"] = content_hash(record)
        problems = record_problems(record, writing=True)
        if problems:  # a writer out of step with the schema: a bug, not the user's
            raise ValueError(f"the model record does not follow MODEL_FIELDS: {'; '.join(problems)}")
        for name, content in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                target.write_text(json.dumps(content, indent=2, default=derivatives._json_default) + "\n")
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_text(content)
        (staging / MODEL_JSON).write_text(json.dumps(record, indent=2, default=derivatives._json_default) + "\n")
        name = f"{record['target']}_{record['model']['architecture']}_{record['content_sha256'][:8]}"
        final = models_dir / name
        if final.exists():  # same content hash: an identical earlier package; replace it
            old = models_dir / f".old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin"})


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the length of its JSON header, then ``{``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return True  # missing: reported below as an incomplete package
    if len(head) < 9:
        return False
    return 2 <= int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def read_package(folder: Path) -> dict[str, Any]:
    """``model.json`` of a package, after checking that the folder is complete and untampered."""
    folder = Path(folder)
    path = folder / MODEL_JSON
    if not folder.is_dir():
        raise InputDataError(f"Model folder {folder} does not exist. Give the folder under OUTPUT_DIR/models/.")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not path.exists():
        hint = (
            f" It holds {', '.join(pickles)}: pickle checkpoints are refused (loading one can run arbitrary code); "
            "bidsdl loads only its own packages, whose weights are safetensors."
            if pickles
            else " Give a folder made by 'bidsdl ... group --target ...' (OUTPUT_DIR/models/<name>)."
        )
        raise InputDataError(f"{folder} is not a bidsdl model package: it has no {MODEL_JSON}.{hint}")
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise InputDataError(
            f"{path} is not valid JSON ({exc}); the package is damaged: re-train or re-copy it."
        ) from exc
    if record.get("format_version") not in FORMAT_CHANGES:
        raise InputDataError(
            f"{folder} was made by bidsdl {record.get('bidsdl_version', '?')} in package format "
            f"{record.get('format_version')!r}; this bidsdl ({__version__}) reads formats "
            f"{', '.join(map(str, FORMAT_CHANGES))}. Use the bidsdl version that made it, or re-train."
        )
    problems = record_problems(record)
    if problems:
        raise InputDataError(
            f"{path} is not a complete bidsdl model record ({'; '.join(problems)}): the package was not made by "
            "bidsdl's group level, or was damaged. Re-train, or re-copy the whole folder."
        )
    if record.get("content_sha256") != content_hash(record):
        raise InputDataError(f"{path} does not match its content_sha256: it was edited after training. Refused.")
    for entry in record.get("weights", []):
        weights = folder / entry["file"]
        if not entry["file"].endswith(".safetensors") or not _is_safetensors(weights):
            raise InputDataError(
                f"{weights} is not a safetensors file: only safetensors weights load; pickle checkpoints "
                "(.pt, .pth, .ckpt, .pkl) are refused because loading one can run arbitrary code."
            )
        if not weights.exists():
            raise InputDataError(f"{folder} is incomplete: {entry['file']} is missing. Re-copy the whole folder.")
        if sha256_file(weights) != entry["sha256"]:
            raise InputDataError(f"{weights} does not match the sha256 in {MODEL_JSON}: it was changed. Refused.")
    distribution = record.get("distribution")
    if distribution:  # the training features' description (:mod:`pipeline.learn.ood`)
        path = folder / distribution["file"]
        if not path.exists() or sha256_file(path) != distribution["sha256"]:
            raise InputDataError(f"{path} is missing or does not match the sha256 in {MODEL_JSON}. Re-copy the "
                                 "whole folder.")  # fmt: skip
    return record


def load_package(folder: Path, device: str | torch.device = "cpu") -> tuple[dict[str, Any], list[nn.Module]]:
    """The checked record and its networks (one per fold; the ensemble averages them), in eval mode."""
    record = read_package(folder)
    config = ModelConfig.from_dict(record["model"])
    networks: list[nn.Module] = []
    for entry in record["weights"]:
        network = build_model(config)
        network.load_state_dict(load_file(str(Path(folder) / entry["file"])))
        networks.append(network.to(device).eval())
    return record, networks
