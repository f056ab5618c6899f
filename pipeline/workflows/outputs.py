"""Every derivative of one T1w, handed to the one writer (:mod:`pipeline.derivatives`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..derivatives import DERIVATIVES, MODEL_RES, named_path
from ..interfaces.derivatives import DerivativesSink, sink_inputs
from ..ops.template import model_grid_description


@dataclasses.dataclass(frozen=True)
class Output:
    """One derivative of a T1w: the sink node, the input field it saves, its name in
    :data:`~pipeline.derivatives.DERIVATIVES` (which gives its entities), extra sidecar fields, the input
    field of a JSON record merged into the sidecar, and the name of the image whose grid it lies on (its
    ``SpatialReference``)."""

    node: str
    field: str
    name: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata_field: str | None = None
    reference: str | None = None


_OUTPUTS: tuple[Output, ...] = (
    Output("ds_t1w_preproc", "t1w_corrected", "preproc",
           {"Description": "T1w reoriented to RAS (no resampling) and bias-corrected (N4)", "SkullStripped": False},
           "n4_record"),
    Output("ds_bias", "bias_field", "bias_field",
           {"Description": "Multiplicative N4 bias field", "SkullStripped": False}, "n4_record"),
    Output("ds_mask_t1w", "mask_t1w", "brain_mask",
           {"Type": "Brain", "Description": "Brain mask by deepbet (learned brain extraction) on the RAS T1w"},
           "brain_record", "preproc"),
    Output("ds_template_mask_t1w", "template_mask_t1w", "template_mask",
           {"Type": "Brain", "Description": "The template's brain mask brought into T1w space through the affine "
            "registration (linear, > 0.5): a second, independent opinion on the brain mask; its Dice with "
            "desc-brain is the quality metric mask_dice"}, None, "preproc"),
    Output("ds_xfm", "transform", "xfm",
           {"Description": "Affine T1w-to-template transform (ITK text; SimpleITK and ANTs read it)"},
           "registration_record"),
    Output("ds_t1w_template", "t1w_template", "preproc_template",
           {"Description": "The bias-corrected T1w resampled into template space (1 mm, affine), normalised"},
           "template_record"),
    Output("ds_mask_template", "mask_template", "mask_template",
           {"Type": "Brain", "Description": "The brain mask (deepbet) brought into template space (linear, > 0.5)"},
           None, "preproc_template"),
    Output("ds_t1w_model", "t1w_model", "preproc_model",
           {"Description": "The bias-corrected T1w on the model grid (affine), normalised: what models learn from"},
           "model_record"),
    Output("ds_mask_model", "mask_model", "mask_model",
           {"Type": "Brain", "Description": "The brain mask (deepbet) on the model grid (linear, > 0.5)"},
           None, "preproc_model"),
    Output("ds_iqm", "iqm_record", "iqm"),
    Output("ds_fig_mosaic", "mosaic", "fig_mosaic"),
    Output("ds_fig_brain", "brain_figure", "fig_brainmask"),
    Output("ds_fig_reg_subject", "registration_subject", "fig_regsubject"),
    Output("ds_fig_reg_template", "registration_template", "fig_regtemplate"),
    Output("ds_fig_bias", "bias_figure", "fig_biasfield"),
    Output("ds_mesh", "surface", "mesh", {}, "surface_record"),
    Output("ds_fig_mesh", "mesh_figure", "fig_mesh"),
)  # fmt: skip

#: The outputs of the inference node (participant level with --model).
_INFERENCE_OUTPUTS: tuple[Output, ...] = (
    Output("ds_prediction", "prediction", "prediction"),
    Output("ds_saliency", "saliency", "saliency",
           {"Description": "Gradient saliency |d score / d input| of the model ensemble, in [0, 1]"},
           "attribution_record", "preproc_model"),
    Output("ds_gradcam", "gradcam", "gradcam",
           {"Description": "Grad-CAM on the networks' last feature maps, upsampled to the input grid, in [0, 1]"},
           "attribution_record", "preproc_model"),
    Output("ds_fig_attribution", "attribution_figure", "fig_attribution"),
)  # fmt: skip

#: The inputs of :func:`init_inference_derivatives_wf` besides ``source_file``.
INFERENCE_INPUTS = ("prediction", "saliency", "gradcam", "attribution_record", "attribution_figure")

#: The outputs of the segmentation node (participant level with a segmentation --model); the meshes, one per
#: structure, are added by :func:`init_segmentation_derivatives_wf`.
_SEGMENTATION_OUTPUTS: tuple[Output, ...] = (
    Output("ds_prediction", "prediction", "prediction"),
    Output("ds_dseg", "dseg", "dseg",
           {"Description": "Labels predicted by the model ensemble, in the T1w's own grid"}, "segmentation_record"),
    Output("ds_dseg_model", "dseg_model", "dseg_model",
           {"Description": "Labels predicted by the model ensemble on the model grid (template space)"},
           "segmentation_record"),
    Output("ds_dseg_table", "dseg_table", "dseg_table"),
    Output("ds_fig_segmentation", "segmentation_figure", "fig_segmentation"),
    Output("ds_fig_segmentation_mesh", "segmentation_mesh_figure", "fig_segmentationmesh"),
    Output("ds_uncertainty", "uncertainty", "uncertainty",
           {"Description": "Voxel-wise uncertainty of the predicted labels: the normalised entropy of the ensemble's "
            "class probabilities (entropy / log K; 0 certain, 1 every class alike), in the T1w's own grid",
            "Units": "arbitrary"}, "segmentation_record"),
    Output("ds_fig_uncertainty", "uncertainty_figure", "fig_uncertainty"),
)  # fmt: skip

#: The inputs of :func:`init_segmentation_derivatives_wf` besides ``source_file``.
SEGMENTATION_INPUTS = (
    "prediction", "dseg", "dseg_model", "dseg_table", "segmentation_record", "segmentation_figure",
    "segmentation_mesh_figure", "meshes", "uncertainty", "uncertainty_figure",
)  # fmt: skip


#: The outputs of the nonlinear registration and morphometry (``--registration syn``); the tissue maps, one per
#: tissue, are added by :func:`~pipeline.workflows.morphometry.init_anat_morphometry_wf`.
_MORPHOMETRY_OUTPUTS: tuple[Output, ...] = (
    Output("ds_xfm_warp", "transform", "xfm_warp",
           {"Description": "T1w-to-template transform: the affine, then the nonlinear warp (ANTs SyN); an ITK "
            "composite transform (HDF5) that antsApplyTransforms and SimpleITK read"}, "warp_record"),
    Output("ds_xfm_warp_inverse", "inverse", "xfm_warp_inverse",
           {"Description": "Template-to-T1w transform: the inverse of the T1w-to-template composite (the inverse warp, "
            "then the affine's inverse)"}, "warp_record"),
    Output("ds_warped_template", "t1w_template", "warped_template",
           {"Description": "The bias-corrected T1w resampled into template space (1 mm) through the nonlinear "
            "registration, normalised", "SkullStripped": False}, "template_record"),
    Output("ds_logjacobian", "logjacobian", "logjacobian",
           {"Description": "Natural log of the Jacobian determinant of the template-to-T1w mapping (affine and warp) "
            "on the model grid: > 0 where the T1w is larger than the template (tensor-based morphometry)",
            "Units": "arbitrary", "SkullStripped": False}, "model_record"),
    Output("ds_volumes", "volumes", "volumes"),
    Output("ds_morphometry", "morphometry_record", "morphometry"),
    Output("ds_fig_warp", "warp_figure", "fig_warp"),
    Output("ds_fig_jacobian", "jacobian_figure", "fig_jacobian"),
)  # fmt: skip

#: The inputs of :func:`init_morphometry_derivatives_wf` besides ``source_file``.
MORPHOMETRY_INPUTS = tuple(
    sorted({o.field for o in _MORPHOMETRY_OUTPUTS} | {o.metadata_field for o in _MORPHOMETRY_OUTPUTS
                                                      if o.metadata_field})
)


def init_morphometry_derivatives_wf(
    *, bids_dir: Path, output_dir: Path, model_resolution: float, name: str = "morphometry_derivatives_wf"
) -> pe.Workflow:
    """Save the nonlinear registration's and the morphometry's outputs of one T1w (but the tissue maps)."""
    return _sinks(_MORPHOMETRY_OUTPUTS, MORPHOMETRY_INPUTS, bids_dir, output_dir, model_resolution, name)


#: The outputs of a co-registered image (FLAIR, T2w, PDw); ``SpatialReference`` of the T1w-grid image is added by
#: :func:`init_coreg_derivatives_wf` (its T1w's derivative).
_COREG_OUTPUTS: tuple[Output, ...] = (
    Output("ds_preproc_reference", "corrected", "preproc_reference",
           {"Description": "The image rigidly co-registered to its T1w, on the T1w's grid (linear), bias-corrected "
            "(N4 inside the T1w's brain mask)", "SkullStripped": False}, "coregistration_record"),
    Output("ds_xfm_reference", "transform", "xfm_reference",
           {"Description": "Rigid transform between the image and its T1w (ITK text; SimpleITK and ANTs read it)"},
           "coregistration_record"),
    Output("ds_coreg_template", "image_template", "preproc_template",
           {"Description": "The co-registered image in template space (1 mm) through its T1w's affine, normalised",
            "SkullStripped": False}, "template_record"),
    Output("ds_coreg_model", "image_model", "preproc_model",
           {"Description": "The co-registered image on the model grid through its T1w's affine, normalised: a "
            "learning channel beside the T1w"}, "model_record"),
    Output("ds_coreg_iqm", "iqm_record", "iqm"),
    Output("ds_fig_coreg_reference", "reference_figure", "fig_coregreference"),
    Output("ds_fig_coreg_image", "image_figure", "fig_coregimage"),
)  # fmt: skip

#: The inputs of :func:`init_coreg_derivatives_wf` besides ``source_file``.
COREG_INPUTS = tuple(
    sorted({o.field for o in _COREG_OUTPUTS} | {o.metadata_field for o in _COREG_OUTPUTS if o.metadata_field})
)


def init_coreg_derivatives_wf(
    *, bids_dir: Path, output_dir: Path, model_resolution: float, reference: Path, name: str = "coreg_derivatives_wf"
) -> pe.Workflow:
    """Save the outputs of one co-registered image; those on the T1w grid name the T1w's (``reference``, in
    BIDS_DIR) preprocessed image as their ``SpatialReference``."""
    t1w_grid = named_path(output_dir, reference, "preproc").relative_to(output_dir).as_posix()
    both = {"Sources": [f"bids:raw:{Path(reference).relative_to(bids_dir).as_posix()}"]}  # and the image's own
    outputs = tuple(
        dataclasses.replace(o, metadata={**o.metadata, **both, "SpatialReference": t1w_grid})
        if o.name == "preproc_reference" else dataclasses.replace(o, metadata={**o.metadata, **both})
        if DERIVATIVES[o.name].extension == ".nii.gz" else o
        for o in _COREG_OUTPUTS
    )  # fmt: skip
    return _sinks(outputs, COREG_INPUTS, bids_dir, output_dir, model_resolution, name)


#: The inputs of :func:`init_anat_derivatives_wf` besides ``source_file``.
DERIVATIVE_INPUTS = tuple(
    sorted({o.field for o in _OUTPUTS} | {o.metadata_field for o in _OUTPUTS if o.metadata_field})
)


def init_anat_derivatives_wf(
    *, bids_dir: Path, output_dir: Path, model_resolution: float, name: str = "anat_derivatives_wf"
) -> pe.Workflow:
    """Save every output of one T1w under its BIDS-derivative name, with sidecars.

    Inputs: ``source_file`` (the T1w in BIDS_DIR) and the preprocessing and QC outputs.
    """
    return _sinks(_OUTPUTS, DERIVATIVE_INPUTS, bids_dir, output_dir, model_resolution, name)


def init_inference_derivatives_wf(
    *, bids_dir: Path, output_dir: Path, model_resolution: float, name: str = "inference_derivatives_wf"
) -> pe.Workflow:
    """Save a prediction, its attribution maps (with the models named in their sidecars) and figure."""
    return _sinks(_INFERENCE_OUTPUTS, INFERENCE_INPUTS, bids_dir, output_dir, model_resolution, name)


def init_segmentation_derivatives_wf(
    *,
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    label_desc: str,
    structures: list[str],
    name: str = "segmentation_derivatives_wf",
) -> pe.Workflow:
    """Save a segmentation: the labels in both grids, the lookup table, the record, the figure and one
    surface per structure (``..._label-<structure>_desc-<label_desc>_mesh.surf.gii``)."""
    from nipype.interfaces.utility import Function

    workflow = _sinks(_SEGMENTATION_OUTPUTS, SEGMENTATION_INPUTS, bids_dir, output_dir, model_resolution, name,
                      label_desc=label_desc)  # fmt: skip
    inputnode = workflow.get_node("inputnode")
    for index, structure in enumerate(structures):
        key = "".join(c for c in structure if c.isalnum())
        select = pe.Node(Function(input_names=["inlist", "index"], output_names=["out"], function=_pick),
                         name=f"select_mesh_{key}", run_without_submitting=True)  # fmt: skip
        select.inputs.index = index
        sink = pe.Node(
            DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir),
                            metadata={"Description": f"Surface of the predicted {structure} (world mm, RAS)"},
                            **sink_inputs("structure_mesh", label_desc=label_desc, structure=structure)),
            name=f"ds_mesh_{key}", run_without_submitting=True, overwrite=True,
        )  # fmt: skip
        workflow.connect([
            (inputnode, select, [("meshes", "inlist")]),
            (select, sink, [("out", "in_file")]),
            (inputnode, sink, [("source_file", "source_file")]),
        ])  # fmt: skip
    return workflow


def _pick(inlist, index):  # Nipype runs its source: no annotations
    return inlist[index]


def _sinks(
    outputs: tuple[Output, ...],
    fields: tuple[str, ...],
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    name: str,
    label_desc: str | None = None,
) -> pe.Workflow:
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["source_file", *fields]), name="inputnode")
    for output in outputs:
        kind = DERIVATIVES[output.name]
        metadata = dict(output.metadata)
        if MODEL_RES in kind.entities.values():  # BIDS requires Resolution wherever res is used
            metadata.setdefault("Resolution", model_grid_description(model_resolution))
        sink = pe.Node(
            DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir), metadata=metadata,
                            **sink_inputs(output.name, model_resolution, label_desc=label_desc)),
            name=output.node,
            # records and figures are copied in the scheduler; images are compressed in a worker
            run_without_submitting=kind.extension in (".json", ".png", ".surf.gii", ".tsv"),
            overwrite=True,
        )  # fmt: skip
        if output.reference:
            reference = DERIVATIVES[output.reference]
            sink.inputs.reference = {"suffix": reference.suffix, **reference.resolved(model_resolution)}
        workflow.connect(inputnode, "source_file", sink, "source_file")
        workflow.connect(inputnode, output.field, sink, "in_file")
        if output.metadata_field:
            workflow.connect(inputnode, output.metadata_field, sink, "metadata_file")
    return workflow
