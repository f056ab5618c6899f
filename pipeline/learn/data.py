"""What training reads: cached model-grid arrays and their targets, each epoch's order, its batches and their
augmentation. Everything random is drawn from seeds derived from (seed, epoch, batch), never from a stream that
runs across epochs (:mod:`.train`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812 - the usual name


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms.

    >>> derived_seed(42, 3) == derived_seed(42, 3) != derived_seed(42, 4)
    True
    """
    return int(
        np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1
    )


class Volumes(torch.utils.data.Dataset):
    """Memory-mapped ``(1, X, Y, Z)`` float32 arrays and their targets."""

    def __init__(self, arrays: Sequence[Path], targets: Sequence[float]) -> None:
        self.paths = [Path(p) for p in arrays]
        self.targets = np.asarray(targets, dtype=np.float32)
        self._maps: list[np.ndarray | None] = [None] * len(self.paths)
        self._resident: torch.Tensor | None = None

    def make_resident(self, device: torch.device, budget: float) -> bool:
        """Keep every array in one tensor on ``device`` when they take at most ``budget`` bytes (a cohort on the
        GPU: a batch is then a gather there, with no copy from the host). Returns whether they are."""
        if self._resident is not None and self._resident.device == device:
            return True
        size = sum(math.prod(self.array(i).shape) * 4 for i in range(len(self)))
        if not len(self) or size > budget:
            return False
        self._resident = torch.empty((len(self), *self.array(0).shape), dtype=torch.float32, device=device)
        for i in range(len(self)):
            self._resident[i] = torch.from_numpy(np.array(self.array(i)))
        return True

    def __getstate__(self) -> dict[str, Any]:  # shared with other ranks as paths, never as device memory
        return {**self.__dict__, "_maps": [None] * len(self.paths), "_resident": None}

    def __len__(self) -> int:
        return len(self.paths)

    def epoch_order(self, *, epoch: int, seed: int, weights: np.ndarray | None) -> np.ndarray:
        return epoch_order(len(self), epoch=epoch, seed=seed, weights=weights)

    def array(self, index: int) -> np.ndarray:
        if self._maps[index] is None:
            self._maps[index] = np.load(self.paths[index], mmap_mode="r")
        return self._maps[index]  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        return torch.from_numpy(np.array(self.array(index))), float(self.targets[index])

    def batch(
        self, indices: Sequence[int] | np.ndarray, *, augment: Sequence[str] = (), seed: int = 0, strength: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(n, 1, X, Y, Z)`` and targets ``(n,)``; augmented with parameters drawn from ``seed`` (their
        ranges scaled by ``strength``)."""
        if self._resident is not None:
            x = self._resident[torch.as_tensor(np.asarray(indices), device=self._resident.device)]
        else:
            x = torch.from_numpy(np.stack([self.array(i) for i in indices]))
        if augment:
            x = augment_batch(x, augment, seed, strength)
        return x, torch.from_numpy(self.targets[list(indices)])


def reference_image(data: Volumes) -> tuple[torch.Tensor, float]:
    """The voxel-wise mean of the training arrays and the SD of the residuals around it."""
    total = np.zeros(data.array(0).shape, dtype=np.float64)
    for i in range(len(data)):
        total += data.array(i)
    mean = total / len(data)
    squares = 0.0
    for i in range(len(data)):
        squares += float(((data.array(i) - mean) ** 2).sum())
    scale = float(np.sqrt(squares / (len(data) * mean.size))) or 1.0
    return torch.from_numpy(mean.astype(np.float32)), scale


def epoch_order(n: int, *, epoch: int, seed: int, weights: np.ndarray | None) -> np.ndarray:
    """The sample indices of one epoch: a permutation, or a weighted draw with replacement."""
    rng = np.random.default_rng(derived_seed(seed, epoch, 0))
    if weights is None:
        return rng.permutation(n)
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches; a last batch of one is dropped (batch norm cannot train on it)."""
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if len(chunk) > 1 or len(order) == 1:
            yield chunk


def augment_batch(x: torch.Tensor, kinds: Sequence[str], seed: int, strength: float = 1.0) -> torch.Tensor:
    """Anatomically plausible random changes; the parameters come from ``seed`` alone.

    affine: rotations up to 5 degrees, scaling 0.95-1.05, shifts up to 3 voxels; intensity:
    gain 0.9-1.1 and offset +-0.1 (the inputs are median/IQR normalised); noise: Gaussian, SD up
    to 0.05; flip: left-right with probability 0.5 (only when asked: brains are not symmetric).
    ``strength`` scales every range but the flip's (1: these; the search draws it).
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    s = float(strength)
    if "affine" in kinds:
        angles = np.deg2rad(rng.uniform(-5 * s, 5 * s, size=(n, 3)))
        scales = rng.uniform(1 - 0.05 * s, 1 + 0.05 * s, size=(n, 3))
        shifts = rng.uniform(-3 * s, 3 * s, size=(n, 3)) * 2 / np.array(x.shape[2:])
        theta = np.zeros((n, 3, 4))
        for i in range(n):
            theta[i, :, :3] = rotation_matrix(angles[i]) @ np.diag(scales[i])
            theta[i, :, 3] = shifts[i]
        grid = F.affine_grid(torch.as_tensor(theta, dtype=x.dtype, device=x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "flip" in kinds:
        flip = torch.as_tensor(rng.random(n) < 0.5, device=x.device)
        x = torch.where(flip[:, None, None, None, None], x.flip(2), x)  # axis 0 of RAS arrays: left-right
    if "intensity" in kinds:
        gain = torch.as_tensor(rng.uniform(1 - 0.1 * s, 1 + 0.1 * s, n), dtype=x.dtype,
                               device=x.device)[:, None, None, None, None]  # fmt: skip
        offset = torch.as_tensor(rng.uniform(-0.1 * s, 0.1 * s, n), dtype=x.dtype,
                                 device=x.device)[:, None, None, None, None]  # fmt: skip
        x = x * gain + offset
    if "noise" in kinds:
        sd = torch.as_tensor(rng.uniform(0, 0.05 * s, n), dtype=x.dtype, device=x.device)[:, None, None, None, None]
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))  # drawn on the CPU: the same anywhere
        x = x + sd * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx
