"""A whole-image task's external evaluation (``group --model``): each image's gathered prediction against its
participants.tsv value, and whether the distribution check's flag separated worse cases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .... import derivatives
from ....errors import InputDataError
from ...cohort import target_values
from ...ensemble import ensemble_id
from ...external import EVALUATION, PREDICTIONS, ExternalRun, by_distribution
from .base import WholeImage

LOGGER = logging.getLogger(__name__)


def evaluate_image_predictions(run: ExternalRun, task: WholeImage) -> dict[str, Any]:
    """A whole-image task's external evaluation: each image's prediction against its participants.tsv value."""
    first, classes = run.records[0], run.records[0]["classes"]
    column = run.target or first["target"]
    table, skipped = run.gathered(lambda record: task.external_row(record, classes))
    values = _reference_values(run.manifest, table, column, required=run.target is not None)
    evaluated, excluded = table, list[dict[str, str]]()
    if values is not None:
        table["target"] = values.to_numpy()
        evaluated, excluded = _evaluable(table, column, task, classes)
    evaluation, by_flag = None, None
    if values is not None and not evaluated.empty:
        evaluation = task.external_evaluate(evaluated, classes, seed=run.seed)
        by_flag = _flagged_against_unflagged(evaluated, task, classes)
    derivatives.write_text(run.output_dir / PREDICTIONS, table.to_csv(sep="\t", index=False, na_rep="n/a"))
    derivatives.write_json(
        run.output_dir / PREDICTIONS.replace(".tsv", ".json"),
        {
            "Description": "The participant level's predictions of every image, gathered by the group level",
            "Models": run.model_entries(),
            "EnsembleID": ensemble_id(run.records),
            "seen_in_training": "true when the model saw this participant (or this image) in training or validation",
            "predicted": "the label at the model's threshold, or the predicted value",
            "probability": "probability of the positive class" if len(classes or []) == 2 else None,
            "out_of_distribution": "true when the image is unlike the model's training images (its features or "
            "quality metrics; see each prediction's distribution_check); n/a: the package records no distribution",
            "distribution_score": "the image's feature score (flagged above the model's threshold)",
            "distribution_reasons": "why the image was flagged",
            "ensemble_sd": "SD of the prediction across the ensemble's members (folds and models)",
        },
    )
    shown = evaluation is not None and not classes  # values (no classes): the report draws them, one by one
    results = {
        **run.base_results(table, skipped),
        "target": column,
        "positive_class": first.get("positive_class"),
        "n_evaluated": len(evaluated) if evaluation else 0,
        "excluded": excluded,
        "evaluation": evaluation,
        "by_distribution": by_flag,
        "truth": evaluated["target"].tolist() if shown else None,
        "predicted": evaluated["predicted"].tolist() if shown else None,
    }
    derivatives.write_json(run.output_dir / EVALUATION, results)
    if evaluation:
        headline = task.headline_metric(len(classes or []))
        LOGGER.info(
            "External evaluation on %d image(s): %s %.3f", len(evaluated), headline, evaluation["metrics"][headline]
        )
    return results


def _flagged_against_unflagged(table: pd.DataFrame, task: WholeImage, classes: Sequence[str]) -> dict[str, Any] | None:
    """:func:`by_distribution` of the task's per-image error (None, logged, for a task that defines none)."""
    try:
        errors, measure = task.case_error(table, classes)
    except NotImplementedError:
        LOGGER.info("The task %s defines no per-image error: flagged and unflagged images are not compared.", task.name)
        return None
    return by_distribution(table, errors, measure, lower_is_better=True)


def _reference_values(manifest: pd.DataFrame, table: pd.DataFrame, column: str, *, required: bool) -> pd.Series | None:
    """The participants.tsv/sessions.tsv value of ``column`` for every gathered image; None (logged) when the new
    dataset does not give it and ``--target`` did not ask for it."""
    try:
        return target_values(manifest.set_index("source").loc[table["source"]].reset_index(), column)
    except InputDataError:
        if required:
            raise
        LOGGER.info("participants.tsv has no column %r: predictions gathered, nothing to evaluate.", column)
        return None


def _evaluable(
    table: pd.DataFrame, column: str, task: WholeImage, classes: Sequence[str]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The images whose prediction can be scored, and the others with the reason."""
    keep = pd.Series(True, index=table.index)
    excluded = []
    for index, row in table.iterrows():
        reason = None
        if row["seen_in_training"]:
            reason = "seen in training (--allow-training-subjects): not an external test"
        elif pd.isna(row["target"]):
            reason = f"no value for {column}"
        else:
            reason = task.external_reason(row["target"], column, classes)
        if reason:
            keep[index] = False
            excluded.append({"source": row["source"], "reason": reason})
    return table[keep], excluded
