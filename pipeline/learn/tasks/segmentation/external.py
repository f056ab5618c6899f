"""``group --model`` with a segmentation model: the participant level's labels (each T1w's own grid) compared
with reference labels (``--labels DIR --label-desc NAME``), case by case and structure by structure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from .... import derivatives
from ....errors import InputDataError
from ...ensemble import ensemble_id, read_prediction
from ...external import CASE_SCORES, EVALUATION, PREDICTIONS, ExternalRun, by_distribution, without_cases
from ...labels import LabelTable, check_labels_dataset, find_label, find_table, load_label
from ...task import Task
from .metrics import structure_scores, summarise_cases

LOGGER = logging.getLogger(__name__)


def evaluate_segmentations(run: ExternalRun, task: Task) -> dict[str, Any]:
    """Gather the volumes every image's labels measure; with references, score each case (Dice, HD95 ...)."""
    first = run.records[0]
    table, skipped = run.gathered()
    names = {int(e["index"]): e["name"] for e in first["labels"]}
    cases: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    if run.labels is not None and run.label_desc is not None and run.bids_dir is not None:
        cases, excluded = _scored_cases(run, table, names)
    evaluation = None
    if cases:
        evaluation = summarise_cases(pd.DataFrame(cases), seed=run.seed, ci=True)
        derivatives.write_text(
            run.output_dir / CASE_SCORES,
            pd.DataFrame(cases).to_csv(sep="\t", index=False, float_format="%.4f", na_rep="n/a"),
        )
        evaluation["cases"] = cases
        LOGGER.info(
            "External evaluation on %d image(s): mean Dice %.3f", evaluation["n"], evaluation["metrics"]["dice"]
        )
    _write_volumes(run, table)
    results = {
        **run.base_results(table, skipped),
        "worst": _worst(cases),
        "target": first["label_desc"],
        "positive_class": None,
        "n_evaluated": evaluation["n"] if evaluation else 0,
        "excluded": excluded,
        "evaluation": evaluation,
        "by_distribution": _by_distribution(table, cases),
        "truth": None,
        "predicted": None,
    }
    derivatives.write_json(run.output_dir / EVALUATION, {**results, "evaluation": without_cases(evaluation)})
    return results


def _by_distribution(table: pd.DataFrame, cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The flagged and unflagged images' Dice (each image's mean over its structures)."""
    if not cases:
        return None
    dice = pd.DataFrame(cases).groupby("source", sort=False)["dice"].mean()
    flags = table.set_index("source")["out_of_distribution"].reindex(dice.index)
    return by_distribution(pd.DataFrame({"out_of_distribution": flags.to_numpy()}), pd.Series(dice.to_numpy()),
                           "Dice (mean over structures)", lower_is_better=False)  # fmt: skip


def _scored_cases(
    run: ExternalRun, table: pd.DataFrame, names: dict[int, str]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every gathered image's scores per structure against its reference labels; the images left out."""
    assert run.labels is not None and run.label_desc is not None and run.bids_dir is not None
    check_labels_dataset(run.labels)
    reference_table = find_table(run.labels, run.label_desc)
    if set(reference_table.names.values()) != set(names.values()):
        LOGGER.warning(
            "The reference labels name %s; the model predicts %s: only the structures of both are compared.",
            ", ".join(reference_table.structures), ", ".join(names.values()),
        )  # fmt: skip
    cases, excluded = [], []
    for _, row in table.iterrows():
        source = row["source"]
        reference_path = find_label(run.labels, source, run.label_desc)
        reason = None
        if row["seen_in_training"]:
            reason = "seen in training (--allow-training-subjects): not an external test"
        elif reference_path is None:
            reason = f"no reference labels (desc-{run.label_desc}) in {run.labels}"
        if reason or reference_path is None:
            excluded.append({"source": source, "reason": str(reason)})
            continue
        try:
            reference = load_label(reference_path, Path(run.bids_dir) / source, reference_table)
        except InputDataError as exc:
            excluded.append({"source": source, "reason": str(exc)})
            LOGGER.error("%s", exc)
            continue
        for score in _case_scores(run, source, reference, reference_table, names):
            cases.append({"participant_id": row["participant_id"], "source": source, **score})
    return cases, excluded


def _case_scores(
    run: ExternalRun, source: str, reference: np.ndarray, reference_table: LabelTable, names: dict[int, str]
) -> list[dict[str, Any]]:
    """One image's predicted labels against its reference, structure by structure name (the reference's
    indices may differ from the model's)."""
    desc = run.records[0]["label_desc"]
    predicted_img = nib.load(derivatives.named_path(run.output_dir, source, "dseg", label_desc=desc))
    predicted = np.asarray(predicted_img.dataobj).astype(np.uint8)  # type: ignore[attr-defined]
    by_name = {n: i for i, n in reference_table.names.items()}
    remapped = np.zeros_like(reference)
    for index, name in names.items():
        if name in by_name:
            remapped[reference == by_name[name]] = index
    spacing = [float(z) for z in predicted_img.header.get_zooms()[:3]]  # type: ignore[attr-defined]
    common = {i: n for i, n in names.items() if n in by_name}
    return list(structure_scores(predicted, remapped, common, spacing))


def _write_volumes(run: ExternalRun, table: pd.DataFrame) -> None:
    """``predictions.tsv``: the volumes (ml) of the structures in every image, with its sidecar."""
    volumes = pd.DataFrame(
        [{"participant_id": r["participant_id"], "source": r["source"],
          **read_prediction(derivatives.named_path(run.output_dir, r["source"], "prediction"))["volumes_ml"]}
         for _, r in table.iterrows()]
    )  # fmt: skip
    derivatives.write_text(run.output_dir / PREDICTIONS, volumes.to_csv(sep="\t", index=False, na_rep="n/a"))
    derivatives.write_json(
        run.output_dir / PREDICTIONS.replace(".tsv", ".json"),
        {
            "Description": "Volumes (ml) of the structures the models segmented in each image, gathered by the "
            "group level",
            "Models": run.model_entries(),
            "EnsembleID": ensemble_id(run.records),
        },
    )


def _worst(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The five images of lowest mean Dice."""
    if not cases:
        return []
    per_case = pd.DataFrame(cases).groupby("source", sort=False)["dice"].mean().sort_values().head(5)
    return [{"source": source, "dice": float(dice)} for source, dice in per_case.items()]
