"""Learned brain extraction with deepbet (Fisch et al., Computers in Biology and Medicine, 2024).

deepbet's wheel ships two TorchScript networks (a box finder on a 128³ copy of the image and a mask
network on the brain's box resized to 256³): nothing is downloaded. bidsdl wraps deepbet's own
steps (``BrainExtraction.run_model`` and ``postprocess``: threshold, largest component, filled
holes) on an RAS array it has already loaded, so the networks see what they were trained on, and
adds what a pipeline needs: the device, the threads, the networks loaded once per process, checks
on the input and the result that fail with a message, and a record of what ran (deepbet's version,
the networks' sha256).

deepbet is imported only where the networks run (:func:`load_extractor`): its wheel also installs a
GUI package and a top-level ``data`` folder, which bidsdl never imports. The networks are found
through the installed distribution's file list.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputDataError

#: The mask network's output above which a voxel is brain (deepbet's default).
THRESHOLD = 0.5
#: The networks in deepbet's wheel, by role.
NETWORKS = {"mask": "data/models/model.pt", "box": "data/models/bbox_model.pt"}
CITATION = (
    "Fisch L, Zumdick S, Barkhau C, et al. deepbet: Fast brain extraction of T1-weighted MRI using "
    "Convolutional Neural Networks. Computers in Biology and Medicine 179 (2024) 108845."
)


def deepbet_version() -> str:
    try:
        return metadata.version("deepbet")
    except metadata.PackageNotFoundError as exc:
        raise ModuleNotFoundError(
            "deepbet is not installed: bidsdl's brain extraction needs it (pip install deepbet)."
        ) from exc


@functools.lru_cache(maxsize=1)
def network_files() -> dict[str, Path]:
    """The TorchScript files of deepbet's networks, from the installed distribution."""
    distribution = metadata.distribution("deepbet")
    files = {}
    for role, relative in NETWORKS.items():
        path = Path(str(distribution.locate_file(relative)))
        if not path.is_file():
            raise FileNotFoundError(
                f"deepbet {deepbet_version()} is installed without its network {relative} (looked in {path}). "
                "Reinstall it: pip install --force-reinstall deepbet."
            )
        files[role] = path
    return files


@functools.lru_cache(maxsize=1)
def network_hashes() -> dict[str, str]:
    """sha256 of each network file: what a brain mask's sidecar records."""
    return {role: hashlib.sha256(path.read_bytes()).hexdigest() for role, path in network_files().items()}


def provenance() -> dict[str, Any]:
    """What every brain mask made by deepbet records about it."""
    return {
        "Software": "deepbet",
        "Version": deepbet_version(),
        "NetworkSHA256": network_hashes(),
        "Threshold": THRESHOLD,
        "Postprocessing": "largest connected component, holes filled (deepbet's own)",
        "Citation": CITATION,
    }


@functools.lru_cache(maxsize=2)
def load_extractor(device: str = "cpu") -> Any:
    """deepbet's ``BrainExtraction`` with both networks on ``device``, loaded once per process."""
    import torch
    from deepbet.bet import BrainExtraction  # here only: deepbet pulls torch and its own helpers

    files = network_files()
    extractor = BrainExtraction(no_gpu=True, model_path=str(files["mask"]), bbox_model_path=str(files["box"]))
    target = torch.device(device)
    extractor.model = extractor.model.to(target)
    extractor.bbox_model = extractor.bbox_model.to(target)
    return extractor


def extract_brain(data: np.ndarray, extractor: Any, *, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The brain mask (bool, same grid) of an RAS-oriented 3D T1w array, and a record.

    Raises :class:`~pipeline.errors.InputDataError` naming ``name`` when the image has nothing to find a
    brain in, or when the networks find none.
    """
    import torch

    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise InputDataError(f"{name}: brain extraction needs a 3D image, got shape {data.shape}.")
    finite = data[np.isfinite(data)]
    if finite.size == 0 or float(finite.max() - finite.min()) <= 0:
        raise InputDataError(f"{name}: the image is constant: there is no brain to extract. Check the file.")
    failed = (
        f"{name}: the brain extractor (deepbet) found no brain in this image. Is it a T1-weighted image of a head? "
        "Check it in a viewer; if it is not a brain T1w, exclude it (remove it, or list it in .bidsignore)."
    )
    try:
        with torch.inference_mode():
            probability = extractor.run_model(np.nan_to_num(data).copy())
        mask = extractor.postprocess(probability > THRESHOLD)
    except (AssertionError, ValueError) as exc:  # deepbet asserts on an empty box, argmax of an empty mask
        raise InputDataError(failed) from exc
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputDataError(failed)
    box = [[int(s.start), int(s.stop)] for s in extractor.bbox]
    return mask, {"BoundingBoxVoxels": box, "Voxels": int(mask.sum())}
