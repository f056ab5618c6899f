"""Memory pre-flight: will a training step of this model, batch and input size fit on this device?

The estimate comes from one forward pass of a single item (no gradients): the bytes of every layer's
output (what backward keeps) per item, times :data:`ACTIVATION_FACTOR`, times the items per process,
plus the weights, their gradients and AdamW's two moments, plus the batch itself. Checked against
measured peak memory of training steps on CPU (conv5fc3 at 2 mm, batches 8 and 32; UNet on 64³ and 96³
patches; ResNet-18): within -3% to +35% (``benchmarks/train.py`` prints both). A run that cannot fit is
refused before training, naming a batch size that fits, rather than dying of out-of-memory an hour in.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError

#: Activation memory of a training step per item, relative to the forward pass's layer outputs.
ACTIVATION_FACTOR = 1.5
#: The share of a device's free memory a training step may plan to use.
HEADROOM = 0.9
GB = 1024**3


@dataclass(frozen=True)
class Footprint:
    per_item: float  # bytes per item of the batch (activations and the input)
    fixed: float  # bytes whatever the batch (weights, gradients, optimiser state)

    def bytes(self, items: int) -> float:
        return self.fixed + items * self.per_item

    def items_fitting(self, available: float) -> int:
        return max(0, math.floor((HEADROOM * available - self.fixed) / self.per_item))


def footprint(model: nn.Module, in_shape: tuple[int, ...], channels: int = 1) -> Footprint:
    """The training-step memory of ``model`` on ``(1, channels, *in_shape)`` inputs (one forward pass on the CPU)."""
    outputs: list[int] = []

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if torch.is_tensor(output):
            outputs.append(output.numel() * 4)  # float32 activations

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.to("cpu")(torch.zeros(1, channels, *in_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.to(device).train(was_training)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return Footprint(per_item=ACTIVATION_FACTOR * sum(outputs) + 4 * channels * math.prod(in_shape),
                     fixed=4.0 * weights)  # fmt: skip


def available_bytes(device: torch.device, processes_on_node: int = 1) -> float:
    """Free memory of ``device``: the GPU's free memory, or the CPU memory available to this process's share
    of the node (``MemAvailable`` and the cgroup's limit, divided among the node's training processes)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    available = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None:
        available = min(available, limit)
    return available / max(1, processes_on_node)


def _meminfo_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cgroup_room() -> float | None:
    """What a cgroup v2 memory limit leaves (a container's or a SLURM job's), or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return float(limit) - float((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def check_fits(
    print_: Footprint, *, batch_size: int, world_size: int, available: float, device: torch.device, what: str
) -> float:
    """The estimated bytes of one process's training step; a :class:`UsageError` naming a batch size that fits
    when it does not."""
    items = math.ceil(batch_size / world_size)
    needed = print_.bytes(items)
    if needed <= HEADROOM * available:
        return needed
    fitting = print_.items_fitting(available) * world_size
    advice = (
        f"--batch-size {fitting} fits (estimated)"
        if fitting >= max(2, world_size)
        else "not even a batch of 2 fits: use a smaller --patch-size (segmentation), a coarser --model-resolution, "
        "a smaller --architecture, or a device with more memory"
    )
    raise UsageError(
        f"Training {what} with --batch-size {batch_size} ({items} per process) needs about {needed / GB:.1f} GB "
        f"(estimated: {print_.per_item / GB:.2f} GB per item and {print_.fixed / GB:.2f} GB of weights, gradients "
        f"and optimiser state); {device} has {available / GB:.1f} GB free for it. {advice}."
    )
