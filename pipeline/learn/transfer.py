"""Transfer learning from a model package (``--init-from``), and its leakage guard across studies.

A fold's network starts from the source package's weights of the same network: every layer whose shape matches is
loaded, the output layer is drawn afresh where the targets differ, and the input standardisation is the target
training set's. ``--freeze`` keeps every layer but the head (:data:`HEADS`) at the source's weights; the other
pretrained layers learn at :data:`PRETRAINED_LR_FACTOR` times the learning rate.

The guard (ClinicaDL's fourth leakage): a participant the source model trained or validated on must never be in
the target's test set, nor in a validation fold (the epochs, thresholds, search and distribution check chosen there
would rest on images the encoder learned). A participant is the source's when one of its images has the content
(voxel data, or the preprocessed model input) of one the source learned from, or when it has the same participant
ID in the same dataset (``dataset_description.json``'s DOI, or else its name: :func:`pipeline.derivatives.
source_dataset`); every dataset has a sub-01, so IDs of another dataset never match. Each match says which rule
found it. Fresh splits move such participants into training (each logged); splits fixed earlier that hold one in
the test set or a validation fold are refused, as are fresh ones left without an unseen participant to test or
validate on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors.torch import load_file
from torch import nn

from ..errors import InputDataError, UsageError
from ..kinds import package_channels
from .package import read_package

LOGGER = logging.getLogger(__name__)

#: The learning rate of pretrained layers, as a share of ``--lr`` (new layers learn at ``--lr``).
PRETRAINED_LR_FACTOR = 0.1
#: Parameters of each network that ``--freeze`` leaves trainable (name prefixes): the head. For a U-Net, its last
#: decoder block.
HEADS: dict[str, tuple[str, ...]] = {
    "conv5fc3": ("net.classifier.",),
    "densenet121": ("net.class_layers.",),
    "resnet10": ("net.fc.",),
    "resnet18": ("net.fc.",),
    "unet": ("net.model.2.",),
    "unet-large": ("net.model.2.",),
}
#: Buffers recomputed on the target's training images, never taken from the source.
_OWN_BUFFERS = frozenset({"mean", "scale"})


@dataclass(frozen=True)
class Source:
    """The source package of a transfer: its folder and checked ``model.json``."""

    folder: Path
    record: dict[str, Any]

    @property
    def n_folds(self) -> int:
        return len(self.record["weights"])

    def weights(self, fold: int) -> tuple[int, Path]:
        """The source fold a target fold starts from (the same index, modulo the source's folds) and its file."""
        k = fold % self.n_folds
        return k, self.folder / self.record["weights"][k]["file"]

    def seen_subjects(self) -> list[dict[str, Any]]:
        """Everyone the source model (and, for a chain of transfers, its own sources) trained or validated on, each
        with the key of its dataset (None: a package made before datasets were recorded)."""
        own = (self.record.get("dataset") or {}).get("key")
        subjects = [{"dataset": own, **s} for s in self.record.get("training_subjects", [])]
        return [*subjects, *self.record.get("transfer", {}).get("seen_subjects", [])]


def load_source(folder: Path, *, architecture: str, inputs: Sequence[str], resolution_mm: float) -> Source:
    """The checked source package; refused with what differs when its network or inputs are not this study's."""
    record = read_package(folder)
    problems = []
    if record["model"]["architecture"] != architecture:
        problems.append(f"its network is {record['model']['architecture']}, this study's --architecture {architecture}")
    channels = package_channels(record)
    if list(channels) != list(inputs):
        problems.append(f"its inputs are {' '.join(channels)}, this study's --inputs {' '.join(inputs)}")
    if float(record["input"]["resolution_mm"]) != float(resolution_mm):
        problems.append(f"it learned at {record['input']['resolution_mm']} mm, this study at {resolution_mm} mm "
                        "(--model-resolution)")  # fmt: skip
    if problems:
        raise UsageError(f"--init-from {folder} does not fit this study: {'; '.join(problems)}. Transfer needs the "
                         "same network, inputs and model grid.")  # fmt: skip
    return Source(Path(folder), record)


def initialise(network: nn.Module, source: Source, fold: int, *, freeze: bool, same_targets: bool) -> dict[str, Any]:
    """Load the source's weights into ``network`` (before its standardisation is set), mark the pretrained
    parameters (their learning rate: :func:`param_groups`) and, with ``freeze``, freeze all but the head. The head
    (:data:`HEADS`) is drawn anew unless the source learned the same targets (``same_targets``: fine-tuning)."""
    source_fold, path = source.weights(fold)
    own = network.state_dict()
    theirs = load_file(str(path))
    heads = HEADS.get(source.record["model"]["architecture"], ())
    loaded = {k: v for k, v in theirs.items() if k in own and k not in _OWN_BUFFERS and v.shape == own[k].shape
              and (same_targets or not k.startswith(heads))}  # fmt: skip
    fresh = sorted(k for k in own if k not in loaded and k not in _OWN_BUFFERS)
    network.load_state_dict(loaded, strict=False)
    parameters = dict(network.named_parameters())
    network.pretrained_parameters = frozenset(k for k in loaded if k in parameters)  # type: ignore[assignment]
    frozen: list[str] = []
    if freeze:
        for name, parameter in parameters.items():
            if not name.startswith(heads):
                parameter.requires_grad_(False)
                frozen.append(name)
    return {"source_fold": source_fold, "loaded": len(loaded), "reinitialised": fresh, "frozen": len(frozen)}


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: new layers at ``lr``, pretrained ones at ``lr`` x
    :data:`PRETRAINED_LR_FACTOR`, frozen ones left out."""
    pretrained: frozenset[str] = getattr(model, "pretrained_parameters", frozenset())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n not in pretrained], "lr": lr},
        {"params": [p for n, p in named if n in pretrained], "lr": lr * PRETRAINED_LR_FACTOR},
    ]
    return [g for g in groups if g["params"]]


def keep_frozen_norms(model: nn.Module) -> None:
    """Batch norms whose parameters are frozen keep their running statistics (eval mode) while training."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own):
            module.eval()


def seen_participants(
    images: pd.DataFrame, seen: Iterable[dict[str, Any]], source_name: str, *, dataset: str
) -> dict[str, str]:
    """The cohort's participants the source model saw, each with the rule that found it: an image with the voxel
    data (``data_sha256``) or the model input (``input_sha256``) of one the source learned from, whatever the
    dataset and ID (a renamed copy); or the same participant ID in the same ``dataset`` (its key). A seen subject
    with no dataset on record (an older package) is matched by ID alone, and says so.

    >>> images = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c"], "data_sha256": ["1", "2", "3"]})
    >>> seen = [{"participant_id": "sub-a", "dataset": "A", "images": []},
    ...         {"participant_id": "sub-b", "dataset": "B", "images": []},
    ...         {"participant_id": "sub-x", "dataset": "B", "images": [{"data_sha256": "3"}]}]
    >>> for pid, why in seen_participants(images, seen, "m", dataset="A").items():
    ...     print(pid, "|", why)
    sub-a | sub-a is a training subject of m (same participant ID and dataset)
    sub-c | sub-c's image has the voxel data of sub-x of dataset B, a training subject of m (same image content)
    """
    by_id: dict[str, str | None] = {}
    by_hash: dict[str, tuple[str, str, str | None]] = {}
    for subject in seen:
        key = subject.get("dataset")
        if key is None or key == dataset:
            by_id[subject["participant_id"]] = key
        for image in subject.get("images", []):
            for column in ("data_sha256", "input_sha256"):
                if image.get(column):
                    by_hash[image[column]] = (subject["participant_id"], column, key)
    out: dict[str, str] = {}
    for row in images.itertuples(index=False):
        pid = str(row.participant_id)
        if pid in out:
            continue
        found = [by_hash[h] for h in (str(getattr(row, c, "") or "") for c in ("data_sha256", "input_sha256"))
                 if h in by_hash]  # fmt: skip
        if pid in by_id:
            rule = ("same participant ID and dataset" if by_id[pid] is not None
                    else "same participant ID; the source package names no dataset")  # fmt: skip
            same = "; same image content" if any(owner == pid for owner, _, _ in found) else ""
            out[pid] = f"{pid} is a training subject of {source_name} ({rule}{same})"
        elif found:
            owner, kind, key = found[0]
            what = "voxel data" if kind == "data_sha256" else "preprocessed model input"
            where = f" of dataset {key}" if key else ""
            out[pid] = (f"{pid}'s image has the {what} of {owner}{where}, a training subject of {source_name} "
                        "(same image content)")  # fmt: skip
    return out


def guard_splits(
    splits: pd.DataFrame, seen: dict[str, str], *, reused: bool, splits_file: Path
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """``splits`` with every participant the source model saw moved out of the test set and the validation folds
    into training (every fold's), and the moves (``from``: test or validation); splits fixed earlier (``reused``)
    that hold one there are refused, as are moves that would leave the test set or a validation fold empty.

    >>> splits = pd.DataFrame({"participant_id": ["a", "d", "b", "e", "c", "c", "b", "e"],
    ...                        "split": ["test", "test", "train", "train", "validation", "train", "validation",
    ...                                  "validation"],
    ...                        "fold": pd.array([None, None, 0, 0, 0, 1, 1, 1], dtype="Int64")})
    >>> table, moved = guard_splits(splits, {"a": "seen", "b": "seen"}, reused=False, splits_file=Path("s"))
    >>> sorted(table.loc[table["participant_id"].isin(["a", "b"]), "split"].unique()), [m["from"] for m in moved]
    (['train'], ['test', 'validation'])
    """
    where = {"test": splits["split"] == "test", "validation": splits["split"] == "validation"}
    caught = {name: sorted(set(splits.loc[rows, "participant_id"]) & set(seen)) for name, rows in where.items()}
    if not caught["test"] and not caught["validation"]:
        return splits, []
    listed = [p for name in ("test", "validation") for p in caught[name]]
    if reused:
        raise InputDataError(
            f"The splits in {splits_file} put {len(listed)} participant(s) the --init-from model saw in the test set "
            f"or a validation fold ({'; '.join(seen[p] for p in listed[:5])}{' ...' if len(listed) > 5 else ''}): "
            "testing, or choosing epochs and thresholds, on them would overstate the result. Run again with --resplit "
            "to make splits that keep them in training."
        )
    moving = set(listed)
    table = splits[~(splits["participant_id"].isin(moving) & (where["test"] | where["validation"]))].copy()
    folds = sorted(int(f) for f in splits["fold"].dropna().unique())
    validating = table["split"] == "validation"
    empty = [f"validation fold {k}" for k in folds if not (validating & (table["fold"] == k)).any()]
    if where["test"].any() and not (table["split"] == "test").any():
        empty.insert(0, "the test set")
    if empty:
        raise InputDataError(
            f"{len(moving)} participant(s) of {splits_file}'s test set and validation folds were seen by the "
            f"--init-from model ({'; '.join(seen[p] for p in listed[:3])} ...): without them "
            f"{' and '.join(empty)} would be empty. Evaluate and validate on participants the source model never saw "
            "(add them to the dataset), lower --n-folds, or train without --init-from."
        )
    have = set(zip(table["participant_id"], table["fold"].astype(object), strict=True))
    added = pd.DataFrame([{"participant_id": pid, "split": "train", "fold": k} for pid in sorted(moving) for k in folds
                          if (pid, k) not in have])  # fmt: skip
    table = pd.concat([table, added], ignore_index=True) if len(added) else table
    table["fold"] = table["fold"].astype("Int64")
    moved = [{"participant_id": pid, "from": name, "reason": seen[pid]} for name in ("test", "validation")
             for pid in caught[name] if not (name == "validation" and pid in caught["test"])]  # fmt: skip
    for item in moved:
        LOGGER.warning("Moved %s from the %s set into training: %s.", item["participant_id"], item["from"],
                       item["reason"])  # fmt: skip
    left = table.loc[table["split"] == "test", "participant_id"].nunique()
    LOGGER.warning("The test set now holds %d participant(s) the source model never saw (it held %d); the validation "
                   "folds %s: their intervals widen accordingly.", left, splits.loc[where["test"], "participant_id"]
                   .nunique(), ", ".join(str(((table["split"] == "validation") & (table["fold"] == k)).sum())
                                         for k in folds))  # fmt: skip
    return table, moved


def record(source: Source, folds: Sequence[dict[str, Any]], *, freeze: bool, moved: list[dict[str, str]],
           seen_in_cohort: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """What ``model.json`` and ``results.json`` keep of the transfer; ``seen_subjects`` extends the inference guard
    to everyone the source saw."""
    return {
        "source": source.record.get("name"),
        "source_folder": str(source.folder),
        "source_content_sha256": source.record.get("content_sha256"),
        "source_folds": [f["source_fold"] for f in folds],
        "loaded_tensors": [f["loaded"] for f in folds],
        "reinitialised": folds[0]["reinitialised"] if folds else [],
        "frozen": freeze,
        "frozen_parameters": [f["frozen"] for f in folds],
        "pretrained_lr_factor": PRETRAINED_LR_FACTOR,
        "seen_subjects": source.seen_subjects(),
        "seen_in_cohort": [{"participant_id": p, "reason": r} for p, r in sorted(seen_in_cohort.items())],
        "moved_to_training": moved,
    }
