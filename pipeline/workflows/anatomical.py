"""Per-image anatomical workflows: audit, preprocessing and quality control."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..derivatives import SOURCE_KIND
from ..interfaces.audit import AuditImage
from ..interfaces.derivatives import DerivativesSink, sink_inputs
from ..interfaces.inference import MaskSurface, RunInference, RunSegmentation
from ..interfaces.lesions import LesionOutputs, PrepareLesionMask
from ..interfaces.preprocess import (
    ComputeIQMs,
    ExtractBrain,
    N4BiasCorrection,
    PrepareT1w,
    QualityGate,
    RegisterToTemplate,
    ResampleToTemplate,
)
from ..interfaces.reports import PlotReportlets
from .morphometry import MORPHOMETRY_SOURCES, init_anat_morphometry_wf
from .outputs import (
    DERIVATIVE_INPUTS,
    INFERENCE_INPUTS,
    SEGMENTATION_INPUTS,
    init_anat_derivatives_wf,
    init_inference_derivatives_wf,
    init_segmentation_derivatives_wf,
)

#: What the preprocessing hands on (outputnode fields of :func:`init_anat_preproc_wf`).
PREPROC_OUTPUTS = (
    "t1w_ras", "prepare_record", "t1w_corrected", "bias_field", "n4_record", "mask_t1w", "brain_record",
    "transform", "registration_record", "t1w_template", "mask_template", "t1w_model", "mask_model",
    "template_mask_t1w", "template_record", "model_record",
)  # fmt: skip
#: What quality control hands on (outputnode fields of :func:`init_anat_qc_wf`); ``t1w_model_passed`` is
#: the model-grid T1w, handed on only when the image passed quality control.
QC_OUTPUTS = (
    "iqm_record", "mosaic", "brain_figure", "registration_subject", "registration_template", "bias_figure",
    "surface", "surface_record", "mesh_figure", "t1w_model_passed",
)  # fmt: skip


def init_anat_audit_wf(*, bids_dir: Path, output_dir: Path, name: str = "anat_audit_wf") -> pe.Workflow:
    """Audit one T1w image and save the record as ``..._desc-audit_T1w.json``.

    Inputs: ``t1w`` (path in ``bids_dir``), ``metadata`` (sidecar dict).
    Outputs: ``audit_record`` (JSON in the working folder), ``readable``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["t1w", "metadata"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["audit_record", "readable"]), name="outputnode")
    audit = pe.Node(AuditImage(bids_dir=str(bids_dir)), name="audit")
    ds_audit = pe.Node(
        DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir), **sink_inputs("audit")),
        name="ds_audit",
        run_without_submitting=True,
        overwrite=True,  # always re-save: cheap, and restores a deleted output
    )
    workflow.connect([
        (inputnode, audit, [("t1w", "in_file"), ("metadata", "metadata")]),
        (inputnode, ds_audit, [("t1w", "source_file")]),
        (audit, ds_audit, [("out_record", "in_file")]),
        (audit, outputnode, [("out_record", "audit_record"), ("readable", "readable")]),
    ])  # fmt: skip
    return workflow


def init_anat_preproc_wf(
    *,
    model_resolution: float,
    seed: int,
    omp_nthreads: int,
    device: str = "cpu",
    brain_helper: str | None = None,
    lesion_source: str | None = None,
    name: str = "anat_preproc_wf",
) -> pe.Workflow:
    """Reorient, brain extraction (deepbet), N4 inside the brain, brain-to-brain affine registration to
    MNI152NLin2009aSym, resampling and normalisation.

    Parameters
    ----------
    model_resolution
        Voxel size (mm) of the cropped template-space grid that learning uses.
    seed
        Seed of the registration's random metric sampling.
    omp_nthreads
        Threads for SimpleITK and torch in each step.
    device
        Where the brain-extraction networks run (``cpu``, ``cuda`` or ``auto``).
    brain_helper
        Contact of the run's brain-extraction helper (:mod:`pipeline.interfaces.brain_service`); None: each
        process starts its own.
    lesion_source
        With a lesion mask (input ``lesion_mask``): where it comes from (a BIDS URI, for the sidecars). The mask
        is checked against the T1w's grid (another grid fails the T1w with both shapes named), made RAS and left
        out of the registration's metric (cost-function masking); outputs ``lesion_t1w`` and ``lesion_record``.

    Inputs: ``t1w`` (and ``lesion_mask``). Outputs: see :data:`PREPROC_OUTPUTS`.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["t1w", "lesion_mask"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=[*PREPROC_OUTPUTS, "lesion_t1w", "lesion_record"]),
                         name="outputnode")  # fmt: skip
    prepare = pe.Node(PrepareT1w(), name="prepare", mem_gb=1.0)
    # deepbet on the RAS image; N4 then fits its field inside the brain (not the neck and shoulders). The
    # networks run in the process's one helper, which serves one request at a time: the node itself only
    # waits, so it holds one slot, and another image's steps run meanwhile.
    brain = pe.Node(ExtractBrain(device=device, num_threads=omp_nthreads), name="brain_extraction",
                    n_procs=1, mem_gb=0.5)  # fmt: skip
    if brain_helper:
        brain.inputs.helper = brain_helper
    n4 = pe.Node(N4BiasCorrection(num_threads=omp_nthreads), name="n4", n_procs=omp_nthreads, mem_gb=1.5)
    # The registration metric runs on one thread (reproducible sums): reserve one core, so that
    # MultiProc runs several subjects' registrations side by side.
    register = pe.Node(RegisterToTemplate(seed=seed, num_threads=omp_nthreads), name="register",
                       n_procs=1, mem_gb=1.0)  # fmt: skip
    to_template = pe.Node(ResampleToTemplate(model_resolution=model_resolution, num_threads=omp_nthreads),
                          name="to_template", n_procs=omp_nthreads, mem_gb=1.5)  # fmt: skip
    if lesion_source is not None:
        lesion = pe.Node(PrepareLesionMask(source=lesion_source), name="prepare_lesion", mem_gb=0.5)
        workflow.connect([
            (inputnode, lesion, [("lesion_mask", "in_file"), ("t1w", "in_t1w")]),
            (lesion, register, [("out_mask", "in_lesion")]),
            (lesion, outputnode, [("out_mask", "lesion_t1w"), ("out_record", "lesion_record")]),
        ])  # fmt: skip
    workflow.connect([
        (inputnode, prepare, [("t1w", "in_file")]),
        (inputnode, brain, [("t1w", "source_name")]),
        (prepare, brain, [("out_file", "in_file")]),
        (prepare, n4, [("out_file", "in_file")]),
        (brain, n4, [("out_mask", "in_mask")]),
        (n4, register, [("out_file", "in_file")]),
        (brain, register, [("out_mask", "in_mask")]),
        (n4, to_template, [("out_file", "in_file")]),
        (brain, to_template, [("out_mask", "in_mask")]),
        (register, to_template, [("out_transform", "in_transform")]),
        (prepare, outputnode, [("out_file", "t1w_ras"), ("out_record", "prepare_record")]),
        (brain, outputnode, [("out_mask", "mask_t1w"), ("out_record", "brain_record")]),
        (n4, outputnode, [("out_file", "t1w_corrected"), ("out_bias", "bias_field"), ("out_record", "n4_record")]),
        (register, outputnode, [("out_transform", "transform"), ("out_record", "registration_record")]),
        (to_template, outputnode, [
            ("out_t1w", "t1w_template"), ("out_mask", "mask_template"), ("out_t1w_model", "t1w_model"),
            ("out_mask_model", "mask_model"), ("out_template_mask_t1w", "template_mask_t1w"),
            ("out_record", "template_record"), ("out_record_model", "model_record"),
        ]),
    ])  # fmt: skip
    return workflow


def init_anat_qc_wf(*, name: str = "anat_qc_wf") -> pe.Workflow:
    """Image quality metrics, the quality verdict and the report's figures for one preprocessed T1w.

    The quality gate fails the image when its verdict is ``fail`` (after the metrics, figures and
    derivatives are saved, so the report shows the evidence) and hands ``t1w_model`` on otherwise.

    Inputs: the preprocessing outputs plus ``audit_record`` (and ``warp_record``, the nonlinear registration's, when it
    ran: its quality joins the checks). Outputs: see :data:`QC_OUTPUTS`.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["audit_record", *PREPROC_OUTPUTS, "warp_record"]),
                        name="inputnode")  # fmt: skip
    outputnode = pe.Node(IdentityInterface(fields=list(QC_OUTPUTS)), name="outputnode")
    iqms = pe.Node(ComputeIQMs(), name="iqms", mem_gb=2.0)
    gate = pe.Node(QualityGate(), name="quality_gate", run_without_submitting=True)
    reportlets = pe.Node(PlotReportlets(), name="reportlets", mem_gb=1.5)
    mesh = pe.Node(MaskSurface(), name="mesh", mem_gb=1.0)
    workflow.connect([
        (inputnode, mesh, [("mask_t1w", "in_mask")]),
        (mesh, outputnode, [("out_surface", "surface"), ("out_record", "surface_record"),
                            ("out_figure", "mesh_figure")]),
        (inputnode, iqms, [
            ("t1w_ras", "in_raw"), ("t1w_corrected", "in_corrected"), ("bias_field", "in_bias"),
            ("mask_t1w", "in_mask"), ("template_mask_t1w", "in_template_mask"), ("transform", "in_transform"),
            ("t1w_template", "in_registered"),
            ("audit_record", "in_audit"), ("registration_record", "in_registration"), ("brain_record", "in_brain"),
            ("prepare_record", "in_prepare"), ("warp_record", "in_warp"),
        ]),
        (inputnode, reportlets, [
            ("t1w_ras", "in_raw"), ("t1w_corrected", "in_corrected"), ("bias_field", "in_bias"),
            ("mask_t1w", "in_mask_t1w"), ("template_mask_t1w", "in_template_mask_t1w"),
            ("t1w_template", "in_registered"), ("mask_template", "in_mask_template"),
        ]),
        (iqms, outputnode, [("out_record", "iqm_record")]),
        (iqms, gate, [("out_record", "in_record")]),
        (inputnode, gate, [("t1w_model", "in_file")]),
        (gate, outputnode, [("out_file", "t1w_model_passed")]),
        (reportlets, outputnode, [
            ("out_mosaic", "mosaic"), ("out_brain", "brain_figure"),
            ("out_registration_subject", "registration_subject"),
            ("out_registration_template", "registration_template"), ("out_bias", "bias_figure"),
        ]),
    ])  # fmt: skip
    return workflow


def init_anat_wf(
    *,
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    seed: int,
    omp_nthreads: int,
    device: str = "cpu",
    brain_helper: str | None = None,
    inference: dict[str, Any] | None = None,
    lesion_source: str | None = None,
    warp_resolution: int | None = None,
    name: str = "anat_wf",
) -> pe.Workflow:
    """Everything done to one T1w: audit, preprocessing, QC, inference with ``--model``, the derivatives.

    ``device``, ``brain_helper``: see :func:`init_anat_preproc_wf`. ``inference``: the keyword arguments of
    :func:`init_anat_inference_wf` but ``omp_nthreads``, or None for no inference. An image that fails
    quality control is not predicted. ``lesion_source``: where the T1w's lesion mask comes from (a BIDS URI,
    for the sidecars; the mask itself is the input ``lesion_mask``), or None without one: see
    :func:`init_anat_preproc_wf` and :func:`init_lesion_wf`. ``warp_resolution``: the nonlinear registration's
    grid (mm; :func:`~pipeline.workflows.morphometry.init_anat_morphometry_wf`), or None for the affine alone.

    Inputs: ``t1w`` (path in ``bids_dir``), ``metadata`` (sidecar dict), with ``inference`` ``source`` (the
    path relative to ``bids_dir``) and ``participant_id``, with ``lesion_source`` ``lesion_mask``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["t1w", "metadata", "source", "participant_id", "lesion_mask"]),
                        name="inputnode")  # fmt: skip
    audit_wf = init_anat_audit_wf(bids_dir=bids_dir, output_dir=output_dir)
    preproc_wf = init_anat_preproc_wf(model_resolution=model_resolution, seed=seed, omp_nthreads=omp_nthreads,
                                      device=device, brain_helper=brain_helper, lesion_source=lesion_source)
    qc_wf = init_anat_qc_wf()
    common: dict[str, Any] = {"bids_dir": bids_dir, "output_dir": output_dir, "model_resolution": model_resolution}
    ds_wf = init_anat_derivatives_wf(**common)
    workflow.connect([
        (inputnode, audit_wf, [("t1w", "inputnode.t1w"), ("metadata", "inputnode.metadata")]),
        (inputnode, preproc_wf, [("t1w", "inputnode.t1w")]),
        (inputnode, ds_wf, [("t1w", "inputnode.source_file")]),
        (audit_wf, qc_wf, [("outputnode.audit_record", "inputnode.audit_record")]),
    ])  # fmt: skip
    for field in PREPROC_OUTPUTS:
        workflow.connect(preproc_wf, f"outputnode.{field}", qc_wf, f"inputnode.{field}")
        if field in DERIVATIVE_INPUTS:
            workflow.connect(preproc_wf, f"outputnode.{field}", ds_wf, f"inputnode.{field}")
    for field in QC_OUTPUTS:
        if field in DERIVATIVE_INPUTS:
            workflow.connect(qc_wf, f"outputnode.{field}", ds_wf, f"inputnode.{field}")
    parts = {"inputnode": inputnode, audit_wf.name: audit_wf, preproc_wf.name: preproc_wf, qc_wf.name: qc_wf}
    if warp_resolution is not None:
        _add_morphometry(workflow, parts, lesion=lesion_source is not None, **{**common, "seed": seed,
                         "warp_resolution": warp_resolution, "omp_nthreads": omp_nthreads})  # fmt: skip
    if lesion_source is not None:
        _add_lesion(workflow, parts, bids_dir=bids_dir, output_dir=output_dir)
    if inference is not None:
        prediction_wf = init_prediction_wf(inference=inference, omp_nthreads=omp_nthreads, **common)
        for key, (part, field) in PREDICTION_SOURCES.items():
            workflow.connect(parts[part], field, prediction_wf, f"inputnode.{key}")
    return workflow


def _add_morphometry(workflow: pe.Workflow, parts: dict[str, Any], *, lesion: bool, **options: Any) -> None:
    """The nonlinear registration and morphometry beside one T1w's preprocessing (``options``:
    :func:`~pipeline.workflows.morphometry.init_anat_morphometry_wf`'s); its quality goes to the QC."""
    morphometry_wf = init_anat_morphometry_wf(lesion=lesion, **options)
    preproc_wf = parts["anat_preproc_wf"]
    workflow.connect(parts["inputnode"], "t1w", morphometry_wf, "inputnode.source_file")
    for field in (*MORPHOMETRY_SOURCES, *(("lesion_t1w",) if lesion else ())):
        workflow.connect(preproc_wf, f"outputnode.{field}", morphometry_wf, f"inputnode.{field}")
    workflow.connect(morphometry_wf, "outputnode.warp_record", parts["anat_qc_wf"], "inputnode.warp_record")
    parts[morphometry_wf.name] = morphometry_wf


def _add_lesion(workflow: pe.Workflow, parts: dict[str, Any], *, bids_dir: Path, output_dir: Path) -> None:
    """The lesion mask's way through one T1w's workflow ``parts``: into the registration, then its outputs."""
    inputnode, preproc_wf = parts["inputnode"], parts["anat_preproc_wf"]
    lesion_wf = init_lesion_wf(bids_dir=bids_dir, output_dir=output_dir)
    workflow.connect(inputnode, "lesion_mask", preproc_wf, "inputnode.lesion_mask")
    workflow.connect(inputnode, "t1w", lesion_wf, "inputnode.t1w")
    for field in ("lesion_t1w", "lesion_record", "t1w_corrected", "mask_t1w", "transform"):
        workflow.connect(preproc_wf, f"outputnode.{field}", lesion_wf, f"inputnode.{field}")


#: Where a prediction's inputs come from in one T1w's workflow (:func:`init_anat_wf`): the part and its field.
PREDICTION_SOURCES: dict[str, tuple[str, str]] = {
    "source": ("inputnode", "source"), "participant_id": ("inputnode", "participant_id"), "t1w": ("inputnode", "t1w"),
    "audit_record": ("anat_audit_wf", "outputnode.audit_record"),
    "passed": ("anat_qc_wf", "outputnode.t1w_model_passed"),
    "iqm_record": ("anat_qc_wf", "outputnode.iqm_record"),
    **{field: ("anat_preproc_wf", f"outputnode.{field}")
       for field in ("t1w_corrected", "transform", "template_record", "mask_model", "model_record")},
}  # fmt: skip


def init_prediction_wf(
    *,
    inference: dict[str, Any],
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float,
    omp_nthreads: int,
    name: str = "prediction_wf",
) -> pe.Workflow:
    """One T1w's prediction with ``--model`` and its derivatives: a segmentation (``inference["labels"]``) or a
    whole-image prediction (:func:`init_anat_segmentation_wf`, :func:`init_anat_inference_wf`). Built inside the
    T1w's workflow, or beside it when the model takes other channels (their images come from the session's other
    workflows, which the T1w's feeds).

    Inputs: the keys of :data:`PREDICTION_SOURCES`, and ``others``, ``other_records`` (the model's other channels).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=[*PREDICTION_SOURCES, "others", "other_records"]), name="inputnode")
    options = {k: v for k, v in inference.items() if k not in ("labels", "channels")}
    segmentation = inference.get("labels")
    fields: list[str]
    outputs: tuple[str, ...]
    if segmentation:
        model_wf = init_anat_segmentation_wf(**options, omp_nthreads=omp_nthreads)
        ds_wf = init_segmentation_derivatives_wf(bids_dir=bids_dir, output_dir=output_dir,
                                                 model_resolution=segmentation["resolution_mm"],
                                                 label_desc=segmentation["label_desc"],
                                                 structures=segmentation["structures"])  # fmt: skip
        fields, outputs = ["source", "participant_id", "t1w", "audit_record", "iqm_record", "passed", "t1w_corrected",
                           "transform", "template_record", "others", "other_records"], SEGMENTATION_INPUTS  # fmt: skip
    else:
        model_wf = init_anat_inference_wf(**options, omp_nthreads=omp_nthreads)
        ds_wf = init_inference_derivatives_wf(bids_dir=bids_dir, output_dir=output_dir,
                                              model_resolution=model_resolution)  # fmt: skip
        fields, outputs = ["source", "participant_id", "audit_record", "iqm_record", "passed", "mask_model",
                           "model_record", "others"], INFERENCE_INPUTS  # fmt: skip
    for field in fields:
        workflow.connect(inputnode, field, model_wf, f"inputnode.{field}")
    workflow.connect(inputnode, "t1w", ds_wf, "inputnode.source_file")
    for field in outputs:
        workflow.connect(model_wf, f"outputnode.{field}", ds_wf, f"inputnode.{field}")
    return workflow

def init_lesion_wf(*, bids_dir: Path, output_dir: Path, name: str = "lesion_wf") -> pe.Workflow:
    """A T1w's lesion mask (prepared by :func:`init_anat_preproc_wf`) brought into template space, drawn on the
    T1w and saved (``label-lesion_mask`` on the RAS T1w grid and in template space, with their volume).

    Inputs: ``t1w`` (in BIDS_DIR), ``lesion_t1w``, ``lesion_record``, ``t1w_corrected``, ``mask_t1w``, ``transform``.
    """
    workflow = pe.Workflow(name=name)
    fields = ["t1w", "lesion_t1w", "lesion_record", "t1w_corrected", "mask_t1w", "transform"]
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    outputs = pe.Node(LesionOutputs(), name="lesion_outputs", mem_gb=1.0)
    described = {
        "lesion_mask": "The lesion mask given with the T1w, reoriented as the T1w (RAS, no resampling); left out of "
        "the registration's metric and of the session's co-registrations",
        "lesion_mask_template": "The lesion mask in template space through the T1w's affine (linear, > 0.5); "
        "VolumeMl is the mask's volume on the T1w's grid",
        "fig_lesions": "",
    }
    sinks = {name: pe.Node(DerivativesSink(base_directory=str(output_dir), bids_dir=str(bids_dir),
                                           metadata={"Description": text} if text else {}, **sink_inputs(name)),
                           name=f"ds_{name}", run_without_submitting=name == "fig_lesions", overwrite=True)
             for name, text in described.items()}  # fmt: skip
    sinks["lesion_mask"].inputs.reference = {"suffix": SOURCE_KIND, "desc": "preproc"}
    workflow.connect([
        (inputnode, outputs, [("lesion_t1w", "in_mask"), ("t1w_corrected", "in_corrected"), ("mask_t1w", "in_brain"),
                              ("transform", "in_transform")]),
        (inputnode, sinks["lesion_mask"], [("lesion_t1w", "in_file"), ("lesion_record", "metadata_file")]),
        (outputs, sinks["lesion_mask_template"], [("out_template", "in_file")]),
        (inputnode, sinks["lesion_mask_template"], [("lesion_record", "metadata_file")]),
        (outputs, sinks["fig_lesions"], [("out_figure", "in_file")]),
    ])  # fmt: skip
    for sink in sinks.values():
        workflow.connect(inputnode, "t1w", sink, "source_file")
    return workflow


def init_anat_segmentation_wf(
    *,
    model_dirs: Sequence[str],
    model_hashes: Sequence[str],
    allow_training_subjects: bool,
    dataset: str,
    device: str,
    omp_nthreads: int,
    name: str = "anat_segmentation_wf",
) -> pe.Workflow:
    """Segment one preprocessed T1w with segmentation model packages (an ensemble when several).

    Parameters: as :func:`init_anat_inference_wf`. Inputs: ``source``, ``participant_id``, ``t1w`` (in BIDS_DIR:
    the grid of the native labels), ``audit_record``, ``passed`` (set only when quality control passed),
    ``t1w_corrected``, ``transform``, ``template_record``. Outputs: see
    :data:`~pipeline.workflows.outputs.SEGMENTATION_INPUTS`.
    """
    fields = ["source", "participant_id", "t1w", "audit_record", "iqm_record", "passed", "t1w_corrected", "transform",
              "template_record", "others", "other_records"]  # fmt: skip
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=list(SEGMENTATION_INPUTS)), name="outputnode")
    segment = _model_node(
        RunSegmentation, "segment", model_dirs, model_hashes, (allow_training_subjects, dataset), device, omp_nthreads,
        mem_gb=2.0,
    )
    workflow.connect([
        (inputnode, segment, [("source", "source"), ("participant_id", "participant_id"), ("t1w", "in_t1w"),
                              ("audit_record", "in_audit"), ("iqm_record", "in_iqm"), ("passed", "in_passed"),
                              ("t1w_corrected", "in_file"),
                              ("transform", "in_transform"), ("template_record", "in_template_record"),
                              ("others", "in_others"), ("other_records", "in_other_records")]),
        (segment, outputnode, [("out_record", "prediction"), ("out_dseg", "dseg"), ("out_dseg_model", "dseg_model"),
                               ("out_table", "dseg_table"), ("out_metadata", "segmentation_record"),
                               ("out_figure", "segmentation_figure"), ("out_meshes", "meshes"),
                               ("out_mesh_figure", "segmentation_mesh_figure"), ("out_uncertainty", "uncertainty"),
                               ("out_uncertainty_figure", "uncertainty_figure")]),
    ])  # fmt: skip
    return workflow


def init_anat_inference_wf(
    *,
    model_dirs: Sequence[str],
    model_hashes: Sequence[str],
    allow_training_subjects: bool,
    dataset: str,
    device: str,
    omp_nthreads: int,
    name: str = "anat_inference_wf",
) -> pe.Workflow:
    """Predict one preprocessed T1w with the model packages (an ensemble when several).

    Parameters
    ----------
    model_dirs, model_hashes
        The packages and their ``content_sha256`` (a changed package re-runs the node).
    allow_training_subjects
        Predict subjects the models saw in training (marked as such) instead of refusing.
    dataset
        The key of BIDS_DIR's dataset (:func:`~pipeline.derivatives.source_dataset`): participant IDs match the
        models' training subjects only within the same dataset.
    device, omp_nthreads
        Where the networks run, and torch's threads on CPU.

    Inputs: ``source`` (relative to BIDS_DIR), ``participant_id``, ``audit_record``, ``passed`` (the model-grid T1w,
    set only when quality control passed), ``mask_model``, ``model_record`` (the resampling record: its space),
    ``others`` (the model's other channels' model-grid images).
    Outputs: see :data:`~pipeline.workflows.outputs.INFERENCE_INPUTS`.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=["source", "participant_id", "audit_record", "iqm_record", "passed", "mask_model", "model_record",
                    "others"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(IdentityInterface(fields=list(INFERENCE_INPUTS)), name="outputnode")
    infer = _model_node(
        RunInference, "infer", model_dirs, model_hashes, (allow_training_subjects, dataset), device, omp_nthreads,
        mem_gb=1.5,
    )
    workflow.connect([
        (inputnode, infer, [("source", "source"), ("participant_id", "participant_id"), ("audit_record", "in_audit"),
                            ("iqm_record", "in_iqm"),
                            ("passed", "in_file"), ("mask_model", "in_mask"), ("model_record", "in_record"),
                            ("others", "in_others")]),
        (infer, outputnode, [("out_record", "prediction"), ("out_saliency", "saliency"), ("out_gradcam", "gradcam"),
                             ("out_metadata", "attribution_record"), ("out_figure", "attribution_figure")]),
    ])  # fmt: skip
    return workflow


def _model_node(
    interface: type,
    name: str,
    model_dirs: Sequence[str] | Sequence[Path],
    model_hashes: Sequence[str],
    guard: tuple[bool, str],
    device: str,
    omp_nthreads: int,
    *,
    mem_gb: float,
) -> pe.Node:
    """A node that runs model packages on one image (inference or segmentation); ``guard``: whether training
    subjects may be predicted, and the key of the dataset whose participant IDs they are compared within."""
    return pe.Node(
        interface(
            model_dirs=list(model_dirs),
            model_hashes=list(model_hashes),
            allow_training_subjects=guard[0],
            dataset=guard[1],
            device=device,
            num_threads=omp_nthreads,
        ),
        name=name,
        n_procs=omp_nthreads,
        mem_gb=mem_gb,
    )
