"""Every derivative of one T1w, handed to the one writer (:mod:`pipeline.derivatives`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..derivatives import DERIVATIVES, MODEL_RES
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
    Output("ds_t1w_preproc", "t1w_corrected", "t1w_preproc",
           {"Description": "T1w reoriented to RAS (no resampling) and bias-corrected (N4)", "SkullStripped": False},
           "n4_record"),
    Output("ds_bias", "bias_field", "bias_field",
           {"Description": "Multiplicative N4 bias field", "SkullStripped": False}, "n4_record"),
    Output("ds_mask_t1w", "mask_t1w", "brain_mask",
           {"Type": "Brain", "Description": "Brain mask by deepbet (learned brain extraction) on the RAS T1w"},
           "brain_record", "t1w_preproc"),
    Output("ds_template_mask_t1w", "template_mask_t1w", "template_mask",
           {"Type": "Brain", "Description": "The template's brain mask brought into T1w space through the affine "
            "registration (linear, > 0.5): a second, independent opinion on the brain mask; its Dice with "
            "desc-brain is the quality metric mask_dice"}, None, "t1w_preproc"),
    Output("ds_xfm", "transform", "xfm",
           {"Description": "Affine T1w-to-template transform (ITK text; SimpleITK and ANTs read it)"},
           "registration_record"),
    Output("ds_t1w_template", "t1w_template", "t1w_template",
           {"Description": "The bias-corrected T1w resampled into template space (1 mm, affine), normalised"},
           "template_record"),
    Output("ds_mask_template", "mask_template", "mask_template",
           {"Type": "Brain", "Description": "The brain mask (deepbet) brought into template space (linear, > 0.5)"},
           None, "t1w_template"),
    Output("ds_t1w_model", "t1w_model", "t1w_model",
           {"Description": "The bias-corrected T1w on the model grid (affine), normalised: what models learn from"},
           "model_record"),
    Output("ds_mask_model", "mask_model", "mask_model",
           {"Type": "Brain", "Description": "The brain mask (deepbet) on the model grid (linear, > 0.5)"},
           None, "t1w_model"),
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
           "attribution_record", "t1w_model"),
    Output("ds_gradcam", "gradcam", "gradcam",
           {"Description": "Grad-CAM on the networks' last feature maps, upsampled to the input grid, in [0, 1]"},
           "attribution_record", "t1w_model"),
    Output("ds_fig_attribution", "attribution_figure", "fig_attribution"),
)  # fmt: skip

#: The inputs of :func:`init_inference_derivatives_wf` besides ``source_file``.
INFERENCE_INPUTS = ("prediction", "saliency", "gradcam", "attribution_record", "attribution_figure")


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


def _sinks(
    outputs: tuple[Output, ...],
    fields: tuple[str, ...],
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    name: str,
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
                            **sink_inputs(output.name, model_resolution)),
            name=output.node,
            # records and figures are copied in the scheduler; images are compressed in a worker
            run_without_submitting=kind.extension in (".json", ".png", ".surf.gii"),
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

