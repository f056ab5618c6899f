"""Top-level workflow builders: one graph for all selected participants.

Only :func:`init_bidsdl_wf` reads the :class:`~pipeline.config.RunConfig`; the builders below it
take plain arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

from nipype.pipeline import engine as pe

from .. import derivatives
from ..bids.layout import AnatImage
from ..bids.pairing import lesion_mask, pair_images
from ..config import RunConfig
from ..derivatives import PYBIDS_ENTITIES, subject_log_dir
from ..kinds import MORPHOMETRY_CHANNELS, REFERENCE_KIND, package_channels
from .anatomical import PREDICTION_SOURCES, init_anat_wf, init_prediction_wf
from .coregistered import REFERENCE_INPUTS, init_coreg_wf


def _node_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text)


def image_key(image: AnatImage) -> str:
    """A name for an image within its subject: every entity that can tell two of its T1w apart.

    >>> image_key(AnatImage(Path("x"), "01", "02", {"subject": "01", "session": "02", "run": "1", "echo": "2"}))
    'ses_02_run_1_echo_2'
    """
    parts = [f"{short}_{image.entities[k]}" for k, short in PYBIDS_ENTITIES.items()
             if short != "sub" and image.entities.get(k)]  # fmt: skip
    return _node_name("_".join(parts)) or REFERENCE_KIND


def image_workflow_name(image: AnatImage) -> str:
    """The name of an image's workflow within its participant's: ``anat_<key>_wf`` for a T1w,
    ``coreg_<kind>_<key>_wf`` for an image aligned to one (its crash files name it)."""
    if image.kind == REFERENCE_KIND:
        return f"anat_{image_key(image)}_wf"
    return f"coreg_{_node_name(image.kind)}_{image_key(image)}_wf"


def executed_node_names(workflow: pe.Workflow, prefix: str = "") -> list[str]:
    """The names (below ``workflow``) of the nodes Nipype runs: every node but the IdentityInterface ones, which
    it drops when it flattens the graph."""
    from nipype.interfaces.utility import IdentityInterface

    names = []
    for node in workflow._graph.nodes():
        if isinstance(node, pe.Workflow):
            names += executed_node_names(node, f"{prefix}{node.name}.")
        elif not isinstance(node.interface, IdentityInterface):
            names.append(prefix + node.name)
    return sorted(names)


def single_subject_name(subject: str) -> str:
    """The name of a participant's workflow (what its nodes' names start with below the top workflow)."""
    return f"sub_{_node_name(subject)}_wf"


def init_single_subject_wf(
    *,
    subject: str,
    images: Sequence[AnatImage],
    bids_dir: Path,
    output_dir: Path,
    model_resolution: float = 2.0,
    seed: int = 42,
    omp_nthreads: int = 1,
    device: str = "cpu",
    brain_helper: str | None = None,
    inference: dict[str, Any] | None = None,
    lesions: Mapping[Path, tuple[Path, str]] | None = None,
    warp_resolution: int | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """All processing of one participant: one anatomical workflow per T1w image, and one per image aligned to a
    T1w of its session (:func:`~pipeline.bids.pairing.pair_images`; an image without one is left out here and
    listed in its status record).

    Parameters
    ----------
    subject
        Participant label without ``sub-``.
    images
        The participant's selected images (T1w and the kinds aligned to them).
    bids_dir, output_dir
        Input BIDS dataset and derivatives root.
    model_resolution, seed, omp_nthreads, device, brain_helper, inference, warp_resolution
        See :func:`~pipeline.workflows.anatomical.init_anat_wf`.
    lesions
        T1w path -> its lesion mask and where that comes from (a BIDS URI): :func:`~pipeline.bids.pairing.lesion_mask`.
    """
    lesions = lesions or {}
    workflow = pe.Workflow(name=name or single_subject_name(subject))
    anat_wfs = {}
    # a model that takes other channels predicts beside the T1w's workflow (their images come after it)
    multichannel = inference is not None and _other_channels(inference)
    for image in (img for img in images if img.kind == REFERENCE_KIND):
        anat_wf = init_anat_wf(bids_dir=bids_dir, output_dir=output_dir, model_resolution=model_resolution, seed=seed,
                               omp_nthreads=omp_nthreads, device=device, brain_helper=brain_helper,
                               inference=None if multichannel else inference,
                               lesion_source=lesions[image.path][1] if image.path in lesions else None,
                               warp_resolution=warp_resolution, name=image_workflow_name(image))  # fmt: skip
        if image.path in lesions:
            anat_wf.inputs.inputnode.lesion_mask = str(lesions[image.path][0])
        anat_wf.inputs.inputnode.t1w = str(image.path)
        anat_wf.inputs.inputnode.metadata = dict(image.metadata)
        anat_wf.inputs.inputnode.source = image.relative_to(bids_dir)
        anat_wf.inputs.inputnode.participant_id = f"sub-{subject}"
        workflow.add_nodes([anat_wf])
        anat_wfs[image.path] = anat_wf
    aligned = _add_coregistered(workflow, images, anat_wfs, set(lesions), bids_dir=bids_dir, output_dir=output_dir,
                                model_resolution=model_resolution, seed=seed, omp_nthreads=omp_nthreads)  # fmt: skip
    if inference is not None and multichannel:
        _add_predictions(workflow, images, anat_wfs, aligned, inference, bids_dir=bids_dir, output_dir=output_dir,
                         model_resolution=model_resolution, omp_nthreads=omp_nthreads)  # fmt: skip
    return workflow


def _add_predictions(workflow: pe.Workflow, images: Sequence[AnatImage], anat_wfs: Mapping[Path, pe.Workflow],
                     aligned: Mapping[Path, Mapping[str, list[pe.Workflow]]], inference: dict[str, Any],
                     **options: Any) -> None:  # fmt: skip
    """Each T1w's prediction by a model of several channels, beside its workflow: fed by it and by the session's
    images of the model's other kinds (``options``: :func:`~pipeline.workflows.anatomical.init_prediction_wf`'s)."""
    for image in (img for img in images if img.kind == REFERENCE_KIND):
        prediction_wf = init_prediction_wf(inference=inference, name=prediction_workflow_name(image), **options)
        for key, (part, field) in PREDICTION_SOURCES.items():
            workflow.connect(anat_wfs[image.path], f"{part}.{field}", prediction_wf, f"inputnode.{key}")
        _connect_channels(workflow, prediction_wf, aligned.get(image.path, {}), inference, anat_wfs[image.path])


def _other_channels(inference: dict[str, Any]) -> list[str]:
    return [kind for kind in inference.get("channels", [REFERENCE_KIND]) if kind != REFERENCE_KIND]


def prediction_workflow_name(image: AnatImage) -> str:
    """The name of a T1w's prediction workflow when it stands beside the T1w's (a model of several channels)."""
    return f"predict_{image_key(image)}_wf"


def _add_coregistered(
    workflow: pe.Workflow,
    images: Sequence[AnatImage],
    anat_wfs: Mapping[Path, pe.Workflow],
    with_lesions: set[Path],
    **options: Any,
) -> dict[Path, dict[str, list[pe.Workflow]]]:
    """One workflow per image aligned to a T1w of its session, fed by that T1w's preprocessing (and its lesion
    mask, for the T1w in ``with_lesions``); ``options``: the keyword arguments of
    :func:`~pipeline.workflows.coregistered.init_coreg_wf` that every image shares. Returns them by T1w and kind
    (in name order)."""
    aligned: dict[Path, dict[str, list[pe.Workflow]]] = {}
    for pairing in pair_images(images):
        if pairing.reference is None:  # listed in the status record, not processed
            continue
        lesion = pairing.reference.path in with_lesions
        coreg_wf = init_coreg_wf(reference=pairing.reference.path, pairing=pairing.reason, lesion=lesion,
                                 name=image_workflow_name(pairing.image), **options)  # fmt: skip
        coreg_wf.inputs.inputnode.image = str(pairing.image.path)
        coreg_wf.inputs.inputnode.metadata = dict(pairing.image.metadata)
        for field in (*REFERENCE_INPUTS, "lesion_t1w") if lesion else REFERENCE_INPUTS:
            workflow.connect(anat_wfs[pairing.reference.path], f"anat_preproc_wf.outputnode.{field}",
                             coreg_wf, f"inputnode.{field}")  # fmt: skip
        aligned.setdefault(pairing.reference.path, {}).setdefault(pairing.image.kind, []).append(coreg_wf)
    return aligned


def _connect_channels(
    workflow: pe.Workflow,
    prediction_wf: pe.Workflow,
    aligned: Mapping[str, list[pe.Workflow]],
    inference: dict[str, Any],
    anat_wf: pe.Workflow,
) -> None:
    """Hand a model's channels other than the T1w to one T1w's prediction: the images of those kinds aligned to it
    (the first by name of each kind, as the group level chose them for training), once their quality passed, and the
    T1w's own morphometry maps (from its ``anat_morphometry_wf``). A T1w without one gets none: its prediction then
    fails, naming the missing kind."""
    from nipype.interfaces.utility import Merge

    kinds = _other_channels(inference)
    maps = anat_wf.get_node("anat_morphometry_wf")
    found = [(maps, f"outputnode.{kind}") if kind in MORPHOMETRY_CHANNELS else
             (aligned.get(kind, [None])[0], None) for kind in kinds]  # fmt: skip
    if any(wf is None for wf, _ in found):
        return
    fields = [("corrected_passed", "others"), ("template_record", "other_records")] if inference.get("labels") else [
        ("passed", "others")]  # fmt: skip
    for output, target in fields:
        merge = pe.Node(Merge(len(found)), name=f"{prediction_wf.name}_{target}", run_without_submitting=True)
        for i, (source_wf, field) in enumerate(found, start=1):
            workflow.connect(source_wf, field or f"outputnode.{output}", merge, f"in{i}")
        workflow.connect(merge, "out", prediction_wf, f"inputnode.{target}")


def _segmentation(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the graph needs of a segmentation model (its labels and grid), or None."""
    if "labels" not in record:
        return None
    return {
        "label_desc": record["label_desc"],
        "structures": [entry["name"] for entry in record["labels"]],
        "resolution_mm": float(record["input"]["resolution_mm"]),
    }


def _inference(config: RunConfig, models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the participant graph needs of ``--model`` (``models``: the packages' checked records, in
    ``config.models``' order): :func:`~pipeline.workflows.anatomical.init_anat_wf`'s ``inference``."""
    return {
        "model_dirs": [str(m) for m in config.models],
        "model_hashes": [record["content_sha256"] for record in models],
        "allow_training_subjects": config.allow_training_subjects,
        "dataset": derivatives.source_dataset(config.bids_dir)["key"],
        "device": config.device,
        "labels": _segmentation(models[0]),
        "channels": package_channels(models[0]),
    }


def init_bidsdl_wf(
    config: RunConfig,
    *,
    subjects: Mapping[str, Sequence[AnatImage]],
    run_id: str,
    work_dir: Path,
    models: Sequence[Mapping[str, Any]] = (),
    brain_helper: str | None = None,
) -> pe.Workflow:
    """The participant-level graph: one sub-workflow per participant, isolated from the others.

    Each participant's crash files go to ``sub-<label>/log/<run_id>/`` in the output, so a failure
    is recorded with its subject and the other participants go on. With ``--model``, every image
    is also predicted (``models``: the packages' records, as :func:`~pipeline.participant.check_models`
    read and checked them before the run).
    ``brain_helper``: the contact of the run's brain-extraction helper.
    """
    inference = _inference(config, models) if config.models else None
    workflow = pe.Workflow(name="bidsdl_wf", base_dir=str(work_dir))
    workflow.config["execution"].update(
        {
            "crashfile_format": "txt",
            "poll_sleep_duration": 0.1,  # the default (2 s) adds seconds per node
            "stop_on_first_crash": str(config.stop_on_first_crash).lower(),
            "remove_unnecessary_outputs": "false",
            # no graph.json/d3.js/index.html at the top of the work dir: array jobs share it
            "create_report": "false",
        }
    )
    for subject, images in subjects.items():
        lesions = {img.path: found for img in images if img.kind == REFERENCE_KIND
                   and (found := lesion_mask(img, config.bids_dir, config.lesion_masks))}  # fmt: skip
        single = init_single_subject_wf(
            subject=subject,
            images=images,
            bids_dir=config.bids_dir,
            output_dir=config.output_dir,
            model_resolution=config.model_resolution,
            seed=config.seed,
            omp_nthreads=config.omp_nthreads,
            device=config.device,
            brain_helper=brain_helper,
            inference=inference,
            lesions=lesions,
            warp_resolution=config.warp_resolution if config.registration == "syn" else None,
        )
        single.config["execution"] = {
            **workflow.config["execution"],
            "crashdump_dir": str(subject_log_dir(config.output_dir, subject) / run_id),
        }
        for node in single._get_all_nodes():
            node.config = deepcopy(single.config)
        workflow.add_nodes([single])
    return workflow
