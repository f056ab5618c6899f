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

from .cohort import LabelledCohort, build_cohort
from .data import SegmentationData, augment_pair, predict_volume
from .grid import (
    DEFAULT_RESOLUTION_MM,
    image_on_grid,
    labels_on_grid,
    model_grid,
    probabilities_to_native,
    read_transform,
)
from .metrics import dice_scores, hausdorff, structure_scores, summarise_cases
from .postprocess import (
    KEEP_LARGEST,
    SegmentationOutputs,
    choose_largest_components,
    keep_largest_components,
    postprocessing_indices,
)
from .task import TASK, Segmentation, segmentation_figure

__all__ = [
    "DEFAULT_RESOLUTION_MM", "KEEP_LARGEST", "TASK", "LabelledCohort", "Segmentation", "SegmentationData",
    "SegmentationOutputs", "augment_pair", "build_cohort", "choose_largest_components", "dice_scores", "hausdorff",
    "image_on_grid", "keep_largest_components", "labels_on_grid", "model_grid", "postprocessing_indices",
    "predict_volume", "probabilities_to_native", "read_transform", "segmentation_figure", "structure_scores",
    "summarise_cases",
]  # fmt: skip
