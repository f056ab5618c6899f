"""What segmentation trains on: cached image and label arrays, patches, paired augmentation, and the sliding
window that predicts a whole grid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F  # noqa: N812 - the usual name

from ...data import augment_batch, derived_seed, rotation_matrix
from .postprocess import probabilities

LOGGER = logging.getLogger(__name__)


#: Training patches drawn per training image and epoch, and at least this many per epoch (nnU-Net's epoch is
#: a fixed number of steps, not one pass over the images: with few images, one pass teaches almost nothing).
PATCHES_PER_IMAGE = 4
MIN_PATCHES_PER_EPOCH = 250
#: Share of patches centred on a voxel of a structure (the rest anywhere in the grid).
FOREGROUND_FRACTION = 1 / 3
#: With one foreground class (lesions: small and scattered), the share of patches centred on a lesion, the lesion
#: drawn first (each connected component equally likely) and then a voxel in it: small lesions are seen as often as
#: large ones (voxels drawn uniformly would centre nearly every patch on the few large ones).
LESION_FRACTION = 1 / 2
#: Overlap of neighbouring windows at inference, and their weighting.
WINDOW_OVERLAP = 0.5
WINDOW_MODE = "gaussian"


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
        self._components: dict[int, list[np.ndarray]] = {}

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

    def _lesions(self, index: int) -> list[np.ndarray]:
        """The voxels of each connected component (26-connected) of a one-class label image."""
        if index not in self._components:
            components, n = ndimage.label(np.asarray(self.label(index)) > 0, structure=np.ones((3, 3, 3)))
            found = ndimage.value_indices(components, ignore_value=0)
            self._components[index] = [np.stack(found[k], axis=1).astype(np.int32) for k in range(1, n + 1)]
        return self._components[index]

    def _corner(self, index: int, rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(self.array(index).shape[1:])
        if self.n_classes == 2:  # one foreground class: lesions, drawn lesion by lesion
            lesions = self._lesions(index)
            if rng.random() < LESION_FRACTION and lesions:
                lesion = lesions[int(rng.integers(len(lesions)))]
                return lesion[int(rng.integers(len(lesion)))] - self.patch // 2
            return np.array([int(rng.integers(n)) for n in shape]) - self.patch // 2
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
        self, indices: Sequence[int] | np.ndarray, *, augment: Sequence[str] = (), seed: int = 0, strength: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(n, C, P, P, P)`` (every channel) and their labels ``(n, 1, P, P, P)``; augmented with ranges
        scaled by ``strength``."""
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for index in indices:
            corner = self._corner(int(index), rng)
            image = np.asarray(self.array(int(index)))
            xs.append(np.stack([self._crop(channel, corner, float(channel.min())) for channel in image]))
            ys.append(self._crop(np.asarray(self.label(int(index))), corner, 0))
        x = torch.from_numpy(np.stack(xs).astype(np.float32))
        y = torch.from_numpy(np.stack(ys)[:, None].astype(np.int64))
        if augment:
            x, y = augment_pair(x, y, augment, int(rng.integers(2**62)), strength)
        return x, y


def augment_pair(
    x: torch.Tensor, y: torch.Tensor, kinds: Sequence[str], seed: int, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and label patches moved together (affine: the image linear, the labels nearest); intensity and
    noise as for the other tasks. No left-right flip: it would swap left and right structures."""
    if "affine" in kinds:
        rng = np.random.default_rng(seed)
        n = x.shape[0]
        theta = np.zeros((n, 3, 4))
        for i in range(n):
            s = float(strength)
            theta[i, :, :3] = rotation_matrix(np.deg2rad(rng.uniform(-10 * s, 10 * s, 3))) @ np.diag(
                rng.uniform(1 - 0.1 * s, 1 + 0.1 * s, 3))
        grid = F.affine_grid(torch.as_tensor(theta, dtype=x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    rest = [k for k in kinds if k in ("intensity", "noise")]
    if rest:
        x = augment_batch(x, rest, seed + 1, strength)
    return x, y


def predict_volume(run: Callable[[torch.Tensor], torch.Tensor], array: np.ndarray, patch: int) -> np.ndarray:
    """Class probabilities ``(K, X, Y, Z)`` (float16) of one ``(C, X, Y, Z)`` array by a sliding window."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.array(array, dtype=np.float32))[None]  # a copy: the cache is mapped read-only
    with torch.no_grad():
        logits = sliding_window_inference(
            x, (patch,) * 3, sw_batch_size=2, predictor=run, overlap=WINDOW_OVERLAP, mode=WINDOW_MODE,
            padding_mode="replicate",
        )  # fmt: skip
    assert isinstance(logits, torch.Tensor)
    return probabilities(logits)[0].numpy().astype(np.float16)
