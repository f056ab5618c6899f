"""Every derivative of one T1w, handed to the one writer (:mod:`pipeline.derivatives`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import DerivativesSink
from ..ops.template import TEMPLATE_SPACE, model_grid_description, resolution_label


@dataclasses.dataclass(frozen=True)
class Output:
    """One derivative of a T1w: the sink node, the input field it saves, its entities (``res="MODEL"``:
    the model grid's label), extra sidecar fields, the input field of a JSON record merged into the
    sidecar, and the entities of the image whose grid it lies on (its ``SpatialReference``)."""

    node: str
    field: str
    entities: dict[str, str]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata_field: str | None = None
    reference: dict[str, str] | None = None


_T1W_GRID = {"desc": "preproc", "suffix": "T1w"}
_TEMPLATE_GRID = {"space": TEMPLATE_SPACE, "desc": "preproc", "suffix": "T1w"}
_MODEL_GRID = {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "preproc", "suffix": "T1w"}

_OUTPUTS: tuple[Output, ...] = (
    Output("ds_t1w_preproc", "t1w_corrected", {"desc": "preproc"},
           {"Description": "T1w reoriented to RAS (no resampling) and bias-corrected (N4)", "SkullStripped": False},
           "n4_record"),
    Output("ds_bias", "bias_field", {"desc": "biasfield"},
           {"Description": "Multiplicative N4 bias field", "SkullStripped": False}, "n4_record"),
    Output("ds_mask_t1w", "mask_t1w", {"desc": "brain", "suffix": "mask"},
           {"Type": "Brain", "Description": "Brain mask by deepbet (learned brain extraction) on the RAS T1w"},
           "brain_record", _T1W_GRID),
    Output("ds_template_mask_t1w", "template_mask_t1w", {"desc": "template", "suffix": "mask"},
           {"Type": "Brain", "Description": "The template's brain mask brought into T1w space through the affine "
            "registration (linear, > 0.5): a second, independent opinion on the brain mask; its Dice with "
            "desc-brain is the quality metric mask_dice"}, None, _T1W_GRID),
    Output("ds_xfm", "transform", {"from_": "T1w", "to": TEMPLATE_SPACE, "mode": "image", "suffix": "xfm"},
           {"Description": "Affine T1w-to-template transform (ITK text; SimpleITK and ANTs read it)"},
           "registration_record"),
    Output("ds_t1w_template", "t1w_template", {"space": TEMPLATE_SPACE, "desc": "preproc"},
           {"Description": "The bias-corrected T1w resampled into template space (1 mm, affine), normalised"},
           "template_record"),
    Output("ds_mask_template", "mask_template", {"space": TEMPLATE_SPACE, "desc": "brain", "suffix": "mask"},
           {"Type": "Brain", "Description": "The brain mask (deepbet) brought into template space (linear, > 0.5)"},
           None, _TEMPLATE_GRID),
    Output("ds_t1w_model", "t1w_model", {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "preproc"},
           {"Description": "The bias-corrected T1w on the model grid (affine), normalised: what models learn from"},
           "model_record"),
    Output("ds_mask_model", "mask_model", {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "brain", "suffix": "mask"},
           {"Type": "Brain", "Description": "The brain mask (deepbet) on the model grid (linear, > 0.5)"},
           None, _MODEL_GRID),
    Output("ds_iqm", "iqm_record", {"desc": "iqm"}),
    Output("ds_fig_mosaic", "mosaic", {"desc": "mosaic", "datatype": "figures"}),
    Output("ds_fig_brain", "brain_figure", {"desc": "brainmask", "datatype": "figures"}),
    Output("ds_fig_reg_subject", "registration_subject", {"desc": "regsubject", "datatype": "figures"}),
    Output("ds_fig_reg_template", "registration_template", {"desc": "regtemplate", "datatype": "figures"}),
    Output("ds_fig_bias", "bias_figure", {"desc": "biasfield", "datatype": "figures"}),
    Output("ds_mesh", "surface", {"desc": "brainmask", "suffix": "mesh"}, {}, "surface_record"),
    Output("ds_fig_mesh", "mesh_figure", {"desc": "mesh", "datatype": "figures"}),
)  # fmt: skip

#: The outputs of the inference node (participant level with --model).
_INFERENCE_OUTPUTS: tuple[Output, ...] = (
    Output("ds_prediction", "prediction", {"suffix": "prediction"}),
    Output("ds_saliency", "saliency",
           {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "saliency", "suffix": "attribution"},
           {"Description": "Gradient saliency |d score / d input| of the model ensemble, in [0, 1]"},
           "attribution_record", _MODEL_GRID),
    Output("ds_gradcam", "gradcam",
           {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "gradcam", "suffix": "attribution"},
           {"Description": "Grad-CAM on the networks' last feature maps, upsampled to the input grid, in [0, 1]"},
           "attribution_record", _MODEL_GRID),
    Output("ds_fig_attribution", "attribution_figure", {"desc": "attribution", "datatype": "figures"}),
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
    model_label = resolution_label(model_resolution)

    def label(entities: dict[str, str]) -> dict[str, str]:
        return {k: (model_label if v == "MODEL" else v) for k, v in entities.items()}

    for output in outputs:
        metadata = dict(output.metadata)
        if output.entities.get("res") == "MODEL":  # BIDS requires Resolution wherever res is used
            metadata.setdefault("Resolution", model_grid_description(model_resolution))
        sink = pe.Node(
            DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir), metadata=metadata,
                            **label(output.entities)),
            name=output.node,
            # records and figures are copied in the scheduler; images are compressed in a worker
            run_without_submitting=(
                output.field.endswith("record") or output.field in ("prediction", "surface")
                or output.entities.get("datatype") == "figures"
            ),
            overwrite=True,
        )  # fmt: skip
        if output.reference:
            sink.inputs.reference = label(output.reference)
        workflow.connect(inputnode, "source_file", sink, "source_file")
        workflow.connect(inputnode, output.field, sink, "in_file")
        if output.metadata_field:
            workflow.connect(inputnode, output.metadata_field, sink, "metadata_file")
    return workflow

