"""Transfer learning from a model package (``--init-from``), and its leakage guard across studies.

A fold's network starts from the source package's weights of the same network: every layer whose shape matches is
loaded, the output layer is drawn afresh where the targets differ, and the input standardisation is the target
training set's. ``--freeze`` keeps every layer but the head (:data:`HEADS`) at the source's weights; the other
pretrained layers learn at :data:`PRETRAINED_LR_FACTOR` times the learning rate.

The guard (ClinicaDL's fourth leakage): a participant the source model trained or validated on, found by
participant ID or by image hash (a renamed copy), must never be in the target's test set. Fresh splits move such
participants into training (each logged); splits fixed earlier that hold one in the test set are refused.
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
        """Everyone the source model (and, for a chain of transfers, its own sources) trained or validated on."""
        return [*self.record.get("training_subjects", []), *self.record.get("transfer", {}).get("seen_subjects", [])]


def load_source(folder: Path, *, architecture: str, inputs: Sequence[str], resolution_mm: float) -> Source:
    """The checked source package; refused with what differs when its network or inputs are not this study's."""
    record = read_package(folder)
    problems = []
    if record["model"]["architecture"] != architecture:
        problems.append(f"its network is {record['model']['architecture']}, this study's --architecture {architecture}")
    channels = record.get("input", {}).get("channels", ["T1w"])
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


def seen_participants(images: pd.DataFrame, seen: Iterable[dict[str, Any]], source_name: str) -> dict[str, str]:
    """The cohort's participants the source model saw (by participant ID, or by an image's voxel or input hash: a
    renamed copy), each with the reason.

    >>> images = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c"], "data_sha256": ["1", "2", "3"]})
    >>> seen = [{"participant_id": "sub-a", "images": []},
    ...         {"participant_id": "sub-x", "images": [{"data_sha256": "3"}]}]
    >>> for pid, why in seen_participants(images, seen, "m").items():
    ...     print(pid, "|", why)
    sub-a | sub-a is a training subject of m
    sub-c | sub-c's image has the voxel data of sub-x, a training subject of m
    """
    by_id = {s["participant_id"] for s in seen}
    by_hash: dict[str, str] = {}
    for subject in seen:
        for image in subject.get("images", []):
            for key in ("data_sha256", "input_sha256"):
                if image.get(key):
                    by_hash[image[key]] = subject["participant_id"]
    out: dict[str, str] = {}
    for row in images.itertuples(index=False):
        pid = str(row.participant_id)
        if pid in out:
            continue
        if pid in by_id:
            out[pid] = f"{pid} is a training subject of {source_name}"
            continue
        for key in ("data_sha256", "input_sha256"):
            owner = by_hash.get(str(getattr(row, key, "") or ""))
            if owner:
                out[pid] = f"{pid}'s image has the voxel data of {owner}, a training subject of {source_name}"
                break
    return out


def guard_test_set(
    splits: pd.DataFrame, seen: dict[str, str], *, reused: bool, splits_file: Path
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """``splits`` with every test participant the source model saw moved into training (each fold's training
    set), and the moves; splits fixed earlier (``reused``) that hold one are refused.

    >>> splits = pd.DataFrame({"participant_id": ["a", "d", "b", "c"], "split": ["test", "test", "train", "validation"],
    ...                        "fold": pd.array([None, None, 0, 0], dtype="Int64")})
    >>> seen = {"a": "a is a training subject of m"}
    >>> table, moved = guard_test_set(splits, seen, reused=False, splits_file=Path("s"))
    >>> table[table["participant_id"] == "a"]["split"].tolist(), len(moved)
    (['train'], 1)
    """
    test = splits[splits["split"] == "test"]
    caught = [pid for pid in test["participant_id"] if pid in seen]
    if not caught:
        return splits, []
    if reused:
        raise InputDataError(
            f"The splits in {splits_file} put {len(caught)} participant(s) the --init-from model saw in the test set "
            f"({'; '.join(seen[p] for p in caught[:5])}{' ...' if len(caught) > 5 else ''}): testing on them would "
            "overstate the result. Run again with --resplit to make splits that keep them in training."
        )
    if len(caught) == test["participant_id"].nunique():
        examples = "; ".join(seen[p] for p in caught[:3])
        raise InputDataError(
            f"Every test participant of {splits_file} was seen by the --init-from model ({examples} ...): nothing "
            "would be left to test on. Evaluate on participants the source model never saw (add them to the "
            "dataset), or train without --init-from."
        )
    folds = sorted(int(f) for f in splits["fold"].dropna().unique())
    added = pd.DataFrame([{"participant_id": pid, "split": "train", "fold": k} for pid in caught for k in folds])
    table = pd.concat([splits[~splits["participant_id"].isin(caught)], added], ignore_index=True)
    table["fold"] = table["fold"].astype("Int64")
    moved = [{"participant_id": pid, "reason": seen[pid]} for pid in caught]
    for item in moved:
        LOGGER.warning("Moved %s from the test set into training: %s.", item["participant_id"], item["reason"])
    left = table.loc[table["split"] == "test", "participant_id"].nunique()
    LOGGER.warning("The test set now holds %d participant(s) the source model never saw (it held %d): its intervals "
                   "widen accordingly.", left, test["participant_id"].nunique())  # fmt: skip
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
