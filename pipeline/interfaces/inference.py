"""Nipype interfaces over :mod:`pipeline.learn.infer` and :mod:`pipeline.ops.mesh` (thin: I/O only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..processes import run_module


class _ModelNodeInputSpec(BaseInterfaceInputSpec):
    """What every node that runs model packages on one image takes."""

    in_audit = File(exists=True, mandatory=True, desc="the image's audit record (voxel-data hash)")
    in_iqm = File(exists=True, desc="the image's quality metrics (the distribution check compares their ranges)")
    source = traits.Str(mandatory=True, desc="the T1w's path relative to BIDS_DIR")
    participant_id = traits.Str(mandatory=True)
    model_dirs = traits.List(traits.Str, mandatory=True, desc="model packages (an ensemble when several)")
    model_hashes = traits.List(traits.Str, mandatory=True, desc="their content hashes (re-run when they change)")
    allow_training_subjects = traits.Bool(False, usedefault=True)
    dataset = traits.Str("", usedefault=True, desc="the key of BIDS_DIR's dataset: participant IDs match the models' "
                         "training subjects only within it")
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    in_others = traits.List(File(exists=True), desc="the images of the model's other channels, in its channel order "
                            "(each aligned to this T1w; as in_file but of its kind)")
    in_other_records = traits.List(File(exists=True), desc="their template-space records (segmentation: their "
                                   "normalisation), in the same order")


def _common_spec(inputs: Any) -> dict[str, Any]:
    return {
        "others": list(inputs.in_others) if isdefined(inputs.in_others) else [],
        "other_records": list(inputs.in_other_records) if isdefined(inputs.in_other_records) else [],
        "audit": inputs.in_audit,
        "iqm": inputs.in_iqm if isdefined(inputs.in_iqm) else None,
        "source": inputs.source,
        "participant_id": inputs.participant_id,
        "model_dirs": list(inputs.model_dirs),
        "model_hashes": list(inputs.model_hashes),
        "allow_training_subjects": bool(inputs.allow_training_subjects),
        "dataset": str(inputs.dataset),
        "device": inputs.device,
        "num_threads": inputs.num_threads,
    }


class _RunInferenceInputSpec(_ModelNodeInputSpec):
    in_file = File(exists=True, mandatory=True, desc="model-resolution template-space T1w (the model input)")
    in_mask = File(exists=True, mandatory=True, desc="brain mask on the same grid (for the figure)")
    in_record = File(exists=True, mandatory=True, desc="the resampling record of in_file (its SpatialReference)")


class _RunInferenceOutputSpec(TraitedSpec):
    out_record = File(exists=True, desc="the prediction (JSON)")
    out_saliency = File(exists=True)
    out_gradcam = File(exists=True)
    out_metadata = File(exists=True, desc="sidecar fields of the maps: the models and the method")
    out_figure = File(exists=True, desc="the maps over the input (PNG)")


class RunInference(SimpleInterface):
    """Predict one image with the model packages; attribution maps as NIfTI on the input grid."""

    input_spec = _RunInferenceInputSpec
    output_spec = _RunInferenceOutputSpec

    def _run_interface(self, runtime):
        cwd = Path(runtime.cwd)
        spec = {
            **_common_spec(self.inputs),
            "in_file": self.inputs.in_file,
            "mask": self.inputs.in_mask,
            "resampling_record": self.inputs.in_record,
        }
        outputs = _run_node(spec, cwd)
        self._results.update(
            out_record=outputs["record"],
            out_saliency=outputs["saliency"],
            out_gradcam=outputs["gradcam"],
            out_metadata=outputs["metadata"],
            out_figure=outputs["figure"],
        )
        return runtime


def _run_node(spec: dict, cwd: Path) -> dict:
    """:func:`pipeline.learn.infer.run_node` on ``spec``, in a fresh interpreter (torch's thread pools do not survive
    the fork() that made this worker); its one-line error becomes this node's error."""
    return run_module("pipeline.learn.infer", spec, cwd)


class _RunSegmentationInputSpec(_ModelNodeInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the bias-corrected T1w (RAS)")
    in_transform = File(exists=True, mandatory=True, desc="the T1w-to-template affine")
    in_template_record = File(exists=True, mandatory=True, desc="the template-space T1w's record (normalisation)")
    in_t1w = File(exists=True, mandatory=True, desc="the T1w in BIDS_DIR (the grid of the native labels)")
    in_passed = File(exists=True, mandatory=True, desc="any output handed on only when quality control passed")


class _RunSegmentationOutputSpec(TraitedSpec):
    out_record = File(exists=True, desc="the prediction (JSON): volumes and surfaces per structure")
    out_dseg = File(exists=True, desc="the labels in the T1w's own grid")
    out_dseg_model = File(exists=True, desc="the labels on the model grid (template space)")
    out_table = File(exists=True, desc="the lookup table (index, name)")
    out_meshes = traits.List(File(exists=True), desc="one GIFTI surface per structure, in label order")
    out_metadata = File(exists=True, desc="sidecar fields: the models and the method")
    out_figure = File(exists=True, desc="the labels over the input (PNG)")
    out_mesh_figure = File(exists=True, desc="the structures' surfaces from three sides (PNG)")
    out_uncertainty = File(exists=True, desc="the voxel-wise uncertainty in the T1w's own grid")
    out_uncertainty_figure = File(exists=True, desc="the uncertainty over the input (PNG)")


class RunSegmentation(SimpleInterface):
    """Segment one image with segmentation model packages: labels in both grids, volumes and surfaces."""

    input_spec = _RunSegmentationInputSpec
    output_spec = _RunSegmentationOutputSpec

    def _run_interface(self, runtime):
        spec = {
            **_common_spec(self.inputs),
            "in_file": self.inputs.in_file,
            "transform": self.inputs.in_transform,
            "template_record": self.inputs.in_template_record,
            "t1w": self.inputs.in_t1w,
        }
        outputs = _run_node(spec, Path(runtime.cwd))
        self._results.update(
            out_record=outputs["record"],
            out_dseg=outputs["dseg"],
            out_dseg_model=outputs["dseg_model"],
            out_table=outputs["table"],
            out_meshes=outputs["meshes"],
            out_metadata=outputs["metadata"],
            out_figure=outputs["figure"],
            out_mesh_figure=outputs["mesh_figure"],
            out_uncertainty=outputs["uncertainty"],
            out_uncertainty_figure=outputs["uncertainty_figure"],
        )
        return runtime


class _MaskSurfaceInputSpec(BaseInterfaceInputSpec):
    in_mask = File(exists=True, mandatory=True, desc="brain mask (T1w space)")
    step_size = traits.Int(desc="marching-cubes step in voxels (default: ~2 mm)")


class _MaskSurfaceOutputSpec(TraitedSpec):
    out_surface = File(exists=True, desc="GIFTI surface")
    out_record = File(exists=True, desc="sidecar fields: area, volume, extent")
    out_figure = File(exists=True, desc="rendering (PNG)")


class MaskSurface(SimpleInterface):
    """The brain mask's surface as a GIFTI mesh, with its size and a rendering from three sides."""

    input_spec = _MaskSurfaceInputSpec
    output_spec = _MaskSurfaceOutputSpec

    def _run_interface(self, runtime):
        from ..ops.mesh import mask_surface, surface_summary, write_gifti
        from ..reports.figures import mesh_views

        img = nib.load(self.inputs.in_mask)
        step = self.inputs.step_size if isdefined(self.inputs.step_size) else None
        vertices, faces = mask_surface(np.asanyarray(img.dataobj), img.affine, step_size=step)
        cwd = Path(runtime.cwd)
        surface = write_gifti(vertices, faces, cwd / "mask.surf.gii")
        record = {
            "Description": "Surface of the brain mask in T1w space (world millimetres, RAS)",
            "Method": "marching cubes (scikit-image) at level 0.5 of the Gaussian-smoothed mask "
            "(sigma max(1 mm, 0.8 voxel); step ~2 mm)",
            "Surface": surface_summary(vertices, faces),
        }
        (cwd / "surface.json").write_text(json.dumps(record, indent=2) + "\n")
        (cwd / "mesh.png").write_bytes(mesh_views(vertices, faces))
        self._results.update(
            out_surface=str(surface), out_record=str(cwd / "surface.json"), out_figure=str(cwd / "mesh.png")
        )
        return runtime
