"""The model package: one self-describing folder that rebuilds and checks the model alone.

``model.json`` (architecture, input contract, labels, threshold, training subjects and image
hashes for the leakage guard, metrics, provenance) + ``fold-<k>.safetensors`` (never pickle) +
the effective config, environment, splits and training logs. ``content_sha256`` in
``model.json`` covers the record and, through their listed hashes, the weights; a package whose
files do not match it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .. import __version__, derivatives
from ..bids.audit import sha256_file
from ..errors import InputDataError
from .models import ModelConfig, build_model

#: The package formats this bidsdl reads, and what each changed (``model.json``'s ``format_version``). A package of
#: an older format is read with the fallbacks its readers keep (named here); a newer one is refused.
FORMAT_CHANGES: dict[int, str] = {
    1: "the first format",
    2: "'dataset' (the training dataset's identity: whose participant IDs the training subjects are) and each "
    "training subject's 'dataset'; the distribution check's calibration records the validation scores' 'mean' and "
    "'sd' (each fold's score joined by the Cauchy combination). Format 1 is read with participant IDs matched "
    "whatever their dataset (said in each match) and the folds' scores averaged, as it was calibrated",
}
FORMAT_VERSION = max(FORMAT_CHANGES)
MODEL_JSON = derivatives.STUDY_OUTPUTS["model_record"]


def content_hash(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``record`` without its own ``content_sha256``."""
    body = {k: v for k, v in record.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hardware_record() -> dict[str, Any]:
    """CPU model, GPU / driver / CUDA when present, and torch's build."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    record: dict[str, Any] = {
        "cpu_model": cpu,
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record["gpu"] = {
            "name": props.name,
            "memory_gb": round(props.total_memory / 1024**3, 1),
            "capability": f"{props.major}.{props.minor}",
            "driver": _nvidia_driver(),
        }
    return record


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("  ")[1].strip() or None
    except (OSError, IndexError):
        return None


def write_package(
    models_dir: Path,
    *,
    record: dict[str, Any],
    weights: dict[str, Path],
    files: dict[str, Path | str | dict[str, Any]],
) -> Path:
    """Assemble the package in a hidden folder, then rename it into place (atomic for readers).

    ``weights``: package file name -> trained weights; ``files``: package file name -> a file to
    copy, text, or a JSON-ready dict. Returns the package folder, named
    ``<target>_<architecture>_<first 8 of content_sha256>``.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        listed = []
        for name, source in sorted(weights.items()):
            shutil.copyfile(source, staging / name)
            listed.append({"file": name, "sha256": sha256_file(staging / name)})
        record = {**record, "format_version": FORMAT_VERSION, "bidsdl_version": __version__, "weights": listed}
        record["content_sha256"] = content_hash(record)
        for name, content in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                target.write_text(json.dumps(content, indent=2, default=derivatives._json_default) + "\n")
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_text(content)
        (staging / MODEL_JSON).write_text(json.dumps(record, indent=2, default=derivatives._json_default) + "\n")
        name = f"{record['target']}_{record['model']['architecture']}_{record['content_sha256'][:8]}"
        final = models_dir / name
        if final.exists():  # same content hash: an identical earlier package; replace it
            old = models_dir / f".old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin"})


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the length of its JSON header, then ``{``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return True  # missing: reported below as an incomplete package
    if len(head) < 9:
        return False
    return 2 <= int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def read_package(folder: Path) -> dict[str, Any]:
    """``model.json`` of a package, after checking that the folder is complete and untampered."""
    folder = Path(folder)
    path = folder / MODEL_JSON
    if not folder.is_dir():
        raise InputDataError(f"Model folder {folder} does not exist. Give the folder under OUTPUT_DIR/models/.")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not path.exists():
        hint = (
            f" It holds {', '.join(pickles)}: pickle checkpoints are refused (loading one can run arbitrary code); "
            "bidsdl loads only its own packages, whose weights are safetensors."
            if pickles
            else " Give a folder made by 'bidsdl ... group --target ...' (OUTPUT_DIR/models/<name>)."
        )
        raise InputDataError(f"{folder} is not a bidsdl model package: it has no {MODEL_JSON}.{hint}")
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise InputDataError(
            f"{path} is not valid JSON ({exc}); the package is damaged: re-train or re-copy it."
        ) from exc
    if record.get("format_version") not in FORMAT_CHANGES:
        raise InputDataError(
            f"{folder} was made by bidsdl {record.get('bidsdl_version', '?')} in package format "
            f"{record.get('format_version')!r}; this bidsdl ({__version__}) reads formats "
            f"{', '.join(map(str, FORMAT_CHANGES))}. Use the bidsdl version that made it, or re-train."
        )
    if record.get("content_sha256") != content_hash(record):
        raise InputDataError(f"{path} does not match its content_sha256: it was edited after training. Refused.")
    for entry in record.get("weights", []):
        weights = folder / entry["file"]
        if not entry["file"].endswith(".safetensors") or not _is_safetensors(weights):
            raise InputDataError(
                f"{weights} is not a safetensors file: only safetensors weights load; pickle checkpoints "
                "(.pt, .pth, .ckpt, .pkl) are refused because loading one can run arbitrary code."
            )
        if not weights.exists():
            raise InputDataError(f"{folder} is incomplete: {entry['file']} is missing. Re-copy the whole folder.")
        if sha256_file(weights) != entry["sha256"]:
            raise InputDataError(f"{weights} does not match the sha256 in {MODEL_JSON}: it was changed. Refused.")
    distribution = record.get("distribution")
    if distribution:  # the training features' description (:mod:`pipeline.learn.ood`)
        path = folder / distribution["file"]
        if not path.exists() or sha256_file(path) != distribution["sha256"]:
            raise InputDataError(f"{path} is missing or does not match the sha256 in {MODEL_JSON}. Re-copy the "
                                 "whole folder.")  # fmt: skip
    return record


def load_package(folder: Path, device: str | torch.device = "cpu") -> tuple[dict[str, Any], list[nn.Module]]:
    """The checked record and its networks (one per fold; the ensemble averages them), in eval mode."""
    record = read_package(folder)
    config = ModelConfig.from_dict(record["model"])
    networks: list[nn.Module] = []
    for entry in record["weights"]:
        network = build_model(config)
        network.load_state_dict(load_file(str(Path(folder) / entry["file"])))
        networks.append(network.to(device).eval())
    return record, networks
