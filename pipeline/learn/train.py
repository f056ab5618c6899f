"""Training as functions: seed, feed, fit, checkpoint, resume, predict.

Randomness is drawn from seeds derived from (seed, epoch, batch), never from a stream that runs
across epochs: an epoch's data order, augmentation and dropout depend only on its number, so a
run resumed from the checkpoint of epoch k ends with exactly the weights of an uninterrupted run.
Checkpoints are written atomically after every epoch and hold no code (``weights_only`` loads).
"""

from __future__ import annotations

import dataclasses
import functools
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
from torch import nn

from .. import derivatives
from ..config import default
from ..errors import InputDataError, TrainingDiverged, UsageError
from . import distributed, memory, walltime
from .curve import projection
from .data import Volumes, batches, derived_seed
from .device import Precision, loader_threads, precision_for, prefetch, to_device
from .task import NO_SCALE, Criterion, TargetScale, Task
from .transfer import keep_frozen_norms, param_groups

__all__ = ["FitHooks", "TargetScale", "TrainSettings", "fit", "predict"]

LOGGER = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: Decay per optimiser step of the weights' exponential moving average (``--ema``).
EMA_DECAY = 0.99


@dataclass(frozen=True)
class TrainSettings:
    """How one model is fitted (plain values; defaults and meaning: :class:`~pipeline.config.RunConfig`)."""

    n_outputs: int
    epochs: int = default("epochs")
    batch_size: int = default("batch_size")
    lr: float = default("lr")
    weight_decay: float = default("weight_decay")
    patience: int = default("patience")
    selection_metric: str = default("selection_metric")
    class_weighting: str = default("class_weighting")
    augment: tuple[str, ...] = default("augment")
    amp: bool | None = default("amp")  # None: bf16 on CUDA GPUs that have it, fp32 elsewhere
    ema: bool = default("ema")
    seed: int = default("seed")
    compile: bool = default("compile")  # how fast, not what: torch.compile the training step
    augment_strength: float = 1.0  # scales the augmentation's ranges (the search draws it)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "augment": list(self.augment)}


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Any,
    *,
    task: Task,
    device: torch.device,
    amp: bool = False,
    scale: TargetScale = NO_SCALE,
    batch_size: int = 8,
) -> np.ndarray:
    """The task's predictions of every item of ``data`` (class probabilities, values in target units, ...)."""
    precision = precision_for(device, amp)
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with precision.autocast(device):
            return model(to_device(x, device, precision)).float().cpu()

    return task.predict(run, data, scale=scale, batch_size=batch_size)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best: dict[str, dict[str, float]]
    run_dir: Path
    stopped_early: bool
    outlook: dict[str, Any] | None = None


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


@dataclass(frozen=True)
class FitHooks:
    """How a fit reports and when it must stop: the prefix of its log lines (``label``), a call after each epoch
    (``on_epoch_end``, given the epoch's number), TensorBoard scalars, the wall-time deadline."""

    label: str = ""
    on_epoch_end: Callable[[int], None] | None = None
    tensorboard: bool = False
    deadline: walltime.Deadline = walltime.NO_DEADLINE


@dataclass(frozen=True)
class _Fit:
    """What every epoch of one fit is given (this rank's view)."""

    settings: TrainSettings
    task: Task
    device: torch.device
    scale: TargetScale
    run_dir: Path
    world: distributed.World
    hooks: FitHooks
    score_key: str  # the validation score whose course is projected

    def outlook(self, history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        return projection(history, self.score_key, self.settings.epochs, self.task.metric_ranges)


def fit(
    model: nn.Module,
    train: Volumes,
    val: Volumes | None,
    settings: TrainSettings,
    *,
    task: Task,
    run_dir: Path,
    device: torch.device,
    scale: TargetScale = NO_SCALE,
    resume: bool = False,
    hooks: FitHooks = FitHooks(),
) -> FitResult:
    """Fit ``model``; write ``checkpoint.pt`` every epoch, ``best-<metric>.safetensors`` and ``history.tsv``.
    With ``resume``, continue from ``run_dir/checkpoint.pt`` (a finished run returns at once). In a distributed run
    every rank calls this with the same job, trains on its share of every batch; only rank 0 validates and writes
    (:mod:`.distributed`). Parts: :func:`_resume`, :func:`_training_module` (pre-flight, residency, DDP, compile),
    :func:`_train_epoch`, :func:`_close_epoch`. Before ``deadline``, training stops with its checkpoint when the next
    epoch would not end in time (:class:`~pipeline.errors.TimeLimitReached`; one epoch per process at least)."""
    world = distributed.current()
    run = _start(model, train, settings, task=task, device=device, world=world, run_dir=run_dir)
    checkpoint_path = run_dir / CHECKPOINT
    ctx = _Fit(settings, task, device, scale, run_dir, world, hooks,
               score_key=f"val_{run.metrics[1] if len(run.metrics) > 1 else 'loss'}")  # fmt: skip
    label, deadline = hooks.label, hooks.deadline
    if resume and checkpoint_path.exists():
        finished = _resume(run, checkpoint_path, world=world, label=label)
        if finished is not None:  # the fit had ended: its record, nothing trained
            return FitResult(run.history, run.best, run_dir, finished, ctx.outlook(run.history))
    if world.main and run.start_epoch < settings.epochs:  # a fold about to start, after others in this job
        deadline.check_before(what=f"{label}epoch {run.start_epoch + 1}")
    trained = _training_module(run.model, train, settings, device=device, world=world, label=label,
                               start_epoch=run.start_epoch)  # fmt: skip
    writer = _tensorboard_writer(run_dir) if hooks.tensorboard and world.main else None
    stopped_early = False
    try:
        for epoch in range(run.start_epoch, settings.epochs):
            started = time.monotonic()
            total, seen, lr = _train_epoch(run, trained, train, settings, epoch=epoch, task=task, scale=scale,
                                           device=device, world=world, label=label)  # fmt: skip
            _check_finite(total, epoch=epoch, lr=lr, precision=run.precision, label=label, run_dir=run_dir)
            finished = False
            if world.main:  # rank 0 validates, writes and decides whether to go on
                stopped_early, finished = _close_epoch(run, ctx, val, epoch=epoch, train_loss=total / max(seen, 1),
                                                       lr=lr, started=started, writer=writer)  # fmt: skip
            if world.active:
                stopped_early = distributed.broadcast_flag(stopped_early, device)
            if _out_of_time(run, deadline, finished=finished, world=world, device=device):
                raise deadline.error(deadline.slowest_epoch(), what=f"{label}epoch {epoch + 2}")
            if stopped_early:
                break
    finally:
        if writer is not None:
            writer.close()
    return FitResult(run.history, run.best, run_dir, stopped_early, ctx.outlook(run.history))


def _close_epoch(
    run: _Run, ctx: _Fit, val: Volumes | None, *, epoch: int, train_loss: float, lr: float, started: float,
    writer: Any,
) -> tuple[bool, bool]:  # fmt: skip
    """Rank 0 after an epoch: validate, keep the best weights, write the checkpoint and the history, report.
    Returns whether to stop early and whether the fit has finished."""
    assert val is not None, "the validation set is needed where the model is validated (rank 0)"
    settings, label = ctx.settings, ctx.hooks.label
    row, scores = _validate(run, val, task=ctx.task, device=ctx.device, scale=ctx.scale, run_dir=ctx.run_dir,
                            epoch=epoch)  # fmt: skip
    row = {"epoch": epoch + 1, "train_loss": train_loss, **row, "lr": lr, "epoch_time_s": time.monotonic() - started}
    run.history.append(row)
    stopped_early = _select(run, scores, settings, task=ctx.task, epoch=epoch, run_dir=ctx.run_dir, label=label)
    finished = stopped_early or epoch + 1 == settings.epochs
    _save_checkpoint(ctx.run_dir / CHECKPOINT, run.checkpoint(epoch, ctx.world.size, finished, stopped_early, settings))
    _write_history(ctx.run_dir / derivatives.STUDY_OUTPUTS["history"], run.history)
    _report_epoch(run, row, scores, settings, writer=writer, label=label, epoch=epoch,
                  outlook=ctx.outlook(run.history), on_epoch_end=ctx.hooks.on_epoch_end)  # fmt: skip
    ctx.hooks.deadline.note_epoch(row["epoch_time_s"])
    return stopped_early, finished


def _out_of_time(
    run: _Run, deadline: walltime.Deadline, *, finished: bool, world: distributed.World, device: torch.device
) -> bool:
    """Whether the next epoch would not end before ``deadline`` (rank 0 decides for every rank)."""
    short = world.main and not finished and deadline.short(deadline.slowest_epoch())
    return distributed.broadcast_flag(short, device) if world.active else short


@dataclass
class _Run:
    """One fit's state from epoch to epoch: the model, what optimises it, and its record so far."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Any  # torch.optim.swa_utils.AveragedModel, or None
    criterion: Criterion
    weights: np.ndarray | None
    precision: Precision
    metrics: list[str]
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    start_epoch: int = 0
    bad_epochs: int = 0

    @property
    def evaluated(self) -> nn.Module:
        """What is validated, kept and packaged: the EMA of the weights (``--ema``), else the weights."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(
        self, epoch: int, world_size: int, finished: bool, stopped_early: bool, settings: TrainSettings
    ) -> dict[str, Any]:
        """Everything a resumed run needs to end where an uninterrupted one does (no code: ``weights_only``)."""
        return {
            "world_size": world_size,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "history": self.history,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "finished": finished,
            "stopped_early": stopped_early,
            "settings": settings.to_dict(),
            "rng": _rng_states(),
        }


def _start(
    model: nn.Module, train: Volumes, settings: TrainSettings, *, task: Task, device: torch.device,
    world: distributed.World, run_dir: Path,
) -> _Run:  # fmt: skip
    """The model on its device, its optimiser, schedule, loss and (``--ema``) weight average; the run folder."""
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    precision = precision_for(device, settings.amp)
    if world.active and device.type == "cuda":  # torch's synchronised batch norm needs GPUs (documented)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    # pretrained layers (--init-from) learn slower, frozen ones not at all
    optimizer = torch.optim.AdamW(param_groups(model, settings.lr), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs, eta_min=settings.lr / 100)
    ema = None
    if settings.ema:  # validated, kept and packaged instead of the raw weights
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
    return _Run(
        model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, precision=precision,
        criterion=task.loss(train.targets, settings.n_outputs, settings.class_weighting),
        weights=sampler_weights(task, train.targets, settings.n_outputs, settings.class_weighting),
        metrics=["loss", *task.metrics(settings.n_outputs)],
    )  # fmt: skip


def sampler_weights(task: Task, targets: np.ndarray, n_outputs: int, class_weighting: str) -> np.ndarray | None:
    """Each training item's chance of being drawn with ``--class-weighting sampler`` (inverse class frequency, for
    categorical targets); None: drawn uniformly.

    >>> class Categories(Task):
    ...     discrete = True
    >>> sampler_weights(Categories(), np.array([0, 0, 0, 1]), 2, "sampler").tolist()
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333, 1.0]
    >>> sampler_weights(Categories(), np.array([0, 1]), 2, "loss") is None
    True
    """
    if not task.discrete or class_weighting != "sampler":
        return None
    counts = np.bincount(targets.astype(int), minlength=n_outputs).astype(np.float64)
    return 1.0 / counts[targets.astype(int)]


def _resume(run: _Run, path: Path, *, world: distributed.World, label: str) -> bool | None:
    """Load the checkpoint into ``run``; a finished fit returns whether it stopped early, else None."""
    state = load_checkpoint(path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.history, run.best = state["history"], state["best"]
    run.start_epoch, run.bad_epochs = int(state["epoch"]) + 1, int(state["bad_epochs"])
    torch.set_rng_state(state["rng"]["torch"])
    if state.get("finished"):
        return bool(state.get("stopped_early"))
    if int(state.get("world_size", 1)) != world.size:
        raise InputDataError(
            f"The checkpoint {path} was written by a run of {state.get('world_size', 1)} process(es); "
            f"this run has {world.size}. Each process's share of the batches depends on their number: resume "
            f"with {state.get('world_size', 1)} process(es), or run without --resume to train this fold anew."
        )
    LOGGER.info("%sresuming after epoch %d (%s)", label, run.start_epoch, path)
    return None


def _training_module(
    model: nn.Module, train: Volumes, settings: TrainSettings, *, device: torch.device, world: distributed.World,
    label: str, start_epoch: int,
) -> nn.Module:  # fmt: skip
    """What the training step runs, decided before the loop: the memory pre-flight (a step that cannot fit stops
    here, with what to do), the cohort resident on a GPU when it fits easily, DDP across ranks, ``torch.compile``."""
    first = train.batch(np.array([0]))[0]
    shape = tuple(first.shape[2:])
    needed = memory.check_fits(
        memory.footprint(model, shape, channels=int(first.shape[1])),
        batch_size=min(settings.batch_size, len(train.epoch_order(epoch=0, seed=0, weights=None))),
        world_size=world.size,
        available=memory.available_bytes(device, distributed.processes_on_node() if world.active else 1),
        device=device,
        what=f"{type(model).__name__} on inputs of {'x'.join(map(str, shape))} voxels",
    )
    LOGGER.info("%sa training step needs ~%.2f GB per process (estimated)", label, needed / memory.GB)
    if device.type == "cuda" and hasattr(train, "make_resident"):  # the cohort on the GPU when it fits easily
        budget = RESIDENT_SHARE * memory.available_bytes(device) - needed
        if train.make_resident(device, budget):
            LOGGER.info("%sthe %d training volumes stay on %s: batches are gathered there", label, len(train), device)
    trained = model
    if world.active:
        _check_world(world, len(train), settings.batch_size)
        distributed.check_same_start(_training_files(train), start_epoch, world)
        gpus = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=gpus)
    if settings.compile:
        trained = torch.compile(trained)  # type: ignore[assignment]
    return trained


def _train_epoch(
    run: _Run, trained: nn.Module, train: Volumes, settings: TrainSettings, *, epoch: int, task: Task,
    scale: TargetScale, device: torch.device, world: distributed.World, label: str,
) -> tuple[float, int, float]:  # fmt: skip
    """One epoch of optimiser steps: the summed loss (over every rank), the images seen here, the learning rate."""
    torch.manual_seed(derived_seed(settings.seed, epoch, 1))  # dropout of this epoch
    run.model.train()
    keep_frozen_norms(run.model)
    order = train.epoch_order(epoch=epoch, seed=settings.seed, weights=run.weights)
    progress = _Progress(f"{label}epoch {epoch + 1}/{settings.epochs}", len(order))
    precision, optimizer = run.precision, run.optimizer
    total, seen = 0.0, 0
    for chunk, mine, x, y in prefetch(_epoch_batches(train, order, settings, epoch, world, device),
                                      loader_threads(device)):  # fmt: skip
        x, y = to_device(x, device, precision), task.loss_targets(y, scale).to(device)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            loss = run.criterion(trained(x), y)
        if world.active:  # DDP averages the ranks' gradients: weigh each by its share of the batch
            loss = loss * (len(mine) * world.size / len(chunk))
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        total += float(loss.detach()) * len(chunk) / world.size
        seen += len(chunk)
        progress.update(seen, f"loss {total / seen:.3f}")
    progress.close()
    lr = optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    if world.active:
        total = distributed.reduce_sum([total], device)[0]
    return total, seen, lr


def _check_finite(
    total: float, *, epoch: int, lr: float, precision: Precision, label: str, run_dir: Path
) -> None:  # fmt: skip
    """A loss that is no longer a number stops training (every rank sees the same sum: all stop together)."""
    if not math.isfinite(total):
        raise TrainingDiverged(
            f"{label}epoch {epoch + 1}: the training loss became {total} (learning rate {lr:g}, "
            f"{precision.name} training steps); this epoch was not kept ({run_dir}: the checkpoint of the epoch "
            "before is). Train again without --resume with a lower --lr" + (" or --no-amp." if precision.enabled
            else ".")
        )  # fmt: skip


def _validate(
    run: _Run, val: Volumes, *, task: Task, device: torch.device, scale: TargetScale, run_dir: Path, epoch: int
) -> tuple[dict[str, float], dict[str, float]]:
    """The validation scores of this epoch's weights (``val_``-prefixed for the history, and as they are)."""
    outputs = predict(run.evaluated, val, task=task, device=device, scale=scale)  # fp32, as the package is used
    scores = {
        "loss": task.validation_loss(run.criterion, outputs, val.targets, scale),
        **task.validation_scores(outputs, val.targets),
    }
    task.after_validation(outputs, val, run_dir=run_dir, epoch=epoch + 1)
    return {f"val_{k}": v for k, v in scores.items()}, scores


def _select(
    run: _Run, scores: dict[str, float], settings: TrainSettings, *, task: Task, epoch: int, run_dir: Path,
    label: str = "",
) -> bool:
    """Keep the weights of each metric's best epoch (``best-<metric>.safetensors``); whether to stop early (no
    better selection metric for ``--patience`` epochs)."""
    improved_selection = False
    for metric in run.metrics:
        value = scores.get(metric)
        if value is None or not np.isfinite(value):
            continue
        previous = run.best.get(metric)
        larger_is_better = task.direction[metric]
        better = previous is None or (value > previous["value"] if larger_is_better else value < previous["value"])
        if better:
            run.best[metric] = {"value": float(value), "epoch": epoch + 1}
            save_weights(run.evaluated, run_dir / f"best-{metric}.safetensors")
            improved_selection |= metric == settings.selection_metric
    run.bad_epochs = 0 if improved_selection else run.bad_epochs + 1
    stop = run.bad_epochs >= settings.patience and epoch + 1 < settings.epochs
    if stop:
        LOGGER.info("%sno better %s for %d epochs: stopping early", label, settings.selection_metric, run.bad_epochs)
    return stop


def _report_epoch(
    run: _Run, row: dict[str, Any], scores: dict[str, float], settings: TrainSettings, *, writer: Any, label: str,
    epoch: int, outlook: dict[str, Any] | None, on_epoch_end: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """The epoch's log line (scores, time, ETA, where the score is heading), its TensorBoard scalars, and the
    caller's ``on_epoch_end``."""
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, epoch + 1)
    eta = np.mean([r["epoch_time_s"] for r in run.history]) * (settings.epochs - epoch - 1)
    LOGGER.info(
        "%sepoch %d/%d: train loss %.4f, %s, %.1f s; ETA %.0f s%s",
        label, epoch + 1, settings.epochs, row["train_loss"],
        ", ".join(f"val {k} {v:.4f}" for k, v in scores.items() if k in run.metrics),
        row["epoch_time_s"], eta, f"; {outlook['text']}" if outlook else "",
    )  # fmt: skip
    if on_epoch_end is not None:
        on_epoch_end(epoch + 1)


#: The share of a GPU's free memory (after the training step's) that may hold the training cohort.
RESIDENT_SHARE = 0.5
#: A batch's indices, this rank's share of them, its inputs and its targets.
Batch = tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]


def _epoch_batches(
    data: Any, order: np.ndarray, settings: TrainSettings, epoch: int, world: distributed.World, device: torch.device
) -> Iterator[Callable[[], Batch]]:
    """How to make each batch of an epoch: its indices, this rank's share, inputs and targets (pinned for a GPU).

    Everything random comes from the batch's seed, so batches made ahead, in any thread, are the batches of a
    plain loop.
    """

    def make(chunk: np.ndarray, mine: np.ndarray, seed: int) -> Batch:
        x, y = data.batch(mine, augment=settings.augment, seed=seed, strength=settings.augment_strength)
        if device.type == "cuda" and x.device.type == "cpu":  # page-locked: the copy overlaps the step before
            x, y = x.pin_memory(), y.pin_memory()
        return chunk, mine, x, y

    for batch_index, chunk in enumerate(batches(order, settings.batch_size)):
        if len(chunk) < world.size:  # a last batch too small to share: every rank skips it
            continue
        rank = (world.rank, world.size) if world.active else ()  # one process: the seeds it always had
        seed = derived_seed(settings.seed, epoch, 2, batch_index, *rank)
        yield functools.partial(make, chunk, distributed.share(chunk, world), seed)


def _check_world(world: distributed.World, n_train: int, batch_size: int) -> None:
    if n_train < world.size:
        raise UsageError(
            f"This distributed run has {world.size} processes but only {n_train} training image(s) in this fold: each "
            f"process needs a share of every batch. Start at most {n_train} processes (or one: a small cohort trains "
            "fast enough alone)."
        )
    if batch_size < world.size:
        raise UsageError(
            f"--batch-size {batch_size} is the batch of one optimiser step across all {world.size} processes: give at "
            f"least {world.size} (e.g. --batch-size {world.size * max(1, batch_size)}), or start fewer processes."
        )


def _training_files(data: Any) -> list[Path]:
    return [*data.paths, *getattr(data, "label_paths", [])]


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
