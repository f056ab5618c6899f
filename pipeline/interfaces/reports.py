"""Nipype interface drawing the preprocessing evidence (pure figures from :mod:`pipeline.reports.figures`)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec

from ..ops.template import load_template
from ..reports import figures


class _ReportletsInputSpec(BaseInterfaceInputSpec):
    in_raw = File(exists=True, mandatory=True, desc="prepared T1w (before N4)")
    in_corrected = File(exists=True, mandatory=True)
    in_bias = File(exists=True, mandatory=True)
    in_mask_t1w = File(exists=True, mandatory=True, desc="the extracted brain mask")
    in_template_mask_t1w = File(exists=True, mandatory=True, desc="the template's brain mask in T1w space")
    in_registered = File(exists=True, mandatory=True, desc="T1w in template space, 1 mm")
    in_mask_template = File(exists=True, mandatory=True, desc="the brain mask in template space, 1 mm")


class _ReportletsOutputSpec(TraitedSpec):
    out_mosaic = File(exists=True)
    out_brain = File(exists=True, desc="both brain masks over the T1w")
    out_registration_subject = File(exists=True)
    out_registration_template = File(exists=True)
    out_bias = File(exists=True)


class PlotReportlets(SimpleInterface):
    """Mosaic in template space with the brain-mask contour; both brain masks over the T1w; the
    registration flicker pair; N4 before/after and the field."""

    input_spec = _ReportletsInputSpec
    output_spec = _ReportletsOutputSpec

    def _run_interface(self, runtime):
        template = load_template(1)
        registered = np.asanyarray(nib.load(self.inputs.in_registered).dataobj, dtype=np.float32)
        load = lambda name: np.asanyarray(nib.load(getattr(self.inputs, name)).dataobj, dtype=np.float32)  # noqa: E731
        mask_t1w = load("in_mask_t1w") > 0
        corrected = nib.load(self.inputs.in_corrected)
        cwd = Path(runtime.cwd)
        outputs = {
            "out_mosaic": figures.mosaic(registered, load("in_mask_template") > 0),
            "out_brain": figures.mosaic(
                np.asanyarray(corrected.dataobj, dtype=np.float32),
                mask_t1w,
                second_contour=load("in_template_mask_t1w") > 0,
                zooms=tuple(float(z) for z in corrected.header.get_zooms()[:3]),
            ),
            "out_bias": figures.bias_panels(
                load("in_raw"), np.asanyarray(corrected.dataobj, dtype=np.float32), load("in_bias"), mask_t1w
            ),
        }
        outputs["out_registration_subject"], outputs["out_registration_template"] = figures.registration_pair(
            registered, template.t1, template.brain_mask
        )
        for key, png in outputs.items():
            path = cwd / f"{key[4:]}.png"
            path.write_bytes(png)
            self._results[key] = str(path)
        return runtime
