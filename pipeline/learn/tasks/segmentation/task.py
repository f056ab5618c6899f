"""The segmentation task object (:data:`TASK`): what differs from whole-image tasks, over the package's parts."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .... import derivatives
from ....bids.audit import load_spatial
from ....errors import UsageError
from ....reports import learning as figures
from ... import ood
from ...task import Criterion, TargetScale, Task
from .cohort import References, build_cohort
from .data import WINDOW_MODE, WINDOW_OVERLAP, SegmentationData, predict_volume
from .external import evaluate_segmentations
from .grid import model_grid, probabilities_to_native, read_transform
from .inference import segment_node
from .loss import DESCRIPTION as LOSS_DESCRIPTION
from .loss import segmentation_loss
from .metrics import dice_scores, structure_scores, summarise_cases
from .postprocess import (
    KEEP_LARGEST,
    MIN_LESION_CANDIDATES,
    SegmentationOutputs,
    choose_largest_components,
    choose_min_lesion_size,
    postprocess,
    probabilities,
)

LOGGER = logging.getLogger(__name__)


class Segmentation(Task):
    name = "segmentation"
    discrete = False
    learns_labels = True
    standardize_inputs = False
    stratify_by_target = False
    predicted_splits = ("validation", "test")
    direction: ClassVar[dict[str, bool]] = {"loss": False, "dice": True}
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {"loss": (0.0, math.inf), "dice": (0.0, 1.0)}
    #: AdamW at 3e-3 learned the sample's structures fastest of 1e-3/3e-3/1e-2 in 300 steps; batches of two 3D
    #: patches, as nnU-Net's 3D configuration; a 1.5 mm grid (whole-image tasks learn at the participant level's 2 mm).
    defaults: ClassVar[dict[str, Any]] = {"architecture": "unet", "lr": 3e-3, "batch_size": 2, "model_resolution": 1.5}
    architectures = ("unet", "unet-large")
    card_metrics = ("dice", "hd95_mm", "abs_volume_difference_ml", "lesion_f1", "lesion_recall", "avd_percent")
    export_output = "class probabilities per voxel (softmax, mean over folds) on one window; slide it over the grid"

    prediction_row_columns = (*Task.prediction_row_columns, "label_array")

    def build_cohort(
        self, manifest: pd.DataFrame, *, output_dir: Path, cache_dir: Path, qc: pd.DataFrame | None, settings: Any
    ) -> tuple[pd.DataFrame, list[str], list[dict[str, str]]]:
        if settings.labels is None or settings.label_desc is None:
            raise UsageError(f"--task {self.name} needs --labels DIR and --label-desc NAME (the reference labels).")
        cohort = build_cohort(
            manifest, output_dir=output_dir, bids_dir=settings.bids_dir,
            references=References(settings.labels, settings.label_desc), resolution_mm=settings.model_resolution,
            cache_dir=cache_dir, qc=qc,
            exclude_qc_outliers=settings.exclude_qc_outliers, include_failed_qc=settings.include_failed_qc,
            inputs=settings.inputs,
        )  # fmt: skip
        return cohort.table, cohort.label_table.structures, cohort.excluded

    def predict_participant(
        self, spec: dict[str, Any], out_dir: Path, models: Sequence[Any], *, seen: Sequence[str], device: Any
    ) -> dict[str, Any]:
        return segment_node(spec, out_dir, models, seen=seen, device=device)

    def external_evaluation(self, run: Any) -> dict[str, Any]:
        return evaluate_segmentations(run, self)

    def n_outputs(self, classes: Sequence[str]) -> int:
        return len(classes) + 1  # the background is class 0

    def dataset(self, rows: pd.DataFrame, *, patch_size: int, n_outputs: int) -> SegmentationData:
        return SegmentationData(rows["array"].tolist(), rows["label_array"].tolist(), patch_size, n_outputs)

    def subject_target(self, y: pd.Series) -> float:
        return 1.0

    def target_summary(self, rows: pd.DataFrame) -> dict[str, Any]:
        return {"labelled images": len(rows)}

    def metrics(self, n_outputs: int) -> tuple[str, ...]:
        return ("dice",)

    def loss(self, targets: Any, n_outputs: int, class_weighting: str) -> Criterion:
        return segmentation_loss(n_outputs)

    def loss_targets(self, y: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return y

    def predict(
        self, run: Callable[[torch.Tensor], torch.Tensor], data: Any, *, scale: TargetScale, batch_size: int
    ) -> Any:
        return SegmentationOutputs([predict_volume(run, data.array(i), data.patch) for i in range(len(data))])

    def features(self, network: torch.nn.Module, data: Any, *, device: Any, batch_size: int = 8) -> np.ndarray:
        """Each image's features: the deepest maps of every window of its sliding-window prediction, averaged (as at
        the participant level, :func:`pipeline.learn.ood.features_while`)."""
        network.eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            return network(x.to(device)).float().cpu()

        found = [ood.features_while(network, functools.partial(predict_volume, run, data.array(i), data.patch))[1]
                 for i in range(len(data))]  # fmt: skip
        return np.concatenate(found) if found else np.zeros((0, 0))

    def validation_loss(self, criterion: Criterion, outputs: Any, targets: Any, scale: TargetScale) -> float:
        return 1.0 - self.validation_scores(outputs, targets)["dice"]

    def validation_scores(self, outputs: Any, targets: Any) -> dict[str, float]:
        n_classes = outputs.probabilities[0].shape[0]
        scores = np.array(
            [
                dice_scores(p.argmax(0), np.asarray(t), range(1, n_classes))
                for p, t in zip(outputs.probabilities, targets, strict=True)
            ]
        )
        per_structure = np.nanmean(scores, axis=0)
        out = {"dice": float(np.nanmean(per_structure))}
        out.update({f"dice_{k}": float(v) for k, v in enumerate(per_structure, start=1)})
        return out

    def after_validation(self, outputs: Any, data: Any, *, run_dir: Any, epoch: int) -> None:
        """Draw the epoch's worst validation case (input, reference, prediction): ``worst_validation.png``."""
        n_classes = outputs.probabilities[0].shape[0]
        scores = [
            float(np.nanmean(dice_scores(p.argmax(0), np.asarray(data.label(i)), range(1, n_classes))))
            for i, p in enumerate(outputs.probabilities)
        ]
        worst = int(np.nanargmin(scores)) if np.isfinite(scores).any() else 0
        figure = segmentation_figure(
            np.asarray(data.array(worst)), np.asarray(data.label(worst)), outputs.probabilities[worst].argmax(0),
            title=f"epoch {epoch}: worst validation case {data.paths[worst].name}, mean Dice {scores[worst]:.3f}",
        )  # fmt: skip
        with derivatives.atomic_path(Path(run_dir) / "worst_validation.png") as tmp:
            tmp.write_bytes(figure)

    def ensemble(self, outputs: Sequence[Any]) -> Any:
        return SegmentationOutputs(
            [
                np.mean([o.probabilities[i].astype(np.float32) for o in outputs], axis=0).astype(np.float16)
                for i in range(len(outputs[0].probabilities))
            ]
        )

    def evaluate_rows(
        self, rows: pd.DataFrame, outputs: Any, *, threshold: float, seed: int, ci: bool
    ) -> dict[str, Any]:
        cases = self.case_scores(rows, outputs)
        result = summarise_cases(cases, seed=seed, ci=ci)
        result["cases"] = cases.to_dict(orient="records")
        return result

    def case_scores(self, rows: pd.DataFrame, outputs: Any) -> pd.DataFrame:
        records = []
        for i, (_, row) in enumerate(rows.iterrows()):
            names = {int(k): v for k, v in json.loads(row["label_names"]).items()}
            spacing = (float(row["grid_mm"]),) * 3
            reference = np.load(row["label_array"])
            for score in structure_scores(outputs.labels(i), reference, names, spacing):
                records.append({"participant_id": row["participant_id"], "source": row["source"], **score})
        return pd.DataFrame(records)

    def prediction_columns(
        self, table: pd.DataFrame, outputs: Any, classes: Sequence[str], threshold: float
    ) -> pd.DataFrame:
        indices = range(1, len(classes) + 1)
        dice = [
            float(np.nanmean(dice_scores(outputs.labels(i), np.load(path), indices)))
            for i, path in enumerate(table["label_array"])
        ]
        table["predicted"] = "labels"
        table["dice"] = dice
        return table.drop(columns=["label_array"])

    def error_size(self, table: pd.DataFrame) -> pd.Series:
        return 1 - table["dice"]

    def headline_metric(self, n_classes: int) -> str:
        return "dice"

    def evaluation_figure(self, evaluation: dict[str, Any], classes: Sequence[str], table: pd.DataFrame) -> bytes:
        """``table``: the case-wise scores (``case_scores.tsv`` rows, or the evaluation's own)."""
        cases = pd.DataFrame(evaluation["cases"]) if evaluation.get("cases") else table
        return figures.segmentation_panels(cases)

    def outputs(self, raw: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return probabilities(raw)

    def postprocessing(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> dict[str, Any]:
        cases = [
            (outputs.labels(i), np.load(path))
            for rows, outputs in validation
            for i, path in enumerate(rows["label_array"])
        ]
        names = {int(k): v for k, v in json.loads(validation[0][0]["label_names"].iloc[0]).items()}
        if len(names) == 1:  # one foreground class (lesions, many per image): the smallest lesion kept
            size = choose_min_lesion_size(cases)
            voxel_ml = float(validation[0][0]["grid_mm"].iloc[0]) ** 3 / 1000
            return {
                "postprocessing": {
                    KEEP_LARGEST: [], "label_indices": [], "min_lesion_voxels": size,
                    "min_lesion_ml": round(size * voxel_ml, 6),
                    "rule": "predicted lesions (26-connected components) smaller than min_lesion_ml are removed; the "
                    f"size is chosen among {list(MIN_LESION_CANDIDATES)} model-grid voxels as the one with the best "
                    "mean of Dice and lesion-wise F1 over every fold's validation images",
                }
            }  # fmt: skip
        chosen = choose_largest_components(cases, sorted(names))
        return {
            "postprocessing": {
                KEEP_LARGEST: [names[k] for k in chosen],
                "label_indices": chosen,
                "rule": "per structure, only its largest 26-connected component is kept when that does not lower "
                "its mean Dice over every fold's validation images (nnU-Net's rule); the rest becomes background",
            }
        }

    def pooled_threshold(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> float:
        """No threshold: each voxel takes its most probable label (0.5, recorded as such)."""
        return 0.5

    def postprocessed(self, outputs: Any, postprocessing: dict[str, Any]) -> Any:
        chosen = postprocessing.get("postprocessing", {})
        return dataclasses.replace(outputs, keep_largest=tuple(int(i) for i in chosen.get("label_indices", [])),
                                   min_lesion_voxels=int(chosen.get("min_lesion_voxels", 0)))  # fmt: skip

    def package_fields(self, *, classes: Sequence[str], settings: Any) -> dict[str, Any]:
        grid, shape = model_grid(settings.model_resolution)
        return {
            "labels": [{"index": i, "name": name} for i, name in enumerate(classes, start=1)],
            "label_desc": settings.label_desc,
            "input": {
                "channels": list(settings.inputs),  # the image kinds fed as channels, in order
                "space": derivatives.TEMPLATE_SPACE,
                "resolution_mm": settings.model_resolution,
                "res": derivatives.resolution_label(settings.model_resolution),
                "desc": "preproc",
                "shape": list(shape),
                "affine": grid.tolist(),
                "dtype": "float32",
                "made_from": "each channel's bias-corrected image on the T1w's grid (desc-preproc_T1w; a co-registered "
                "kind's space-T1w_desc-preproc) resampled through the participant level's affine "
                "(from-T1w_to-...xfm.txt, linear) onto the template grid cropped to the brain + 4 mm",
                "normalisation": "per channel: minus the median, divided by the IQR of that channel's template-space "
                "image in the T1w's brain (its sidecar's IntensityNormalization)",
            },
            "patch_size": settings.patch_size,
            "loss": LOSS_DESCRIPTION["lesions" if len(classes) == 1 else "multi-class"],
            "patch_sampling": "one foreground class: half the patches centred on a lesion (each connected component "
            "equally likely), the rest anywhere" if len(classes) == 1 else "a third of the patches centred on a "
            "structure's voxel, the rest anywhere",
            "inference": {
                "window": [settings.patch_size] * 3,
                "overlap": WINDOW_OVERLAP,
                "weighting": WINDOW_MODE,
                "output": "softmax probabilities averaged over folds; labels = argmax, in each T1w's grid after "
                "resampling the probabilities through the inverse affine (linear); then the post-processing "
                "('postprocessing': the structures whose largest connected component alone is kept, or the smallest "
                "lesion kept)",
            },
        }

    def finish_study(self, rows: pd.DataFrame, ensemble: Any, *, run_dir: Any, settings: Any) -> dict[str, Any]:
        """The test ensemble in each T1w's own grid, and previews of the worst test cases."""
        grid, _ = model_grid(settings.model_resolution)
        records = []
        previews = []
        scores = []
        for i, ((_, row), image_probabilities) in enumerate(zip(rows.iterrows(), ensemble.probabilities, strict=True)):
            names = {int(k): v for k, v in json.loads(row["label_names"]).items()}
            t1w = load_spatial(Path(settings.bids_dir) / row["source"])
            xfm = derivatives.named_path(settings.output_dir, row["source"], "xfm")
            native = probabilities_to_native(image_probabilities, grid, read_transform(xfm), t1w.affine, t1w.shape[:3])
            spacing = [float(z) for z in t1w.header.get_zooms()[:3]]
            rules = {"min_lesion_ml": ensemble.min_lesion_voxels * settings.model_resolution**3 / 1000}
            native = postprocess(native, rules, ensemble.keep_largest, float(np.prod(spacing)) / 1000)
            reference = np.asarray(nib.load(row["label_file"]).dataobj).astype(np.uint8)  # type: ignore[attr-defined]
            for score in structure_scores(native, reference, names, spacing):
                records.append({"participant_id": row["participant_id"], "source": row["source"], **score})
            labels = ensemble.labels(i)
            scores.append(float(np.nanmean(dice_scores(labels, np.load(row["label_array"]), sorted(names)))))
        native_eval = summarise_cases(pd.DataFrame(records), seed=settings.train.seed, ci=True)
        native_eval["cases"] = records
        worst_dir = Path(run_dir) / "worst"
        for index in np.argsort(scores)[:3]:
            row = rows.iloc[int(index)]
            figure = segmentation_figure(
                np.load(row["array"]), np.load(row["label_array"]), ensemble.labels(int(index)),
                title=f"{row['source']}: mean Dice {scores[int(index)]:.3f}",
            )  # fmt: skip
            path = worst_dir / (Path(row["source"]).name.split(".")[0] + ".png")
            with derivatives.atomic_path(path) as tmp:
                tmp.write_bytes(figure)
            figure_path = path.relative_to(settings.output_dir).as_posix()
            previews.append({"source": row["source"], "dice": scores[int(index)], "figure": figure_path})
        return {"test_native": native_eval, "worst_previews": previews}

    def prediction_fields(
        self, models: Sequence[dict[str, Any]], output: np.ndarray, per_model: Sequence[np.ndarray]
    ) -> dict[str, Any]:
        return {"predicted": "labels"}


TASK = Segmentation()


def segmentation_figure(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, title: str) -> bytes:
    return figures.segmentation_preview(image, reference, prediction, title=title)
