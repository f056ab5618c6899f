"""Training as functions: seed, feed, fit, checkpoint, resume, predict.

Randomness is drawn from seeds derived from (seed, epoch, batch), never from a stream that runs
across epochs: an epoch's data order, augmentation and dropout depend only on its number, so a
run resumed from the checkpoint of epoch k ends with exactly the weights of an uninterrupted run.
Checkpoints are written atomically after every epoch and hold no code (``weights_only`` loads).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual name

from .. import derivatives
from ..errors import InputDataError, UsageError

LOGGER = logging.getLogger(__name__)

#: Metric -> whether larger is better.
METRIC_DIRECTION = {"loss": False, "balanced_accuracy": True, "roc_auc": True, "mae": False}
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    """How one model is fitted (plain values; see ``bidsdl --help`` for their meaning)."""

    task: str
    n_outputs: int
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    selection_metric: str = "loss"
    class_weighting: str = "loss"
    augment: tuple[str, ...] = ()
    amp: bool = False
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "augment": list(self.augment)}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms.

    >>> derived_seed(42, 3) == derived_seed(42, 3) != derived_seed(42, 4)
    True
    """
    return int(
        np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1
    )


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for, but torch sees no CUDA GPU (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Use --device cpu, or run on a "
            "machine with a GPU (in a container: --gpus all / singularity --nv)."
        )
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def determinism_record(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch_threads": torch.get_num_threads(),
        "bitwise_reproducible": device.type == "cpu",
    }


class Volumes(torch.utils.data.Dataset):
    """Memory-mapped ``(1, X, Y, Z)`` float32 arrays and their targets."""

    def __init__(self, arrays: Sequence[Path], targets: Sequence[float]) -> None:
        self.paths = [Path(p) for p in arrays]
        self.targets = np.asarray(targets, dtype=np.float32)
        self._maps: list[np.ndarray | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def array(self, index: int) -> np.ndarray:
        if self._maps[index] is None:
            self._maps[index] = np.load(self.paths[index], mmap_mode="r")
        return self._maps[index]  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        return torch.from_numpy(np.array(self.array(index))), float(self.targets[index])

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([self.array(i) for i in indices]))
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


def augment_batch(x: torch.Tensor, kinds: Sequence[str], seed: int) -> torch.Tensor:
    """Anatomically plausible random changes; the parameters come from ``seed`` alone.

    affine: rotations up to 5 degrees, scaling 0.95-1.05, shifts up to 3 voxels; intensity:
    gain 0.9-1.1 and offset +-0.1 (the inputs are median/IQR normalised); noise: Gaussian, SD up
    to 0.05; flip: left-right with probability 0.5 (only when asked: brains are not symmetric).
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    if "affine" in kinds:
        angles = np.deg2rad(rng.uniform(-5, 5, size=(n, 3)))
        scales = rng.uniform(0.95, 1.05, size=(n, 3))
        shifts = rng.uniform(-3, 3, size=(n, 3)) * 2 / np.array(x.shape[2:])
        theta = np.zeros((n, 3, 4))
        for i in range(n):
            theta[i, :, :3] = _rotation(angles[i]) @ np.diag(scales[i])
            theta[i, :, 3] = shifts[i]
        grid = F.affine_grid(torch.as_tensor(theta, dtype=x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "flip" in kinds:
        flip = torch.as_tensor(rng.random(n) < 0.5)
        x = torch.where(flip[:, None, None, None, None], x.flip(2), x)  # axis 0 of RAS arrays: left-right
    if "intensity" in kinds:
        gain = torch.as_tensor(rng.uniform(0.9, 1.1, n), dtype=x.dtype)[:, None, None, None, None]
        offset = torch.as_tensor(rng.uniform(-0.1, 0.1, n), dtype=x.dtype)[:, None, None, None, None]
        x = x * gain + offset
    if "noise" in kinds:
        sd = torch.as_tensor(rng.uniform(0, 0.05, n), dtype=x.dtype)[:, None, None, None, None]
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = x + sd * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Precision:
    """Autocast settings for a device; ``scaler`` only for fp16 on CUDA."""

    enabled: bool
    dtype: torch.dtype
    channels_last: bool
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)


def precision_for(device: torch.device, amp: bool) -> Precision:
    if not amp:
        return Precision(False, torch.float32, channels_last=False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(True, torch.bfloat16, channels_last=True)
        return Precision(True, torch.float16, channels_last=True, scaler=torch.amp.GradScaler("cuda"))
    return Precision(True, torch.bfloat16, channels_last=True)


def _to_device(x: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if precision.channels_last else x


@dataclass(frozen=True)
class TargetScale:
    """Regression targets are standardised for the loss; outputs are mapped back."""

    mean: float = 0.0
    sd: float = 1.0


def loss_function(settings: TrainSettings, targets: np.ndarray) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if settings.task == "regression":
        return lambda out, y: F.mse_loss(out[:, 0].float(), y)
    weight = None
    if settings.class_weighting == "loss":
        counts = np.bincount(targets.astype(int), minlength=settings.n_outputs).astype(np.float64)
        weight = torch.as_tensor(len(targets) / (settings.n_outputs * np.maximum(counts, 1)), dtype=torch.float32)
    return lambda out, y: F.cross_entropy(
        out.float(), y.long(), weight=None if weight is None else weight.to(out.device)
    )


def sample_weights(settings: TrainSettings, targets: np.ndarray) -> np.ndarray | None:
    if settings.task != "classification" or settings.class_weighting != "sampler":
        return None
    counts = np.bincount(targets.astype(int), minlength=settings.n_outputs).astype(np.float64)
    return 1.0 / counts[targets.astype(int)]


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Volumes,
    *,
    task: str,
    device: torch.device,
    amp: bool = False,
    scale: TargetScale = TargetScale(),
    batch_size: int = 8,
) -> np.ndarray:
    """Class probabilities ``(n, classes)`` or regression values ``(n,)`` in target units."""
    precision = precision_for(device, amp)
    model.eval()
    outputs = []
    for chunk in np.array_split(np.arange(len(data)), max(1, math.ceil(len(data) / batch_size))):
        if not len(chunk):
            continue
        x, _ = data.batch(chunk)
        with precision.autocast(device):
            out = model(_to_device(x, device, precision)).float().cpu()
        outputs.append(out)
    raw = torch.cat(outputs)
    if task == "classification":
        return torch.softmax(raw, dim=1).numpy().astype(np.float64)
    return raw[:, 0].numpy().astype(np.float64) * scale.sd + scale.mean


def validation_scores(task: str, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The per-epoch validation metrics (the full evaluation is :mod:`pipeline.learn.evaluate`)."""
    if task == "regression":
        return {"mae": float(np.mean(np.abs(outputs - targets)))}
    y = targets.astype(int)
    scores = {"balanced_accuracy": float(balanced_accuracy_score(y, outputs.argmax(axis=1)))}
    if outputs.shape[1] == 2 and len(np.unique(y)) == 2:
        scores["roc_auc"] = float(roc_auc_score(y, outputs[:, 1]))
    return scores


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best: dict[str, dict[str, float]]
    run_dir: Path
    stopped_early: bool


class _Progress:
    """A one-line progress bar with ETA on a terminal; nothing otherwise (log files get epoch lines)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.start = label, total, time.monotonic()
        self.enabled = sys.stderr.isatty()

    def update(self, done: int, text: str = "") -> None:
        if not self.enabled or not self.total:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        bar = "#" * int(24 * done / self.total)
        sys.stderr.write(f"\r{self.label} [{bar:<24}] {done}/{self.total} {text} ETA {eta:4.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _rng_states() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.asarray(np.random.get_state()[1]).tolist(),  # type: ignore[index]
        "python": list(random.getstate()[1]),
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with derivatives.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without unpickling code (``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and what to do
        raise InputDataError(
            f"The checkpoint {path} cannot be read ({exc.__class__.__name__}). Delete it to train this fold "
            "from the start, or run without --resume."
        ) from exc


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with derivatives.atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(str(path)))
    return model


def fit(
    model: nn.Module,
    train: Volumes,
    val: Volumes,
    settings: TrainSettings,
    *,
    run_dir: Path,
    device: torch.device,
    scale: TargetScale = TargetScale(),
    resume: bool = False,
    label: str = "",
    on_epoch_end: Callable[[int], None] | None = None,
    tensorboard: bool = False,
) -> FitResult:
    """Fit ``model``; write ``checkpoint.pt`` every epoch, ``best-<metric>.safetensors`` and ``history.tsv``.

    With ``resume``, continue from ``run_dir/checkpoint.pt`` (a finished run returns at once).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = precision_for(device, settings.amp)
    model.to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs, eta_min=settings.lr / 100)
    criterion = loss_function(settings, train.targets)
    weights = sample_weights(settings, train.targets)
    metrics = (
        ["loss", *(["balanced_accuracy"] + (["roc_auc"] if settings.n_outputs == 2 else []))]
        if (settings.task == "classification")
        else ["loss", "mae"]
    )
    history: list[dict[str, Any]] = []
    best: dict[str, dict[str, float]] = {}
    start_epoch, bad_epochs = 0, 0
    checkpoint_path = run_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        start_epoch, bad_epochs = int(state["epoch"]) + 1, int(state["bad_epochs"])
        torch.set_rng_state(state["rng"]["torch"])
        LOGGER.info("%sresuming after epoch %d (%s)", label, start_epoch, checkpoint_path)
        if state.get("finished"):
            return FitResult(history, best, run_dir, stopped_early=bool(state.get("stopped_early")))
    writer = _tensorboard_writer(run_dir) if tensorboard else None
    stopped_early = False
    train_scale = (lambda y: (y - scale.mean) / scale.sd) if settings.task == "regression" else (lambda y: y)
    for epoch in range(start_epoch, settings.epochs):
        started = time.monotonic()
        torch.manual_seed(derived_seed(settings.seed, epoch, 1))  # dropout of this epoch
        model.train()
        order = epoch_order(len(train), epoch=epoch, seed=settings.seed, weights=weights)
        progress = _Progress(f"{label}epoch {epoch + 1}/{settings.epochs}", len(order))
        total, seen = 0.0, 0
        for batch_index, chunk in enumerate(batches(order, settings.batch_size)):
            x, y = train.batch(chunk)
            if settings.augment:
                x = augment_batch(x, settings.augment, derived_seed(settings.seed, epoch, 2, batch_index))
            x, y = _to_device(x, device, precision), train_scale(y).to(device)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast(device):
                loss = criterion(model(x), y)
            if precision.scaler is not None:
                precision.scaler.scale(loss).backward()
                precision.scaler.step(optimizer)
                precision.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * len(chunk)
            seen += len(chunk)
            progress.update(seen, f"loss {total / seen:.3f}")
        progress.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        outputs = predict(model, val, task=settings.task, device=device, amp=settings.amp, scale=scale)
        val_loss = _validation_loss(settings, criterion, outputs, val.targets, scale)
        scores = {"loss": val_loss, **validation_scores(settings.task, outputs, val.targets)}
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            **{f"val_{k}": v for k, v in scores.items()},
            "lr": lr,
            "epoch_time_s": time.monotonic() - started,
        }
        history.append(row)
        improved_selection = False
        for metric in metrics:
            value = scores.get(metric)
            if value is None or not np.isfinite(value):
                continue
            previous = best.get(metric)
            better = previous is None or (
                value > previous["value"] if METRIC_DIRECTION[metric] else value < previous["value"]
            )
            if better:
                best[metric] = {"value": float(value), "epoch": epoch + 1}
                save_weights(model, run_dir / f"best-{metric}.safetensors")
                improved_selection |= metric == settings.selection_metric
        bad_epochs = 0 if improved_selection else bad_epochs + 1
        stopped_early = bad_epochs >= settings.patience and epoch + 1 < settings.epochs
        finished = stopped_early or epoch + 1 == settings.epochs
        _save_checkpoint(
            checkpoint_path,
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best": best,
                "bad_epochs": bad_epochs,
                "finished": finished,
                "stopped_early": stopped_early,
                "settings": settings.to_dict(),
                "rng": _rng_states(),
            },
        )
        _write_history(run_dir / "history.tsv", history)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
        LOGGER.info(
            "%sepoch %d/%d: train loss %.4f, %s, %.1f s",
            label,
            epoch + 1,
            settings.epochs,
            row["train_loss"],
            ", ".join(f"val {k} {v:.4f}" for k, v in scores.items()),
            row["epoch_time_s"],
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
        if stopped_early:
            LOGGER.info("%sno better %s for %d epochs: stopping early", label, settings.selection_metric, bad_epochs)
            break
    if writer is not None:
        writer.close()
    return FitResult(history, best, run_dir, stopped_early)


def _validation_loss(
    settings: TrainSettings, criterion: Callable, outputs: np.ndarray, targets: np.ndarray, scale: TargetScale
) -> float:
    if settings.task == "regression":
        scaled = (outputs - scale.mean) / scale.sd
        return float(np.mean((scaled - (targets - scale.mean) / scale.sd) ** 2))
    logits = torch.log(torch.as_tensor(np.clip(outputs, 1e-7, 1.0), dtype=torch.float32))
    return float(criterion(logits, torch.as_tensor(targets)))


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    derivatives.write_text(path, pd.DataFrame(history).to_csv(sep="\t", index=False, float_format="%.6g"))


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UsageError(
            "--tensorboard needs the 'tensorboard' package, which is not installed: pip install tensorboard "
            "(the per-epoch log history.tsv is written either way)."
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
