"""Every derivative of one T1w, handed to the one writer (:mod:`pipeline.derivatives`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import DerivativesSink
from ..ops.template import TEMPLATE_SPACE, resolution_label

#: (node name, input field, entities, extra sidecar metadata, metadata-file field)
_OUTPUTS: tuple[tuple[str, str, dict[str, str], dict[str, Any], str | None], ...] = (
    ("ds_t1w_preproc", "t1w_corrected", {"desc": "preproc"},
     {"Description": "T1w reoriented to RAS (no resampling) and bias-corrected (N4)", "SkullStripped": False},
     "n4_record"),
    ("ds_bias", "bias_field", {"desc": "biasfield"},
     {"Description": "Multiplicative N4 bias field", "SkullStripped": False}, "n4_record"),
    ("ds_mask_t1w", "mask_t1w", {"desc": "brain", "suffix": "mask"},
     {"Type": "Brain", "Description": "Brain mask by deepbet (learned brain extraction) on the RAS T1w"},
     "brain_record"),
    ("ds_template_mask_t1w", "template_mask_t1w", {"desc": "template", "suffix": "mask"},
     {"Type": "Brain", "Description": "The template's brain mask brought into T1w space through the affine "
      "registration (linear, > 0.5): a second, independent opinion on the brain mask; its Dice with "
      "desc-brain is the quality metric mask_dice"}, None),
    ("ds_xfm", "transform", {"from_": "T1w", "to": TEMPLATE_SPACE, "mode": "image", "suffix": "xfm"},
     {"Description": "Affine T1w-to-template transform (ITK text; SimpleITK and ANTs read it)"},
     "registration_record"),
    ("ds_t1w_template", "t1w_template", {"space": TEMPLATE_SPACE, "desc": "preproc"}, {}, "template_record"),
    ("ds_mask_template", "mask_template", {"space": TEMPLATE_SPACE, "desc": "brain", "suffix": "mask"},
     {"Type": "Brain", "Description": "The brain mask (deepbet) brought into template space (linear, > 0.5)"},
     None),
    ("ds_t1w_model", "t1w_model", {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "preproc"}, {}, "model_record"),
    ("ds_mask_model", "mask_model", {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "brain", "suffix": "mask"},
     {"Type": "Brain", "Description": "The brain mask (deepbet) on the model grid (linear, > 0.5)"}, None),
    ("ds_iqm", "iqm_record", {"desc": "iqm"}, {}, None),
    ("ds_fig_mosaic", "mosaic", {"desc": "mosaic", "datatype": "figures"}, {}, None),
    ("ds_fig_brain", "brain_figure", {"desc": "brainmask", "datatype": "figures"}, {}, None),
    ("ds_fig_reg_subject", "registration_subject", {"desc": "regsubject", "datatype": "figures"}, {}, None),
    ("ds_fig_reg_template", "registration_template", {"desc": "regtemplate", "datatype": "figures"}, {}, None),
    ("ds_fig_bias", "bias_figure", {"desc": "biasfield", "datatype": "figures"}, {}, None),
    ("ds_mesh", "surface", {"desc": "brainmask", "suffix": "mesh"}, {}, "surface_record"),
    ("ds_fig_mesh", "mesh_figure", {"desc": "mesh", "datatype": "figures"}, {}, None),
)  # fmt: skip

#: The outputs of the inference node (participant level with --model).
_INFERENCE_OUTPUTS: tuple[tuple[str, str, dict[str, str], dict[str, Any], str | None], ...] = (
    ("ds_prediction", "prediction", {"suffix": "prediction"}, {}, None),
    ("ds_saliency", "saliency", {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "saliency", "suffix": "attribution"},
     {"Description": "Gradient saliency |d score / d input| of the model ensemble, in [0, 1]"}, "attribution_record"),
    ("ds_gradcam", "gradcam", {"space": TEMPLATE_SPACE, "res": "MODEL", "desc": "gradcam", "suffix": "attribution"},
     {"Description": "Grad-CAM on the networks' last feature maps, upsampled to the input grid, in [0, 1]"},
     "attribution_record"),
    ("ds_fig_attribution", "attribution_figure", {"desc": "attribution", "datatype": "figures"}, {}, None),
)  # fmt: skip

#: The inputs of :func:`init_inference_derivatives_wf` besides ``source_file``.
INFERENCE_INPUTS = ("prediction", "saliency", "gradcam", "attribution_record", "attribution_figure")


#: The inputs of :func:`init_anat_derivatives_wf` besides ``source_file``.
DERIVATIVE_INPUTS = tuple(sorted({field for _, field, _, _, _ in _OUTPUTS} | {m for *_, m in _OUTPUTS if m}))


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
    outputs: tuple[tuple[str, str, dict[str, str], dict[str, Any], str | None], ...],
    fields: tuple[str, ...],
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    name: str,
) -> pe.Workflow:
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["source_file", *fields]), name="inputnode")
    for node_name, field, entities, metadata, metadata_field in outputs:
        ents = {k: (resolution_label(model_resolution) if v == "MODEL" else v) for k, v in entities.items()}
        sink = pe.Node(
            DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir), metadata=metadata, **ents),
            name=node_name,
            # records and figures are copied in the scheduler; images are compressed in a worker
            run_without_submitting=(
                field.endswith("record") or field in ("prediction", "surface") or entities.get("datatype") == "figures"
            ),
            overwrite=True,
        )
        workflow.connect(inputnode, "source_file", sink, "source_file")
        workflow.connect(inputnode, field, sink, "in_file")
        if metadata_field:
            workflow.connect(inputnode, metadata_field, sink, "metadata_file")
    return workflow
