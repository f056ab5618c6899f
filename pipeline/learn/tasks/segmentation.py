"""Segmentation: a label per voxel, learned from reference labels (``--labels DIR --label-desc NAME``).

The input grid is the template grid cropped to the brain at ``--model-resolution`` (default 1.5 mm for
segmentation): each image is resampled once from its bias-corrected T1w through the participant level's
affine (one interpolation, linear), normalised as its template-space image was (median 0, IQR 1 in the
brain); each label image goes the same way by nearest neighbour. Training draws patches (one in three
centred on a voxel of a random structure present, as nnU-Net oversamples foreground), with Dice +
cross-entropy; validation and prediction slide a window over the whole grid (Gaussian-weighted overlap).
Predictions go back to each T1w's own grid through the inverse affine: the probabilities are resampled
(linear), then the argmax is taken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch.nn import functional as F  # noqa: N812 - the usual name

from ... import derivatives
from ...bids.audit import load_spatial, sha256_file
from ...errors import InputDataError
from ...ops.images import array_to_sitk
from ...ops.resample import resample
from ...ops.template import cropped_grid, load_template
from .. import evaluate
from ..labels import LabelTable, check_labels_dataset, find_label, find_table, load_label
from .base import Criterion, TargetScale, Task

LOGGER = logging.getLogger(__name__)

#: Default voxel size (mm) of the segmentation grid: small structures need finer voxels than a diagnosis.
DEFAULT_RESOLUTION_MM = 1.5
#: Training patches drawn per training image and epoch, and at least this many per epoch (nnU-Net's epoch is
#: a fixed number of steps, not one pass over the images: with few images, one pass teaches almost nothing).
PATCHES_PER_IMAGE = 4
MIN_PATCHES_PER_EPOCH = 250
#: Share of patches centred on a voxel of a structure (the rest anywhere in the grid).
FOREGROUND_FRACTION = 1 / 3
#: Overlap of neighbouring windows at inference, and their weighting.
WINDOW_OVERLAP = 0.5
WINDOW_MODE = "gaussian"
#: Percentile of the surface distances reported as the Hausdorff distance.
HAUSDORFF_PERCENTILE = 95


# --- grids ---------------------------------------------------------------------------------------------------
def model_grid(resolution_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The segmentation grid: the 1 mm template's brain box + 4 mm, at ``resolution_mm``."""
    template = load_template(1)
    return cropped_grid(template.brain_mask, template.affine, resolution_mm)


def read_transform(path: Path) -> sitk.Transform:
    """The participant level's T1w -> template affine (maps template points to T1w points)."""
    return sitk.ReadTransform(str(path))


def image_on_grid(
    t1w: nib.spatialimages.SpatialImage, transform: sitk.Transform, grid: np.ndarray, shape: Sequence[int],
    normalisation: dict[str, Any],
) -> np.ndarray:  # fmt: skip
    """The bias-corrected T1w on the grid (linear), normalised with its template-space median and IQR."""
    data = np.asanyarray(t1w.dataobj, dtype=np.float32)
    values = resample(array_to_sitk(data, t1w.affine), transform, grid, shape)
    return ((values - float(normalisation["median"])) / float(normalisation["iqr"])).astype(np.float32)


def labels_on_grid(
    labels: np.ndarray, affine: np.ndarray, transform: sitk.Transform, grid: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """A T1w-grid label image on the model grid (nearest neighbour)."""
    image = array_to_sitk(labels.astype(np.float32), affine)
    return resample(image, transform, grid, shape, interpolation=sitk.sitkNearestNeighbor).astype(np.uint8)


def probabilities_to_native(
    probabilities: np.ndarray,
    grid: np.ndarray,
    transform: sitk.Transform,
    affine: np.ndarray,
    shape: Sequence[int],
) -> np.ndarray:
    """Model-grid class probabilities ``(K, X, Y, Z)`` -> the labels on a T1w's grid (resample, then argmax).

    Outside the model grid the background wins.
    """
    inverse = transform.GetInverse()
    best = np.zeros(tuple(shape), dtype=np.float32)
    labels = np.zeros(tuple(shape), dtype=np.uint8)
    for k in range(probabilities.shape[0]):
        channel = array_to_sitk(np.asarray(probabilities[k], dtype=np.float32), grid)
        values = resample(channel, inverse, affine, shape)
        if k == 0:  # the background: 1 outside the grid
            ones = array_to_sitk(np.ones(probabilities.shape[1:], dtype=np.float32), grid)
            values = values + (1 - resample(ones, inverse, affine, shape))
        better = values > best
        labels[better] = k
        best[better] = values[better]
    return labels


# --- metrics -------------------------------------------------------------------------------------------------
def keep_largest_components(labels: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """For each label in ``indices``, its voxels outside its largest 26-connected component become background.

    >>> a = np.zeros((9, 9, 9), np.uint8); a[1:4, 1:4, 1:4] = 1; a[7, 7, 7] = 1; a[5, 5, 5] = 2
    >>> b = keep_largest_components(a, [1, 2])
    >>> int((b == 1).sum()), int((b == 2).sum()), int(b[7, 7, 7])
    (27, 1, 0)
    """
    out = np.array(labels, copy=True)
    for index in indices:
        mask = out == index
        if not mask.any():
            continue
        components, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        if n > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            out[mask & (components != largest)] = 0
    return out


def choose_largest_components(cases: Sequence[tuple[np.ndarray, np.ndarray]], indices: Sequence[int]) -> list[int]:
    """The labels for which keeping only the largest component does not lower the mean Dice over ``cases``
    (``(predicted, reference)`` pairs of validation images): nnU-Net's rule for its post-processing."""
    chosen = []
    for index in indices:
        before = [dice_scores(pred, ref, [index])[0] for pred, ref in cases]
        after = [dice_scores(keep_largest_components(pred, [index]), ref, [index])[0] for pred, ref in cases]
        if np.isfinite(before).any() and _mean(np.array(after)) >= _mean(np.array(before)):
            chosen.append(int(index))
    return chosen


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], percentile: float) -> float:
    """The larger of the two directed ``percentile`` surface distances (mm), as MONAI computes it."""
    if not pred.any() or not ref.any():
        return float("nan")
    sp, sr = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(to_ref[sp], percentile), np.percentile(to_pred[sr], percentile)))


def _crop(*masks: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    union = np.zeros(masks[0].shape, dtype=bool)
    for m in masks:
        union |= m
    idx = np.argwhere(union)
    if not len(idx):
        return tuple(slice(0, 0) for _ in masks[0].shape)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, masks[0].shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def structure_scores(
    pred: np.ndarray, ref: np.ndarray, names: dict[int, str], spacing: Sequence[float]
) -> list[dict[str, Any]]:
    """Per structure: Dice, HD95 (mm), reference and predicted volume (ml) and their difference.

    >>> ref = np.zeros((8, 8, 8), np.uint8); ref[2:6, 2:6, 2:6] = 1
    >>> [round(s["dice"], 3) for s in structure_scores(ref, ref, {1: "a"}, (1, 1, 1))]
    [1.0]
    """
    voxel_ml = float(np.prod(spacing)) / 1000
    out = []
    for index, name in sorted(names.items()):
        p, r = pred == index, ref == index
        box = _crop(p, r)
        p, r = p[box], r[box]
        n_p, n_r = int(p.sum()), int(r.sum())
        dice = 2 * int((p & r).sum()) / (n_p + n_r) if n_p + n_r else float("nan")
        out.append(
            {
                "structure": name,
                "dice": float(dice),
                "hd95_mm": hausdorff(p, r, spacing, HAUSDORFF_PERCENTILE) if n_p + n_r else float("nan"),
                "volume_ref_ml": n_r * voxel_ml,
                "volume_pred_ml": n_p * voxel_ml,
                "volume_difference_ml": (n_p - n_r) * voxel_ml,
            }
        )
    return out


def dice_scores(pred: np.ndarray, ref: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Dice per index (NaN where both are empty)."""
    out = []
    for index in indices:
        p, r = pred == index, ref == index
        total = int(p.sum()) + int(r.sum())
        out.append(2 * int((p & r).sum()) / total if total else np.nan)
    return np.asarray(out, dtype=float)


def _mean(values: np.ndarray) -> float:
    """The mean of the finite values (NaN when there are none: e.g. HD95 of a structure never predicted)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if len(finite) else float("nan")


def summarise_cases(cases: pd.DataFrame, *, seed: int, ci: bool) -> dict[str, Any]:
    """Mean (and SD, bootstrap CI over participants) of the case-wise scores, overall and per structure."""
    per_case = cases.groupby("source", sort=False).agg(
        participant_id=("participant_id", "first"),
        dice=("dice", "mean"),
        hd95_mm=("hd95_mm", "mean"),
        abs_volume_difference_ml=("volume_difference_ml", lambda v: float(np.mean(np.abs(v)))),
    )
    structures = list(dict.fromkeys(cases["structure"]))
    wide = {s: cases[cases["structure"] == s].set_index("source").reindex(per_case.index) for s in structures}

    def compute(idx: np.ndarray) -> dict[str, float]:
        out = {
            "dice": _mean(per_case["dice"].to_numpy()[idx]),
            "hd95_mm": _mean(per_case["hd95_mm"].to_numpy()[idx]),
            "abs_volume_difference_ml": _mean(per_case["abs_volume_difference_ml"].to_numpy()[idx]),
        }
        for s in structures:
            key = derivatives.bids_label(s)
            out[f"dice_{key}"] = _mean(wide[s]["dice"].to_numpy()[idx])
            out[f"hd95_{key}"] = _mean(wide[s]["hd95_mm"].to_numpy()[idx])
            out[f"voldiff_{key}"] = _mean(wide[s]["volume_difference_ml"].to_numpy()[idx])
        return out

    everything = np.arange(len(per_case))
    result: dict[str, Any] = {
        "n": len(per_case),
        "n_subjects": int(per_case["participant_id"].nunique()),
        "metrics": compute(everything),
        "sd": {
            "dice": float(per_case["dice"].std(ddof=1)) if len(per_case) > 1 else float("nan"),
            "hd95_mm": float(per_case["hd95_mm"].std(ddof=1)) if len(per_case) > 1 else float("nan"),
        },
        "structures": structures,
    }
    if ci:
        result["ci"] = evaluate.bootstrap_ci(compute, per_case["participant_id"].tolist(), seed=seed)
    return result


# --- data ----------------------------------------------------------------------------------------------------
class SegmentationData:
    """Cached image arrays ``(1, X, Y, Z)`` and label arrays ``(X, Y, Z)``; patches for training.

    An epoch is :data:`PATCHES_PER_IMAGE` patches of every training image (at least
    :data:`MIN_PATCHES_PER_EPOCH` in all, the images taken in turn), in an order drawn from the epoch's seed;
    a patch's place comes from the batch's seed alone (resume equals uninterrupted).
    """

    def __init__(self, arrays: Sequence[Path], labels: Sequence[Path], patch_size: int, n_classes: int) -> None:
        self.paths = [Path(p) for p in arrays]
        self.label_paths = [Path(p) for p in labels]
        self.patch = int(patch_size)
        self.n_classes = int(n_classes)
        self._foreground: dict[int, dict[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> list[np.ndarray]:
        return [self.label(i) for i in range(len(self))]

    def array(self, index: int) -> np.ndarray:
        return np.load(self.paths[index], mmap_mode="r")

    def label(self, index: int) -> np.ndarray:
        return np.load(self.label_paths[index], mmap_mode="r")

    def epoch_order(self, *, epoch: int, seed: int, weights: np.ndarray | None) -> np.ndarray:
        from ..data import derived_seed

        rng = np.random.default_rng(derived_seed(seed, epoch, 0))
        size = max(PATCHES_PER_IMAGE * len(self), MIN_PATCHES_PER_EPOCH)
        return rng.permutation(np.resize(np.arange(len(self)), size))

    def _voxels(self, index: int) -> dict[int, np.ndarray]:
        if index not in self._foreground:
            label = np.asarray(self.label(index))
            self._foreground[index] = {
                int(k): np.argwhere(label == k).astype(np.int32) for k in np.unique(label) if k != 0
            }
        return self._foreground[index]

    def _corner(self, index: int, rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(self.array(index).shape[1:])
        if rng.random() < FOREGROUND_FRACTION and self._voxels(index):
            voxels = self._voxels(index)
            cls = sorted(voxels)[int(rng.integers(len(voxels)))]
            centre = voxels[cls][int(rng.integers(len(voxels[cls])))]
        else:
            centre = np.array([int(rng.integers(n)) for n in shape])
        return centre - self.patch // 2

    def _crop(self, volume: np.ndarray, corner: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((self.patch,) * 3, fill, dtype=volume.dtype)
        lo = np.maximum(corner, 0)
        hi = np.minimum(corner + self.patch, volume.shape)
        if np.any(hi <= lo):
            return out
        dst = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner, strict=True))
        out[dst] = volume[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        return out

    def batch(
        self, indices: Sequence[int] | np.ndarray, *, augment: Sequence[str] = (), seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(n, 1, P, P, P)`` and their labels ``(n, 1, P, P, P)``."""
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for index in indices:
            corner = self._corner(int(index), rng)
            image = np.asarray(self.array(int(index))[0])
            xs.append(self._crop(image, corner, float(image.min())))
            ys.append(self._crop(np.asarray(self.label(int(index))), corner, 0))
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(ys)[:, None].astype(np.int64))
        if augment:
            x, y = augment_pair(x, y, augment, int(rng.integers(2**62)))
        return x, y


def augment_pair(
    x: torch.Tensor, y: torch.Tensor, kinds: Sequence[str], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and label patches moved together (affine: the image linear, the labels nearest); intensity and
    noise as for the other tasks. No left-right flip: it would swap left and right structures."""
    from ..data import _rotation, augment_batch

    if "affine" in kinds:
        rng = np.random.default_rng(seed)
        n = x.shape[0]
        theta = np.zeros((n, 3, 4))
        for i in range(n):
            theta[i, :, :3] = _rotation(np.deg2rad(rng.uniform(-10, 10, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
        grid = F.affine_grid(torch.as_tensor(theta, dtype=x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    rest = [k for k in kinds if k in ("intensity", "noise")]
    if rest:
        x = augment_batch(x, rest, seed + 1)
    return x, y


# --- the task ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentationOutputs:
    """Class probabilities ``(K, X, Y, Z)`` (float16) of each image on the model grid, and the labels whose
    largest connected component alone is kept (the post-processing chosen on validation)."""

    probabilities: list[np.ndarray]
    keep_largest: tuple[int, ...] = ()

    def labels(self, index: int) -> np.ndarray:
        """The labels of image ``index``: the argmax, post-processed."""
        return keep_largest_components(self.probabilities[index].argmax(0).astype(np.uint8), self.keep_largest)


#: How model.json names the post-processing (label names: indices may differ between label tables).
KEEP_LARGEST = "keep_largest_component"


def postprocessing_indices(record: dict[str, Any]) -> tuple[int, ...]:
    """The label indices of a package's ``keep_largest_component`` structures (none in older packages)."""
    names = set(record.get("postprocessing", {}).get(KEEP_LARGEST, []))
    return tuple(int(e["index"]) for e in record["labels"] if e["name"] in names)


class Segmentation(Task):
    name = "segmentation"
    discrete = False
    voxelwise = True
    standardize_inputs = False
    stratify_by_target = False
    predicted_splits = ("validation", "test")
    direction: ClassVar[dict[str, bool]] = {"loss": False, "dice": True}
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {"loss": (0.0, math.inf), "dice": (0.0, 1.0)}
    #: AdamW at 3e-3 learned the sample's structures fastest of 1e-3/3e-3/1e-2 in 300 steps; batches of two 3D
    #: patches, as nnU-Net's 3D configuration; a 1.5 mm grid (whole-image tasks learn at the participant level's 2 mm).
    defaults: ClassVar[dict[str, Any]] = {"architecture": "unet", "lr": 3e-3, "batch_size": 2, "model_resolution": 1.5}
    architectures = ("unet", "unet-large")
    card_metrics = ("dice", "hd95_mm", "abs_volume_difference_ml")
    output_kind = "probabilities"
    export_output = "class probabilities per voxel (softmax, mean over folds) on one window; slide it over the grid"

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
        from monai.losses import DiceCELoss

        criterion = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        return lambda out, y: criterion(out.float(), y)

    def loss_targets(self, y: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return y

    def predict(
        self, run: Callable[[torch.Tensor], torch.Tensor], data: Any, *, scale: TargetScale, batch_size: int
    ) -> Any:
        return SegmentationOutputs([predict_volume(run, data.array(i), data.patch) for i in range(len(data))])

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
        from ...reports import learning as figures

        cases = pd.DataFrame(evaluation["cases"]) if evaluation.get("cases") else table
        return figures.segmentation_panels(cases)

    def fold_output(self, raw: np.ndarray, fold: int, record: dict[str, Any]) -> np.ndarray:
        return raw

    def postprocessing(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> dict[str, Any]:
        cases = [
            (outputs.labels(i), np.load(path))
            for rows, outputs in validation
            for i, path in enumerate(rows["label_array"])
        ]
        names = {int(k): v for k, v in json.loads(validation[0][0]["label_names"].iloc[0]).items()}
        chosen = choose_largest_components(cases, sorted(names))
        return {
            "postprocessing": {
                KEEP_LARGEST: [names[k] for k in chosen],
                "label_indices": chosen,
                "rule": "per structure, only its largest 26-connected component is kept when that does not lower "
                "its mean Dice over every fold's validation images (nnU-Net's rule); the rest becomes background",
            }
        }

    def postprocessed(self, outputs: Any, postprocessing: dict[str, Any]) -> Any:
        indices = postprocessing.get("postprocessing", {}).get("label_indices", [])
        return dataclasses.replace(outputs, keep_largest=tuple(int(i) for i in indices))

    def package_fields(self, *, classes: Sequence[str], settings: Any) -> dict[str, Any]:
        grid, shape = model_grid(settings.model_resolution)
        return {
            "labels": [{"index": i, "name": name} for i, name in enumerate(classes, start=1)],
            "label_desc": settings.label_desc,
            "input": {
                "space": derivatives.TEMPLATE_SPACE,
                "resolution_mm": settings.model_resolution,
                "res": derivatives.resolution_label(settings.model_resolution),
                "desc": "preproc",
                "shape": list(shape),
                "affine": grid.tolist(),
                "dtype": "float32",
                "made_from": "the bias-corrected T1w (desc-preproc_T1w) resampled through the participant level's "
                "affine (from-T1w_to-...xfm.txt, linear) onto the template grid cropped to the brain + 4 mm",
                "normalisation": "minus the median, divided by the IQR of the template-space T1w in the brain "
                "(its sidecar's IntensityNormalization)",
            },
            "patch_size": settings.patch_size,
            "inference": {
                "window": [settings.patch_size] * 3,
                "overlap": WINDOW_OVERLAP,
                "weighting": WINDOW_MODE,
                "output": "softmax probabilities averaged over folds; labels = argmax, in each T1w's grid after "
                "resampling the probabilities through the inverse affine (linear); then the post-processing "
                "('postprocessing': the structures whose largest connected component alone is kept)",
            },
        }

    def finish_study(self, rows: pd.DataFrame, ensemble: Any, *, run_dir: Any, settings: Any) -> dict[str, Any]:
        """The test ensemble in each T1w's own grid, and previews of the worst test cases."""
        grid, _ = model_grid(settings.model_resolution)
        records = []
        previews = []
        scores = []
        for i, ((_, row), probabilities) in enumerate(zip(rows.iterrows(), ensemble.probabilities, strict=True)):
            names = {int(k): v for k, v in json.loads(row["label_names"]).items()}
            t1w = load_spatial(Path(settings.bids_dir) / row["source"])
            xfm = derivatives.named_path(settings.output_dir, row["source"], "xfm")
            native = probabilities_to_native(probabilities, grid, read_transform(xfm), t1w.affine, t1w.shape[:3])
            native = keep_largest_components(native, ensemble.keep_largest)
            reference = np.asarray(nib.load(row["label_file"]).dataobj).astype(np.uint8)  # type: ignore[attr-defined]
            spacing = [float(z) for z in t1w.header.get_zooms()[:3]]
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
    from ...reports import learning as figures

    return figures.segmentation_preview(image, reference, prediction, title=title)


def predict_volume(run: Callable[[torch.Tensor], torch.Tensor], array: np.ndarray, patch: int) -> np.ndarray:
    """Class probabilities ``(K, X, Y, Z)`` (float16) of one ``(1, X, Y, Z)`` array by a sliding window."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    with torch.no_grad():
        logits = sliding_window_inference(
            x, (patch,) * 3, sw_batch_size=2, predictor=run, overlap=WINDOW_OVERLAP, mode=WINDOW_MODE,
            padding_mode="replicate",
        )  # fmt: skip
    return torch.softmax(logits[0].float(), dim=0).numpy().astype(np.float16)


# --- the cohort ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledCohort:
    table: pd.DataFrame
    excluded: list[dict[str, str]]
    label_table: LabelTable


def build_cohort(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    bids_dir: Path,
    labels_dir: Path,
    label_desc: str,
    resolution_mm: float,
    cache_dir: Path,
    qc: pd.DataFrame | None,
    exclude_qc_outliers: bool,
    include_failed_qc: bool,
) -> LabelledCohort:
    """The images with reference labels, each brought onto the segmentation grid and cached as ``.npy``."""
    check_labels_dataset(labels_dir)
    table = find_table(labels_dir, label_desc)
    verdicts = qc.set_index("source")["qc_verdict"] if qc is not None and "qc_verdict" in qc else pd.Series()
    outliers = set(qc.loc[qc["qc_outlier"].astype(bool), "source"]) if qc is not None and "qc_outlier" in qc else set()
    grid, shape = model_grid(resolution_mm)
    rows, excluded = [], []
    problems = []
    for _, image in manifest.iterrows():
        source = image["source"]
        label = find_label(labels_dir, source, label_desc)
        preproc = derivatives.named_path(output_dir, source, "t1w_preproc")
        xfm = derivatives.named_path(output_dir, source, "xfm")
        template = derivatives.named_path(output_dir, source, "t1w_template")
        reason = None
        if label is None:
            reason = f"no reference labels (desc-{label_desc}_dseg or _mask in {labels_dir})"
        elif not (preproc.exists() and xfm.exists() and template.exists()):
            reason = "no preprocessed image (participant level failed or not run)"
        elif verdicts.get(source) == "fail" and not include_failed_qc:
            reason = "failed quality control (registration or brain extraction; --include-failed-qc keeps it)"
        elif exclude_qc_outliers and (source in outliers or verdicts.get(source) == "flag"):
            reason = "QC outlier or flagged by quality control (--exclude-qc-outliers)"
        if reason:
            excluded.append({"source": source, "reason": reason})
            continue
        assert label is not None
        try:
            array, labels, sha = _cache(
                cache_dir, bids_dir / source, label, preproc, xfm, template, table, grid, shape, resolution_mm
            )
        except InputDataError as exc:
            problems.append(str(exc))
            excluded.append({"source": source, "reason": str(exc)})
            continue
        rows.append({**image.to_dict(), "target": label_desc, "y": 1.0, "array": array, "label_array": labels,
                     "input_sha256": sha, "label_file": str(label), "label_names": json.dumps(table.names),
                     "grid_mm": resolution_mm})  # fmt: skip
    for problem in problems:
        LOGGER.error("%s", problem)
    if not rows:
        reasons = "; ".join(sorted({e["reason"] for e in excluded})) or "no images"
        raise InputDataError(
            f"No image can be learned from for segmentation: {len(excluded)} left out ({reasons}). Run the "
            f"participant level first and check --labels {labels_dir} --label-desc {label_desc}."
        )
    out = pd.DataFrame(rows)
    return LabelledCohort(out.reset_index(drop=True), excluded, table)


def _cache(
    cache_dir: Path,
    t1w: Path,
    label: Path,
    preproc: Path,
    xfm: Path,
    template: Path,
    table: LabelTable,
    grid: np.ndarray,
    shape: Sequence[int],
    resolution_mm: float,
) -> tuple[Path, Path, str]:
    """The image and label arrays of one case on the grid, rebuilt when any input changed."""
    key_parts = [sha256_file(p) for p in (preproc, xfm, label)] + [f"{resolution_mm:g}", json.dumps(table.names)]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "segmentation"
    folder.mkdir(parents=True, exist_ok=True)
    stem = preproc.name.removesuffix(".nii.gz")
    array_path, label_path = folder / f"{stem}_{key}.npy", folder / f"{stem}_{key}_dseg.npy"
    if array_path.exists() and label_path.exists():
        return array_path, label_path, key_parts[0]
    labels = load_label(label, t1w, table)
    t1w_img = nib.load(t1w)
    transform = read_transform(xfm)
    normalisation = json.loads(derivatives.sidecar_of(template).read_text())["IntensityNormalization"]
    image = image_on_grid(load_spatial(preproc), transform, grid, shape, normalisation)
    on_grid = labels_on_grid(labels, t1w_img.affine, transform, grid, shape)  # type: ignore[attr-defined]
    if not (set(np.unique(on_grid).tolist()) - {0}):
        raise InputDataError(
            f"The labels {label} fall outside the brain grid once registered: check the registration in the "
            "participant's report."
        )
    with derivatives.atomic_path(array_path) as tmp:
        np.save(tmp, image[None])
    with derivatives.atomic_path(label_path) as tmp:
        np.save(tmp, on_grid)
    return array_path, label_path, key_parts[0]
