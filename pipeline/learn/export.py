"""Export a model package as one standalone network (the fold ensemble): TorchScript or ONNX.

The exported network takes the model input ``(batch, C, X, Y, Z)`` (``C``: the package's ``input.channels``;
float32, prepared as ``model.json`` says) and returns class probabilities or de-standardised values, exactly what
the package predicts. Every export is checked against the package before it is kept.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__, derivatives
from ..errors import UsageError
from ..kinds import package_channels
from .package import load_package
from .registry import get_task
from .task import TargetScale, Task, fold_scale

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
#: Largest allowed difference between the export's and the package's outputs.
TOLERANCE = 1e-4


class Ensemble(nn.Module):
    """The package's folds as one network: the mean of their outputs, post-processed by the task
    (:meth:`~pipeline.learn.task.Task.outputs`: the same path as evaluation and inference)."""

    def __init__(self, networks: list[nn.Module], task: Task, scales: list[TargetScale]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.task, self.scales = task, scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = zip(self.networks, self.scales, strict=True)
        outputs = [self.task.outputs(network(x), scale) for network, scale in pairs]
        return torch.stack(outputs).mean(0)


class SlicedAdaptiveAvgPool3d(nn.Module):
    """``AdaptiveAvgPool3d`` for one known input size, as slices and means (ONNX has no adaptive 3D pooling
    whose output does not divide its input). Bins as torch's: ``[floor(i n / o), ceil((i + 1) n / o))``."""

    def __init__(self, in_size: tuple[int, int, int], out_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.out_size = out_size
        self.bins = [
            [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)] for n, o in zip(in_size, out_size, strict=True)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = [
            x[:, :, a0:b0, a1:b1, a2:b2].mean(dim=(2, 3, 4))
            for a0, b0 in self.bins[0]
            for a1, b1 in self.bins[1]
            for a2, b2 in self.bins[2]
        ]
        return torch.stack(cells, dim=-1).reshape(x.shape[0], x.shape[1], *self.out_size)


def _exportable(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """``module`` with each adaptive 3D pooling replaced by its fixed-size equivalent for inputs like ``x``."""
    sizes: dict[str, tuple[int, int, int]] = {}
    handles = [
        m.register_forward_hook(lambda m, inputs, _o, name=name: sizes.__setitem__(name, tuple(inputs[0].shape[2:])))
        for name, m in module.named_modules()
        if isinstance(m, nn.AdaptiveAvgPool3d)
    ]
    with torch.no_grad():
        module(x)
    for handle in handles:
        handle.remove()
    for name, in_size in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        pool = getattr(parent, child)
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 3
        out_size = tuple(int(o or n) for o, n in zip(out, in_size, strict=True))
        setattr(parent, child, SlicedAdaptiveAvgPool3d(in_size, out_size))  # type: ignore[arg-type]
    return module


def package_ensemble(folder: Path) -> tuple[dict[str, Any], Ensemble]:
    record, networks = load_package(folder)
    task = get_task(record["task"])  # the entry point of export: the task resolved once, here
    ensemble = Ensemble(list(networks), task, [fold_scale(record, k) for k in range(len(networks))]).eval()
    return record, ensemble


def example_input(record: dict[str, Any], n: int = 2, seed: int = 0) -> torch.Tensor:
    """Inputs like the model's: its training mean image plus noise of the training residual SD."""
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(input_shape(record))
    return torch.randn((n, n_channels(record), *shape), generator=generator)


def n_channels(record: dict[str, Any]) -> int:
    """How many channels (image kinds) the model takes: one for packages that do not say."""
    return len(package_channels(record))


def input_shape(record: dict[str, Any]) -> list[int]:
    """The spatial shape an export takes: the whole model grid, or one window of a segmentation model (slide it
    over the grid as ``model.json``'s ``inference`` says)."""
    if "patch_size" in record:
        return [int(record["patch_size"])] * 3
    return [int(n) for n in record["input"]["shape"]]


def onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Outputs of an exported network (TorchScript through torch, ONNX through onnxruntime)."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return module(x).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def export_package(folder: Path, fmt: str, output: Path | None = None) -> dict[str, Any]:
    """Write the export and its JSON sidecar; check it against the package; return the sidecar."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if fmt == "onnx" and not onnx_available():
        raise UsageError(
            "ONNX export needs the packages onnx, onnxscript and onnxruntime, which are not installed here. "
            "Install them (pip install 'bidsdl[export]') or export with --format torchscript."
        )
    folder = Path(folder)
    record, ensemble = package_ensemble(folder)
    output = Path(output) if output else folder.parent / f"{folder.name}{SUFFIX[fmt]}"
    if output.resolve().is_relative_to(folder.resolve()):
        raise UsageError(
            f"--output {output} is inside the package {folder}; a package is never changed. Choose another path."
        )
    x = example_input(record)
    with torch.no_grad():
        expected = ensemble(x).numpy()
    with derivatives.atomic_path(output) as tmp:
        if fmt == "torchscript":
            traced = torch.jit.trace(ensemble, x[:1], check_trace=False)
            torch.jit.save(traced, str(tmp))
        else:
            torch.onnx.export(
                _exportable(ensemble, x[:1]),
                (x[:1],),
                str(tmp),
                input_names=["t1w"],
                output_names=["output"],
                dynamic_axes={"t1w": {0: "batch"}, "output": {0: "batch"}},
                dynamo=False,
            )
        got = run_exported(tmp, fmt, x)
        difference = float(np.abs(got - expected).max())
        if not difference <= TOLERANCE:
            raise UsageError(
                f"The {fmt} export of {folder} differs from the package by {difference:.2e} (> {TOLERANCE:g}); "
                "it was not kept. Report this with the package's model.json."
            )
    sidecar = {
        "Format": fmt,
        "Package": folder.name,
        "PackageContentSha256": record["content_sha256"],
        "ExportedBy": {"Name": "bidsdl", "Version": __version__, "torch": torch.__version__},
        "Input": {**record["input"],
                  "tensor": f"float32 (batch, {n_channels(record)}, {', '.join(map(str, input_shape(record)))})"},
        "SlidingWindow": record.get("inference"),
        "Output": ensemble.task.export_output,
        "Classes": record["classes"],
        "PositiveClass": record.get("positive_class"),
        "Threshold": record["threshold"],
        "Equivalence": {"max_abs_difference": difference, "tolerance": TOLERANCE, "inputs": int(x.shape[0])},
        "NotForClinicalUse": True,
    }
    derivatives.write_json(output.with_name(output.name + ".json"), sidecar)
    return {**sidecar, "path": str(output)}


def main_export(folder: Path, fmt: str, output: Path | None) -> int:
    result = export_package(folder, fmt, output)
    print(json.dumps({"exported": result["path"], "max_abs_difference": result["Equivalence"]["max_abs_difference"]}))
    return 0
