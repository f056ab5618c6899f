"""Thin Nipype interfaces of the nonlinear registration (:mod:`pipeline.ops.warp`) and the morphometry after it
(:mod:`pipeline.ops.morphometry`)."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from ..ops import iqm, morphometry, resample, warp
from ..ops.images import array_to_sitk, nib_to_sitk, sitk_affine
from ..ops.template import TEMPLATE_SPACE, cropped_grid, load_template, model_grid_description, resolution_label
from .preprocess import _save, _threads, _write_json


class _WarpInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask (same grid)")
    in_transform = File(exists=True, mandatory=True, desc="the affine (template points to T1w points)")
    in_lesion = File(exists=True, desc="a lesion mask (same grid), left out of the metric")
    resolution = traits.Int(2, usedefault=True, desc="the warp field's grid (mm): 2, 3 or 4")
    seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _WarpOutputSpec(TraitedSpec):
    out_transform = File(exists=True, desc="ITK composite (.h5): template points to T1w points (affine + warp)")
    out_inverse = File(exists=True, desc="ITK composite (.h5): T1w points to template points")
    out_record = File(exists=True, desc="the run and the warp's quality metrics")


class WarpToTemplate(SimpleInterface):
    """ANTs SyN from the affine (:func:`pipeline.ops.warp.syn_register`), its inverse and its quality."""

    input_spec = _WarpInputSpec
    output_spec = _WarpOutputSpec

    def _run_interface(self, runtime):
        _threads(self.inputs.num_threads)
        corrected = nib_to_sitk(nib.load(self.inputs.in_file))
        mask_img = nib.load(self.inputs.in_mask)
        mask = nib_to_sitk(mask_img, np.uint8)
        brain = sitk.Cast(corrected, sitk.sitkFloat32) * sitk.Cast(mask > 0, sitk.sitkFloat32)
        affine = sitk.ReadTransform(self.inputs.in_transform)
        template = load_template(self.inputs.resolution)
        moving_mask = None
        if isdefined(self.inputs.in_lesion):
            lesion = nib_to_sitk(nib.load(self.inputs.in_lesion), np.uint8)
            moving_mask = sitk.Cast((mask > 0) * (lesion == 0), sitk.sitkUInt8)
        composite, field, record = warp.syn_register(
            brain, array_to_sitk(template.t1, template.affine), affine, seed=self.inputs.seed,
            threads=self.inputs.num_threads, settings=warp.WarpSettings(resolution_mm=float(self.inputs.resolution)),
            moving_mask=moving_mask,
        )  # fmt: skip
        inverse = warp.inverse_composite(affine, field)
        # the template brain's overlap with the T1w's brain mask, through the affine and through the warp
        brain_float = sitk.Cast(mask, sitk.sitkFloat32)
        through = {name: resample.resample(brain_float, transform, template.affine, template.t1.shape) > 0.5
                   for name, transform in (("affine", affine), ("warp", composite))}  # fmt: skip
        dices = {name: iqm.dice(moved, template.brain_mask) for name, moved in through.items()}
        quality = warp.warp_quality(field, template.brain_mask, dice_affine=dices["affine"], dice_warp=dices["warp"])
        cwd = Path(runtime.cwd)
        sitk.WriteTransform(composite, str(cwd / "xfm.h5"))
        sitk.WriteTransform(inverse, str(cwd / "inverse_xfm.h5"))
        self._results.update(out_transform=str(cwd / "xfm.h5"), out_inverse=str(cwd / "inverse_xfm.h5"))
        sidecar = {
            "Registration": record,
            "Template": TEMPLATE_SPACE,
            "Quality": quality,
            "Convention": "ITK/ANTs composite: the affine of from-T1w_to-<template>_mode-image_xfm.txt, then the "
            "displacement field; maps template points to T1w points, so it resamples the T1w into the template "
            "(antsApplyTransforms -r template -t this file). The from-<template>_to-T1w file is its inverse.",
        }
        self._results["out_record"] = _write_json(sidecar, cwd / "warp.json")
        return runtime


class _MorphometryInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask")
    in_transform = File(exists=True, mandatory=True, desc="composite: template points to T1w points")
    in_inverse = File(exists=True, mandatory=True, desc="composite: T1w points to template points")
    model_resolution = traits.Float(2.0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _MorphometryOutputSpec(TraitedSpec):
    out_t1w_template = File(exists=True, desc="the T1w in template space through the warp (1 mm), normalised")
    out_probseg = traits.Dict(desc="tissue label (GM, WM, CSF) -> its posterior map on the T1w grid")
    out_modulated = traits.Dict(desc="tissue label -> its modulated map on the model grid")
    out_logjacobian = File(exists=True, desc="log det J of the template-to-T1w mapping, on the model grid")
    out_volumes = File(exists=True, desc="regional volumes (TSV)")
    out_record = File(exists=True, desc="the tissue fit, the tissue volumes, the atlas")
    out_record_template = File(exists=True, desc="sidecar fields of the 1 mm template-space T1w")
    out_record_model = File(exists=True, desc="sidecar fields of the model-grid maps")


class Morphometry(SimpleInterface):
    """Tissue maps on the T1w grid (template priors through the warp), modulated maps and the log-Jacobian on the
    model grid, the warped T1w and the atlas's regional volumes (:mod:`pipeline.ops.morphometry`)."""

    input_spec = _MorphometryInputSpec
    output_spec = _MorphometryOutputSpec

    def _run_interface(self, runtime):
        _threads(self.inputs.num_threads)
        cwd = Path(runtime.cwd)
        template = load_template(1)
        subject = nib.load(self.inputs.in_file)
        forward = sitk.ReadTransform(self.inputs.in_transform)
        posteriors, fit = _tissues(subject, nib.load(self.inputs.in_mask), sitk.ReadTransform(self.inputs.in_inverse))
        self._results["out_probseg"] = {
            morphometry.TISSUE_LABELS[c]: _save(p, subject.affine, cwd / f"probseg_{c}.nii", np.int16)
            for c, p in posteriors.items()
        }  # fmt: skip
        # the Jacobian determinant of the whole mapping (affine and warp), on the warp's grid
        field = sitk.DisplacementFieldTransform(forward.GetNthTransform(1)).GetDisplacementField()
        det = warp.jacobian_determinant(field, warp.affine_matrix(forward.GetNthTransform(0)))
        det_image = array_to_sitk(np.maximum(det, 1e-6), sitk_affine(field))
        model_affine, model_shape = cropped_grid(template.brain_mask, template.affine, self.inputs.model_resolution)
        logjac, modulated = _model_grid_maps(posteriors, subject.affine, forward, det_image, model_affine, model_shape)
        self._results["out_modulated"] = {
            morphometry.TISSUE_LABELS[c]: _save(m, model_affine, cwd / f"modulated_{c}.nii", np.int16, code=4)
            for c, m in modulated.items()
        }  # fmt: skip
        self._results["out_logjacobian"] = _save(logjac, model_affine, cwd / "logjacobian.nii", code=4)
        # the warped T1w (1 mm), normalised inside the template's brain mask: after the warp it is the T1w's brain
        warped = resample.resample(nib_to_sitk(subject), forward, template.affine, template.t1.shape)
        warped, normalisation = resample.robust_normalize(warped, template.brain_mask)
        normalisation["mask"] = "the template's brain mask (the T1w's brain after the nonlinear registration)"
        self._results["out_t1w_template"] = _save(warped, template.affine, cwd / "t1w_warped.nii", np.int16, code=4)
        atlas = morphometry.default_atlas()
        rows = _regional_volumes(atlas, det_image, subject, forward)
        tissue_ml = morphometry.tissue_volumes_ml(posteriors, float(np.prod(subject.header.get_zooms()[:3])))
        self._results["out_volumes"] = _write_volumes(rows, tissue_ml, cwd / "volumes.tsv")
        record = {
            "TissueSegmentation": fit,
            "TissueVolumes": tissue_ml,
            "Atlas": {"Name": atlas.name, "Description": atlas.description, "Citation": atlas.citation,
                      "Licence": atlas.licence, "Regions": len(rows)},
            "RegionsNotMeasured": [r["region"] for r in rows if not np.isfinite(r["volume_ml"])],
            "MinRegionCoverage": morphometry.MIN_REGION_COVERAGE,
        }  # fmt: skip
        self._results["out_record"] = _write_json(record, cwd / "morphometry.json")
        self._results["out_record_template"] = _write_json(
            {"SpatialReference": TEMPLATE_SPACE, "SkullStripped": False, "Interpolation": "linear",
             "Resolution": "1 mm isotropic (template grid)", "IntensityNormalization": normalisation},
            cwd / "template.json")  # fmt: skip
        resolution = self.inputs.model_resolution
        self._results["out_record_model"] = _write_json(
            {"SpatialReference": TEMPLATE_SPACE, "Resolution": model_grid_description(resolution),
             "res": resolution_label(resolution), "Shape": list(model_shape), "Affine": model_affine.tolist()},
            cwd / "model.json")  # fmt: skip
        return runtime


def _tissues(subject: nib.Nifti1Image, mask: nib.Nifti1Image, inverse: sitk.Transform
             ) -> tuple[dict[str, np.ndarray], dict]:  # fmt: skip
    """Tissue posteriors on the T1w grid, with the template's maps (smooth: its 2 mm grid) brought there through the
    inverse of the nonlinear registration as priors."""
    priors, priors_affine = _template_priors()
    on_subject = dict(zip(priors, resample.resample_maps(list(priors.values()), priors_affine, inverse,
                                                         subject.affine, subject.shape), strict=True))  # fmt: skip
    corrected = np.asanyarray(subject.dataobj, dtype=np.float32)
    return morphometry.segment_with_priors(corrected, np.asanyarray(mask.dataobj) > 0, on_subject)


def _model_grid_maps(posteriors: dict[str, np.ndarray], subject_affine: np.ndarray, forward: sitk.Transform,
                     det_image: sitk.Image, model_affine: np.ndarray, model_shape: tuple[int, int, int]
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """The log-Jacobian and the modulated tissue maps on the model grid (0 beyond the warp's grid)."""
    identity = sitk.Transform(3, sitk.sitkIdentity)
    det_model = resample.resample(det_image, identity, model_affine, model_shape)
    inside = det_model > 0
    logjac = np.where(inside, np.log(np.maximum(det_model, 1e-6)), 0.0).astype(np.float32)
    moved = resample.resample_maps(list(posteriors.values()), subject_affine, forward, model_affine, model_shape)
    return logjac, {c: m * np.where(inside, det_model, 0.0) for c, m in zip(posteriors, moved, strict=True)}


def _regional_volumes(atlas: morphometry.Atlas, det_image: sitk.Image, subject: nib.Nifti1Image,
                      forward: sitk.Transform) -> list[dict]:  # fmt: skip
    """The Jacobian determinant integrated over each atlas region, with the share of it in the field of view (on the
    warp's grid: coarse enough for a 90% coverage rule)."""
    labels, atlas_affine = atlas.load()
    identity = sitk.Transform(3, sitk.sitkIdentity)
    det_atlas = resample.resample(det_image, identity, atlas_affine, labels.shape)
    ones = sitk.Image(list(subject.shape), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(nib_to_sitk(subject))
    field_affine = sitk_affine(det_image)
    fov_field = resample.resample(ones, forward, field_affine, det_image.GetSize(),
                                  interpolation=sitk.sitkNearestNeighbor)  # fmt: skip
    fov = resample.resample(array_to_sitk(fov_field, field_affine), identity, atlas_affine, labels.shape,
                            interpolation=sitk.sitkNearestNeighbor)  # fmt: skip
    atlas_voxel = float(abs(np.linalg.det(atlas_affine[:3, :3])))
    return morphometry.regional_volumes(labels, atlas.labels, det_atlas, (fov > 0.5) & (det_atlas > 0), atlas_voxel)


@functools.lru_cache(maxsize=1)
def _template_priors() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The tissue priors on the template's 2 mm grid (made once per process: every image shares them)."""
    template = load_template(2)
    return morphometry.template_priors(template.gm, template.wm, template.brain_mask), template.affine


#: Columns of the ``desc-volumes`` table, in order.
VOLUME_COLUMNS = ("index", "region", "volume_ml", "template_volume_ml", "coverage", "reason")


def _write_volumes(rows: list[dict], tissues: dict[str, float], path: Path) -> str:
    """One row per atlas region, then one per tissue class and the intracranial volume (index ``n/a``)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(VOLUME_COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in VOLUME_COLUMNS])
        for name, value in tissues.items():
            writer.writerow(["n/a", name, _cell(value), "n/a", "n/a", "the tissue classes' posteriors summed"
                             if name != "TIV" else "GM + WM + CSF"])  # fmt: skip
    return str(path)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)



class _PlotInputSpec(BaseInterfaceInputSpec):
    in_warped = File(exists=True, mandatory=True, desc="the T1w in template space through the warp (1 mm)")
    in_logjacobian = File(exists=True, mandatory=True, desc="the log-Jacobian on the model grid")


class _PlotOutputSpec(TraitedSpec):
    out_warp = File(exists=True, desc="the warped T1w under the template's edges (flickers with the affine's figure)")
    out_jacobian = File(exists=True, desc="the log-Jacobian over the template")


class PlotMorphometry(SimpleInterface):
    """The warp's figures (:func:`pipeline.reports.figures.registration_pair`, :func:`~pipeline.reports.figures.
    jacobian_overlay`)."""

    input_spec = _PlotInputSpec
    output_spec = _PlotOutputSpec

    def _run_interface(self, runtime):
        from ..reports import figures

        template = load_template(1)
        warped = np.asanyarray(nib.load(self.inputs.in_warped).dataobj, dtype=np.float32)
        subject_panel, _ = figures.registration_pair(warped, template.t1, template.brain_mask)
        logjac = nib.load(self.inputs.in_logjacobian)
        on_template = resample.resample(array_to_sitk(np.asanyarray(logjac.dataobj, dtype=np.float32), logjac.affine),
                                        sitk.Transform(3, sitk.sitkIdentity), template.affine, template.t1.shape)
        cwd = Path(runtime.cwd)
        (cwd / "warp.png").write_bytes(subject_panel)
        (cwd / "jacobian.png").write_bytes(figures.jacobian_overlay(template.t1, on_template, template.brain_mask))
        self._results.update(out_warp=str(cwd / "warp.png"), out_jacobian=str(cwd / "jacobian.png"))
        return runtime
