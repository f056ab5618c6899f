"""Near-identical images under two participant IDs, found without holding every pair in memory.

Each image becomes a vector (block means of its model-grid array); its residual is its difference from the cohort's
mean vector, centred; two images of one scan keep a residual correlation close to 1, two people do not. All pairs
are compared in blocks of rows (memory bounded by the block, not the number of pairs). Up to
:data:`EXACT_MAX_IMAGES` images the residuals are compared as they are; beyond, on a seeded Gaussian random
projection to :data:`PROJECTED_DIMS` numbers (correlations kept to about +-0.1, Johnson-Lindenstrauss), and
every pair the projection puts within :data:`CANDIDATE_MARGIN` of the threshold is computed again exactly, so
no pair is called (or missed) on an estimate. 10,000 images: 50 million pairs of 256 numbers, about a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Images up to which residuals are compared in full.
EXACT_MAX_IMAGES = 2000
#: Numbers per image in the projection beyond that.
PROJECTED_DIMS = 256
#: Projected correlations this close below the threshold are computed again exactly.
CANDIDATE_MARGIN = 0.15
#: Rows compared with all others at once.
BLOCK_ROWS = 1024
#: Most candidate pairs checked exactly (the largest projected correlations first).
MAX_CANDIDATES = 100_000
#: Pairs listed as the most alike, for the report (from the best TOP_POOL projected pairs, computed exactly).
TOP_PAIRS = 5
TOP_POOL = 50
_BINS = np.linspace(-1.0, 1.0, 4001)


def block_means(array: np.ndarray, factor: int = 3) -> np.ndarray:
    """Means of ``factor``^3 blocks of a 3-D volume (of its first channel when channel-first), flattened.

    >>> block_means(np.arange(27, dtype=np.float32).reshape(3, 3, 3)).tolist()
    [13.0]
    >>> block_means(np.stack([np.zeros((3, 3, 3)), np.ones((3, 3, 3))])).tolist()
    [0.0]
    """
    volume = np.asarray(array[0] if array.ndim == 4 else array, dtype=np.float32)
    shape = [dim // factor * factor for dim in map(int, volume.shape)]
    cut = volume[: shape[0], : shape[1], : shape[2]]
    blocks = cut.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32).ravel()


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


@dataclass(frozen=True)
class Scan:
    """The pairs of different participants at or above the threshold, the most alike pairs, and the median."""

    pairs: list[tuple[float, int, int]]  # (r, i, j), largest first
    top: list[tuple[float, int, int]]
    median: float
    n_pairs: int
    projected: bool


def scan(arrays: Sequence[np.ndarray], owners: Sequence[str], *, threshold: float,
         exact_max_images: int = EXACT_MAX_IMAGES, seed: int = 0) -> Scan:  # fmt: skip
    """Residual correlations of every pair of images of different ``owners`` (participant IDs)."""
    n = len(arrays)
    codes = np.unique(np.asarray(owners), return_inverse=True)[1]
    if n < 3:
        return Scan([], [], float("nan"), 0, False)
    projected = n > exact_max_images
    first = block_means(arrays[0])
    mean = np.zeros(first.size, np.float64)
    if projected:
        rng = np.random.default_rng(seed)
        basis = (rng.standard_normal((first.size, PROJECTED_DIMS)) / np.sqrt(PROJECTED_DIMS)).astype(np.float32)
        rows = np.empty((n, PROJECTED_DIMS), np.float32)
        row_means = np.empty(n, np.float64)
        for i, array in enumerate(arrays):
            vector = first if i == 0 else block_means(array)
            mean += vector
            rows[i] = vector @ basis
            row_means[i] = vector.mean(dtype=np.float64)
        mean /= n
        # the projection is linear: project(v - mean - its own mean) from the projections of v, mean and ones
        ones = basis.sum(axis=0)
        centred = rows - (mean.astype(np.float32) @ basis) - ((row_means - mean.mean())[:, None] * ones).astype(
            np.float32)  # fmt: skip
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        unit = centred / np.where(norms > 0, norms, 1)
    else:
        full = np.stack([first] + [block_means(a) for a in arrays[1:]])
        mean = full.mean(axis=0, dtype=np.float64)
        unit = _unit(full - mean.astype(np.float32)).astype(np.float32)
    floor = threshold - CANDIDATE_MARGIN if projected else threshold
    found, top, counts, n_pairs, values = _compare(unit, codes, floor, keep_values=not projected,
                                                   n_top=TOP_POOL if projected else TOP_PAIRS)  # fmt: skip
    if projected:
        exact = _Exact(arrays, mean.astype(np.float32))
        found = [(exact.r(i, j), i, j) for _, i, j in sorted(found, reverse=True)[:MAX_CANDIDATES]]
        top = [(exact.r(i, j), i, j) for _, i, j in top]
    pairs = sorted((p for p in found if p[0] >= threshold), reverse=True)
    top = sorted(top, reverse=True)[:TOP_PAIRS]
    median = float(np.median(values)) if values is not None and values.size else _median(counts, n_pairs)
    return Scan(pairs, top, median, n_pairs, projected)


def _compare(unit: np.ndarray, codes: np.ndarray, floor: float, *, keep_values: bool, n_top: int):
    """Every pair (i < j) of rows of different owners, in blocks: the pairs at or above ``floor``, the most
    correlated pairs, a histogram of all correlations, how many pairs there are, and (``keep_values``) them all."""
    n = len(unit)
    found: list[tuple[float, int, int]] = []
    top: list[tuple[float, int, int]] = []
    counts = np.zeros(len(_BINS) - 1, np.int64)
    n_pairs = 0
    kept: list[np.ndarray] = []
    columns = np.arange(n)
    for start in range(0, n, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n)
        block = unit[start:stop] @ unit.T
        rows = np.arange(start, stop)[:, None]
        keep = (columns[None, :] > rows) & (codes[start:stop, None] != codes[None, :])
        values = block[keep]
        n_pairs += values.size
        if keep_values:
            kept.append(values.astype(np.float64))
        counts += np.histogram(np.clip(values, -1, 1), _BINS)[0]
        if values.size == 0:
            continue
        i_idx, j_idx = np.nonzero(keep)
        high = np.nonzero(values >= floor)[0]
        found += [(float(values[k]), int(i_idx[k] + start), int(j_idx[k])) for k in high]
        best = np.argpartition(values, -min(n_top, values.size))[-n_top:]
        top = sorted(top + [(float(values[k]), int(i_idx[k] + start), int(j_idx[k])) for k in best],
                     reverse=True)[:n_top]  # fmt: skip
    return found, top, counts, n_pairs, (np.concatenate(kept) if kept else None)


def _median(counts: np.ndarray, n: int) -> float:
    """The median of the histogrammed correlations (to the bin width, 0.0005)."""
    if n == 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(counts), (n + 1) / 2))
    return float((_BINS[k] + _BINS[k + 1]) / 2)


class _Exact:
    """Exact residual correlations of chosen pairs (each image's unit residual computed once)."""

    def __init__(self, arrays: Sequence[np.ndarray], mean: np.ndarray) -> None:
        self.arrays, self.mean = arrays, mean
        self.cache: dict[int, np.ndarray] = {}

    def unit(self, i: int) -> np.ndarray:
        if i not in self.cache:
            self.cache[i] = _unit((block_means(self.arrays[i]) - self.mean)[None])[0]
        return self.cache[i]

    def r(self, i: int, j: int) -> float:
        return float(self.unit(i) @ self.unit(j))
