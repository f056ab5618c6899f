"""One T1w's nonlinear registration and morphometry (``--registration syn``), and its derivatives."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import Function, IdentityInterface
from nipype.pipeline import engine as pe

from ..derivatives import SOURCE_KIND, TEMPLATE_SPACE
from ..interfaces.derivatives import DerivativesSink, sink_inputs
from ..interfaces.morphometry import Morphometry, PlotMorphometry, WarpToTemplate
from ..kinds import MORPHOMETRY_CHANNELS
from ..ops.morphometry import TISSUE_LABELS
from ..ops.template import model_grid_description
from .outputs import init_morphometry_derivatives_wf

#: What the morphometry workflow needs from the T1w's preprocessing (its outputnode's fields).
MORPHOMETRY_SOURCES = ("t1w_corrected", "mask_t1w", "transform")


def init_anat_morphometry_wf(
    *,
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    warp_resolution: int,
    seed: int,
    omp_nthreads: int,
    lesion: bool = False,
    name: str = "anat_morphometry_wf",
) -> pe.Workflow:
    """ANTs SyN from the T1w's affine (:class:`~pipeline.interfaces.morphometry.WarpToTemplate`), then tissue maps,
    modulated maps, the log-Jacobian, the warped T1w and regional volumes
    (:class:`~pipeline.interfaces.morphometry.Morphometry`), their figures and derivatives.

    ``model_resolution``: the model grid's voxel size (mm: the modulated maps and the log-Jacobian lie on it);
    ``warp_resolution``: the warp field's grid (mm); ``seed``, ``omp_nthreads``: SyN's (the same field bit for bit
    for the same seed and threads); ``lesion``: whether the input ``lesion_t1w`` is connected (left out of the metric).

    Inputs: ``source_file`` (the T1w in BIDS_DIR) and :data:`MORPHOMETRY_SOURCES` (and ``lesion_t1w``).
    Outputs: ``warp_record`` (the warp's run and quality, for the quality metrics) and the model-grid maps that are
    learning channels (:data:`~pipeline.kinds.MORPHOMETRY_CHANNELS`: ``GM``, ``WM``, ``CSF``, ``logjacobian``).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["source_file", *MORPHOMETRY_SOURCES, "lesion_t1w"]),
                        name="inputnode")  # fmt: skip
    outputnode = pe.Node(IdentityInterface(fields=["warp_record", *MORPHOMETRY_CHANNELS]), name="outputnode")
    # SyN's threads sum no metric in a thread-dependent order that changes the field (checked): it may use them all
    warp = pe.Node(WarpToTemplate(resolution=warp_resolution, seed=seed, num_threads=omp_nthreads), name="warp",
                   n_procs=omp_nthreads, mem_gb=2.0)  # fmt: skip
    # mostly single-threaded numpy: one slot, so that two images' morphometry run side by side
    morphometry = pe.Node(Morphometry(model_resolution=model_resolution, num_threads=omp_nthreads),
                          name="morphometry", n_procs=1, mem_gb=3.0)  # fmt: skip
    plots = pe.Node(PlotMorphometry(), name="plot_morphometry", mem_gb=1.0)
    ds_wf = init_morphometry_derivatives_wf(bids_dir=bids_dir, output_dir=output_dir,
                                            model_resolution=model_resolution)  # fmt: skip
    if lesion:
        workflow.connect(inputnode, "lesion_t1w", warp, "in_lesion")
    workflow.connect([
        (inputnode, warp, [("t1w_corrected", "in_file"), ("mask_t1w", "in_mask"), ("transform", "in_transform")]),
        (inputnode, morphometry, [("t1w_corrected", "in_file"), ("mask_t1w", "in_mask")]),
        (warp, morphometry, [("out_transform", "in_transform"), ("out_inverse", "in_inverse")]),
        (morphometry, plots, [("out_t1w_template", "in_warped"), ("out_logjacobian", "in_logjacobian")]),
        (warp, outputnode, [("out_record", "warp_record")]),
        (morphometry, outputnode, [("out_logjacobian", "logjacobian")]),
        (inputnode, ds_wf, [("source_file", "inputnode.source_file")]),
        (warp, ds_wf, [("out_transform", "inputnode.transform"), ("out_inverse", "inputnode.inverse"),
                       ("out_record", "inputnode.warp_record")]),
        (morphometry, ds_wf, [
            ("out_t1w_template", "inputnode.t1w_template"), ("out_logjacobian", "inputnode.logjacobian"),
            ("out_volumes", "inputnode.volumes"), ("out_record", "inputnode.morphometry_record"),
            ("out_record_template", "inputnode.template_record"), ("out_record_model", "inputnode.model_record"),
        ]),
        (plots, ds_wf, [("out_warp", "inputnode.warp_figure"), ("out_jacobian", "inputnode.jacobian_figure")]),
    ])  # fmt: skip
    _add_tissue_maps(workflow, morphometry, ds_wf.get_node("inputnode"), outputnode, bids_dir=bids_dir,
                     output_dir=output_dir, model_resolution=model_resolution)  # fmt: skip
    return workflow


def _add_tissue_maps(workflow: pe.Workflow, morphometry: pe.Node, inputs: pe.Node, outputnode: pe.Node, *,
                     bids_dir: Path, output_dir: Path, model_resolution: float) -> None:  # fmt: skip
    """A sink per tissue map (``label-<tissue>_probseg`` on the T1w grid, ``desc-modulated`` on the model grid); the
    modulated maps are also learning channels (the outputnode's ``GM``, ``WM``, ``CSF``)."""
    for label in TISSUE_LABELS.values():
        for field, kind, grid in (("out_probseg", "tissue_probseg", None), ("out_modulated", "tissue_modulated",
                                                                            model_resolution)):  # fmt: skip
            select = pe.Node(Function(input_names=["maps", "key"], output_names=["out"], function=_pick),
                             name=f"select_{kind}_{label}", run_without_submitting=True)  # fmt: skip
            select.inputs.key = label
            metadata = {"Description": _TISSUE_DESCRIPTIONS[kind].format(label=label)}
            if grid is not None:
                metadata.update(Resolution=model_grid_description(grid), SpatialReference=TEMPLATE_SPACE)
            sink = pe.Node(
                DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir), metadata=metadata,
                                **sink_inputs(kind, grid, structure=label)),
                name=f"ds_{kind}_{label}", overwrite=True,
            )  # fmt: skip
            if grid is None:  # on the T1w's grid: the bias-corrected T1w is its reference (BIDS recommends naming it)
                sink.inputs.reference = {"suffix": SOURCE_KIND, "desc": "preproc"}
            workflow.connect([
                (morphometry, select, [(field, "maps")]),
                (select, sink, [("out", "in_file")]),
                (inputs, sink, [("source_file", "source_file")]),
            ])  # fmt: skip
            if kind == "tissue_modulated":  # a learning channel (a model of GM, WM or CSF predicts from it)
                workflow.connect(select, "out", outputnode, label)


_TISSUE_DESCRIPTIONS = {
    "tissue_probseg": "Posterior probability of {label} on the T1w's grid: a Gaussian mixture of the bias-corrected "
    "intensities with the template's tissue maps, brought through the nonlinear registration, as priors",
    "tissue_modulated": "{label} probability in template space (through the nonlinear registration) times the "
    "Jacobian determinant of the template-to-T1w mapping: summed over the grid it gives the T1w's {label} volume "
    "(modulated, VBM)",
}


def _pick(maps, key):  # Nipype runs its source: no annotations
    return maps[key]
