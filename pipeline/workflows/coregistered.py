"""The workflow of an image aligned to its session's T1w (FLAIR, T2w, PDw: a ``coregistered`` kind)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..interfaces.coregistration import CoregisterToReference, CoregistrationQC
from ..interfaces.preprocess import N4BiasCorrection, PrepareT1w, QualityGate, ResampleToTemplate
from .anatomical import init_anat_audit_wf
from .outputs import init_coreg_derivatives_wf

#: What the T1w's preprocessing hands to a co-registered image (outputnode fields of ``init_anat_preproc_wf``).
REFERENCE_INPUTS = ("t1w_corrected", "mask_t1w", "transform")


def init_coreg_wf(
    *,
    bids_dir: Path,
    output_dir: Path,
    reference: Path,
    pairing: str,
    model_resolution: float,
    seed: int,
    omp_nthreads: int,
    lesion: bool = False,
    name: str = "coreg_wf",
) -> pe.Workflow:
    """Audit one image, align it rigidly to its T1w (``reference`` in ``bids_dir``; ``pairing``: why that one),
    correct its bias inside the T1w's brain, bring it into template space through the T1w's affine, measure the
    alignment and save everything. ``model_resolution``, ``seed``, ``omp_nthreads``: as for the T1w
    (:func:`~pipeline.workflows.anatomical.init_anat_preproc_wf`); ``lesion``: the T1w has a lesion mask (input
    ``lesion_t1w``), left out of the co-registration's metric.

    Inputs: ``image`` (in ``bids_dir``), ``metadata``, and from its T1w's preprocessing :data:`REFERENCE_INPUTS`.
    Outputs: ``passed`` and ``corrected_passed`` (the model-grid image and the bias-corrected one on the T1w's grid,
    only when its quality passed: a failed co-registration fails this image, not the T1w, whose outputs stand),
    ``template_record`` (its normalisation): a model's channel.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["image", "metadata", *REFERENCE_INPUTS, "lesion_t1w"]),
                        name="inputnode")  # fmt: skip
    outputnode = pe.Node(IdentityInterface(fields=["passed", "corrected_passed", "template_record"]),
                         name="outputnode")  # fmt: skip
    audit_wf = init_anat_audit_wf(bids_dir=bids_dir, output_dir=output_dir)
    prepare = pe.Node(PrepareT1w(), name="prepare", mem_gb=1.0)
    coregister = pe.Node(
        CoregisterToReference(seed=seed, num_threads=omp_nthreads, pairing=pairing,
                              reference_source=Path(reference).relative_to(bids_dir).as_posix()),
        name="coregister", n_procs=1, mem_gb=1.5,
    )  # fmt: skip
    n4 = pe.Node(N4BiasCorrection(num_threads=omp_nthreads), name="n4", n_procs=omp_nthreads, mem_gb=1.5)
    to_template = pe.Node(ResampleToTemplate(model_resolution=model_resolution, num_threads=omp_nthreads),
                          name="to_template", n_procs=omp_nthreads, mem_gb=1.5)  # fmt: skip
    qc = pe.Node(CoregistrationQC(), name="coreg_qc", mem_gb=2.0)
    if lesion:
        workflow.connect(inputnode, "lesion_t1w", coregister, "in_lesion")
    workflow.connect([
        (inputnode, audit_wf, [("image", "inputnode.t1w"), ("metadata", "inputnode.metadata")]),
        (inputnode, prepare, [("image", "in_file")]),
        (prepare, coregister, [("out_file", "in_file")]),
        (inputnode, coregister, [("t1w_corrected", "in_reference"), ("mask_t1w", "in_mask")]),
        (coregister, n4, [("out_file", "in_file")]),
        (inputnode, n4, [("mask_t1w", "in_mask")]),
        (n4, to_template, [("out_file", "in_file")]),
        (inputnode, to_template, [("mask_t1w", "in_mask"), ("transform", "in_transform")]),
        (to_template, outputnode, [("out_record", "template_record")]),
    ])  # fmt: skip
    ds_wf = init_coreg_derivatives_wf(bids_dir=bids_dir, output_dir=output_dir, model_resolution=model_resolution,
                                      reference=reference)  # fmt: skip
    _connect_measures(workflow, ds_wf, inputnode, audit_wf, prepare, coregister, n4, to_template, qc)
    for gate_name, image, passed in (("quality_gate", (to_template, "out_t1w_model"), "passed"),
                                     ("quality_gate_t1w_grid", (n4, "out_file"), "corrected_passed")):
        gate = pe.Node(QualityGate(), name=gate_name, run_without_submitting=True)
        workflow.connect([(qc, gate, [("out_record", "in_record")]), (image[0], gate, [(image[1], "in_file")]),
                          (gate, outputnode, [("out_file", passed)])])  # fmt: skip
    return workflow


def _connect_measures(workflow: pe.Workflow, ds_wf: pe.Workflow, inputnode: pe.Node, audit_wf: pe.Workflow,
                      prepare: pe.Node, coregister: pe.Node, n4: pe.Node, to_template: pe.Node, qc: pe.Node
                      ) -> None:  # fmt: skip
    """The quality measures' inputs, and every output to the derivatives."""
    workflow.connect([
        (prepare, qc, [("out_file", "in_raw"), ("out_record", "in_prepare")]),
        (n4, qc, [("out_file", "in_corrected")]),
        (coregister, qc, [("out_coverage", "in_coverage"), ("out_record", "in_coregistration")]),
        (inputnode, qc, [("t1w_corrected", "in_reference"), ("mask_t1w", "in_mask")]),
        (audit_wf, qc, [("outputnode.audit_record", "in_audit")]),
        (inputnode, ds_wf, [("image", "inputnode.source_file")]),
        (n4, ds_wf, [("out_file", "inputnode.corrected")]),
        (coregister, ds_wf, [("out_transform", "inputnode.transform"),
                             ("out_record", "inputnode.coregistration_record")]),
        (to_template, ds_wf, [("out_t1w", "inputnode.image_template"), ("out_t1w_model", "inputnode.image_model"),
                              ("out_record", "inputnode.template_record"),
                              ("out_record_model", "inputnode.model_record")]),
        (qc, ds_wf, [("out_record", "inputnode.iqm_record"), ("out_reference_figure", "inputnode.reference_figure"),
                     ("out_image_figure", "inputnode.image_figure")]),
    ])  # fmt: skip
