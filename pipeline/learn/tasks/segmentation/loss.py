"""The segmentation loss: Dice + cross-entropy (nnU-Net's), and for one foreground class (lesions) a cross-entropy
that weighs each lesion by its size, so that missing a small lesion costs what missing a large one does.

Plain Dice and cross-entropy count voxels: a 10-voxel lesion weighs a hundredth of a 1,000-voxel one, and a model
can score well while missing every small lesion, the ones lesion-wise detection (Kuijf et al. 2019) counts. Each
lesion's voxels get the weight (mean lesion size in the patch) / (its size), between 1 and :data:`MAX_LESION_WEIGHT`
(large lesions and the background keep 1), the blob-loss idea of weighting instances rather than voxels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F  # noqa: N812 - the usual name

#: The largest weight a small lesion's voxels get.
MAX_LESION_WEIGHT = 10.0

#: What model.json records of the loss.
DESCRIPTION = {
    "multi-class": "Dice (batch, without the background) + cross-entropy (MONAI DiceCELoss)",
    "lesions": "Dice (batch, without the background) + cross-entropy weighting each lesion's voxels by the patch's "
    f"mean lesion size over its own (26-connected components; between 1 and {MAX_LESION_WEIGHT:g})",
}


def lesion_weights(labels: np.ndarray) -> np.ndarray:
    """Per-voxel weights of a batch of one-class label patches ``(n, 1, X, Y, Z)``: 1 for the background, and for
    each lesion's voxels the patch's mean lesion size over the lesion's, clipped to [1, :data:`MAX_LESION_WEIGHT`].

    >>> y = np.zeros((1, 1, 12, 12, 12), np.int64); y[0, 0, :5, :5, :5] = 1; y[0, 0, 10, 10, 10] = 1
    >>> w = lesion_weights(y); float(w[0, 0, 0, 0, 0]), float(w[0, 0, 10, 10, 10]), float(w[0, 0, 11, 0, 0])
    (1.0, 10.0, 1.0)
    """
    weights = np.ones(labels.shape, dtype=np.float32)
    for i in range(labels.shape[0]):
        components, n = ndimage.label(labels[i, 0] > 0, structure=np.ones((3, 3, 3)))
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:].astype(np.float32)
        per_component = np.clip(sizes.mean() / sizes, 1.0, MAX_LESION_WEIGHT)
        weights[i, 0] = np.concatenate([[1.0], per_component])[components]
    return weights


def segmentation_loss(n_outputs: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training criterion of a segmentation with ``n_outputs`` classes (the background included)."""
    from monai.losses import DiceCELoss, DiceLoss

    if n_outputs != 2:
        criterion = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        return lambda out, y: criterion(out.float(), y)
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def lesion_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = out.float()
        weights = torch.from_numpy(lesion_weights(y.detach().cpu().numpy())).to(out.device)[:, 0]
        ce = F.cross_entropy(out, y[:, 0].long(), reduction="none")
        return dice(out, y) + (ce * weights).sum() / weights.sum()

    return lesion_loss
