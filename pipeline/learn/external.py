"""External evaluation at the group level (``group --model``): gather the participants' predictions and,
when the new dataset gives the target, evaluate the model on it exactly as training's test set was.

Nothing is trained. Predictions made by another model than the one given, predictions of subjects
the model saw in training (``--allow-training-subjects``), and images without a usable target are
listed and left out of the metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import derivatives
from ..errors import InputDataError
from .ensemble import check_ensemble, ensemble_id, read_prediction
from .package import read_package
from .task import Task

LOGGER = logging.getLogger(__name__)
PREDICTIONS = derivatives.GROUP_OUTPUTS["predictions"]
EVALUATION = derivatives.GROUP_OUTPUTS["external_evaluation"]
#: Case-wise scores of an external segmentation evaluation (per image and structure, each T1w's grid).
CASE_SCORES = derivatives.GROUP_OUTPUTS["external_case_scores"]


def prediction_path(output_dir: Path, source: str) -> Path:
    """The participant level's prediction record of the BIDS image ``source``."""
    return derivatives.named_path(output_dir, source, "prediction")


def _failed_quality_control(output_dir: Path, source: str) -> bool:
    iqm = derivatives.named_path(output_dir, source, "iqm")
    try:
        return json.loads(iqm.read_text()).get("qc", {}).get("verdict") == "fail"
    except (OSError, ValueError):
        return False


#: A task's columns of one gathered prediction record (:func:`predicted`: what was predicted, the default).
Columns = Callable[[dict[str, Any]], dict[str, Any]]


def predicted(record: dict[str, Any]) -> dict[str, Any]:
    """A prediction record's ``predicted`` (the gathered columns of a task that adds none)."""
    return {"predicted": record["predicted"]}


def gather_predictions(
    manifest: pd.DataFrame, output_dir: Path, records: Sequence[dict[str, Any]], columns: Columns = predicted
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """One row per image predicted by exactly these models (``columns``: the task's columns of a record); the
    others listed with the reason."""
    wanted = [r["content_sha256"] for r in records]
    rows, skipped = [], []
    for _, image in manifest.iterrows():
        path = prediction_path(output_dir, image["source"])
        if not path.exists():
            reason = "no prediction (run the participant level with --model)"
            if _failed_quality_control(output_dir, image["source"]):
                reason = "failed quality control (registration or brain extraction; see its report): not predicted"
            skipped.append({"source": image["source"], "reason": reason})
            continue
        try:
            record = read_prediction(path)
        except InputDataError as exc:
            skipped.append({"source": image["source"], "reason": str(exc)})
            continue
        made_by = [m["content_sha256"] for m in record["models"]]
        if made_by != wanted:
            skipped.append(
                {
                    "source": image["source"],
                    "reason": f"predicted by another model ({', '.join(h[:8] for h in made_by)}); "
                    "re-run the participant level with these --model",
                }
            )
            continue
        row: dict[str, Any] = {
            "participant_id": image["participant_id"],
            "session_id": image.get("session_id"),
            "source": image["source"],
            "seen_in_training": record["seen_in_training"],
            **columns(record),
            # the distribution check and the ensemble's spread (None: made before bidsdl checked them)
            "out_of_distribution": record.get("out_of_distribution"),
            "distribution_score": (record.get("distribution_check") or {}).get("score"),
            "distribution_reasons": "; ".join((record.get("distribution_check") or {}).get("reasons", [])) or None,
            "ensemble_sd": (record.get("uncertainty") or {}).get("fold_sd"),
        }
        rows.append(row)
    return pd.DataFrame(rows), skipped


def _gathered(
    manifest: pd.DataFrame,
    output_dir: Path,
    records: Sequence[dict[str, Any]],
    model_dirs: Sequence[Path],
    columns: Columns,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The gathered predictions and the images left out (logged); no prediction at all is an input error."""
    table, skipped = gather_predictions(manifest, output_dir, records, columns)
    for item in skipped:
        LOGGER.warning("No prediction used for %s: %s.", item["source"], item["reason"])
    if table.empty:
        raise InputDataError(
            f"No image in {output_dir} has a prediction by {', '.join(str(m) for m in model_dirs)}. Run "
            "'bidsdl BIDS_DIR OUTPUT_DIR participant --model MODEL_DIR' first."
        )
    return table, skipped


@dataclass(frozen=True)
class ExternalRun:
    """What one external evaluation is given: the manifest of the new dataset, where its participant-level
    predictions are, the model packages (their folders and records) and the references to evaluate against."""

    manifest: pd.DataFrame
    output_dir: Path
    model_dirs: list[Path]
    records: list[dict[str, Any]]
    target: str | None
    seed: int
    bids_dir: Path | None = None
    labels: Path | None = None
    label_desc: str | None = None

    def gathered(self, columns: Columns = predicted) -> tuple[pd.DataFrame, list[dict[str, str]]]:
        """One row per image that these models predicted (``columns``: the task's columns of a prediction record),
        and the images skipped, logged."""
        return _gathered(self.manifest, self.output_dir, self.records, self.model_dirs, columns)

    def model_entries(self) -> list[dict[str, Any]]:
        return _model_entries(self.model_dirs, self.records)

    def base_results(self, table: pd.DataFrame, skipped: list[dict[str, str]]) -> dict[str, Any]:
        """What every external evaluation records: the models, their training, what was predicted and skipped, and
        the images the distribution check flagged (logged)."""
        first = self.records[0]
        flagged = table.loc[table["out_of_distribution"].map(lambda v: v is True), "source"].tolist()
        if flagged:
            LOGGER.warning("%d of %d prediction(s) flagged as unlike the model's training images (out of distribution; "
                           "kept and marked in predictions.tsv): %s", len(flagged), len(table), ", ".join(flagged))
        return {
            "models": self.model_entries(),
            "ensemble_id": ensemble_id(self.records),
            "task": first["task"],
            "classes": first["classes"],
            "training": {"n_subjects": first["data"]["n_subjects"], "test": first["metrics"]["test"]},
            "n_predicted": len(table),
            "skipped": skipped,
            "seen_in_training": table.loc[table["seen_in_training"].astype(bool), "source"].tolist(),
            "out_of_distribution": [
                {"source": row["source"], "reasons": row["distribution_reasons"]}
                for _, row in table.iterrows() if row["source"] in flagged
            ],
            "distribution_checked": int(table["out_of_distribution"].notna().sum()),
        }


def run_external_evaluation(
    manifest: pd.DataFrame,
    *,
    task: Task,
    output_dir: Path,
    model_dirs: Sequence[Path],
    target: str | None,
    seed: int,
    bids_dir: Path | None = None,
    labels: Path | None = None,
    label_desc: str | None = None,
) -> dict[str, Any]:
    """Write ``predictions.tsv`` (+ ``.json``) and ``external_evaluation.json`` of ``task``'s models; return the
    results (the task gathers and evaluates: :meth:`~pipeline.learn.task.Task.external_evaluation`)."""
    records = [read_package(folder) for folder in model_dirs]
    check_ensemble(records, list(model_dirs))
    run = ExternalRun(manifest, Path(output_dir), list(model_dirs), records, target, seed, bids_dir, labels, label_desc)
    return task.external_evaluation(run)


def by_distribution(table: pd.DataFrame, errors: pd.Series, measure: str, *, lower_is_better: bool) -> dict[str, Any]:
    """How the images the distribution check flagged score against those it did not: the count and the mean and
    median of a per-image ``errors`` (``measure``) in each group, and a sentence saying whether the flag separated
    worse cases (the flag is only useful if flagged cases do worse).

    >>> t = pd.DataFrame({"out_of_distribution": [True, False, False]})
    >>> by_distribution(t, pd.Series([0.9, 0.1, 0.2]), "error", lower_is_better=True)["text"]
    '1 flagged image(s): mean error 0.9 against 0.15 for the 2 unflagged: the flagged did worse.'
    """
    flags = table["out_of_distribution"]
    known = flags.notna().to_numpy()
    groups = {}
    for name, wanted in (("flagged", True), ("unflagged", False)):
        chosen = errors.to_numpy()[known & (flags.to_numpy() == wanted)].astype(float)
        groups[name] = {"n": len(chosen), "mean": float(chosen.mean()) if len(chosen) else None,
                        "median": float(np.median(chosen)) if len(chosen) else None}  # fmt: skip
    flagged, unflagged = groups["flagged"], groups["unflagged"]
    f_mean, u_mean = flagged["mean"], unflagged["mean"]
    if not known.any():
        text = "The predictions carry no distribution check (the model package was made before bidsdl recorded one)."
    elif not flagged["n"]:
        text = f"No image was flagged as unlike the training images ({unflagged['n']} checked)."
    elif u_mean is None or f_mean is None:
        text = f"Every image ({flagged['n']}) was flagged as unlike the training images: mean {measure} {f_mean:.3g}."
    else:
        worse = (f_mean > u_mean) == lower_is_better
        text = (f"{flagged['n']} flagged image(s): mean {measure} {f_mean:.3g} against {u_mean:.3g} for the "
                f"{unflagged['n']} unflagged: the flagged did {'worse' if worse else 'not do worse'}.")  # fmt: skip
    return {"measure": measure, "lower_is_better": lower_is_better, **groups, "text": text}


def without_cases(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if evaluation is None else {k: v for k, v in evaluation.items() if k != "cases"}


def _model_entries(model_dirs: Sequence[Path], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"package": str(folder), "name": r["name"], "content_sha256": r["content_sha256"],
         "bidsdl_version": r["bidsdl_version"]}
        for folder, r in zip(model_dirs, records, strict=True)
    ]  # fmt: skip
