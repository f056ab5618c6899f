"""Thin Nipype interfaces of a lesion mask given with a T1w: checked and made RAS; brought into template space
and drawn."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from ..bids.audit import load_spatial
from ..ops import lesions, resample
from ..ops.images import nib_to_sitk
from ..ops.template import load_template
from ..reports import figures
from .preprocess import _save, _write_json


class _PrepareLesionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the lesion mask (the T1w's grid)")
    in_t1w = File(exists=True, mandatory=True, desc="its T1w in BIDS_DIR")
    source = traits.Str(mandatory=True, desc="where the mask came from (a BIDS URI), for the sidecars")


class _PrepareLesionOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="the mask, RAS (as the prepared T1w), uint8")
    out_record = File(exists=True)


class PrepareLesionMask(SimpleInterface):
    """Check a lesion mask against its T1w's grid and reorient it as the T1w (:mod:`pipeline.ops.lesions`)."""

    input_spec = _PrepareLesionInputSpec
    output_spec = _PrepareLesionOutputSpec

    def _run_interface(self, runtime):
        mask_path, t1w_path = Path(self.inputs.in_file), Path(self.inputs.in_t1w)
        ras, record = lesions.prepare_lesion_mask(load_spatial(mask_path), load_spatial(t1w_path),
                                                  name=str(mask_path), t1w_name=t1w_path.name)  # fmt: skip
        cwd = Path(runtime.cwd)
        self._results["out_mask"] = _save(np.asanyarray(ras.dataobj), ras.affine, cwd / "lesion_ras.nii", np.uint8)
        record = {"Type": "Lesion", "Sources": [self.inputs.source], "VolumeMl": record["volume_ml"],
                  "Voxels": record["voxels"]}  # fmt: skip
        self._results["out_record"] = _write_json(record, cwd / "lesion.json")
        return runtime


class _LesionOutputsInputSpec(BaseInterfaceInputSpec):
    in_mask = File(exists=True, mandatory=True, desc="the RAS lesion mask")
    in_corrected = File(exists=True, mandatory=True, desc="the bias-corrected T1w")
    in_brain = File(exists=True, mandatory=True, desc="its brain mask")
    in_transform = File(exists=True, mandatory=True, desc="the T1w's registration (template points to T1w points)")


class _LesionOutputsOutputSpec(TraitedSpec):
    out_template = File(exists=True, desc="the lesion mask in template space, 1 mm (linear, > 0.5)")
    out_figure = File(exists=True, desc="the lesions drawn on the T1w")


class LesionOutputs(SimpleInterface):
    """The lesion mask in template space, and the lesions' outline on the bias-corrected T1w."""

    input_spec = _LesionOutputsInputSpec
    output_spec = _LesionOutputsOutputSpec

    def _run_interface(self, runtime):
        template = load_template(1)
        mask = nib.load(self.inputs.in_mask)
        transform = sitk.ReadTransform(self.inputs.in_transform)
        on_template = resample.resample(nib_to_sitk(mask), transform, template.affine, template.t1.shape) > 0.5
        corrected = nib.load(self.inputs.in_corrected)
        brain = np.asanyarray(nib.load(self.inputs.in_brain).dataobj) > 0
        lesion = np.asanyarray(mask.dataobj) > 0
        cwd = Path(runtime.cwd)
        self._results["out_template"] = _save(on_template, template.affine, cwd / "lesion_template.nii", np.uint8,
                                              code=4)  # fmt: skip
        png = figures.mosaic(np.asanyarray(corrected.dataobj, dtype=np.float32), lesion if lesion.any() else None,
                             window=brain, zooms=tuple(float(z) for z in corrected.header.get_zooms()[:3]))  # fmt: skip
        (cwd / "lesions.png").write_bytes(png)
        self._results["out_figure"] = str(cwd / "lesions.png")
        return runtime
