"""One learning study at the group level: cohort -> splits + leakage checks -> folds (or a search) -> assembly.

Everything the group report shows of learning is written to ``results.json`` beside the training
runs, so ``--reports-only`` re-renders without training.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...progress import Progress
from .. import transfer, walltime
from ..device import resolve_device, seed_everything
from ..models import ModelConfig
from .assembly import assemble
from .search import reuse_best_trial, run_search, with_values
from .settings import CohortStage, Provenance, SplitStage, StudySettings, prepare_run_dir, selected_folds
from .stages import gather_cohort, split_and_check, train_fold, warn_of_folds_to_train

LOGGER = logging.getLogger(__name__)


def run_study(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    cache_dir: Path,
    qc: pd.DataFrame | None,
    settings: StudySettings,
    config_record: dict[str, Any],
    environment: dict[str, Any],
    manifest_sha256: str,
) -> dict[str, Any] | None:
    """Train and evaluate; write the model package and ``results.json``; return the results (None when
    ``--fold`` trained some folds only: the assembly is a later run)."""
    started = time.monotonic()
    device = resolve_device(settings.device)
    seed_everything(settings.train.seed)
    settings = dataclasses.replace(settings, deadline=walltime.deadline(settings.time_limit))  # one for the job
    source = None
    if settings.init_from:  # checked before minutes of gathering
        source = transfer.load_source(settings.init_from, architecture=settings.architecture, inputs=settings.inputs,
                                      resolution_mm=settings.model_resolution)
    cohort = gather_cohort(manifest, output_dir=output_dir, cache_dir=cache_dir, qc=qc, settings=settings)
    split = split_and_check(cohort, output_dir=output_dir, settings=settings, source=source)
    selected = selected_folds(settings, split.n_folds)
    model_config = ModelConfig(
        architecture=settings.architecture,
        n_outputs=cohort.task.n_outputs(cohort.classes),
        in_shape=tuple(int(s) for s in np.load(cohort.images["array"].iloc[0], mmap_mode="r").shape[-3:]),  # type: ignore[arg-type]
        in_channels=len(settings.inputs),
    )
    searched = None
    if settings.search:  # the trials, then the best one's values are the study's
        searched = run_search(cohort, split, settings=settings, model_config=model_config, device=device)
        if searched is None:
            return None
        settings, model_config = with_values(settings, model_config, searched["best_values"])
    provenance = Provenance(config_record, environment, manifest_sha256, started)
    return _train_and_assemble(cohort, split, selected, settings=settings, model_config=model_config, device=device,
                               searched=searched, output_dir=output_dir, provenance=provenance)  # fmt: skip


def _train_and_assemble(
    cohort: CohortStage, split: SplitStage, selected: list[int], *, settings: StudySettings, model_config: ModelConfig,
    device: torch.device, searched: dict[str, Any] | None, output_dir: Path, provenance: Provenance,
) -> dict[str, Any] | None:  # fmt: skip
    """The folds of ``selected`` trained (or reused), then, unless ``--fold`` chose some, the assembly."""
    if not settings.fold:
        warn_of_folds_to_train(split, settings)
    prepare_run_dir(split.run_dir, settings, split, selected)
    if searched is not None:
        reuse_best_trial(split, searched["best"], settings)
    progress = Progress("folds", len(selected), logger=LOGGER, log_every_s=0)  # a line as each fold ends
    folds = []
    for fold in selected:
        progress.update(running=1)
        folds.append(train_fold(fold, cohort=cohort, split=split, settings=settings, model_config=model_config,
                                device=device))  # fmt: skip
        progress.update(done=progress.done + 1, running=0)
    if settings.fold:
        LOGGER.info(
            "Trained fold(s) %s of %d in %s. When every fold has finished, run the group level again without "
            "--fold (same options) to assemble the model, its evaluation and the reports.",
            ", ".join(map(str, selected)), split.n_folds, split.run_dir,
        )  # fmt: skip
        return None
    return assemble(cohort, split, folds, settings=settings, model_config=model_config, output_dir=output_dir,
                    provenance=provenance, device=device, searched=searched)  # fmt: skip
