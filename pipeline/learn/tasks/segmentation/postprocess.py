"""Post-processing of segmentation outputs: largest connected components, chosen on validation (nnU-Net's rule)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .metrics import dice_scores, finite_mean

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
