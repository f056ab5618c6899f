"""Participant-level segmentation of one T1w with segmentation model packages (the inference node's work).

The image is brought onto the model's grid from its bias-corrected T1w through the participant level's
affine (as in training), each fold of each model slides its window over it, the probabilities are
averaged, and the labels are written twice: on the model grid (template space) and in the T1w's own
grid (probabilities resampled through the inverse affine, then the argmax). Per structure: its volume
(ml) and a GIFTI surface in world millimetres with its area and enclosed volume.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ....bids.audit import load_spatial
from ....derivatives import bids_label
from ....errors import InputDataError
from ....ops.mesh import mask_surface, surface_summary, write_gifti
from ....reports.figures import attribution_overlay, mesh_views
from ....reports.learning import segmentation_preview
from ... import ood
from ...channels import channel_files
from ...ensemble import LoadedModel, prediction_metadata, prediction_record
from .data import predict_volume
from .grid import image_on_grid, map_to_native, model_grid, probabilities_to_native, read_transform
from .postprocess import postprocess, postprocessing_indices


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type = np.uint8) -> str:
    """``data`` as NIfTI (labels: uint8; maps: float32) with the affine as both qform and sform."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.to_filename(path)
    return str(path)


def _mesh_figure(surfaces: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Every structure's surface in one rendering from three sides (an empty picture when none)."""
    if not surfaces:
        surfaces = [(np.zeros((3, 3), np.float32), np.array([[0, 1, 2]], np.int32))]
    offsets = np.cumsum([0] + [len(v) for v, _ in surfaces[:-1]])
    vertices = np.concatenate([v for v, _ in surfaces])
    faces = np.concatenate([f + o for (_, f), o in zip(surfaces, offsets, strict=True)])
    return mesh_views(vertices, faces)


def check_models(models: Sequence[LoadedModel]) -> None:
    """An ensemble of segmentation models must share the labels and the grid."""
    first = models[0].record
    for model in models[1:]:
        for key in ("labels", "label_desc"):
            if model.record.get(key) != first.get(key):
                raise InputDataError(
                    f"--model {models[0].folder} and --model {model.folder} cannot form an ensemble: their {key} "
                    "differ. Give segmentation models trained on the same labels."
                )


def segment(
    models: Sequence[LoadedModel], array: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, list[np.ndarray], list[list[np.ndarray]]]:
    """Class probabilities ``(K, X, Y, Z)`` of the ensemble (the mean over folds and models), each model's, and each
    model's folds' features (the distribution check's, kept during the same windows' forward passes)."""
    per_model, features = [], []
    volume = array if array.ndim == 4 else array[None]
    for model in models:
        patch = int(model.record["patch_size"])
        folds, fold_features = [], []
        for network in model.networks:

            def run(x: torch.Tensor, network: torch.nn.Module = network) -> torch.Tensor:
                with torch.no_grad():
                    return network(x.to(device)).float().cpu()

            probabilities, found = ood.features_while(network, functools.partial(predict_volume, run, volume, patch))
            folds.append(probabilities.astype(np.float32))
            fold_features.append(found)
        per_model.append(np.mean(folds, axis=0))
        features.append(fold_features)
    return np.mean(per_model, axis=0), per_model, features


def entropy_map(probabilities: np.ndarray) -> np.ndarray:
    """Voxel-wise uncertainty of class probabilities ``(K, ...)``: their entropy divided by log K (0: one class is
    certain; 1: every class alike).

    >>> entropy_map(np.array([[1.0, 0.5], [0.0, 0.5]])).round(3).tolist()
    [0.0, 1.0]
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(0) / np.log(p.shape[0])).astype(np.float32)


def structure_uncertainty(labels: np.ndarray, uncertainty: np.ndarray, index: int) -> dict[str, float | None]:
    """The uncertainty within one predicted structure: its mean and the share of its voxels above 0.5 (None when the
    structure is absent)."""
    inside = uncertainty[labels == index]
    if not inside.size:
        return {"mean": None, "share_above_half": None}
    return {"mean": round(float(inside.mean()), 4), "share_above_half": round(float((inside > 0.5).mean()), 4)}


def segment_node(
    spec: dict[str, Any], out_dir: Path, models: Sequence[LoadedModel], *, seen: Sequence[str], device: Any
) -> dict[str, Any]:
    """Segment one image into ``out_dir``; returns the paths the interface hands to the sinks."""
    check_models(models)
    record = models[0].record
    labels = {int(entry["index"]): entry["name"] for entry in record["labels"]}
    grid, shape = model_grid(float(record["input"]["resolution_mm"]))
    if list(shape) != list(record["input"]["shape"]):
        raise InputDataError(
            f"The model {record['name']} expects a grid of shape {tuple(record['input']['shape'])}; this bidsdl "
            f"makes {shape} at {record['input']['resolution_mm']} mm. Use the bidsdl version the model was trained "
            "with."
        )
    transform = read_transform(Path(spec["transform"]))
    images = channel_files(record, spec["in_file"], spec.get("others", []))
    records = channel_files(record, spec["template_record"], spec.get("other_records", []))
    array = np.stack([
        image_on_grid(load_spatial(Path(image)), transform, grid, shape,
                      json.loads(Path(template).read_text())["IntensityNormalization"])
        for image, template in zip(images, records, strict=True)
    ])  # fmt: skip
    probabilities, _, features = segment(models, array, device)
    keep, rules = postprocessing_indices(record), record.get("postprocessing", {})  # chosen on validation
    grid_ml = float(record["input"]["resolution_mm"]) ** 3 / 1000
    on_grid = postprocess(probabilities.argmax(0).astype(np.uint8), rules, keep, grid_ml)
    raw = load_spatial(Path(spec["t1w"]))
    native_ml = float(np.prod(raw.header.get_zooms()[:3])) / 1000
    native = postprocess(probabilities_to_native(probabilities, grid, transform, raw.affine, raw.shape[:3]), rules,
                         keep, native_ml)  # fmt: skip
    uncertainty = map_to_native(entropy_map(probabilities), grid, transform, raw.affine, raw.shape[:3])
    outputs: dict[str, Any] = {
        "dseg": _save(native, raw.affine, out_dir / "dseg.nii"),
        "dseg_model": _save(on_grid, grid, out_dir / "dseg_model.nii"),
        "uncertainty": _save(uncertainty, raw.affine, out_dir / "uncertainty.nii", np.float32),
    }
    table = out_dir / "dseg.tsv"
    table.write_text("index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in sorted(labels.items())))
    outputs["table"] = str(table)
    structures, outputs["meshes"], surfaces = _structures(native, raw.affine, labels, out_dir)
    for entry in structures:
        entry["uncertainty"] = structure_uncertainty(native, uncertainty, entry["index"])
    check = ood.check_image(models, features, spec.get("iqm"))
    outputs.update(_write_records(spec, models, structures, out_dir, seen=seen, check=check))
    title = ", ".join(f"{s['name']} {s['volume_ml']:.1f} ml" for s in structures[:6])
    outputs["figure"] = str(out_dir / "segmentation.png")
    Path(outputs["figure"]).write_bytes(segmentation_preview(array[-1], None, on_grid, title=title))
    outputs["uncertainty_figure"] = str(out_dir / "uncertainty.png")
    Path(outputs["uncertainty_figure"]).write_bytes(
        attribution_overlay(array[-1], {"uncertainty (entropy / log K)": entropy_map(probabilities)})
    )
    outputs["mesh_figure"] = str(out_dir / "segmentation_mesh.png")
    Path(outputs["mesh_figure"]).write_bytes(_mesh_figure(surfaces))
    return outputs


def _structures(
    native: np.ndarray, affine: np.ndarray, labels: dict[int, str], out_dir: Path
) -> tuple[list[dict[str, Any]], list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """Per structure: its volume (ml) and a GIFTI surface in world millimetres (empty when none is predicted)."""
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000
    structures, meshes, surfaces = [], [], []
    for index, name in sorted(labels.items()):
        mask = native == index
        entry: dict[str, Any] = {"index": index, "name": name, "volume_ml": round(float(mask.sum()) * voxel_ml, 3)}
        path = out_dir / f"mesh_{bids_label(name)}.surf.gii"
        if mask.any():
            vertices, faces = mask_surface(mask, affine, step_size=1, sigma_mm=0.5)
            entry["surface"] = surface_summary(vertices, faces)
            surfaces.append((vertices, faces))
        else:
            vertices, faces = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
            entry["surface"] = None
        write_gifti(vertices, faces, path, description=f"Surface of the predicted {name} (marching cubes, level 0.5)")
        meshes.append(str(path))
        structures.append(entry)
    return structures, meshes, surfaces


def _write_records(
    spec: dict[str, Any], models: Sequence[LoadedModel], structures: list[dict[str, Any]], out_dir: Path, *,
    seen: Sequence[str], check: dict[str, Any],
) -> dict[str, str]:  # fmt: skip
    """The prediction record (``prediction.json``) and the labels' sidecar metadata."""
    record = models[0].record
    fields = {
        "label_desc": record["label_desc"],
        "predicted": "labels",
        "structures": structures,
        "volumes_ml": {s["name"]: s["volume_ml"] for s in structures},
        "absent_structures": [s["name"] for s in structures if s["surface"] is None],  # none predicted: look
    }
    uncertainty = {
        "map": "normalised entropy of the ensemble's class probabilities (entropy / log K: 0 certain, 1 every class "
        "alike), on the model grid, brought to the T1w's grid (linear)",
        "members": sum(len(m.networks) for m in models),
        "structures": {s["name"]: s["uncertainty"] for s in structures},
    }
    prediction = prediction_record(models, source=spec["source"], participant_id=spec["participant_id"], seen=seen,
                                   check=check, fields=fields, uncertainty=uncertainty)  # fmt: skip
    metadata = {
        **prediction_metadata(prediction),
        "Labels": record["labels"],
        "Method": "sliding-window softmax of every fold (mean), brought to this grid through the inverse of the "
        "participant level's affine (probabilities, linear), then the argmax; for the structures named in "
        "PostProcessing, only the largest connected component is kept",
        "PostProcessing": record.get("postprocessing", {}),
    }
    paths = {"record": str(out_dir / "prediction.json"), "metadata": str(out_dir / "metadata.json")}
    Path(paths["record"]).write_text(json.dumps(prediction, indent=2) + "\n")
    Path(paths["metadata"]).write_text(json.dumps(metadata, indent=2) + "\n")
    return paths
