"""Post-processing of segmentation outputs, chosen on validation: per structure, its largest connected component
alone (nnU-Net's rule); for one foreground class (lesions, many per image), the smallest lesion kept."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .metrics import dice_scores, finite_mean, lesion_scores

LOGGER = logging.getLogger(__name__)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of raw outputs ``(n, K, X, Y, Z)``: the softmax over classes (in float32)."""
    return torch.softmax(logits.float(), dim=1)


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
        if np.isfinite(before).any() and finite_mean(np.array(after)) >= finite_mean(np.array(before)):
            chosen.append(int(index))
    return chosen


#: The smallest lesion sizes tried (voxels of the model grid): predicted lesions below the chosen one are removed.
MIN_LESION_CANDIDATES = (0, 2, 4, 8, 16, 32)


def remove_small_lesions(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Label 1's 26-connected components of fewer than ``min_voxels`` voxels become background.

    >>> a = np.zeros((9, 9, 9), np.uint8); a[1:4, 1:4, 1:4] = 1; a[7, 7, 7] = 1
    >>> int(remove_small_lesions(a, 2).sum()), int(remove_small_lesions(a, 0).sum())
    (27, 28)
    """
    if min_voxels <= 1 or not labels.any():
        return labels
    components, _ = ndimage.label(labels == 1, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())
    small = np.flatnonzero(sizes < min_voxels)
    out = np.array(labels, copy=True)
    out[np.isin(components, small[small > 0])] = 0
    return out


def choose_min_lesion_size(cases: Sequence[tuple[np.ndarray, np.ndarray]],
                           candidates: Sequence[int] = MIN_LESION_CANDIDATES) -> int:  # fmt: skip
    """The smallest-lesion size (voxels) whose removal scores best over the validation ``cases`` (``(predicted,
    reference)`` pairs): the mean of Dice and lesion-wise F1 (detection and overlap count alike); ties go to the
    smaller size (the least removed)."""
    best, best_score = 0, -np.inf
    for size in candidates:
        scores = []
        for pred, ref in cases:
            kept = remove_small_lesions(pred, size)
            f1 = lesion_scores(kept == 1, ref == 1, 1.0)["lesion_f1"]
            scores.append(np.nanmean([dice_scores(kept, ref, [1])[0], f1]))
        score = finite_mean(np.array(scores))
        if score > best_score + 1e-9:
            best, best_score = int(size), score
    return best


@dataclass(frozen=True)
class SegmentationOutputs:
    """Class probabilities ``(K, X, Y, Z)`` (float16) of each image on the model grid, and the post-processing
    chosen on validation: the labels whose largest connected component alone is kept, and the smallest lesion
    kept (voxels; one foreground class)."""

    probabilities: list[np.ndarray]
    keep_largest: tuple[int, ...] = ()
    min_lesion_voxels: int = 0

    def labels(self, index: int) -> np.ndarray:
        """The labels of image ``index``: the argmax, post-processed."""
        labels = keep_largest_components(self.probabilities[index].argmax(0).astype(np.uint8), self.keep_largest)
        return remove_small_lesions(labels, self.min_lesion_voxels)


#: How model.json names the post-processing (label names: indices may differ between label tables).
KEEP_LARGEST = "keep_largest_component"


def postprocessing_indices(record: dict[str, Any]) -> tuple[int, ...]:
    """The label indices of a package's ``keep_largest_component`` structures (none in older packages)."""
    names = set(record.get("postprocessing", {}).get(KEEP_LARGEST, []))
    return tuple(int(e["index"]) for e in record["labels"] if e["name"] in names)


def postprocess(labels: np.ndarray, postprocessing: dict[str, Any], indices: Sequence[int], voxel_ml: float
                ) -> np.ndarray:  # fmt: skip
    """A label image post-processed as a package says (``postprocessing``: its ``postprocessing`` record;
    ``indices``: :func:`postprocessing_indices`), on any grid (``voxel_ml``: its voxel volume; the smallest lesion
    is kept by volume, so the rule is the same on the model grid and in each T1w's)."""
    labels = keep_largest_components(labels, indices)
    min_ml = float(postprocessing.get("min_lesion_ml", 0.0))
    return remove_small_lesions(labels, int(np.ceil(min_ml / voxel_ml - 1e-9))) if min_ml > 0 else labels
