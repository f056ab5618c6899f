"""A whole-image task's prediction of one participant: the input contract, the ensemble's prediction, the
distribution check, attribution maps and the prediction record.

Attribution maps: gradient saliency (``|d score / d input|``) and Grad-CAM on the network's last
feature maps, where the score is the positive class's log-odds (binary), the predicted class's
logit (several classes) or the value (regression). Each fold's map is scaled to [0, 1] before the
folds and models are averaged, so every network counts equally.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from ....bids.audit import load_spatial
from ....derivatives import parse_bids_name
from ....errors import InputDataError
from ....reports.figures import attribution_overlay
from ... import ood
from ...channels import channel_files
from ...ensemble import LoadedModel, prediction_metadata
from ...ensemble import prediction_record as ensemble_record
from .base import WholeImage, whole_image


def check_input_image(record: dict[str, Any], path: Path, *, space: str | None = None) -> np.ndarray:
    """The model input array of ``path``, after checking its space, voxel size and shape against ``record``.

    ``space``: the image's template space (default: the ``space-`` entity of its file name).
    """
    path = Path(path)
    expected = record["input"]
    if space is None:
        space = parse_bids_name(path.name)[0].get("space")
    if space != expected["space"]:
        raise InputDataError(
            f"{path} is in space {space!r}; the model {record['name']} expects {expected['space']!r}. "
            "Preprocess the data with the bidsdl version and template the model was trained with."
        )
    img = load_spatial(path)
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    want = float(expected["resolution_mm"])
    if any(abs(z - want) > 1e-3 for z in zooms):
        raise InputDataError(
            f"{path} has voxels of {'x'.join(f'{z:g}' for z in zooms)} mm; the model {record['name']} expects "
            f"{want:g} mm. Run the participant level with --model-resolution {want:g} (in a new OUTPUT_DIR "
            "or after removing these derivatives)."
        )
    shape = tuple(int(s) for s in img.shape[:3])
    if list(shape) != list(expected["shape"]):
        raise InputDataError(
            f"{path} has shape {shape}; the model {record['name']} expects {tuple(expected['shape'])}. "
            "The template grid differs from training: preprocess with the bidsdl version the model was trained with."
        )
    return np.asarray(img.dataobj, dtype=np.float32)


def _unit(volume: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by its 99.9th percentile (a few extreme voxels do not rule)."""
    top = float(np.percentile(volume, 99.9))
    return np.clip(volume / top, 0, 1) if top > 0 else np.zeros_like(volume)


def explain(
    network: nn.Module, x: torch.Tensor, task: WholeImage
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One network's outputs, gradient saliency (the largest over the channels), Grad-CAM and the features the
    distribution check reads (the same maps, averaged over space) for one input ``(1, C, X, Y, Z)``."""
    layer = ood.feature_layer(network)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))
        return output.clone()  # later in-place operations must not touch what Grad-CAM reads

    handle = layer.register_forward_hook(keep)
    try:
        x = x.detach().clone().requires_grad_(True)
        network.zero_grad(set_to_none=True)
        outputs = network(x)
        task.attribution_score(outputs).sum().backward()
    finally:
        handle.remove()
    saliency = x.grad.detach().abs()[0].amax(dim=0).float().cpu().numpy()  # type: ignore[union-attr]
    activation, gradient = captured["activation"].detach(), captured["gradient"].detach()
    weights = gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam.float(), size=tuple(x.shape[-3:]), mode="trilinear", align_corners=False)
    features = ood.pooled(activation).double().cpu().numpy()
    return outputs.detach().float().cpu().numpy()[0], _unit(saliency), _unit(cam[0, 0].cpu().numpy()), features


@dataclass(frozen=True)
class Inference:
    """The ensemble's output for one image, each model's and each member's (every fold of every model), the
    averaged attribution maps and each model's folds' features."""

    output: np.ndarray  # class probabilities, or the regression value (length 1)
    per_model: list[np.ndarray]
    saliency: np.ndarray
    gradcam: np.ndarray
    per_fold: list[np.ndarray]
    features: list[list[np.ndarray]]


def infer(models: Sequence[LoadedModel], array: np.ndarray, device: str | torch.device = "cpu") -> Inference:
    """Predict one model-input array (``(X, Y, Z)`` or ``(C, X, Y, Z)``) with every fold of every model; average
    them."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(1, -1, *array.shape[-3:]).to(device)
    per_model, saliency, gradcam, per_fold, features = [], [], [], [], []
    for model in models:
        task = whole_image(model.task)
        fold_outputs, fold_features = [], []
        for fold, network in enumerate(model.networks):
            raw, sal, cam, feat = explain(network, x, task)
            fold_outputs.append(task.fold_output(raw, fold, model.record))
            fold_features.append(feat)
            saliency.append(sal)
            gradcam.append(cam)
        per_model.append(np.mean(fold_outputs, axis=0))
        per_fold += fold_outputs
        features.append(fold_features)
    return Inference(
        output=np.mean(per_model, axis=0),
        per_model=per_model,
        saliency=np.mean(saliency, axis=0).astype(np.float32),
        gradcam=np.mean(gradcam, axis=0).astype(np.float32),
        per_fold=per_fold,
        features=features,
    )


def prediction_record(
    models: Sequence[LoadedModel],
    result: Inference,
    *,
    source: str,
    participant_id: str,
    seen_in_training: Sequence[str],
    check: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-ready prediction of one image (:func:`pipeline.learn.ensemble.prediction_record`): the task's
    prediction fields, with its distribution check (``check``) and the ensemble's spread."""
    task = whole_image(models[0].task)
    return ensemble_record(models, source=source, participant_id=participant_id, seen=seen_in_training, check=check,
                           fields=task.prediction_fields([m.record for m in models], result.output, result.per_model),
                           uncertainty=task.uncertainty(result.per_fold))  # fmt: skip


def predict_image(
    spec: dict[str, Any], out_dir: Path, models: Sequence[LoadedModel], *, seen: Sequence[str], device: torch.device
) -> dict[str, str]:
    """A whole-image task's participant prediction: check the input, predict, write the attribution maps, the
    record and the figure into ``out_dir``."""
    space = json.loads(Path(spec["resampling_record"]).read_text()).get("SpatialReference")
    files = channel_files(models[0].record, spec["in_file"], spec.get("others", []))
    array = np.stack([check_input_image(models[0].record, Path(f), space=space) for f in files])
    result = infer(models, array, device)
    check = ood.check_image(models, result.features, spec.get("iqm"))
    record = prediction_record(
        models, result, source=spec["source"], participant_id=spec["participant_id"], seen_in_training=seen,
        check=check,
    )
    img = load_spatial(Path(spec["in_file"]))
    outputs = {}
    for key, volume in (("saliency", result.saliency), ("gradcam", result.gradcam)):
        out = nib.Nifti1Image(volume.astype(np.float32), img.affine)
        out.header.set_xyzt_units("mm")
        outputs[key] = str(out_dir / f"{key}.nii")
        nib.save(out, outputs[key])
    metadata = {
        **prediction_metadata(record),
        "Score": whole_image(models[0].task).attribution_score_name(len(models[0].record["classes"] or [])),
        "Scaling": "each fold's map divided by its 99.9th percentile and clipped to [0, 1], then averaged",
    }  # fmt: skip
    outputs["record"] = str(out_dir / "prediction.json")
    outputs["metadata"] = str(out_dir / "metadata.json")
    outputs["figure"] = str(out_dir / "attribution.png")
    Path(outputs["record"]).write_text(json.dumps(record, indent=2) + "\n")
    Path(outputs["metadata"]).write_text(json.dumps(metadata, indent=2) + "\n")
    mask = np.asarray(load_spatial(Path(spec["mask"])).dataobj) > 0
    maps = {"saliency": result.saliency, "Grad-CAM": result.gradcam}
    Path(outputs["figure"]).write_bytes(attribution_overlay(array[0], maps, mask=mask))
    return outputs
