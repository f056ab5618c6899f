"""The methods text: what ran, in words a paper's methods section can take (as fMRIPrep's boilerplate), with a
reference for each method and tool.

Written from the records the run left, never from the options alone: each processed image's sidecars (its N4,
brain extraction, registrations, tissue classes, normalisation, quality rules, co-registration, lesion mask,
prediction), each run's ``environment.json`` (versions), and a study's ``results.json`` (design, splits and
leakage checks, network, baselines, metrics with intervals). Only what ran appears: a run without ``--model``
has no inference paragraph, a dataset registered affinely has no nonlinear one. When images were processed
differently (another bidsdl version, another registration), each variant says how many images it covers.

Citations are ``[@key]`` into :data:`~pipeline.reports.references.REFERENCES`; ``methods.md`` keeps them (pandoc
reads them with ``references.bib``), the HTML reports number them.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import derivatives
from .references import REFERENCES, bibtex, cited, numbered

#: The sections, in the order they are written.
SECTIONS = ("Software", "Anatomical preprocessing", "Other contrasts", "Quality control", "Inference", "Learning",
            "Evaluation on a new dataset")  # fmt: skip


@dataclass
class Methods:
    """Paragraphs by section (each paragraph a string with ``[@key]`` citations)."""

    sections: dict[str, list[str]] = field(default_factory=dict)

    def add(self, section: str, paragraph: str | None) -> None:
        if paragraph:
            self.sections.setdefault(section, []).append(paragraph)

    def ordered(self) -> list[tuple[str, list[str]]]:
        return [(s, self.sections[s]) for s in SECTIONS if self.sections.get(s)]

    def keys(self) -> list[str]:
        return cited(p for _, paragraphs in self.ordered() for p in paragraphs)

    def markdown(self, title: str = "Methods") -> str:
        lines = [f"# {title}", "", "*Written by bidsdl from the records of what ran; cite the works in "
                 "`references.bib` (pandoc: `pandoc --citeproc --bibliography references.bib methods.md`).*", ""]
        for section, paragraphs in self.ordered():
            lines += [f"## {section}", ""]
            for paragraph in paragraphs:
                lines += [paragraph, ""]
        lines += ["## References", ""] + [f"- [@{key}] {REFERENCES[key].text()}" for key in self.keys()]
        return "\n".join(lines) + "\n"

    def bibtex(self) -> str:
        return bibtex(self.keys())

    def context(self) -> dict[str, Any]:
        """What the HTML reports show: sections of paragraphs with numbered citations, and the numbered list."""
        keys = self.keys()
        return {
            "sections": [{"title": s, "paragraphs": numbered(p, keys)} for s, p in self.ordered()],
            "references": [REFERENCES[k].text() for k in keys],
        }


def write_methods(methods: Methods, folder: Path, *, title: str = "Methods") -> Path:
    """``methods.md`` and its ``references.bib`` in ``folder`` (OUTPUT_DIR or a study's; atomic writes)."""
    path = folder / derivatives.GROUP_OUTPUTS["methods"]
    derivatives.write_text(path, methods.markdown(title))
    derivatives.write_text(folder / derivatives.GROUP_OUTPUTS["references"], methods.bibtex())
    return path


# ---------------------------------------------------------------------------------------------------------------
# The participant level: per image, sentences; over images, each sentence once with the share it covers.


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _ml(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


@dataclass(frozen=True)
class ImageRecords:
    """The records of one processed image (``None``: that step did not run or left no record)."""

    source: str
    kind: str
    versions: Mapping[str, str]
    preproc: dict[str, Any] | None = None
    brain_mask: dict[str, Any] | None = None
    affine: dict[str, Any] | None = None
    warp: dict[str, Any] | None = None
    template: dict[str, Any] | None = None
    model_grid: dict[str, Any] | None = None
    morphometry: dict[str, Any] | None = None
    iqm: dict[str, Any] | None = None
    coregistration: dict[str, Any] | None = None
    lesion_mask: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None


def image_records(output_dir: Path, source: str, kind: str, versions: Mapping[str, str]) -> ImageRecords:
    """Read the sidecars of ``source``'s derivatives (the names of :data:`~pipeline.derivatives.DERIVATIVES`)."""
    find = lambda name: derivatives.named_path(output_dir, source, name)  # noqa: E731
    sidecar = lambda name: _read(derivatives.sidecar_of(find(name)))  # noqa: E731
    template_path = find("preproc_template")
    model_grids = sorted(template_path.parent.glob(template_path.name.replace("_desc-", "_res-*_desc-")
                                                   .removesuffix(".nii.gz") + ".json"))  # fmt: skip
    return ImageRecords(
        source=source, kind=kind, versions=versions, preproc=sidecar("preproc"), brain_mask=sidecar("brain_mask"),
        affine=sidecar("xfm"), warp=sidecar("xfm_warp"), template=_read(template_path.with_name(
            template_path.name.removesuffix(".nii.gz") + ".json")),
        model_grid=_read(model_grids[0]) if model_grids else None, morphometry=_read(find("morphometry")),
        iqm=_read(find("iqm")), coregistration=sidecar("xfm_reference"), lesion_mask=sidecar("lesion_mask"),
        prediction=_read(find("prediction")),
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _versions(environment_file: Path) -> Mapping[str, str]:
    """bidsdl's and the key packages' versions of a run (read once per run: an array's tasks share few runs)."""
    environment = _read(environment_file) or {}
    return {"bidsdl": environment.get("bidsdl_version", "unknown"), **environment.get("packages", {})}


def subject_images(output_dir: Path, subject: str) -> list[ImageRecords]:
    """The records of the participant's processed images, with the versions of the run that processed them."""
    status = _read(derivatives.status_path(output_dir, subject)) or {}
    versions = _versions(output_dir / "logs" / status.get("run_id", "-") / "environment.json")
    return [image_records(output_dir, entry["source"], entry.get("kind", "T1w"), versions)
            for entry in status.get("images", []) if entry.get("state") == "done"]  # fmt: skip


def _software(image: ImageRecords) -> str:
    v = image.versions
    return (f"Images were processed with bidsdl {v.get('bidsdl', 'unknown')} [@bidsdl], a BIDS App [@bids; "
            f"@bidsapps] built on Nipype {v.get('nipype', '?')} [@nipype], PyBIDS {v.get('pybids', '?')} "
            f"[@pybids], SimpleITK {v.get('SimpleITK', '?')} [@simpleitk], nilearn {v.get('nilearn', '?')} "
            f"[@nilearn] and PyTorch {v.get('torch', '?')} [@pytorch].")


def _n4(record: dict[str, Any]) -> str | None:
    n4 = record.get("BiasFieldCorrection")
    if not n4:
        return None
    grid = n4.get("fit_voxel_mm")
    return (f"Intensity non-uniformity was corrected with N4 [@n4] ({n4.get('Method', 'N4')}; fitted on a "
            f"{_ml(grid)} mm grid in {n4.get('FittedIn', 'the image')}, {_listing(n4.get('iterations', []))} "
            "iterations per level).")


def _brain(record: dict[str, Any]) -> str:
    networks = ", ".join(f"{role} {str(digest)[:12]}" for role, digest in (record.get("NetworkSHA256") or {}).items())
    return (f"The brain was extracted with deepbet {record.get('Version', '')} [@deepbet], a convolutional network "
            f"trained for T1w brain extraction (probability threshold {record.get('Threshold', 0.5)}; "
            f"{record.get('Postprocessing', 'no post-processing')}"
            + (f"; the networks' sha256: {networks}" if networks else "") + ").")


def _affine(record: dict[str, Any], template: str) -> str:
    reg = record.get("Registration", {})
    s = reg.get("settings", {})
    masked = " The lesion mask was left out of the registration's metric." if reg.get("lesion_masked") else ""
    return (f"The extracted brain was registered to the brain of the {template} template [@mni2009] (nilearn's "
            f"copy) by a similarity then an affine transform ({reg.get('method', 'SimpleITK')}; Mattes mutual "
            f"information [@mattes] with {s.get('histogram_bins', '?')} bins, {reg.get('optimizer', 'gradient')} "
            f"descent, shrink factors {_listing(s.get('similarity_shrink', []))} then "
            f"{_listing(s.get('affine_shrink', []))}; started from {reg.get('initialisation', 'the image centres')}; "
            f"seed {reg.get('seed', '?')}).{masked}")


def _warp(record: dict[str, Any]) -> str:
    reg = record.get("Registration", {})
    s = reg.get("Settings", {})
    masked = " The lesion mask was left out of its metric." if reg.get("LesionMasked") else ""
    return (f"A nonlinear registration followed from the affine: {reg.get('Method', 'ANTs SyN')} [@syn; @antsx] "
            f"({reg.get('Software', 'antspyx')}; {s.get('metric', '?')} metric on a {_ml(s.get('resolution_mm'))} mm "
            f"grid, {_listing(s.get('iterations', []))} iterations per level, gradient step "
            f"{s.get('gradient_step', '?')}, flow and total smoothing {s.get('flow_sigma', '?')} and "
            f"{s.get('total_sigma', '?')} voxels, seed {reg.get('Seed', '?')}).{masked}")


def _morphometry(record: dict[str, Any]) -> str:
    seg = record.get("TissueSegmentation", {})
    atlas = record.get("Atlas", {})
    text = (f"Grey matter, white matter and CSF were classified by a {seg.get('Method', 'Gaussian mixture')} "
            "[@unifiedseg]; their probability maps were brought into template space through the nonlinear "
            "registration and modulated by its Jacobian determinant (so that they keep each tissue's volume) "
            "[@vbm], and the log-Jacobian determinant was kept as a map of local volume.")
    if atlas:
        text += (f" Regional volumes were measured in the {atlas.get('Name', 'atlas')} atlas [@desikan] "
                 f"({atlas.get('Regions', '?')} regions; a region less than "
                 f"{100 * float(record.get('MinRegionCoverage', 0.9)):g}% inside the field of view is not measured).")
    return text


def _resampling(template: dict[str, Any] | None, grid: dict[str, Any] | None, warped: bool) -> str | None:
    if not template:
        return None
    norm = template.get("IntensityNormalization", {})
    text = (f"The bias-corrected image was resampled into template space through the affine "
            f"({template.get('Resolution', '')}, {template.get('Interpolation', 'linear')} interpolation) and its "
            f"intensities normalised by a {norm.get('method', 'z-score')}")
    text += f" ({norm['mask']})." if norm.get("mask") else "."
    if grid:
        text += f" Models learn from a grid of {grid.get('Resolution', '')}."
    if warped:
        text += " The image warped by the nonlinear registration serves the quality checks and the figures."
    return text


def _quality(iqm: dict[str, Any]) -> str | None:
    checks = (iqm.get("qc") or {}).get("checks") or []
    if not checks:
        return None
    rules = "; ".join(f"{c['metric']} ({c['limits']})" for c in checks if c.get("limits"))
    return ("Image quality metrics were computed after MRIQC [@mriqc] (signal- and contrast-to-noise ratios, CJV, "
            "EFC, FBER, the bias field's range) together with checks of the registration and the brain mask, and "
            f"each image was given a verdict by fixed limits (fail, or flag for a person to look): {rules}. "
            "An image that fails is not used by the group level.")


def _coregistration(image: ImageRecords) -> str | None:
    coreg = (image.coregistration or {}).get("Coregistration")
    if not coreg:
        return None
    mask = str(coreg.get("cost_function_mask", "the brain"))
    masked = "; the lesion mask left out" if coreg.get("lesion_masked") and "lesion" not in mask else ""
    return (f"Each {image.kind} image was rigidly co-registered to the T1w of its session ({coreg.get('method', '')}; "
            f"Mattes mutual information [@mattes] in {mask}, the best of "
            f"{len(coreg.get('starts', []))} starting positions{masked}), resampled onto the T1w's grid, corrected by "
            "N4 [@n4] inside the T1w's brain mask and brought into template space through the T1w's transforms, "
            "with the T1w's intensity normalisation rule.")


def _lesions(record: dict[str, Any]) -> str:
    return ("Lesion masks given with the data (`--lesion-masks`) were resampled onto each T1w's grid and into "
            "template space; the registrations left them out of their metric.")


def _prediction(record: dict[str, Any]) -> str:
    models = record.get("models") or []
    names = ", ".join(f"{m.get('name', '?')} (content {str(m.get('content_sha256', ''))[:12]})" for m in models)
    what = (f"labelled ({record.get('label_desc') or 'labels'}) by a sliding window [@monai]" if record.get(
        "predicted") == "labels" else f"given a prediction of {record.get('target', 'the target')}")
    return (f"Each preprocessed image was {what} with the model package(s) {names or 'named in its record'} "
            f"({record.get('task', '')}; bidsdl {models[0].get('bidsdl_version', '?') if models else '?'}), its "
            "inputs prepared as in training; the prediction, the spread across the ensemble's members and the "
            "image's distance from the training images (a Mahalanobis distance of the network's features "
            "[@mahalanobis], and the quality metrics' training ranges) were recorded per image.")


def _image_sentences(image: ImageRecords, template: str) -> list[tuple[str, str]]:
    """(section, sentence) for one image, in the order the steps ran."""
    out: list[tuple[str, str]] = [("Software", _software(image))]
    if image.coregistration:
        out.append(("Other contrasts", _coregistration(image) or ""))
    else:
        out.append(("Anatomical preprocessing", "Each T1w image was audited (header, orientation, voxel size, "
                    "intensities) and reoriented to RAS without resampling."))  # fmt: skip
        for section, text in (("Anatomical preprocessing", image.preproc and _n4(image.preproc)),
                              ("Anatomical preprocessing", image.brain_mask and _brain(image.brain_mask)),
                              ("Anatomical preprocessing", image.affine and _affine(image.affine, template)),
                              ("Anatomical preprocessing", image.warp and _warp(image.warp)),
                              ("Anatomical preprocessing", image.morphometry and _morphometry(image.morphometry)),
                              ("Anatomical preprocessing", _resampling(image.template, image.model_grid,
                                                                       image.warp is not None)),
                              ("Anatomical preprocessing", image.lesion_mask and _lesions(image.lesion_mask)),
                              ("Quality control", image.iqm and _quality(image.iqm))):  # fmt: skip
            if text:
                out.append((section, text))
    if image.prediction:
        out.append(("Inference", _prediction(image.prediction)))
    return [(s, t) for s, t in out if t]


def _unit(kind: str, n: int) -> str:
    return f"{n} {kind} image" + ("s" if n != 1 else "")


def participant_methods(images: Sequence[ImageRecords], methods: Methods | None = None, *,
                        template: str = derivatives.TEMPLATE_SPACE) -> Methods:  # fmt: skip
    """The participant level's paragraphs over ``images``: each sentence once, with how many images of its kind it
    covers when that is not all of them."""
    methods = methods if methods is not None else Methods()
    by_kind: dict[str, list[list[tuple[str, str]]]] = {}
    for image in images:
        by_kind.setdefault("T1w" if not image.coregistration else image.kind, []).append(
            _image_sentences(image, template))
    if not by_kind:
        return methods
    paragraphs: dict[str, list[str]] = {}
    for kind, per_image in by_kind.items():
        counts: dict[tuple[str, str], int] = {}
        for sentences in per_image:
            for item in dict.fromkeys(sentences):
                counts[item] = counts.get(item, 0) + 1
        total = len(per_image)
        for (section, sentence), n in counts.items():
            text = sentence if n == total else f"({n} of the {_unit(kind, total)}:) {sentence}"
            if text not in paragraphs.setdefault(section, []):
                paragraphs[section].append(text)
    n_images = {kind: len(v) for kind, v in by_kind.items()}
    paragraphs.setdefault("Software", []).insert(0, "The outputs described here cover " + ", ".join(
        _unit(k, n) for k, n in n_images.items()) + ".")
    for section in SECTIONS:
        if paragraphs.get(section):
            methods.add(section, " ".join(paragraphs[section]))
    return methods


# ---------------------------------------------------------------------------------------------------------------
# The group level: a study's results.json and an external evaluation.

def _metrics(evaluation: Mapping[str, Any] | None, limit: int = 6) -> str:
    """``mae 6.10 (95% CI 3.83 to 8.44); ...`` from an evaluation (``{"metrics": {...}, "ci": {...}}``)."""
    metrics = (evaluation or {}).get("metrics") or {}
    cis = (evaluation or {}).get("ci") or {}
    parts = []
    ordered = [m for m in _HEADLINES if m in metrics] + [m for m in metrics if m not in _HEADLINES]
    for name in ordered:
        value = metrics[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        text = f"{name} {value:.3f}"
        ci = cis.get(name)
        if isinstance(ci, Sequence) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
            text += f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})"
        parts.append(text)
    return "; ".join(parts[:limit])


#: Metrics a methods text names first (the tasks' headline and chance metrics), the others after them.
_HEADLINES = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "mae", "rmse", "r2", "pearson_r", "dice",
              "hd95")  # fmt: skip

_ARCHITECTURE_REFERENCES = {"conv5fc3": "clinicadl", "unet": "unet; @monai", "resnet": "monai", "densenet": "monai"}


def _design(results: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    nested = results.get("nested")
    stratify = ", ".join([results.get("target", "the target"), *settings.get("stratify", [])])
    inner = (f"{settings.get('n_folds')}-fold cross-validation" if settings.get("n_folds", 1) > 1 else
             f"one validation split of {settings.get('val_size')} of the participants")
    if nested:
        return (f"Performance was estimated by nested cross-validation [@nestedcv]: {nested.get('outer_folds')} outer "
                f"folds, each participant in one outer test fold ({nested.get('n_tested')} participants, "
                f"{nested.get('n_images')} images, each predicted once); within each outer fold, {inner} on its "
                "training participants chose the epochs (early stopping), the threshold and the baselines' "
                "regularisation, and the folds' ensemble predicted the outer test fold. The model for later use "
                "was trained by the same procedure on every participant.")
    share = settings.get("test_size")
    share_text = f"{100 * share:g}%" if isinstance(share, (int, float)) else str(share)
    return (f"The participants were split, stratified by {stratify}, into a test set ({share_text} of them) and the "
            f"rest, on which {inner} trained and validated the network; the folds' ensemble "
            "(mean of their outputs) was evaluated once on the test set.")


def _checks(results: Mapping[str, Any]) -> str | None:
    checks = results.get("checks") or []
    if not checks:
        return None
    listed = "; ".join(f"{c.get('name', '?')}: {c.get('result', '?')}" for c in checks)
    return (f"Every split was made by participant (all images of a person in one split), and leakage was checked "
            f"[@leakage]: {listed}.")


def _network(results: Mapping[str, Any], record: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    model = record.get("model", {})
    architecture = results.get("architecture") or model.get("architecture", "?")
    cite = _ARCHITECTURE_REFERENCES.get(str(architecture).split("-")[0].lower())
    inputs = " and ".join(results.get("inputs") or [])
    grid = record.get("input", {})
    augment = ", ".join(settings.get("augment") or []) or "none"
    reference = f" [@{cite}]" if cite else ""
    text = (f"A {architecture} network{reference} (PyTorch [@pytorch]; {model.get('in_channels', '?')} input "
            f"channel(s): {inputs} on the {grid.get('space', 'template')} grid at "
            f"{_ml(grid.get('resolution_mm', results.get('model_resolution')))} mm) learned {results.get('task')} "
            f"of {results.get('target')} with AdamW [@adamw] (learning rate {settings.get('lr')}, weight decay "
            f"{settings.get('weight_decay')}, batch size {settings.get('batch_size')}), up to "
            f"{settings.get('epochs')} epochs with early stopping on the validation {settings.get('selection_metric')} "
            f"(patience {settings.get('patience')}); augmentation: {augment}; seed {settings.get('seed')}; "
            f"device {results.get('device', '?')}.")
    if settings.get("class_weighting") and results.get("classes"):
        text += f" Classes were balanced by {settings['class_weighting']} weighting."
    if settings.get("ema"):
        text += " The weights' exponential moving average was kept."
    design = results.get("design") or {}
    if design.get("inputs_chosen_by") == "default" and design.get("inputs_reason"):
        text += f" The inputs were bidsdl's default for these outputs ({design['inputs_reason']})."
    return text


def _baselines(results: Mapping[str, Any]) -> list[str]:
    out = []
    for key, label in (("baseline", "A linear baseline"), ("volumes_baseline", "A baseline on regional volumes")):
        baseline = results.get(key)
        if not baseline:
            continue
        text = (f"{label} stood beside the network, trained and tested on the same participants: "
                f"{baseline.get('model')} [@sklearn] on {baseline.get('features')}; regularisation by "
                f"{baseline.get('selection')}.")
        scored = _metrics(baseline.get("test"))
        if scored:
            text += f" Its test scores: {scored}."
        headline = baseline.get("headline")
        comparison = (baseline.get("comparison") or {}).get(headline) if headline else None
        if comparison and isinstance(comparison.get("difference"), (int, float)):
            lo, hi = comparison.get("ci", [None, None])
            interval = f" (95% CI {lo:.3f} to {hi:.3f})." if lo is not None else "."
            text += (f" The network minus this baseline in {headline}, paired on the same test images: "
                     f"{comparison['difference']:.3f}{interval}")
        out.append(text)
    return out


def study_methods(results: Mapping[str, Any], record: Mapping[str, Any], methods: Methods | None = None) -> Methods:
    """The paragraphs of one study: ``results`` its ``results.json``, ``record`` its package's ``model.json``."""
    methods = methods if methods is not None else Methods()
    settings = record.get("learning_settings", {})
    excluded = results.get("excluded") or []
    reasons: dict[str, int] = {}
    for entry in excluded:
        reason = str(entry.get("reason", "?")).split(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    left_out = "; ".join(f"{n}: {r}" for r, n in reasons.items())
    methods.add("Learning", (
        f"The group level gathered the participant level's outputs: {results.get('n_images')} images of "
        f"{results.get('n_subjects')} participants learned from"
        + (f"; {len(excluded)} image(s) left out ({left_out})." if excluded else "; none left out.")
        + " " + _design(results, settings) + (" " + (_checks(results) or ""))
    ))
    methods.add("Learning", _network(results, record, settings))
    scored = _metrics(results.get("test"))
    if scored:
        where = "over every participant of the nested cross-validation" if results.get("nested") else "on the test set"
        methods.add("Learning", f"The network's scores {where}: {scored}. Intervals are 95% percentile intervals over "
                    "bootstrap resamples of participants [@bootstrap].")  # fmt: skip
    for paragraph in _baselines(results):
        methods.add("Learning", paragraph)
    control = results.get("permutation_control")
    if control:
        methods.add("Learning", "As a control, the whole study was run again on shuffled training targets "
                    f"[@permutation]: {control.get('metric')} {_ml(control.get('deep'))} (expected at chance).")
    if results.get("distribution"):
        methods.add("Learning", "The package records its training images' distribution (the network's features: "
                    "mean and shrunk covariance per fold [@mahalanobis]; the quality metrics' ranges), against which "
                    "later predictions are checked: a threshold at the 97.5% prediction bound of the validation "
                    "images' scores, each image's scores by the folds joined by the Cauchy combination [@cauchy].")
    return methods


def external_methods(external: Mapping[str, Any], methods: Methods | None = None) -> Methods:
    """The paragraph of ``group --model``: the models evaluated on a new dataset."""
    methods = methods if methods is not None else Methods()
    models = ", ".join(f"{m.get('name')} (content {str(m.get('content_sha256', ''))[:12]})"
                       for m in external.get("models", []))  # fmt: skip
    text = (f"The model package(s) {models} were evaluated on this dataset: {external.get('n_predicted')} images "
            f"predicted at the participant level, {external.get('n_evaluated', 0)} scored against their reference "
            f"values ({len(external.get('excluded') or [])} not scored, each with its reason; images seen in training "
            f"are never scored as external); {external.get('distribution_checked', 0)} checked against the training "
            f"distribution, {len(external.get('out_of_distribution') or [])} flagged.")
    scored = _metrics(external.get("evaluation"))
    if scored:
        text += f" Scores: {scored} (95% percentile bootstrap intervals over participants [@bootstrap])."
    methods.add("Evaluation on a new dataset", text)
    return methods
