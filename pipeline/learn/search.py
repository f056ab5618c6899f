"""Hyperparameter search without late-split leakage (``--search N``).

Random search (Bergstra & Bengio 2012) over the learning rate, the weight decay, the network's width, its dropout
and the augmentation's strength. Each trial trains every cross-validation fold on its training participants and is
scored by its validation folds only (the mean of each fold's best selection metric): the test set is never
predicted during the search. The best trial is trained again as the study and evaluated once on the test set.
Every trial is kept (``search/trial-K/``), tabulated (``search_trials.tsv``) and shown in the report, as ClinicaDL's
MAPS keeps every explored path.

Trial ``K``'s values depend only on the seed and ``K``: ``--search 20`` and ``--search 10`` share their first ten
trials, and ``--trial K`` jobs (one SLURM array task each) draw the same values as one sequential run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError
from .data import derived_seed


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: drawn uniformly on ``[low, high]`` (on a log scale when ``log``)."""

    name: str
    low: float
    high: float
    log: bool = False

    def draw(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))


#: The searched space (the default settings lie inside it).
SPACE = (
    Dimension("lr", 1e-4, 3e-3, log=True),
    Dimension("weight_decay", 1e-6, 1e-2, log=True),
    Dimension("width", 0.5, 2.0, log=True),
    Dimension("dropout", 0.0, 0.6),
    Dimension("augment_strength", 0.0, 1.5),
)
#: The augmentation a trial uses when the study asked for none (its strength is searched; 0 is none).
SEARCH_AUGMENT = ("affine", "intensity", "noise")


def draw_trial(seed: int, trial: int) -> dict[str, float]:
    """Trial ``trial``'s values, from the seed and its number alone.

    >>> draw_trial(42, 3) == draw_trial(42, 3) != draw_trial(42, 4)
    True
    >>> sorted(draw_trial(42, 0))
    ['augment_strength', 'dropout', 'lr', 'weight_decay', 'width']
    """
    rng = np.random.default_rng(derived_seed(seed, 1000 + trial))
    return {d.name: round(d.draw(rng), 8) for d in SPACE}


def architecture_kwargs(architecture: str, width: float, dropout: float) -> dict[str, Any]:
    """The network arguments of a width multiplier and a dropout rate; a network without one ignores it (the trial
    table says so).

    >>> architecture_kwargs("conv5fc3", 0.5, 0.2)
    {'channels': [4, 8, 16, 32, 64], 'hidden': [64, 32], 'dropout': 0.2}
    """
    def scaled(values: Sequence[int]) -> list[int]:
        return [max(2, round(v * width)) for v in values]

    if architecture == "conv5fc3":
        return {"channels": scaled((8, 16, 32, 64, 128)), "hidden": scaled((128, 64)), "dropout": dropout}
    if architecture in ("resnet10", "resnet18"):
        return {"widen_factor": width}
    if architecture == "densenet121":
        return {"growth_rate": max(4, round(32 * width)), "dropout_prob": dropout}
    if architecture == "unet":
        return {"channels": scaled((16, 32, 64, 128)), "dropout": dropout}
    if architecture == "unet-large":
        return {"channels": scaled((32, 64, 128, 256, 320)), "dropout": dropout}
    raise UsageError(f"--search does not know how to widen {architecture}: search another --architecture.")


def searched_names(architecture: str) -> list[str]:
    """The dimensions that change ``architecture``'s training (a ResNet has no dropout to search)."""
    kwargs = architecture_kwargs(architecture, 1.0, 0.5)
    return [d.name for d in SPACE if d.name != "dropout" or any("dropout" in k for k in kwargs)]


def trial_key(learning_settings: dict[str, Any], trial: int, values: dict[str, float], members: Any) -> str:
    """What a trial's result depends on (its settings, values and the folds' participants): sha256."""
    blob = json.dumps({"settings": learning_settings, "trial": trial, "values": values, "members": members},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def trial_score(bests: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """A trial's score from its folds' best values of ``metric`` alone (each fold's ``best`` record): a fold where
    the metric is undefined (e.g. ROC-AUC on a validation fold of one class) is left out and named, never scored by
    another metric (a loss averaged with AUCs would rank trials by nothing).

    >>> trial_score([{"roc_auc": {"value": 0.8}, "loss": {"value": 0.5}}, {"loss": {"value": 0.4}}], "roc_auc")
    {'fold_scores': [0.8, nan], 'score': 0.8, 'folds_without_metric': [1]}
    """
    scores = [float((best.get(metric) or {}).get("value", float("nan"))) for best in bests]
    finite = [v for v in scores if math.isfinite(v)]
    return {"fold_scores": scores, "score": float(np.mean(finite)) if finite else float("nan"),
            "folds_without_metric": [i for i, v in enumerate(scores) if not math.isfinite(v)]}  # fmt: skip


def best_trial(trials: Sequence[dict[str, Any]], larger_is_better: bool) -> dict[str, Any]:
    """The trial with the best validation score (the lowest number among equals); trials without a finite score
    never win.

    >>> best_trial([{"trial": 0, "score": 0.7}, {"trial": 1, "score": 0.9}, {"trial": 2, "score": float("nan")}],
    ...            True)["trial"]
    1
    """
    scored = [t for t in trials if t["score"] is not None and math.isfinite(t["score"])]
    if not scored:
        raise UsageError("No search trial has a finite validation score (every fold diverged or scored NaN): widen "
                         "the data or choose another --selection-metric.")  # fmt: skip
    sign = -1.0 if larger_is_better else 1.0
    return min(scored, key=lambda t: (sign * t["score"], t["trial"]))
