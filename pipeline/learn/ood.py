"""Whether an image is like those a model learned from: the distribution check a prediction carries.

What a model package records, from its training data only:

* **features**: per fold, the network's features of that fold's training images (the last feature maps averaged
  over space: the layer Grad-CAM explains for whole-image networks, the deepest maps of a U-Net averaged over the
  windows of its sliding-window prediction), described by their mean, their SD and their correlation shrunk
  towards the identity (Schafer-Strimmer: with few images, nearly a standardised Euclidean distance; with many,
  the full Mahalanobis distance). The
  correlation is kept as its principal axes (every axis along which the training images vary: at most one per
  training image, so no D x D matrix is stored when there are fewer images than features), which gives the exact
  distance. An
  image's score is its log distance (divided by sqrt(D): about 0 for a training image), averaged over the folds.
* **the threshold**, chosen on the validation images only (each scored by the fold that did not learn from it): a
  one-sided 97.5% prediction bound (Student t) of their scores, so that about 2.5% of images like them are flagged.
  A new image is scored by every fold: each fold's score becomes the chance that a familiar image scores higher
  (the same Student t predictive distribution), and the folds' chances are joined by the Cauchy combination (Liu &
  Xie 2020: valid whatever the folds' dependence), read back as a score on the same scale. (A plain mean over the
  folds spreads less than the one-fold scores the threshold is set on, and would flag fewer than 2.5%.) With fewer
  than 2 validation images no threshold is set and the check says so. The test set plays no part.
* **image quality metrics' ranges**: for each metric, a prediction interval of the training participants' values
  (Student t; Bonferroni over the metrics, so that together they flag about 2.5% of images like them).

An image is ``out_of_distribution`` when its score is above the threshold or a metric lies outside its range; the
reasons say which. A flagged prediction is still written, with the flag.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file, save_file
from scipy import stats
from torch import nn

from .. import derivatives

#: The image quality metrics whose training ranges a package records: those that describe the image's contrast,
#: noise and anatomy (not the acquisition's artefacts, which quality control judges).
RANGE_METRICS = (
    "snr_wm", "snr_gm", "cnr", "cjv", "efc", "fber", "gm_wm_ratio", "wm_dice", "registration_ncc", "brain_volume_ml",
)  # fmt: skip
#: The share of familiar images the threshold aims to flag (one-sided prediction bound).
FLAG_RATE = 0.025
#: Fewest validation scores a threshold is set on.
MIN_CALIBRATION = 2
#: The file of a package that holds the folds' feature descriptions.
FILE = derivatives.STUDY_OUTPUTS["distribution"]


# --- the features -------------------------------------------------------------------------------------------------
def feature_layer(network: nn.Module) -> nn.Module:
    """The layer whose maps describe an image: a whole-image network's last block of feature maps (what Grad-CAM
    explains), or a U-Net's deepest block (its bottleneck)."""
    net = getattr(network, "net", network)
    for name in ("features", "layer4"):
        layer = getattr(net, name, None)
        if isinstance(layer, nn.Module):
            return layer
    if hasattr(net, "model"):  # MONAI's U-Net: nested (down, SkipConnection(submodule), up) blocks
        block = net.model
        while isinstance(block, nn.Sequential) and len(block) == 3 and hasattr(block[1], "submodule"):
            block = block[1].submodule
        return block  # type: ignore[return-value]
    return [m for m in net.modules() if isinstance(m, nn.Conv3d)][-1]


def pooled(maps: torch.Tensor) -> torch.Tensor:
    """Feature maps ``(n, C, ...)`` averaged over space: ``(n, C)`` in float32."""
    return maps.detach().float().flatten(2).mean(-1)


class FeatureHook:
    """Keep the pooled maps of :func:`feature_layer` of every forward pass of ``network`` (a context manager)."""

    def __init__(self, network: nn.Module) -> None:
        self.layer = feature_layer(network)
        self.kept: list[torch.Tensor] = []
        self._handle: Any = None

    def __enter__(self) -> FeatureHook:
        self._handle = self.layer.register_forward_hook(lambda _m, _i, out: self.kept.append(pooled(out).cpu()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def features(self) -> np.ndarray:
        """The kept features ``(n, C)`` of every pass, in order (float64)."""
        return torch.cat(self.kept).double().numpy() if self.kept else np.zeros((0, 0))


def whole_image_features(
    network: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> np.ndarray:
    """The features ``(n, C)`` of every image of ``batches`` (inputs ``(b, C, X, Y, Z)``) by a whole-image network."""
    network.eval()
    with FeatureHook(network) as hook, torch.no_grad():
        for batch in batches:
            network(batch.to(device))
    return hook.features()


def features_while(network: nn.Module, predict: Callable[[], Any]) -> tuple[Any, np.ndarray]:
    """Run ``predict`` (e.g. a sliding-window prediction by ``network``) while keeping the pooled maps of its
    :func:`feature_layer`: its result, and the features of the image ``(1, C)``, the mean over every window. The
    features cost no forward pass of their own."""
    with FeatureHook(network) as hook:
        result = predict()
    return result, hook.features().mean(axis=0, keepdims=True)


# --- one fold's description ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldReference:
    """One fold's training features: their mean and SD per feature, and their correlation shrunk towards the
    identity (Schafer and Strimmer's target D), kept as its principal axes, its eigenvalues along them and the
    shrinkage (its eigenvalue elsewhere)."""

    mean: np.ndarray  # (D,)
    sd: np.ndarray  # (D,)
    axes: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,): the shrunk correlation's eigenvalues along the axes
    residual: float  # the shrinkage: its eigenvalue off the axes

    def distance(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row of ``features``, divided by sqrt(D) (about 1 for a training image)."""
        z = (np.atleast_2d(features) - self.mean) / self.sd
        along = z @ self.axes.T
        d2 = (along**2 / self.variances).sum(1) + np.maximum((z**2).sum(1) - (along**2).sum(1), 0) / self.residual
        return np.sqrt(d2 / z.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """The log distance: what the threshold is set on."""
        return np.log(self.distance(features) + 1e-12)


def shrinkage(standardised: np.ndarray) -> float:
    """Schafer and Strimmer's (2005) optimal shrinkage of the correlation matrix of ``standardised`` features
    (n x D, columns of mean 0 and SD 1) towards the identity: sum of Var(r_ij) over sum of r_ij^2, i != j."""
    x = np.asarray(standardised, dtype=np.float64)
    n = len(x)
    if n < 3:
        return 1.0
    w_mean = x.T @ x / n
    r = w_mean * n / (n - 1)
    var_r = np.maximum((x**2).T @ (x**2) - n * w_mean**2, 0) * n / (n - 1) ** 3
    off = ~np.eye(x.shape[1], dtype=bool)
    denominator = float((r[off] ** 2).sum())
    return float(np.clip(var_r[off].sum() / denominator, 0.0, 1.0)) if denominator > 0 else 1.0


def fit_reference(features: np.ndarray) -> FoldReference:
    """The description of a fold's training ``features`` (n x D, n >= 2). A feature that barely varies gets the SD
    floor (a tenth of the median SD), so an image that moves it is far, but not infinitely.

    >>> rng = np.random.default_rng(0)
    >>> ref = fit_reference(rng.normal(size=(40, 8)))
    >>> bool(ref.distance(np.full(8, 6.0))[0] > 3 * ref.distance(np.zeros(8))[0])
    True
    """
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(0)
    sd = x.std(0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1])
    positive = sd[sd > 0]
    sd = np.maximum(sd, 0.1 * float(np.median(positive)) if len(positive) else 1.0)
    z = (x - mean) / sd
    alpha = max(shrinkage(z), 1e-3)
    _, singular, axes = np.linalg.svd(z, full_matrices=False)
    eigen = singular**2 / max(len(x) - 1, 1)
    keep = int((eigen > 1e-9 * max(float(eigen.max(initial=0)), 1e-30)).sum())
    return FoldReference(mean, sd, axes[:keep], alpha + (1 - alpha) * eigen[:keep], alpha)


# --- the threshold ------------------------------------------------------------------------------------------------
def prediction_bound(scores: Sequence[float] | np.ndarray, rate: float = FLAG_RATE) -> float:
    """The one-sided (1 - rate) prediction bound of one more score drawn like ``scores`` (normal, Student t):
    mean + t(1 - rate, n - 1) * SD * sqrt(1 + 1/n).

    >>> round(prediction_bound([0.0, 1.0, -1.0, 0.5, -0.5]), 1)
    2.4
    """
    v = np.asarray(scores, dtype=float)
    n = len(v)
    return float(v.mean() + stats.t.ppf(1 - rate, n - 1) * v.std(ddof=1) * math.sqrt(1 + 1 / n))


def calibrate(validation: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The threshold, set on the validation scores (each by the fold that did not learn the image), the predictive
    distribution a fold's score is read against (:func:`combined_score`), and what the threshold flags of them.
    With fewer than :data:`MIN_CALIBRATION` scores the threshold is None: the check cannot be made."""
    valid = np.asarray([float(v) for v in validation])
    record: dict[str, Any] = {
        "rule": f"one-sided {1 - FLAG_RATE:.1%} prediction bound (Student t) of the validation scores; an image's "
        "score joins the folds' scores by the Cauchy combination of their predictive p-values",
        "calibrated_on": "validation images (each scored by the fold that did not learn from it)",
        "n_validation": len(valid),
        "validation_scores": [round(float(v), 4) for v in valid],
    }
    if len(valid) < MIN_CALIBRATION:
        return {**record, "threshold": None, "validation_flagged": None,
                "note": f"{len(valid)} validation image(s): too few to set a threshold (at least {MIN_CALIBRATION})"}
    threshold = prediction_bound(valid)
    return {**record, "threshold": threshold, "mean": float(valid.mean()), "sd": float(valid.std(ddof=1)),
            "validation_flagged": float((valid > threshold).mean())}  # fmt: skip


def combined_score(calibration: dict[str, Any], fold_scores: Sequence[float] | np.ndarray) -> Any:
    """One image's score from each fold's (``fold_scores``: one per fold; or ``(folds, images)``, a score per
    image): each read as the chance that a familiar image scores higher (Student t with the validation scores'
    mean, SD and count), the chances joined by the Cauchy combination (the mean of tan((1/2 - p) pi); valid under
    any dependence between the folds), and the joint chance read back as a score on the same scale, so that it is
    above the threshold exactly when that chance is below the flag rate. One fold: its own score.

    >>> calibration = calibrate([0.0, 1.0, -1.0, 0.5, -0.5])
    >>> combined_score(calibration, [1.2]), round(combined_score(calibration, [1.2, 1.2]), 6)
    (1.2, 1.2)
    >>> threshold = calibration["threshold"]
    >>> bool(combined_score(calibration, [4.0, 0.0]) > threshold > combined_score(calibration, [2.0, 0.0]))
    True
    """
    values = np.asarray(fold_scores, dtype=float)
    if len(values) == 1:
        combined = values[0]
    else:
        mean, sd, n = float(calibration["mean"]), float(calibration["sd"]), int(calibration["n_validation"])
        scale = max(sd, 1e-12) * math.sqrt(1 + 1 / n)
        p = np.clip(stats.t.sf((values - mean) / scale, n - 1), 1e-300, 1 - 1e-16)
        joint = np.clip(stats.cauchy.sf(np.mean(np.tan((0.5 - p) * np.pi), axis=0)), 1e-300, 1 - 1e-16)
        combined = mean + scale * stats.t.isf(joint, n - 1)
    return float(combined) if np.ndim(combined) == 0 else np.asarray(combined, dtype=float)


# --- image quality metrics ----------------------------------------------------------------------------------------
def metric_ranges(table: pd.DataFrame, metrics: Sequence[str] = RANGE_METRICS) -> dict[str, dict[str, float]]:
    """Each metric's training range and the range a new image must lie in: a two-sided prediction interval of one
    more value drawn like the training values (Student t), at the level that leaves :data:`FLAG_RATE` over all the
    metrics together (Bonferroni), and at least 5% of the median's magnitude on each side.

    >>> r = metric_ranges(pd.DataFrame({"cnr": [2.0, 3.0, 4.0, 3.0]}))["cnr"]
    >>> (r["min"], r["max"], round(r["low"], 2), round(r["high"], 2), r["n"])
    (2.0, 4.0, -0.81, 6.81, 4)
    """
    present = [m for m in metrics if m in table.columns]
    out = {}
    for metric in present:
        values = pd.to_numeric(table[metric], errors="coerce").dropna().to_numpy(dtype=float)
        if len(values) < 3:
            continue
        n = len(values)
        q = float(stats.t.ppf(1 - FLAG_RATE / (2 * len(present)), n - 1))
        half = max(q * float(values.std(ddof=1)) * math.sqrt(1 + 1 / n), 0.05 * abs(float(np.median(values))))
        centre = float(values.mean())
        out[metric] = {"min": float(values.min()), "max": float(values.max()), "low": centre - half,
                       "high": centre + half, "n": n}  # fmt: skip
    return out


def metric_reasons(ranges: dict[str, dict[str, float]], metrics: dict[str, Any]) -> list[str]:
    """Why the image's metrics are unlike the training images' (empty: they are like them).

    >>> metric_reasons({"cnr": {"min": 2.0, "max": 4.0, "low": 1.0, "high": 5.0, "n": 3}}, {"cnr": 0.5})
    ['cnr 0.5 is outside the training range 2 to 4 (allowed 1 to 5)']
    """
    reasons = []
    for metric, bounds in ranges.items():
        value = metrics.get(metric)
        if isinstance(value, int | float) and math.isfinite(value) and not bounds["low"] <= value <= bounds["high"]:
            reasons.append(
                f"{metric} {value:.3g} is outside the training range {bounds['min']:.3g} to {bounds['max']:.3g} "
                f"(allowed {bounds['low']:.3g} to {bounds['high']:.3g})"
            )
    return reasons


# --- the package's record and the check ---------------------------------------------------------------------------
def save_references(references: Sequence[FoldReference], path: Path) -> None:
    """The folds' feature descriptions as one safetensors file (never pickle)."""
    tensors = {}
    for fold, ref in enumerate(references):
        tensors.update({f"fold-{fold}.mean": ref.mean, f"fold-{fold}.sd": ref.sd, f"fold-{fold}.axes": ref.axes,
                        f"fold-{fold}.variances": ref.variances})  # fmt: skip
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(path))


def load_references(folder: Path, record: dict[str, Any]) -> list[FoldReference]:
    """The folds' feature descriptions of a package (``record`` is its ``distribution`` entry)."""
    tensors = load_file(str(Path(folder) / record["file"]))
    return [
        FoldReference(tensors[f"fold-{k}.mean"], tensors[f"fold-{k}.sd"], tensors[f"fold-{k}.axes"],
                      tensors[f"fold-{k}.variances"], float(fold["shrinkage"]))
        for k, fold in enumerate(record["folds"])
    ]  # fmt: skip


def fold_record(reference: FoldReference, n_train: int) -> dict[str, Any]:
    """What ``model.json`` keeps of one fold's description besides its arrays."""
    return {"n_train": n_train, "n_features": len(reference.mean), "n_axes": len(reference.variances),
            "shrinkage": reference.residual}  # fmt: skip


def image_score(
    references: Sequence[FoldReference], features: Sequence[np.ndarray], calibration: dict[str, Any]
) -> float:
    """An image's score: its score by each fold (``features``: each fold's) joined by :func:`combined_score`; by a
    package made before the combination (its calibration has no ``mean``), their mean."""
    scores = [ref.score(f)[0] for ref, f in zip(references, features, strict=True)]
    if "mean" not in calibration:
        return float(np.mean(scores))
    return combined_score(calibration, scores)


def verdict(
    records: Sequence[dict[str, Any]], scores: Sequence[float | None], metrics: dict[str, Any] | None
) -> dict[str, Any]:
    """The distribution check of one image by the models of ``records`` (their ``distribution`` entries): each
    model's feature score against its threshold, and the image's quality metrics against each model's ranges."""
    reasons: list[str] = []
    outside: list[str] = []
    checks = []
    for record, score in zip(records, scores, strict=True):
        entry = record.get("distribution")
        if not entry:
            checks.append({"model": record["name"], "available": False})
            continue
        threshold = float(entry["calibration"]["threshold"])
        check: dict[str, Any] = {"model": record["name"], "available": True, "score": score, "threshold": threshold}
        if score is not None and score > threshold:
            reasons.append(
                f"the network's features are unlike its training images' (score {score:.2f} > threshold "
                f"{threshold:.2f} of {record['name']})"
            )
        if metrics is not None:
            outside += [r for r in metric_reasons(entry.get("metric_ranges", {}), metrics) if r not in outside]
        checks.append(check)
    reasons += outside
    available = any(c["available"] for c in checks)
    return {
        "out_of_distribution": bool(reasons) if available else None,
        "reasons": reasons,
        "score": max((c["score"] for c in checks if c.get("score") is not None), default=None),
        "threshold": min((c["threshold"] for c in checks if c.get("threshold") is not None), default=None),
        "checks": checks,
        "metrics_checked": metrics is not None,
        "metrics_outside": outside,
        "note": None if available else (
            "the model package records no training distribution (made before the check, or too few images to set one)"
        ),
    }


def check_image(
    models: Sequence[Any], features: Sequence[Sequence[np.ndarray]], iqm: str | Path | None
) -> dict[str, Any]:
    """:func:`verdict` of one image: each model's (:class:`~pipeline.learn.ensemble.LoadedModel`) folds' ``features``
    scored against its training images', the image's quality metrics (its ``desc-iqm`` record) against their
    ranges."""
    scores = [image_score(m.references, f, m.record["distribution"]["calibration"]) if m.references else None
              for m, f in zip(models, features, strict=True)]  # fmt: skip
    metrics = json.loads(Path(iqm).read_text()).get("metrics", {}) if iqm else None
    return verdict([m.record for m in models], scores, metrics)


def banner(check: dict[str, Any] | None) -> str | None:
    """The plain sentence a report shows above a flagged prediction (None: not flagged)."""
    if not check or not check.get("out_of_distribution"):
        return None
    return ("This image is unlike the images the model learned from: " + "; ".join(check["reasons"]) +
            ". The prediction is shown, but do not trust it without looking at the image.")  # fmt: skip
