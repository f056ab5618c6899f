"""External evaluation at the group level (``group --model``): gather the participants' predictions and,
when the new dataset gives the target, evaluate the model on it exactly as training's test set was.

Nothing is trained. Predictions made by another model than the one given, predictions of subjects
the model saw in training (``--allow-training-subjects``), and images without a usable target are
listed and left out of the metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .. import derivatives
from ..errors import InputDataError
from .cohort import target_values
from .infer import check_ensemble, ensemble_id
from .package import read_package
from .tasks import get_task

LOGGER = logging.getLogger(__name__)
PREDICTIONS = "predictions.tsv"
EVALUATION = "external_evaluation.json"


def prediction_path(output_dir: Path, source: str) -> Path:
    """The participant level's prediction record of the BIDS image ``source``."""
    return derivatives.named_path(output_dir, source, "prediction")


def _failed_quality_control(output_dir: Path, source: str) -> bool:
    iqm = derivatives.named_path(output_dir, source, "iqm")
    try:
        return json.loads(iqm.read_text()).get("qc", {}).get("verdict") == "fail"
    except (OSError, ValueError):
        return False


def gather_predictions(
    manifest: pd.DataFrame, output_dir: Path, records: Sequence[dict[str, Any]]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """One row per image predicted by exactly these models; the others listed with the reason."""
    wanted = [r["content_sha256"] for r in records]
    classes = records[0]["classes"]
    task = get_task(records[0]["task"])
    rows, skipped = [], []
    for _, image in manifest.iterrows():
        path = prediction_path(output_dir, image["source"])
        if not path.exists():
            reason = "no prediction (run the participant level with --model)"
            if _failed_quality_control(output_dir, image["source"]):
                reason = "failed quality control (registration or brain extraction; see its report): not predicted"
            skipped.append({"source": image["source"], "reason": reason})
            continue
        record = json.loads(path.read_text())
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
            **task.external_row(record, classes),
        }
        rows.append(row)
    return pd.DataFrame(rows), skipped


def run_external_evaluation(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    model_dirs: Sequence[Path],
    target: str | None,
    seed: int,
) -> dict[str, Any]:
    """Write ``predictions.tsv`` (+ ``.json``) and ``external_evaluation.json``; return the results."""
    records = [read_package(folder) for folder in model_dirs]
    check_ensemble(records, list(model_dirs))
    first = records[0]
    task, classes = get_task(first["task"]), first["classes"]
    column = target or first["target"]
    table, skipped = gather_predictions(manifest, output_dir, records)
    for item in skipped:
        LOGGER.warning("No prediction used for %s: %s.", item["source"], item["reason"])
    if table.empty:
        raise InputDataError(
            f"No image in {output_dir} has a prediction by {', '.join(str(m) for m in model_dirs)}. Run "
            "'bidsdl BIDS_DIR OUTPUT_DIR participant --model MODEL_DIR' first."
        )
    evaluated, excluded = table, []
    try:
        values = target_values(manifest.set_index("source").loc[table["source"]].reset_index(), column)
    except InputDataError:
        if target is not None:
            raise
        values = None
        LOGGER.info("participants.tsv has no column %r: predictions gathered, nothing to evaluate.", column)
    if values is not None:
        table["target"] = values.to_numpy()
        keep = pd.Series(True, index=table.index)
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
        evaluated = table[keep]
    evaluation = None
    if values is not None and not evaluated.empty:
        evaluation = task.external_evaluate(evaluated, classes, seed=seed)
    derivatives.write_text(output_dir / PREDICTIONS, table.to_csv(sep="\t", index=False, na_rep="n/a"))
    models = [
        {"package": str(folder), "name": r["name"], "content_sha256": r["content_sha256"],
         "bidsdl_version": r["bidsdl_version"]}
        for folder, r in zip(model_dirs, records, strict=True)
    ]  # fmt: skip
    derivatives.write_json(
        output_dir / PREDICTIONS.replace(".tsv", ".json"),
        {
            "Description": "The participant level's predictions of every image, gathered by the group level",
            "Models": models,
            "EnsembleID": ensemble_id(records),
            "seen_in_training": "true when the model saw this participant (or this image) in training or validation",
            "predicted": "the label at the model's threshold, or the predicted value",
            "probability": "probability of the positive class" if len(classes or []) == 2 else None,
        },
    )
    results = {
        "models": models,
        "ensemble_id": ensemble_id(records),
        "task": task.name,
        "target": column,
        "classes": classes,
        "positive_class": first.get("positive_class"),
        "training": {
            "n_subjects": first["data"]["n_subjects"],
            "test": first["metrics"]["test"],
        },
        "n_predicted": len(table),
        "n_evaluated": len(evaluated) if evaluation else 0,
        "skipped": skipped,
        "excluded": excluded,
        "evaluation": evaluation,
        "truth": evaluated["target"].tolist() if evaluation and not task.discrete else None,
        "predicted": evaluated["predicted"].tolist() if evaluation and not task.discrete else None,
        "seen_in_training": table.loc[table["seen_in_training"].astype(bool), "source"].tolist(),
    }
    derivatives.write_json(output_dir / EVALUATION, results)
    if evaluation:
        headline = task.headline_metric(len(classes or []))
        LOGGER.info(
            "External evaluation on %d image(s): %s %.3f", len(evaluated), headline, evaluation["metrics"][headline]
        )
    return results
