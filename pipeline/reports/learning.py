"""Figures of the learning sections of the group report: pure functions of numbers, PNG bytes out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figures import _png

_COLOURS = ("#2a6f97", "#c8553d", "#588157", "#8d5a97", "#e09f3e", "#3d5a80", "#9c6644", "#6c757d")


def dataset_counts(columns: dict[str, dict[str, int]], age: Sequence[float] | None, *, dpi: int = 70) -> bytes:
    """Bar charts of categorical columns (e.g. target, site, sex) and a histogram of age."""
    panels = len(columns) + (1 if age is not None and len(age) else 0)
    figure = Figure(figsize=(3.2 * max(panels, 1), 2.6))
    for i, (name, counts) in enumerate(columns.items()):
        ax = figure.add_subplot(1, max(panels, 1), i + 1)
        ax.bar(list(counts), list(counts.values()), color=_COLOURS[0])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole numbers
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    if age is not None and len(age):
        ax = figure.add_subplot(1, panels, panels)
        ax.hist(age, bins=12, color=_COLOURS[1])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("age", fontsize=9)
        ax.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure, dpi)


def training_curves(histories: Sequence[Sequence[dict[str, Any]]], *, dpi: int = 70) -> bytes:
    """Per fold: training and validation loss, the validation metrics, learning rate and epoch time."""
    keys = (
        [k for k in histories[0][0] if k.startswith("val_") and k != "val_loss" and not k.startswith("val_dice_")]
        if histories[0]
        else []
    )  # per-structure Dice: in history.tsv and the segmentation figures
    panels = ["loss", *keys, "lr", "epoch_time_s"]
    figure = Figure(figsize=(3.0 * len(panels), 2.6))
    for p, key in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), p + 1)
        for f, history in enumerate(histories):
            epochs = [row["epoch"] for row in history]
            colour = _COLOURS[f % len(_COLOURS)]
            if key == "loss":
                ax.plot(epochs, [r["train_loss"] for r in history], color=colour, lw=1, ls="--")
                ax.plot(epochs, [r["val_loss"] for r in history], color=colour, lw=1.2, label=f"fold {f}")
            else:
                ax.plot(epochs, [r[key] for r in history], color=colour, lw=1.2)
        title = {"loss": "loss (dashed: train)", "lr": "learning rate", "epoch_time_s": "epoch time (s)"}
        ax.set_title(title.get(key, key.replace("val_", "validation ")), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "loss" and len(histories) > 1:
            ax.legend(fontsize=6)
    figure.tight_layout()
    return _png(figure, dpi)


def learning_curves(curves: dict[str, Sequence[dict[str, Any]]], deep: dict[str, Any] | None, chance: float | None,
                    *, dpi: int = 70) -> bytes:  # fmt: skip
    """The headline metric against the number of training participants: one line (with its 95% interval) per
    linear model, the network's score at the full training set, chance as a dotted line."""
    figure = Figure(figsize=(4.6, 3.0))
    ax = figure.add_subplot(1, 1, 1)
    metric = ""
    for c, (name, every) in enumerate(curves.items()):
        points = [p for p in every if p.get("value") is not None]  # undefined on its test set (JSON null)
        n = [p["n_train"] for p in points]
        value = [p["value"] for p in points]
        low = [p["value"] - p["ci"][0] if p["ci"][0] is not None else 0.0 for p in points]
        high = [p["ci"][1] - p["value"] if p["ci"][1] is not None else 0.0 for p in points]
        ax.errorbar(n, value, yerr=[low, high], color=_COLOURS[c % len(_COLOURS)], lw=1.2, marker="o", ms=3,
                    capsize=2, label=name)  # fmt: skip
        metric = points[0]["metric"] if points else metric
    if deep is not None:
        low_ci, high_ci = (deep["value"] if v is None else v for v in deep["ci"])
        error = [[deep["value"] - low_ci], [high_ci - deep["value"]]]
        ax.errorbar([deep["n_train"]], [deep["value"]], yerr=error, color="black", marker="*", ms=8, capsize=2,
                    ls="none", label="deep model")  # fmt: skip
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1)
    ax.set_xlabel("training participants per fold", fontsize=8)
    ax.set_ylabel(f"test {metric}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    figure.tight_layout()
    return _png(figure, dpi)


def classification_panels(evaluation: dict[str, Any], classes: Sequence[str], *, dpi: int = 70) -> bytes:
    """ROC, precision-recall, reliability (calibration) and the confusion matrix of one set."""
    curves = evaluation.get("curves")
    panels = 4 if curves else 1
    figure = Figure(figsize=(3.1 * panels, 3.0))
    if curves:
        ax = figure.add_subplot(1, panels, 1)
        ax.plot(curves["roc"]["fpr"], curves["roc"]["tpr"], color=_COLOURS[0])
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
        ax.set(
            xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (AUC {evaluation['metrics']['roc_auc']:.2f})"
        )
        ax = figure.add_subplot(1, panels, 2)
        ax.plot(curves["pr"]["recall"], curves["pr"]["precision"], color=_COLOURS[1])
        ax.set(xlabel="recall", ylabel="precision", title=f"PR (AP {evaluation['metrics']['pr_auc']:.2f})")
        ax = figure.add_subplot(1, panels, 3)
        ax.plot(curves["calibration"]["predicted"], curves["calibration"]["observed"], "o-", color=_COLOURS[2])
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
        ax.set(xlabel="predicted probability", ylabel="observed frequency")
        ax.set_title(f"calibration (Brier {evaluation['metrics']['brier']:.3f})")
    ax = figure.add_subplot(1, panels, panels)
    matrix = np.asarray(evaluation["confusion"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black" if value < matrix.max() / 2 else "white")
    ax.set_xticks(range(len(classes)), classes, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion")
    for axis in figure.axes:
        axis.title.set_fontsize(9)
        axis.xaxis.label.set_fontsize(8)
        axis.yaxis.label.set_fontsize(8)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure, dpi)


def regression_panels(truth: Sequence[float], predicted: Sequence[float], *, dpi: int = 70) -> bytes:
    """Predicted against true values, and residuals against true values."""
    y, p = np.asarray(truth, dtype=float), np.asarray(predicted, dtype=float)
    figure = Figure(figsize=(6.4, 3.0))
    ax = figure.add_subplot(1, 2, 1)
    ax.scatter(y, p, s=12, color=_COLOURS[0])
    low, high = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([low, high], [low, high], color="#999", lw=0.8, ls=":")
    ax.set(xlabel="true", ylabel="predicted", title="predicted vs true")
    ax = figure.add_subplot(1, 2, 2)
    ax.scatter(y, p - y, s=12, color=_COLOURS[1])
    ax.axhline(0, color="#999", lw=0.8, ls=":")
    ax.set(xlabel="true", ylabel="predicted - true", title="residuals")
    for axis in figure.axes:
        axis.title.set_fontsize(9)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure, dpi)


def orthogonal_slices(volume: np.ndarray, *, dpi: int = 60) -> bytes:
    """Mid sagittal, coronal and axial slices of a (RAS) model input (its first channel)."""
    data = np.asarray(volume[0] if volume.ndim == 4 else volume, dtype=float)
    low, high = np.percentile(data, [1, 99.5])
    figure = Figure(figsize=(4.5, 1.6), facecolor="black")
    for i in range(3):
        ax = figure.add_subplot(1, 3, i + 1)
        ax.imshow(np.take(data, data.shape[i] // 2, axis=i).T, cmap="gray", origin="lower", vmin=low, vmax=high)
        ax.axis("off")
    figure.subplots_adjust(0, 0, 1, 1, 0.02, 0)
    return _png(figure, dpi)


def segmentation_panels(cases: Any, *, dpi: int = 70) -> bytes:
    """Case-wise Dice and HD95 per structure (one dot per image, the median as a bar)."""
    structures = list(dict.fromkeys(cases["structure"]))
    figure = Figure(figsize=(max(6.4, 1.1 * len(structures) * 2), 3.2))
    for p, (key, title) in enumerate((("dice", "Dice"), ("hd95_mm", "HD95 (mm)"))):
        ax = figure.add_subplot(1, 2, p + 1)
        for i, name in enumerate(structures):
            values = cases.loc[cases["structure"] == name, key].astype(float).to_numpy()
            values = values[np.isfinite(values)]
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + jitter, values, s=10, color=_COLOURS[i % len(_COLOURS)])
            if len(values):
                ax.hlines(np.median(values), i - 0.3, i + 0.3, color="#333", lw=1.2)
        ax.set_xticks(range(len(structures)))
        ax.set_xticklabels(structures, rotation=40, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if key == "dice":
            ax.set_ylim(0, 1.02)
    figure.tight_layout()
    return _png(figure, dpi)


def segmentation_preview(
    image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, *, title: str = "", dpi: int = 70
) -> bytes:
    """Three orthogonal slices through the labelled structures: the input, the reference and the prediction
    over it (colours by label index), so that a score never hides a misplaced structure. Of several channels, the
    last is shown (the FLAIR of ``--inputs T1w FLAIR``, where lesions show)."""
    from matplotlib.colors import ListedColormap

    data = np.asarray(image[-1] if image.ndim == 4 else image, dtype=float)
    union = prediction > 0 if reference is None else (prediction > 0) | (reference > 0)
    centre = np.argwhere(union).mean(0).round().astype(int) if union.any() else np.array(data.shape) // 2
    low, high = np.percentile(data, [1, 99.5])
    n = int(max(prediction.max(), 0 if reference is None else reference.max())) + 1
    colours = ListedColormap([(0, 0, 0, 0)] + [_COLOURS[i % len(_COLOURS)] for i in range(max(n - 1, 1))])
    columns = [("input", None), ("reference", reference), ("prediction", prediction)]
    columns = [c for c in columns if c[0] != "reference" or reference is not None]
    figure = Figure(figsize=(2.0 * len(columns), 6.0), facecolor="white")
    for row in range(3):
        for col, (name, labels) in enumerate(columns):
            ax = figure.add_subplot(3, len(columns), row * len(columns) + col + 1)
            ax.imshow(np.take(data, centre[row], axis=row).T, cmap="gray", origin="lower", vmin=low, vmax=high)
            if labels is not None:
                section = np.take(labels, centre[row], axis=row).T
                ax.imshow(np.ma.masked_equal(section, 0), cmap=colours, origin="lower", vmin=0, vmax=max(n - 1, 1),
                          alpha=0.55, interpolation="nearest")  # fmt: skip
            ax.axis("off")
            if row == 0:
                ax.set_title(name, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return _png(figure, dpi)
