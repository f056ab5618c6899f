"""The subject's own tissue classes inside its brain mask: a Gaussian mixture on intensities.

CSF, grey and white matter of a T1w differ by intensity once the bias field is removed, so a
three-class Gaussian mixture on the bias-corrected intensities inside the brain mask separates them
(FSL FAST's intensity model). Each class's posterior map is then smoothed by one voxel, a light stand-in
for FAST's spatial prior: tissue is spatially coherent, noise is not. Without it, classes drawn from the
intensities alone are separated by construction, and a noisy image with no grey/white contrast would
show a good one. The quality metrics use the voxels each class claims with high posterior ("pure"
tissue), and the class volumes describe the brain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: Class order (by increasing mean intensity on a T1w) and label values.
CLASSES = ("csf", "gm", "wm")
#: A voxel is "pure" tissue when its class's posterior is at least this, or, where the classes
#: overlap so much that few voxels reach it (a smooth or low-contrast image), at least the median
#: posterior of the class's voxels: the better half of each class.
PURE_POSTERIOR = 0.9
#: Posterior maps are smoothed by this many voxels (Gaussian sigma) before the classes are drawn.
SMOOTHING_VOXELS = 1.0
#: The mixture is fitted to a histogram of this many bins between the 0.5th and 99.5th percentiles:
#: in one dimension that is exact enough, fast, and the same every time.
BINS = 512
ITERATIONS = 300


def fit_mixture(values: np.ndarray, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Means, standard deviations and weights of a 1D Gaussian mixture (EM on a histogram), by
    increasing mean, and whether EM converged.

    EM is started twice, from percentiles (10th to 85th) and from equal steps across the intensity
    range, and the start with the higher likelihood wins: either alone was seen to put two classes on
    one tissue that fills most of the mask.

    >>> rng = np.random.default_rng(0)
    >>> means, sds, weights, _ = fit_mixture(np.concatenate([rng.normal(m, 5, 4000) for m in (30, 80, 120)]))
    >>> np.round(means).tolist(), np.round(weights, 1).tolist()
    ([30.0, 80.0, 120.0], [0.3, 0.3, 0.3])
    >>> means, _, _, _ = fit_mixture(np.concatenate([rng.normal(30, 8, 17000), rng.normal(80, 8, 9000),
    ...                                              rng.normal(120, 8, 2000)]))  # one class dominates
    >>> np.round(means / 10).tolist()
    [3.0, 8.0, 12.0]
    """
    low, high = np.percentile(values, [0.5, 99.5])
    counts, bounds = np.histogram(values, bins=BINS, range=(low, high))
    centres = (bounds[:-1] + bounds[1:]) / 2
    starts = (
        np.percentile(values, np.linspace(10, 85, n_classes)),
        low + (high - low) * (np.arange(n_classes) + 0.5) / n_classes,
    )
    fits = [
        _em(centres, counts, start, (high - low) / (2 * n_classes), (bounds[1] - bounds[0]) / 2) for start in starts
    ]
    means, sds, weights, converged, _ = max(fits, key=lambda fit: fit[4])
    order = np.argsort(means)
    return means[order], sds[order], weights[order], converged


def _em(
    centres: np.ndarray, counts: np.ndarray, means: np.ndarray, sd: float, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, float]:
    """EM for a 1D Gaussian mixture on a histogram; returns the fit and its log-likelihood."""
    total = counts.sum()
    n_classes = len(means)
    sds = np.full(n_classes, sd)
    weights = np.full(n_classes, 1.0 / n_classes)
    span = centres[-1] - centres[0]
    converged = False
    for _ in range(ITERATIONS):
        density = weights * np.exp(-0.5 * ((centres[:, None] - means) / sds) ** 2) / sds
        responsibility = density / np.maximum(density.sum(axis=1, keepdims=True), 1e-300)
        mass = (responsibility * counts[:, None]).sum(axis=0)
        new_means = (responsibility * counts[:, None] * centres[:, None]).sum(axis=0) / np.maximum(mass, 1e-12)
        variance = (responsibility * counts[:, None] * (centres[:, None] - new_means) ** 2).sum(axis=0)
        sds = np.maximum(np.sqrt(variance / np.maximum(mass, 1e-12)), floor)  # no narrower than half a bin
        weights = mass / total
        shift = np.abs(new_means - means).max()
        means = new_means
        if shift < 1e-6 * span:
            converged = True
            break
    density = (weights * np.exp(-0.5 * ((centres[:, None] - means) / sds) ** 2) / (sds * np.sqrt(2 * np.pi))).sum(1)
    return means, sds, weights, converged, float((counts * np.log(np.maximum(density, 1e-300))).sum())


def smooth_posteriors(posterior: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Each class's posterior (one column per class, one row per brain voxel) smoothed in space inside the
    brain's box, then renormalised.

    >>> brain = np.zeros((5, 5, 5), bool); brain[1:4, 1:4, 1:4] = True
    >>> p = np.tile([0.5, 0.5], (27, 1)); p[13] = [1.0, 0.0]  # one odd voxel in the middle
    >>> smoothed = smooth_posteriors(p, brain)
    >>> bool(smoothed[13, 0] < 0.8), bool(np.allclose(smoothed.sum(axis=1), 1))
    (True, True)
    """
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))
    inside = brain[box]
    out = np.empty_like(posterior)
    for k in range(posterior.shape[1]):
        volume = np.zeros(inside.shape, dtype=np.float32)
        volume[inside] = posterior[:, k]
        out[:, k] = ndimage.gaussian_filter(volume, SMOOTHING_VOXELS, mode="constant")[inside]
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-30)


@dataclass(frozen=True)
class TissueMasks:
    """Pure CSF, GM and WM (bool masks on the image grid), drawn two ways.

    ``pure``: from the intensity posteriors (voxel-exact: the white matter the registration check compares
    with the template's). ``coherent``: from the smoothed posteriors (the classes the contrast metrics use).
    """

    pure: dict[str, np.ndarray]
    coherent: dict[str, np.ndarray]


def _pure_classes(posterior: np.ndarray, brain: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, list[float]]:
    winner = posterior.argmax(axis=1)
    masks, thresholds = {}, []
    for index, name in enumerate(CLASSES):
        won = winner == index
        threshold = min(PURE_POSTERIOR, float(np.median(posterior[won, index]))) if won.any() else PURE_POSTERIOR
        mask = np.zeros(brain.shape, dtype=bool)
        mask[brain] = won & (posterior[:, index] >= threshold)
        masks[name] = mask
        thresholds.append(threshold)
    return masks, winner, thresholds


def classify_tissues(
    corrected: np.ndarray, brain: np.ndarray, *, voxel_volume_mm3: float
) -> tuple[TissueMasks, dict[str, Any]]:
    """Pure CSF, GM and WM inside ``brain`` (:class:`TissueMasks`), and a record of the fit with each
    class's volume (from the intensity posteriors).

    >>> rng = np.random.default_rng(0)  # three slabs of tissue
    >>> image = np.concatenate([rng.normal(m, 5, 4000) for m in (30, 80, 120)]).reshape(60, 20, 10)
    >>> masks, record = classify_tissues(image, np.ones(image.shape, bool), voxel_volume_mm3=1.0)
    >>> [round(record["classes"][c]["mean"] / 10) for c in ("csf", "gm", "wm")], int(masks.pure["wm"].sum()) > 3500
    ([3, 8, 12], True)
    """
    corrected = np.asarray(corrected, dtype=np.float32)
    # voxels without signal (exact zeros: a skull-stripped or masked image's background inside a mask
    # that reaches past its edge) are not tissue; left in, they become a "CSF" class and merge GM with WM
    brain = brain & (corrected > 0)
    values = corrected[brain]
    if values.size < 100:
        raise ValueError(f"the brain mask holds {values.size} voxels: too few to classify tissues")
    means, sds, weights, converged = fit_mixture(values, len(CLASSES))
    z = (values[:, None] - means.astype(np.float32)) / sds.astype(np.float32)
    density = weights * np.exp(-0.5 * z**2) / sds
    posterior = density / np.maximum(density.sum(axis=1, keepdims=True), 1e-30)
    pure, winner, thresholds = _pure_classes(posterior, brain)
    coherent, _, coherent_thresholds = _pure_classes(smooth_posteriors(posterior, brain), brain)
    classes: dict[str, dict[str, float]] = {}
    for index, name in enumerate(CLASSES):
        classes[name] = {
            "mean": float(means[index]),
            "sd": float(sds[index]),
            "weight": float(weights[index]),
            "volume_ml": float((winner == index).sum() * voxel_volume_mm3 / 1000.0),
            "pure_voxels": int(pure[name].sum()),
            "pure_posterior": thresholds[index],
            "coherent_voxels": int(coherent[name].sum()),
            "coherent_posterior": coherent_thresholds[index],
        }
    record = {
        "method": "3-class Gaussian mixture (EM on a histogram of the bias-corrected intensities inside the brain "
        "mask, voxels without signal (0) left out); a voxel belongs to the class of highest posterior (volumes), "
        "and is pure tissue at posterior >= "
        f"{PURE_POSTERIOR} (or the class's median posterior, when lower); the contrast metrics use the classes "
        f"of the posteriors smoothed by {SMOOTHING_VOXELS:g} voxel (coherent tissue), the registration check the "
        "white matter of the unsmoothed ones",
        "converged": converged,
        "classes": classes,
    }
    return TissueMasks(pure=pure, coherent=coherent), record
