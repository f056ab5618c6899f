"""Where and how training runs on this machine: the device (``--device``; a rank's own GPU), the precision of the
training steps, the seeds and deterministic kernels, and the threads that make batches ahead of the step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from ..errors import UsageError
from . import distributed

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def resolve_device(requested: str) -> torch.device:
    """The device ``--device`` names (``auto``: a GPU when torch sees one); in a distributed run, this rank's own."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for, but torch sees no CUDA GPU (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Use --device cpu, or run on a "
            "machine with a GPU (in a container: --gpus all / singularity --nv)."
        )
    world = distributed.current()
    if world.active:  # each rank its own GPU
        return distributed.device_for(world, requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def determinism_record(device: torch.device, amp: bool | None = False) -> dict[str, Any]:
    return {
        "device": str(device),
        "training_precision": precision_for(device, amp).name,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch_threads": torch.get_num_threads(),
        "bitwise_reproducible": device.type == "cpu",
    }


@dataclass
class Precision:
    """Autocast settings for a device; ``scaler`` only for fp16 on CUDA."""

    enabled: bool
    dtype: torch.dtype
    channels_last: bool
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)


    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32") if self.enabled else "fp32"


def precision_for(device: torch.device, amp: bool | None) -> Precision:
    """The training steps' precision. ``amp`` None (the default): bf16 autocast on CUDA GPUs with bf16, fp32
    elsewhere; True: mixed precision everywhere (fp16 with loss scaling on GPUs without bf16); False: fp32.

    CPUs stay fp32 by default even with bf16 units: measured on an AVX512-BF16 CPU, bf16 autocast made the
    default model's steps 2.7x faster but training no longer bit-for-bit reproducible (and a small
    batch-normalised model diverged to NaN), and CPU runs promise reproducibility (``--amp`` opts in).
    """
    if amp is None:
        amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not amp:
        return Precision(False, torch.float32, channels_last=False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(True, torch.bfloat16, channels_last=True)
        return Precision(True, torch.float16, channels_last=True, scaler=torch.amp.GradScaler("cuda"))
    return Precision(True, torch.bfloat16, channels_last=True)


def to_device(x: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if precision.channels_last else x


#: Batches read and augmented ahead of the training step, per loader thread.
PREFETCH_PER_THREAD = 2


def loader_threads(device: torch.device) -> int:
    """Threads preparing batches: one beside a CPU's training step (the step uses the cores), up to four
    feeding a GPU."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 1


def prefetch(makers: Iterable[Callable[[], T]], threads: int = 1) -> Iterator[T]:
    """The results of ``makers`` in order, made ahead (``PREFETCH_PER_THREAD`` per thread) by ``threads`` threads;
    an error in one is raised here, when its turn comes.

    >>> list(prefetch((lambda i=i: i * i for i in range(5)), threads=2))
    [0, 1, 4, 9, 16]
    """
    pending: collections.deque[concurrent.futures.Future[T]] = collections.deque()
    todo = iter(makers)
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="bidsdl-loader")
    try:
        for maker in itertools.islice(todo, PREFETCH_PER_THREAD * threads):
            pending.append(pool.submit(maker))
        while pending:
            result = pending.popleft().result()
            for maker in itertools.islice(todo, 1):
                pending.append(pool.submit(maker))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
