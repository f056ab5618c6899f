"""Nipype interfaces over :mod:`pipeline.learn.infer` and :mod:`pipeline.ops.mesh` (thin: checks and I/O only)."""

from __future__ import annotations

import json
from pathlib import Path

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


class _RunInferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="model-resolution template-space T1w (the model input)")
    in_mask = File(exists=True, mandatory=True, desc="brain mask on the same grid (for the figure)")
    in_record = File(exists=True, mandatory=True, desc="the resampling record of in_file (its SpatialReference)")
    in_audit = File(exists=True, mandatory=True, desc="the image's audit record (voxel-data hash)")
    source = traits.Str(mandatory=True, desc="the T1w's path relative to BIDS_DIR")
    participant_id = traits.Str(mandatory=True)
    model_dirs = traits.List(traits.Str, mandatory=True, desc="model packages (an ensemble when several)")
    model_hashes = traits.List(traits.Str, mandatory=True, desc="their content hashes (re-run when they change)")
    allow_training_subjects = traits.Bool(False, usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


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
        import torch

        from ..errors import InputDataError
        from ..learn.infer import check_input_image, infer, load_models, prediction_record, training_matches
        from ..learn.train import resolve_device
        from ..reports.figures import attribution_overlay

        torch.set_num_threads(max(1, self.inputs.num_threads))
        device = resolve_device(self.inputs.device)
        models = load_models(self.inputs.model_dirs, device)
        hashes = [m.record["content_sha256"] for m in models]
        if hashes != list(self.inputs.model_hashes):
            raise InputDataError(f"The model packages changed while this run used them ({self.inputs.model_dirs}).")
        audit = json.loads(Path(self.inputs.in_audit).read_text())
        data_hashes = [audit.get("intensity", {}).get("data_sha256", "")]
        seen = training_matches([m.record for m in models], self.inputs.participant_id, data_hashes)
        if seen and not self.inputs.allow_training_subjects:
            raise InputDataError("; ".join(seen) + ". Refused: use --allow-training-subjects to predict it anyway.")
        space = json.loads(Path(self.inputs.in_record).read_text()).get("SpatialReference")
        array = check_input_image(models[0].record, Path(self.inputs.in_file), space=space)
        result = infer(models, array, device)
        record = prediction_record(
            models, result, source=self.inputs.source, participant_id=self.inputs.participant_id, seen_in_training=seen
        )
        cwd = Path(runtime.cwd)
        img = nib.load(self.inputs.in_file)
        for key, volume in (("out_saliency", result.saliency), ("out_gradcam", result.gradcam)):
            path = cwd / f"{key[4:]}.nii"
            out = nib.Nifti1Image(volume.astype(np.float32), img.affine)
            out.header.set_xyzt_units("mm")
            nib.save(out, str(path))
            self._results[key] = str(path)
        metadata = {
            "Models": record["models"],
            "EnsembleID": record["ensemble_id"],
            "SeenInTraining": record["seen_in_training"],
            "Score": "positive-class log-odds"
            if len(record.get("probabilities", {})) == 2
            else ("predicted class logit" if record["task"] == "classification" else "predicted value"),
            "Scaling": "each fold's map divided by its 99.9th percentile and clipped to [0, 1], then averaged",
        }
        (cwd / "prediction.json").write_text(json.dumps(record, indent=2) + "\n")
        (cwd / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        mask = np.asarray(nib.load(self.inputs.in_mask).dataobj) > 0
        png = attribution_overlay(array, {"saliency": result.saliency, "Grad-CAM": result.gradcam}, mask=mask)
        (cwd / "attribution.png").write_bytes(png)
        self._results.update(
            out_record=str(cwd / "prediction.json"),
            out_metadata=str(cwd / "metadata.json"),
            out_figure=str(cwd / "attribution.png"),
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
