"""Model packages loaded for use: one :class:`LoadedModel` per package, checked as an ensemble, with the task
resolved once (:attr:`LoadedModel.task`), the leakage guard and the model card a prediction carries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputDataError, UsageError
from ..kinds import MORPHOMETRY_CHANNELS, package_channels
from . import ood
from .package import load_package
from .registry import get_task
from .task import Task

#: Model-record fields that all models of an ensemble must share.
_CONTRACT = ("space", "resolution_mm", "shape")


@dataclass(frozen=True)
class LoadedModel:
    """A checked package: its folder, its ``model.json`` and one network per fold."""

    folder: Path
    record: dict[str, Any]
    networks: list[nn.Module]
    task: Task
    #: Each fold's description of its training features (:mod:`pipeline.learn.ood`); None: none recorded.
    references: list[ood.FoldReference] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """What every output made with this model records about it."""
        return {
            "name": self.record["name"],
            "package": self.folder.name,
            "content_sha256": self.record["content_sha256"],
            "bidsdl_version": self.record["bidsdl_version"],
            "task": self.record["task"],
            "target": self.record["target"],
        }


def load_models(folders: Sequence[Path | str], device: str | torch.device = "cpu") -> list[LoadedModel]:
    """Load and check every package; an ensemble's models must share task, classes and input."""
    models = []
    for folder in folders:
        record, networks = load_package(Path(folder), device)
        references = ood.load_references(Path(folder), record["distribution"]) if record.get("distribution") else None
        models.append(LoadedModel(Path(folder), record, networks, get_task(record["task"]), references))
    check_ensemble([m.record for m in models], [m.folder for m in models])
    return models


def check_ensemble(records: Sequence[dict[str, Any]], folders: Sequence[Path]) -> None:
    """Refuse models that cannot be averaged (naming both values)."""
    first, first_folder = records[0], folders[0]
    for record, folder in zip(records[1:], folders[1:], strict=True):
        for key, a, b in [("task", first["task"], record["task"]), ("classes", first["classes"], record["classes"])] + [
            (f"input {k}", first["input"][k], record["input"][k]) for k in _CONTRACT
        ]:
            if a != b:
                raise UsageError(
                    f"--model {first_folder} and --model {folder} cannot form an ensemble: {key} is {a!r} in the "
                    f"first and {b!r} in the second. Give models trained for the same target on the same input."
                )


def ensemble_id(records: Sequence[dict[str, Any]]) -> str:
    """A short identifier of a set of models (its members' content hashes, in order)."""
    if len(records) == 1:
        return str(records[0]["content_sha256"][:8])
    joined = ",".join(r["content_sha256"] for r in records)
    return hashlib.sha256(joined.encode()).hexdigest()[:8]


def check_resolution(records: Sequence[dict[str, Any]], resolution_mm: float, folders: Sequence[Path]) -> None:
    """The participant level's ``--model-resolution`` must be the one the models were trained at."""
    for record, folder in zip(records, folders, strict=True):
        expected = float(record["input"]["resolution_mm"])
        if abs(expected - float(resolution_mm)) > 1e-6:
            raise UsageError(
                f"The model {folder} expects input at {expected:g} mm (res-{record['input']['res']}); this run "
                f"prepares {resolution_mm:g} mm (--model-resolution {resolution_mm:g}). "
                f"Run with --model-resolution {expected:g}, or use a model trained at {resolution_mm:g} mm."
            )


def check_registration(records: Sequence[dict[str, Any]], registration: str, folders: Sequence[Path]) -> None:
    """A model that takes morphometry maps (``GM``, ``logjacobian`` ...) needs the participant level's nonlinear
    registration, which makes them.

    >>> check_registration([{"input": {"channels": ["T1w", "GM"]}}], "affine", [Path("m")])
    Traceback (most recent call last):
    ...
    pipeline.errors.UsageError: The model m takes the morphometry map(s) GM as input, ...
    """
    for record, folder in zip(records, folders, strict=True):
        maps = [kind for kind in package_channels(record) if kind in MORPHOMETRY_CHANNELS]
        if maps and registration != "syn":
            raise UsageError(
                f"The model {folder} takes the morphometry map(s) {', '.join(maps)} as input, which the participant "
                f"level makes with its nonlinear registration: run without --registration {registration} "
                "(--registration syn is the default)."
            )


def training_matches(
    records: Sequence[dict[str, Any]], participant_id: str, data_sha256: Sequence[str], *, dataset: str
) -> list[str]:
    """Why this participant was seen in training or validation by any of the models (empty: never), each with the
    rule that found it: an image with the voxel data of a training subject's (``data_sha256``: a renamed copy, in
    any dataset), or the same participant ID in the same ``dataset`` (its key; a package made before datasets were
    recorded is matched by ID alone, and says so). Every dataset has a sub-01: another dataset's never matches.

    >>> rec = {"name": "m", "dataset": {"key": "A"},
    ...        "training_subjects": [{"participant_id": "sub-01", "images": [{"data_sha256": "a"}]}]}
    >>> training_matches([rec], "sub-02", ["a"], dataset="B")
    ["sub-02's image has the voxel data of sub-01 of dataset A, a training subject of m (same image content)"]
    >>> training_matches([rec], "sub-01", ["b"], dataset="B"), training_matches([rec], "sub-01", ["b"], dataset="A")
    ([], ['sub-01 is a training subject of m (same participant ID and dataset)'])
    """
    reasons = []
    hashes = set(data_sha256) - {""}
    for record in records:
        transfer = record.get("transfer") or {}
        source = f"{transfer.get('source')}, the source model of {record['name']}"
        own = (record.get("dataset") or {}).get("key")
        sources = [([{"dataset": own, **s} for s in record.get("training_subjects", [])], record["name"]),
                   (transfer.get("seen_subjects", []), source)]  # fmt: skip
        for subjects, whose in sources:
            for subject in subjects:
                key = subject.get("dataset")
                content = bool(hashes & {img.get("data_sha256") for img in subject["images"]})
                if subject["participant_id"] == participant_id and key in (None, dataset):
                    rule = ("same participant ID and dataset" if key is not None
                            else "same participant ID; the package names no dataset")  # fmt: skip
                    reasons.append(f"{participant_id} is a training subject of {whose} ({rule}"
                                   + ("; same image content)" if content else ")"))  # fmt: skip
                elif content:
                    where = f" of dataset {key}" if key else ""
                    owner = subject["participant_id"]
                    reasons.append(f"{participant_id}'s image has the voxel data of {owner}{where}, a training subject "
                                   f"of {whose} (same image content)")  # fmt: skip
    return reasons


def _distribution_card(entry: dict[str, Any] | None) -> str | None:
    """One sentence on how the model tells an unfamiliar image (None: the package records no distribution)."""
    if not entry:
        return None
    calibration = entry["calibration"]
    flagged = calibration.get("validation_flagged")
    return (
        f"features of {sum(f['n_train'] for f in entry['folds'])} training images (over {len(entry['folds'])} "
        f"fold(s)) and {len(entry.get('metric_ranges', {}))} quality metrics' ranges; threshold "
        f"{calibration['threshold']:.2f} set on {calibration['n_validation']} validation images"
        + (f", {flagged:.0%} of which it flags" if flagged is not None else "")
    )


def prediction_record(
    models: Sequence[LoadedModel], *, source: str, participant_id: str, seen: Sequence[str],
    check: dict[str, Any] | None, fields: dict[str, Any], uncertainty: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The record of one image's prediction (``prediction.json``), whatever the task: what was predicted, by which
    models, whether they saw the participant, then the task's ``fields``, the distribution check (``check``), the
    ensemble's ``uncertainty`` and the model card the subject report shows. The one place it is assembled."""
    return {
        "source": source,
        "participant_id": participant_id,
        "task": models[0].task.name,
        "target": models[0].record["target"],
        "models": [m.identity for m in models],
        "ensemble_id": ensemble_id([m.record for m in models]),
        "seen_in_training": bool(seen),
        "seen_in_training_reasons": list(seen),
        **fields,
        "out_of_distribution": (check or {}).get("out_of_distribution"),
        "distribution_check": check,
        "uncertainty": uncertainty,
        "model_card": [model_card(m) for m in models],
    }


#: The fields every prediction record has had, whatever the task and the bidsdl that wrote it (:func:`prediction_record`
#: writes them and more: a task adds its own, ``predicted`` among them; the distribution check and the ensemble's
#: spread came later, so readers take those with ``.get``); :func:`read_prediction` checks them.
PREDICTION_FIELDS = ("source", "participant_id", "task", "target", "models", "seen_in_training")


def read_prediction(path: Path) -> dict[str, Any]:
    """A participant level's ``prediction.json``, after checking that it is one (:data:`PREDICTION_FIELDS`); the
    one reader of what :func:`prediction_record` wrote. Raises :class:`~pipeline.errors.InputDataError` naming the
    file and what to do."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path} cannot be read ({exc.__class__.__name__}): re-run the participant level with "
                             "--model for this image.") from exc  # fmt: skip
    missing = [name for name in PREDICTION_FIELDS if name not in record] if isinstance(record, dict) else ["all"]
    if missing:
        raise InputDataError(f"{path} is not a bidsdl prediction record (no {', '.join(missing)}): damaged or made "
                             "by another tool; re-run the participant level with --model for this image.")  # fmt: skip
    return record


def prediction_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """The fields every sidecar of a prediction's maps or labels starts with (``record``: the prediction)."""
    return {"Models": record["models"], "EnsembleID": record["ensemble_id"],
            "SeenInTraining": record["seen_in_training"], "OutOfDistribution": record["out_of_distribution"]}


def model_card(model: LoadedModel) -> dict[str, Any]:
    """A summary of one model for the reader of a prediction: data, test metrics with CIs, intended use."""
    record = model.record
    test = record.get("metrics", {}).get("test", {})
    metrics = []
    for key in model.task.card_metrics:
        value = test.get("metrics", {}).get(key)
        if value is None or not np.isfinite(value):
            continue
        ci = test.get("ci", {}).get(key)
        metrics.append({"name": key, "value": value, "ci": ci if ci and all(np.isfinite(ci)) else None})
    return {
        **model.identity,
        "classes": record.get("classes"),
        "n_training_subjects": len(record.get("training_subjects", [])),
        "n_training_images": sum(len(s["images"]) for s in record.get("training_subjects", [])),
        "n_test_subjects": len(record.get("test_subjects", [])),
        "test_metrics": metrics,
        "baseline": (record.get("baseline") or {}).get("verdict", {}).get("text"),  # against a linear model
        "transferred_from": (record.get("transfer") or {}).get("source"),
        "distribution_check": _distribution_card(record.get("distribution")),
        "intended_use": record.get("model_card", {}).get("intended_use"),
        "limitations": record.get("model_card", {}).get("limitations"),
        "not_for_clinical_use": True,
    }
