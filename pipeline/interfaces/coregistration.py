"""Thin Nipype interfaces of a co-registered image (FLAIR, T2w, PDw): align it to its T1w, measure the result."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from ..ops import coregistration, iqm, resample, tissues
from ..ops.images import nib_to_sitk
from ..reports import figures
from .preprocess import _save, _threads, _write_json


class _CoregisterInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the prepared image (RAS, its own grid)")
    in_reference = File(exists=True, mandatory=True, desc="the bias-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="the T1w's brain mask")
    in_lesion = File(exists=True, desc="a lesion mask on the T1w's grid, left out of the metric")
    reference_source = traits.Str(mandatory=True, desc="the T1w, relative to BIDS_DIR")
    pairing = traits.Str(mandatory=True, desc="why this T1w was chosen")
    seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _CoregisterOutputSpec(TraitedSpec):
    out_transform = File(exists=True, desc="ITK rigid: T1w points to the image's points")
    out_file = File(exists=True, desc="the image on the T1w grid (linear)")
    out_coverage = File(exists=True, desc="1 where the image's field of view covers the T1w grid")
    out_record = File(exists=True, desc="the run, its reference and the pairing (sidecar fields)")


class CoregisterToReference(SimpleInterface):
    """Rigid, brain-masked co-registration to the T1w (:func:`pipeline.ops.coregistration.coregister`)."""

    input_spec = _CoregisterInputSpec
    output_spec = _CoregisterOutputSpec

    def _run_interface(self, runtime):
        _threads(self.inputs.num_threads)
        reference = nib.load(self.inputs.in_reference)
        moving = nib_to_sitk(nib.load(self.inputs.in_file))
        lesion = nib_to_sitk(nib.load(self.inputs.in_lesion), np.uint8) if isdefined(self.inputs.in_lesion) else None
        transform, record = coregistration.coregister(
            nib_to_sitk(reference), nib_to_sitk(nib.load(self.inputs.in_mask), np.uint8), moving, exclude=lesion,
            seed=self.inputs.seed,
        )
        cwd = Path(runtime.cwd)
        sitk.WriteTransform(transform, str(cwd / "xfm.txt"))
        on_reference = resample.resample(moving, transform, reference.affine, reference.shape)
        ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
        ones.CopyInformation(moving)
        coverage = resample.resample(ones, transform, reference.affine, reference.shape,
                                     interpolation=sitk.sitkNearestNeighbor)  # fmt: skip
        self._results.update(
            out_transform=str(cwd / "xfm.txt"),
            out_file=_save(on_reference, reference.affine, cwd / "on_reference.nii"),
            out_coverage=_save(coverage > 0.5, reference.affine, cwd / "coverage.nii", np.uint8),
        )
        sidecar = {
            "Coregistration": record,
            "Reference": self.inputs.reference_source,
            "Pairing": self.inputs.pairing,
            "Sources": [f"bids:raw:{self.inputs.reference_source}"],
            "Convention": "ITK/ANTs: maps T1w points to this image's points; resamples this image onto the T1w "
            "(antsApplyTransforms -r <T1w> -t this file).",
        }
        self._results["out_record"] = _write_json(sidecar, cwd / "coregistration.json")
        return runtime


class _CoregQCInputSpec(BaseInterfaceInputSpec):
    in_raw = File(exists=True, mandatory=True, desc="the prepared image (its own grid, as acquired)")
    in_corrected = File(exists=True, mandatory=True, desc="the bias-corrected image on the T1w grid")
    in_coverage = File(exists=True, mandatory=True)
    in_reference = File(exists=True, mandatory=True, desc="the bias-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="the T1w's brain mask")
    in_audit = File(exists=True, mandatory=True)
    in_coregistration = File(exists=True, mandatory=True)
    in_prepare = File(exists=True, mandatory=True)


class _CoregQCOutputSpec(TraitedSpec):
    out_record = File(exists=True, desc="metrics and verdict (desc-iqm)")
    out_reference_figure = File(exists=True, desc="the T1w under its own edges")
    out_image_figure = File(exists=True, desc="the image on the T1w grid under the T1w's edges")


class CoregistrationQC(SimpleInterface):
    """The co-registered image's metrics (its contrast in the T1w's tissue classes, the co-registration's edge
    correlation and coverage), its verdict (:func:`pipeline.ops.iqm.assess_coregistered`) and the flicker pair."""

    input_spec = _CoregQCInputSpec
    output_spec = _CoregQCOutputSpec

    def _run_interface(self, runtime):
        load = lambda name, dtype=np.float32: np.asanyarray(nib.load(getattr(self.inputs, name)).dataobj, dtype=dtype)  # noqa: E731
        reference_img = nib.load(self.inputs.in_reference)
        reference = np.asanyarray(reference_img.dataobj, dtype=np.float32)
        brain = load("in_mask", np.uint8) > 0
        corrected = load("in_corrected")
        zooms = tuple(float(z) for z in reference_img.header.get_zooms()[:3])
        classes, _ = tissues.classify_tissues(reference, brain, voxel_volume_mm3=float(np.prod(zooms)))
        metrics = iqm.intensity_iqms(load("in_raw"), corrected, classes)
        metrics.update(coregistration.coregistration_metrics(reference, corrected, load("in_coverage"), brain,
                                                             float(np.mean(zooms))))  # fmt: skip
        coreg = json.loads(Path(self.inputs.in_coregistration).read_text())
        metrics["coregistration_mi"] = coreg["Coregistration"]["final_metric"]
        assessment = iqm.assess_coregistered(metrics)
        audit = json.loads(Path(self.inputs.in_audit).read_text())
        record = {
            "source": audit["source"],
            "Sources": audit["Sources"] + coreg["Sources"],
            "reference": coreg["Reference"],
            "pairing": coreg["Pairing"],
            "metrics": metrics,
            "flags": list(audit.get("flags", [])) + assessment["flags"],
            "qc": assessment,
            "preparation": json.loads(Path(self.inputs.in_prepare).read_text()),
        }
        cwd = Path(runtime.cwd)
        self._results["out_record"] = _write_json(record, cwd / "iqms.json")
        image_png, reference_png = figures.registration_pair(corrected, reference, brain)
        (cwd / "coreg_image.png").write_bytes(image_png)
        (cwd / "coreg_reference.png").write_bytes(reference_png)
        self._results.update(out_image_figure=str(cwd / "coreg_image.png"),
                             out_reference_figure=str(cwd / "coreg_reference.png"))  # fmt: skip
        return runtime
