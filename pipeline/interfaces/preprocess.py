"""Thin Nipype interfaces over :mod:`pipeline.ops`: load, call a pure function, save in the node folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from ..bids.audit import load_spatial
from ..errors import QualityCheckFailed
from ..ops import bias, iqm, orient, registration, resample, tissues
from ..ops.images import nib_to_sitk, sitk_to_nib
from ..ops.template import TEMPLATE_SPACE, load_template, model_grid_description, resolution_label


def _threads(n: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(n)))


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type = np.float32, code: int = 1) -> str:
    """Save in the node folder, uncompressed (the derivatives writer compresses once).

    ``dtype=np.int16`` stores float data scaled (nibabel picks the slope): plenty for images people look at.
    """
    stored = np.uint8 if dtype is np.uint8 else np.float32
    img = nib.Nifti1Image(np.asarray(data, dtype=stored), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    img.to_filename(path)
    return str(path)


def _save_sitk(image: sitk.Image, path: Path, dtype: type = np.float32) -> str:
    nifti = sitk_to_nib(image)
    return _save(np.asanyarray(nifti.dataobj), nifti.affine, path, dtype)


def _write_json(data: dict, path: Path) -> str:
    path.write_text(json.dumps(data, indent=2, default=float))
    return str(path)


class _PrepareInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the T1w in BIDS_DIR")


class _PrepareOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="RAS, float32, finite")
    out_record = File(exists=True, desc="what was done (JSON)")


class PrepareT1w(SimpleInterface):
    """Reorient to RAS without resampling; clean non-finite voxels; refuse what is not 3D."""

    input_spec = _PrepareInputSpec
    output_spec = _PrepareOutputSpec

    def _run_interface(self, runtime):
        path = Path(self.inputs.in_file)
        prepared, record = orient.prepare_t1w(load_spatial(path), name=path.name)
        self._results["out_file"] = _save(
            np.asanyarray(prepared.dataobj), prepared.affine, Path(runtime.cwd) / "t1w_ras.nii"
        )
        self._results["out_record"] = _write_json(record, Path(runtime.cwd) / "prepare.json")
        return runtime


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    in_mask = File(exists=True, desc="brain mask on the same grid (the field is fitted inside it, grown)")
    num_threads = traits.Int(1, usedefault=True)


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected T1w")
    out_bias = File(exists=True, desc="multiplicative bias field")
    out_record = File(exists=True, desc="N4 parameters")


class N4BiasCorrection(SimpleInterface):
    """N4 bias-field correction (see :func:`pipeline.ops.bias.n4_correct`)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        _threads(self.inputs.num_threads)
        mask = nib_to_sitk(nib.load(self.inputs.in_mask), np.uint8) if isdefined(self.inputs.in_mask) else None
        corrected, field, fit = bias.n4_correct(nib_to_sitk(nib.load(self.inputs.in_file)), mask)
        cwd = Path(runtime.cwd)
        self._results.update(
            out_file=_save_sitk(corrected, cwd / "t1w_n4.nii", np.int16),
            out_bias=_save_sitk(field, cwd / "bias_field.nii", np.int16),
        )
        record = {"BiasFieldCorrection": {"Method": "N4 (SimpleITK)", **bias.N4_DEFAULTS, **fit}}
        self._results["out_record"] = _write_json(record, cwd / "n4.json")
        return runtime


class _ExtractBrainInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="prepared T1w (RAS)")
    source_name = traits.Str(mandatory=True, desc="the T1w's file name, for messages")
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    helper = traits.Str(nohash=True, desc="contact of the run's brain-extraction helper (else one of this process's)")


class _ExtractBrainOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8, T1w space)")
    out_record = File(exists=True, desc="what ran: deepbet's version, the networks' sha256, the volume")


class ExtractBrain(SimpleInterface):
    """Brain mask by deepbet (see :mod:`pipeline.ops.brain_extraction`), computed by the run's helper
    interpreter (:mod:`pipeline.interfaces.brain_service`), which loads the networks once."""

    input_spec = _ExtractBrainInputSpec
    output_spec = _ExtractBrainOutputSpec

    def _run_interface(self, runtime):
        from . import brain_service

        outputs = brain_service.extract(
            Path(self.inputs.in_file),
            Path(runtime.cwd),
            name=self.inputs.source_name,
            num_threads=self.inputs.num_threads,
            device=self.inputs.device,
            helper=self.inputs.helper if isdefined(self.inputs.helper) else None,
        )
        self._results.update(out_mask=outputs["mask"], out_record=outputs["record"])
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask (same grid)")
    in_lesion = File(exists=True, desc="a lesion mask (same grid), left out of the metric")
    seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    out_transform = File(exists=True, desc="ITK affine: template points to T1w points")
    out_record = File(exists=True)


class RegisterToTemplate(SimpleInterface):
    """Affine registration to the MNI152 template (see :mod:`pipeline.ops.registration`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        _threads(self.inputs.num_threads)
        template = load_template(2)
        transform, record = registration.register_to_template(
            nib_to_sitk(nib.load(self.inputs.in_file)),
            nib_to_sitk(nib.load(self.inputs.in_mask), np.uint8),
            resample.array_to_sitk(template.t1, template.affine),
            template.brain_mask,
            template.affine,
            seed=self.inputs.seed,
            lesion_mask=nib_to_sitk(nib.load(self.inputs.in_lesion), np.uint8) if isdefined(self.inputs.in_lesion)
            else None,
        )  # fmt: skip
        cwd = Path(runtime.cwd)
        sitk.WriteTransform(transform, str(cwd / "xfm.txt"))
        self._results["out_transform"] = str(cwd / "xfm.txt")
        sidecar = {
            "Registration": record,
            "Template": TEMPLATE_SPACE,
            "Convention": "ITK/ANTs: maps template points to T1w points; resamples the T1w into the template "
            "(antsApplyTransforms -r template -t this file).",
        }
        self._results["out_record"] = _write_json(sidecar, cwd / "registration.json")
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask (T1w space)")
    in_transform = File(exists=True, mandatory=True)
    model_resolution = traits.Float(2.0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _ResampleOutputSpec(TraitedSpec):
    out_t1w = File(exists=True, desc="template space, 1 mm, normalised")
    out_mask = File(exists=True, desc="the brain mask in template space, 1 mm")
    out_t1w_model = File(exists=True, desc="template space, model grid, normalised")
    out_mask_model = File(exists=True, desc="the brain mask on the model grid")
    out_template_mask_t1w = File(exists=True, desc="the template's brain mask brought into T1w space")
    out_record = File(exists=True, desc="sidecar fields of the template-space T1w")
    out_record_model = File(exists=True, desc="sidecar fields of the model-grid T1w")


class ResampleToTemplate(SimpleInterface):
    """Template-space images at 1 mm and on the model grid with the brain mask, and the template's
    brain mask in T1w space (a second opinion on the brain mask)."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        _threads(self.inputs.num_threads)
        template = load_template(1)
        subject = nib.load(self.inputs.in_file)
        mask = nib.load(self.inputs.in_mask)
        transform = sitk.ReadTransform(self.inputs.in_transform)
        out = resample.template_space_outputs(
            nib_to_sitk(subject),
            nib_to_sitk(mask),
            transform,
            template_t1=template.t1,
            template_mask=template.brain_mask,
            template_affine=template.affine,
            model_resolution=self.inputs.model_resolution,
        )
        template_mask_t1w = resample.to_subject(
            template.brain_mask, template.affine, transform, subject.affine, subject.shape
        )
        cwd = Path(runtime.cwd)
        self._results.update(
            out_t1w=_save(out["t1w_1mm"], out["affine_1mm"], cwd / "t1w_template.nii", np.int16, code=4),
            out_mask=_save(out["mask_1mm"], out["affine_1mm"], cwd / "mask_template.nii", np.uint8, code=4),
            out_t1w_model=_save(out["t1w_model"], out["affine_model"], cwd / "t1w_model.nii", code=4),
            out_mask_model=_save(out["mask_model"], out["affine_model"], cwd / "mask_model.nii", np.uint8, code=4),
            out_template_mask_t1w=_save(template_mask_t1w > 0.5, subject.affine, cwd / "template_mask_t1w.nii",
                                        np.uint8),
        )  # fmt: skip
        resolution = self.inputs.model_resolution
        common = {
            "SpatialReference": TEMPLATE_SPACE,
            "SkullStripped": False,
            "Interpolation": "linear",
            "IntensityNormalization": out["normalisation"],
        }
        self._results["out_record"] = _write_json(
            {**common, "Resolution": "1 mm isotropic (template grid)"}, cwd / "template.json"
        )
        model = {
            **common,
            "Resolution": model_grid_description(resolution),
            "res": resolution_label(resolution),
            "Shape": list(out["t1w_model"].shape),
            "Affine": out["affine_model"].tolist(),
        }
        self._results["out_record_model"] = _write_json(model, cwd / "model.json")
        return runtime


class _IQMInputSpec(BaseInterfaceInputSpec):
    in_raw = File(exists=True, mandatory=True, desc="prepared T1w (RAS, before N4)")
    in_corrected = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    in_bias = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True, desc="the extracted brain mask (T1w space)")
    in_template_mask = File(exists=True, mandatory=True, desc="the template's brain mask in T1w space")
    in_transform = File(exists=True, mandatory=True, desc="the registration (template to T1w points)")
    in_registered = File(exists=True, mandatory=True, desc="T1w in template space, 1 mm")
    in_audit = File(exists=True, mandatory=True)
    in_registration = File(exists=True, mandatory=True)
    in_brain = File(exists=True, mandatory=True, desc="the brain-extraction record")
    in_prepare = File(exists=True, mandatory=True)
    in_warp = File(exists=True, desc="the nonlinear registration's record (its quality joins the metrics)")


class _IQMOutputSpec(TraitedSpec):
    out_record = File(exists=True)


class ComputeIQMs(SimpleInterface):
    """Image quality metrics (GM/WM from the subject's own tissue classes inside its brain mask) and
    the quality verdict (:func:`pipeline.ops.iqm.assess`)."""

    input_spec = _IQMInputSpec
    output_spec = _IQMOutputSpec

    def _run_interface(self, runtime):
        template = load_template(1)
        raw = nib.load(self.inputs.in_raw)
        load = lambda name, dtype=np.float32: np.asanyarray(nib.load(getattr(self.inputs, name)).dataobj, dtype=dtype)  # noqa: E731
        corrected = load("in_corrected")
        brain = load("in_mask", np.uint8) > 0
        zooms = tuple(float(z) for z in raw.header.get_zooms()[:3])
        classes, tissue_record = tissues.classify_tissues(corrected, brain, voxel_volume_mm3=float(np.prod(zooms)))
        metrics = iqm.compute_iqms(
            raw=np.asanyarray(raw.dataobj, dtype=np.float32),
            corrected=corrected,
            bias_field=load("in_bias"),
            brain=brain,
            template_brain_t1w=load("in_template_mask", np.uint8) > 0,
            template_wm_t1w=resample.to_subject(
                template.wm, template.affine, sitk.ReadTransform(self.inputs.in_transform), raw.affine, raw.shape
            )
            > 0.5,
            tissues=classes,
            tissue_volumes_ml={name: c["volume_ml"] for name, c in tissue_record["classes"].items()},
            zooms=zooms,
            registered=load("in_registered"),
            template=template.t1,
            template_brain=template.brain_mask,
        )
        audit = json.loads(Path(self.inputs.in_audit).read_text())
        registration_record = json.loads(Path(self.inputs.in_registration).read_text())["Registration"]
        metrics["registration_mi"] = registration_record["final_metric"]
        if isdefined(self.inputs.in_warp):
            quality = json.loads(Path(self.inputs.in_warp).read_text())["Quality"]
            metrics.update({k: v for k, v in quality.items() if k != "warp_logjac_range"})
        assessment = iqm.assess(metrics)
        record = {
            "source": audit["source"],
            "Sources": audit["Sources"],
            "metrics": metrics,
            "flags": list(audit.get("flags", [])) + assessment["flags"],
            "qc": assessment,
            "tissues": tissue_record,
            "brain_extraction": json.loads(Path(self.inputs.in_brain).read_text()),
            "preparation": json.loads(Path(self.inputs.in_prepare).read_text()),
        }
        self._results["out_record"] = _write_json(record, Path(runtime.cwd) / "iqms.json")
        return runtime


class _QualityGateInputSpec(BaseInterfaceInputSpec):
    in_record = File(exists=True, mandatory=True, desc="the IQM record with its verdict")
    in_file = File(exists=True, mandatory=True, desc="what passes on when the image passed")


class _QualityGateOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class QualityGate(SimpleInterface):
    """Fail the image (and so its participant) when its quality verdict is ``fail``; else hand
    ``in_file`` on, so that nothing downstream (a prediction) is made from a failed image."""

    input_spec = _QualityGateInputSpec
    output_spec = _QualityGateOutputSpec

    def _run_interface(self, runtime):
        record = json.loads(Path(self.inputs.in_record).read_text())
        if record["qc"]["verdict"] == "fail":
            raise QualityCheckFailed(iqm.failure_message(record["source"], record["qc"]))
        self._results["out_file"] = self.inputs.in_file
        return runtime
