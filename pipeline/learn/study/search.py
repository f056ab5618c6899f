"""Hyperparameter search inside a study: each trial is the study's folds with other values, scored on the
validation folds alone; the best trial's folds are kept as the study's (:mod:`pipeline.learn.search`: the space).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from typing import Any

import pandas as pd
import torch

from ... import derivatives
from .. import search
from ..models import ModelConfig
from .settings import CohortStage, SplitStage, StudySettings, fold_finished, fold_key
from .stages import fit_fold, fold_setup

LOGGER = logging.getLogger(__name__)


def run_search(
    cohort: CohortStage, split: SplitStage, *, settings: StudySettings, model_config: ModelConfig,
    device: torch.device,
) -> dict[str, Any] | None:  # fmt: skip
    """``--search N``: each trial (those of ``--trial``, else all) trains every fold and is scored on the validation
    folds only; the record of every trial and the best (None when ``--trial`` ran some only: the refit is later)."""
    task, metric = cohort.task, settings.train.selection_metric
    wanted = list(settings.trial) or list(range(settings.search))
    trials = [_run_trial(k, cohort=cohort, split=split, settings=settings, model_config=model_config, device=device)
              for k in wanted]  # fmt: skip
    if settings.trial:
        LOGGER.info("Trained search trial(s) %s of %d in %s. When every trial has finished, run the group level again "
                    "without --trial (same options) to train the best and evaluate it.",
                    ", ".join(map(str, wanted)), settings.search, split.run_dir / "search")  # fmt: skip
        return None
    best = search.best_trial(trials, task.direction[metric])
    table = pd.DataFrame([{"trial": t["trial"], **t["values"], "score": t["score"],
                           **{f"fold_{i}": v for i, v in enumerate(t["fold_scores"])}} for t in trials])  # fmt: skip
    derivatives.write_text(split.run_dir / SEARCH_TRIALS, table.to_csv(sep="\t", index=False, float_format="%.6g"))
    LOGGER.info("Search: trial %d is best (validation %s %.4f over %d fold(s)): %s", best["trial"], metric,
                best["score"], split.n_folds, ", ".join(f"{k} {v:.3g}" for k, v in best["values"].items()))  # fmt: skip
    return {
        "n_trials": settings.search,
        "metric": metric,
        "larger_is_better": task.direction[metric],
        "space": [dataclasses.asdict(d) for d in search.SPACE],
        "searched": search.searched_names(settings.architecture),
        "scored_on": "the validation folds only (mean over folds of each fold's best validation score); the test "
        "set is predicted once, by the best trial's folds (the study's model)",
        "trials": trials,
        "best": best["trial"],
        "best_values": best["values"],
    }


#: Every search trial, tabulated beside results.json.
SEARCH_TRIALS = derivatives.STUDY_OUTPUTS["search_trials"]


def with_values(
    settings: StudySettings, model_config: ModelConfig, values: dict[str, float]
) -> tuple[StudySettings, ModelConfig]:
    """The study's settings and network with a trial's values (learning rate, weight decay, augmentation strength;
    width and dropout as the network's arguments)."""
    train = dataclasses.replace(settings.train, lr=values["lr"], weight_decay=values["weight_decay"],
                                augment=settings.train.augment or search.SEARCH_AUGMENT,
                                augment_strength=values["augment_strength"])  # fmt: skip
    kwargs = search.architecture_kwargs(settings.architecture, values["width"], values["dropout"])
    learning = {**settings.learning_settings, "search_values": values}
    return (dataclasses.replace(settings, train=train, learning_settings=learning),
            dataclasses.replace(model_config, kwargs={**model_config.kwargs, **kwargs}))  # fmt: skip


def _run_trial(
    trial: int, *, cohort: CohortStage, split: SplitStage, settings: StudySettings, model_config: ModelConfig,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """One search trial: every fold trained with its values (in ``search/trial-K/fold-F``) and scored on its
    validation participants; reused when it finished earlier with the same settings, values and participants."""
    values = search.draw_trial(settings.train.seed, trial)
    trial_settings, trial_config = with_values(settings, model_config, values)
    trial_split = dataclasses.replace(split, run_dir=split.run_dir / "search" / f"trial-{trial}")
    members = [split.members(k) for k in range(split.n_folds)]
    key = search.trial_key(settings.learning_settings, trial, values, members)
    record_path = trial_split.run_dir / derivatives.STUDY_OUTPUTS["trial_record"]
    if record_path.exists() and json.loads(record_path.read_text()).get("key") == key:
        LOGGER.info("Search trial %d finished earlier with these settings: reused (%s)", trial, record_path)
        return json.loads(record_path.read_text())["trial"]
    metric = settings.train.selection_metric
    LOGGER.info("Search trial %d (of trials 0-%d): %s", trial, settings.search - 1,
                ", ".join(f"{k} {v:.3g}" for k, v in values.items()))  # fmt: skip
    bests, epochs = [], []
    for fold in range(split.n_folds):
        _rows, data, network, scale, _ = fold_setup(fold, cohort=cohort, split=trial_split, settings=trial_settings,
                                                     model_config=trial_config, parts=("train", "validation"))
        result = fit_fold(fold, network, data, task=cohort.task, split=trial_split, settings=trial_settings,
                           model_config=trial_config, scale=scale, device=device)  # fmt: skip
        bests.append(result.best)
        epochs.append(len(result.history))
    record = {"trial": trial, "values": values, **search.trial_score(bests, metric), "metric": metric,
              "epochs": epochs}  # fmt: skip
    derivatives.write_json(record_path, {"key": key, "trial": record})
    return record


def reuse_best_trial(split: SplitStage, best: int, settings: StudySettings) -> None:
    """The best trial's folds are the study's: trained with the same values, seeds and participants (each copied
    into the run folder, where :func:`fit_fold` finds it finished)."""
    for fold in range(split.n_folds):
        source, target = split.run_dir / "search" / f"trial-{best}" / f"fold-{fold}", split.run_dir / f"fold-{fold}"
        if fold_finished(source, fold_key(settings, split, fold)) and not fold_finished(
            target, fold_key(settings, split, fold)
        ):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            LOGGER.info("Fold %d of search trial %d is the study's fold %d (same values, seeds and participants)",
                        fold, best, fold)  # fmt: skip
