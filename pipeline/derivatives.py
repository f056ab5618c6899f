"""Everything bidsdl writes into OUTPUT_DIR goes through this module.

BIDS-derivative names are built from entities (never by string concatenation in workflows),
JSON records carry their provenance, and every file is written atomically: to a temporary name in
the same folder, flushed, then renamed, so an interrupted run never leaves a file that looks
complete. ``dataset_description.json`` is created under a lock so that many participant jobs may
start at once in the same OUTPUT_DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputDataError, OutputNotWritable, UsageError
from .kinds import DEFAULT_CHANNELS, PROCESSED_KINDS, REFERENCE_KIND

LOGGER = logging.getLogger(__name__)

CODE_URL = "https://github.com/bidsdl/bidsdl"
BIDS_VERSION = "1.9.0"

#: Entity order of BIDS file names (the subset bidsdl reads or writes, in the BIDS schema's order;
#: ``from``/``to``/``mode`` of transforms, which the schema does not order, before ``space``).
ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "flip", "inv", "mt", "part",
    "from", "to", "mode", "space", "chunk", "res", "den", "label", "desc",
)  # fmt: skip
#: Entities that can tell two T1w of one participant apart (those BIDS allows on a T1w): they carry
#: over to the derivatives' names.
SOURCE_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "part", "chunk")
#: pybids' names of :data:`SOURCE_ENTITIES`.
PYBIDS_ENTITIES = {
    "subject": "sub", "session": "ses", "task": "task", "acquisition": "acq", "ceagent": "ce",
    "reconstruction": "rec", "run": "run", "echo": "echo", "part": "part", "chunk": "chunk",
}  # fmt: skip

#: The template every template-space derivative is in (nilearn's MNI152 2009a, symmetric).
TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: Stands for the model grid's ``res`` label in :data:`DERIVATIVES` (it depends on --model-resolution).
MODEL_RES = "MODEL"
#: Stands for the ``desc`` of a segmentation's labels (``--label-desc``, or the model's) in :data:`DERIVATIVES`.
LABEL_DESC = "LABELS"
#: Stands for one structure's name (letters and digits only, as BIDS labels are) in :data:`DERIVATIVES`.
STRUCTURE = "STRUCTURE"


def resolution_label(resolution_mm: float) -> str:
    """The BIDS ``res`` label of a resolution: ``2`` for 2 mm, ``1p5`` for 1.5 mm.

    >>> resolution_label(2.0), resolution_label(1.5)
    ('2', '1p5')
    """
    return f"{resolution_mm:g}".replace(".", "p")


#: A suffix or entity value of :data:`DERIVATIVES` that is the source image's own kind (``T1w``, ``FLAIR`` ...:
#: :data:`pipeline.kinds.IMAGE_KINDS`): ``desc-preproc_T1w`` of a T1w, ``desc-preproc_FLAIR`` of a FLAIR.
SOURCE_KIND = "<kind>"


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of file bidsdl writes for each anatomical image: its entities (besides the source's), suffix
    and extension (:data:`SOURCE_KIND` where they are the source's kind), where it lives (``anat`` or
    ``figures``), and whether BIDS defines it (``bids=False``: listed in OUTPUT_DIR's .bidsignore). Writers and
    readers both name files through it (:func:`named_path`)."""

    suffix: str
    extension: str
    entities: Mapping[str, str] = dataclasses.field(default_factory=dict)
    datatype: str = "anat"
    bids: bool = True

    def resolved(
        self, model_resolution: float | None = None, *, label_desc: str | None = None, structure: str | None = None,
        source_kind: str = REFERENCE_KIND,
    ) -> dict[str, str]:  # fmt: skip
        """The entities, with the model grid's ``res`` label, the labels' ``desc``, the structure and the source's
        kind filled in."""
        values = {MODEL_RES: None if model_resolution is None else resolution_label(model_resolution),
                  LABEL_DESC: label_desc, STRUCTURE: None if structure is None else bids_label(structure),
                  SOURCE_KIND: source_kind}  # fmt: skip
        out = {}
        for key, value in self.entities.items():
            if value in values:
                if values[value] is None:
                    raise ValueError(f"a {self.suffix} named {key}-{value} needs that value")
                value = values[value]  # type: ignore[assignment]
            out[key] = value
        return out

    def suffix_of(self, source_kind: str) -> str:
        """The suffix of this derivative of an image of ``source_kind``."""
        return source_kind if self.suffix == SOURCE_KIND else self.suffix

    @property
    def patterns(self) -> tuple[str, ...]:
        """Globs of the file name by its ``desc``, suffix and extension (the last parts of a BIDS name; the
        entities before them vary with the source), one per processed kind: ``*_desc-iqm_T1w.json``. One ``*``
        only: the BIDS validator's .bidsignore matching fails on some names with two."""
        return self.patterns_of(PROCESSED_KINDS)

    def patterns_of(self, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """:attr:`patterns` of the derivatives of images of ``kinds`` only."""
        desc = self.entities.get("desc")
        fixed = f"desc-{desc}_" if desc and desc != LABEL_DESC else ""
        suffixes = dict.fromkeys(self.suffix_of(kind) for kind in kinds)
        return tuple(f"*_{fixed}{suffix}{self.extension}" for suffix in suffixes)


def _figure(desc: str) -> Kind:
    return Kind(SOURCE_KIND, ".png", {"desc": desc}, datatype="figures", bids=False)


_TPL = {"space": TEMPLATE_SPACE}
_MODEL = {"space": TEMPLATE_SPACE, "res": MODEL_RES}
#: Every file bidsdl writes per T1w, by name: the one table of derivative names.
DERIVATIVES: dict[str, Kind] = {
    "audit": Kind(SOURCE_KIND, ".json", {"desc": "audit"}, bids=False),
    "iqm": Kind(SOURCE_KIND, ".json", {"desc": "iqm"}, bids=False),
    "preproc": Kind(SOURCE_KIND, ".nii.gz", {"desc": "preproc"}),
    "bias_field": Kind(SOURCE_KIND, ".nii.gz", {"desc": "biasfield"}),
    "brain_mask": Kind("mask", ".nii.gz", {"desc": "brain"}),
    "template_mask": Kind("mask", ".nii.gz", {"desc": "template"}),
    "xfm": Kind("xfm", ".txt", {"from": SOURCE_KIND, "to": TEMPLATE_SPACE, "mode": "image"}, bids=False),
    "preproc_template": Kind(SOURCE_KIND, ".nii.gz", {**_TPL, "desc": "preproc"}),
    "mask_template": Kind("mask", ".nii.gz", {**_TPL, "desc": "brain"}),
    "preproc_model": Kind(SOURCE_KIND, ".nii.gz", {**_MODEL, "desc": "preproc"}),
    "mask_model": Kind("mask", ".nii.gz", {**_MODEL, "desc": "brain"}),
    "mesh": Kind("mesh", ".surf.gii", {"desc": "brainmask"}, bids=False),
    # a lesion mask given with the T1w (label-lesion_roi beside it, or --lesion-masks): on the RAS T1w grid, and in
    # template space; drawn on the T1w
    "lesion_mask": Kind("mask", ".nii.gz", {"label": "lesion"}),
    "lesion_mask_template": Kind("mask", ".nii.gz", {**_TPL, "label": "lesion"}),
    "fig_lesions": _figure("lesions"),
    # a co-registered image (FLAIR, T2w, PDw): on its T1w's grid, and the rigid transform to it
    "preproc_reference": Kind(SOURCE_KIND, ".nii.gz", {"space": REFERENCE_KIND, "desc": "preproc"}),
    "xfm_reference": Kind("xfm", ".txt", {"from": SOURCE_KIND, "to": REFERENCE_KIND, "mode": "image"}, bids=False),
    "fig_coregreference": _figure("coregreference"),
    "fig_coregimage": _figure("coregimage"),
    # the nonlinear registration (--registration syn): the composite transforms (ITK .h5, the affine then the warp),
    # the T1w through them, the log-Jacobian and modulated tissue maps on the model grid, tissue maps on the T1w's
    # grid (STRUCTURE: the tissue, GM/WM/CSF), the atlas's regional volumes, the warp's figure
    # (the forward one's desc-nonlinear: a name that differs from the affine's by its extension alone would share its
    # sidecar; the inverse, from the template, has no affine beside it)
    "xfm_warp": Kind("xfm", ".h5", {"from": SOURCE_KIND, "to": TEMPLATE_SPACE, "mode": "image", "desc": "nonlinear"},
                     bids=False),
    "xfm_warp_inverse": Kind("xfm", ".h5", {"from": TEMPLATE_SPACE, "to": SOURCE_KIND, "mode": "image"}, bids=False),
    "warped_template": Kind(SOURCE_KIND, ".nii.gz", {**_TPL, "desc": "warped"}),
    "tissue_probseg": Kind("probseg", ".nii.gz", {"label": STRUCTURE}),
    "tissue_modulated": Kind("probseg", ".nii.gz", {**_MODEL, "label": STRUCTURE, "desc": "modulated"}),
    "logjacobian": Kind(SOURCE_KIND, ".nii.gz", {**_MODEL, "desc": "logjacobian"}),
    "volumes": Kind(SOURCE_KIND, ".tsv", {"desc": "volumes"}, bids=False),
    "morphometry": Kind(SOURCE_KIND, ".json", {"desc": "morphometry"}, bids=False),
    "fig_warp": _figure("warp"),
    "fig_jacobian": _figure("jacobian"),
    "prediction": Kind("prediction", ".json", bids=False),
    "saliency": Kind("attribution", ".nii.gz", {**_MODEL, "desc": "saliency"}, bids=False),
    "gradcam": Kind("attribution", ".nii.gz", {**_MODEL, "desc": "gradcam"}, bids=False),
    # segmentation (participant level with a segmentation --model)
    "dseg": Kind("dseg", ".nii.gz", {"desc": LABEL_DESC}),
    "dseg_table": Kind("dseg", ".tsv", {"desc": LABEL_DESC}),
    "dseg_model": Kind("dseg", ".nii.gz", {**_MODEL, "desc": LABEL_DESC}),
    "structure_mesh": Kind("mesh", ".surf.gii", {"label": STRUCTURE, "desc": LABEL_DESC}, bids=False),
    # the segmentation's voxel-wise uncertainty (normalised entropy of the ensemble's probabilities), T1w grid
    "uncertainty": Kind("probseg", ".nii.gz", {"label": LABEL_DESC, "desc": "uncertainty"}, bids=False),
    "fig_uncertainty": _figure("uncertainty"),
    "fig_segmentation": _figure("segmentation"),
    "fig_segmentationmesh": _figure("segmentationmesh"),
    "fig_mosaic": _figure("mosaic"),
    "fig_brainmask": _figure("brainmask"),
    "fig_regsubject": _figure("regsubject"),
    "fig_regtemplate": _figure("regtemplate"),
    "fig_biasfield": _figure("biasfield"),
    "fig_mesh": _figure("mesh"),
    "fig_attribution": _figure("attribution"),
}


def bids_label(text: str) -> str:
    """``text`` as a BIDS label (letters and digits only).

    >>> bids_label("Left-Lateral-Ventricle")
    'LeftLateralVentricle'
    """
    return "".join(c for c in text if c.isalnum())


def named_path(
    output_dir: Path,
    source: Path | str,
    name: str,
    *,
    model_resolution: float | None = None,
    label_desc: str | None = None,
    structure: str | None = None,
) -> Path:
    """Where the derivative ``name`` (a key of :data:`DERIVATIVES`) of the BIDS file ``source`` goes.

    >>> named_path(Path("out"), "sub-01/anat/sub-01_run-2_T1w.nii.gz", "iqm").as_posix()
    'out/sub-01/anat/sub-01_run-2_desc-iqm_T1w.json'
    >>> named_path(Path("out"), "sub-01/anat/sub-01_T1w.nii.gz", "mask_model", model_resolution=1.5).name
    'sub-01_space-MNI152NLin2009aSym_res-1p5_desc-brain_mask.nii.gz'
    """
    kind = DERIVATIVES[name]
    source_kind = source_suffix(source)
    entities = kind.resolved(model_resolution, label_desc=label_desc, structure=structure, source_kind=source_kind)
    return derivative_path(output_dir, source, suffix=kind.suffix_of(source_kind), extension=kind.extension,
                           datatype=kind.datatype, **entities)  # fmt: skip


def source_suffix(source: Path | str) -> str:
    """The suffix (the image's kind) of the BIDS file ``source``.

    >>> source_suffix("sub-01/anat/sub-01_ce-gd_T1w.nii.gz"), source_suffix("sub-01_FLAIR.nii")
    ('T1w', 'FLAIR')
    """
    return parse_bids_name(Path(source).name)[1]


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar of a derivative (``.nii.gz``, ``.txt``, ``.surf.gii``)."""
    for extension in (".nii.gz", ".surf.gii", ".nii", ".txt", ".h5", ".tsv"):
        if path.name.endswith(extension):
            return path.with_name(path.name[: -len(extension)] + ".json")
    raise ValueError(f"{path.name} has no sidecar")


#: BIDS labels are letters, digits and "+" (``space-MNIInfant+1``).
_NAME_RE = re.compile(r"^(?P<entities>(?:[a-zA-Z]+-[a-zA-Z0-9+]+_)*)(?P<suffix>[a-zA-Z0-9]+)(?P<ext>\..+)$")


def parse_bids_name(name: str) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into entities, suffix and extension.

    >>> parse_bids_name("sub-01_ses-02_run-1_T1w.nii.gz")
    ({'sub': '01', 'ses': '02', 'run': '1'}, 'T1w', '.nii.gz')
    """
    match = _NAME_RE.match(name)
    if match is None:
        raise InputDataError(
            f"{name!r} is not a BIDS file name (expected 'sub-<label>[_<key>-<value>...]_<suffix>.<ext>'). "
            "Rename the file following the BIDS specification."
        )
    pairs = [p for p in match["entities"].split("_") if p]
    entities = dict(p.split("-", 1) for p in pairs)
    return entities, match["suffix"], match["ext"]


def build_path(
    entities: Mapping[str, str | int],
    *,
    suffix: str,
    extension: str,
    datatype: str | None = "anat",
) -> Path:
    """Relative BIDS-derivative path for ``entities``.

    >>> str(build_path({"sub": "01", "ses": "1", "desc": "audit"}, suffix="T1w", extension=".json"))
    'sub-01/ses-1/anat/sub-01_ses-1_desc-audit_T1w.json'
    """
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"Unknown BIDS entities {sorted(unknown)}")
    if "sub" not in entities:
        raise ValueError("A derivative needs the 'sub' entity")
    parts = [f"{key}-{entities[key]}" for key in ENTITY_ORDER if entities.get(key) not in (None, "")]
    name = "_".join([*parts, suffix]) + extension
    folder = Path(f"sub-{entities['sub']}")
    if entities.get("ses"):
        folder /= f"ses-{entities['ses']}"
    if datatype:
        folder /= datatype
    return folder / name


def source_entities(source: Path | str) -> dict[str, str]:
    """Entities of a BIDS source file that its derivatives keep."""
    entities, _, _ = parse_bids_name(Path(source).name)
    return {k: v for k, v in entities.items() if k in SOURCE_ENTITIES}


def subject_log_dir(output_dir: Path, subject: str) -> Path:
    return Path(output_dir) / f"sub-{subject}" / "log"


def status_path(output_dir: Path, subject: str) -> Path:
    return subject_log_dir(output_dir, subject) / f"sub-{subject}_status.json"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the extension (tools like nibabel choose the format from it) and
    starts with a dot, so BIDS tools ignore leftovers of a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write strict JSON (what other tools and the BIDS validator read): a value that is not a finite
    number (an undefined metric) is written as ``null``, never as ``NaN``."""
    text = json.dumps(finite_json(data), indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    return write_text(path, text + "\n")


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity (also inside lists, dicts and numpy values) made None.

    >>> finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": "NaN"})
    {'a': None, 'b': [1.0, None], 'c': 'NaN'}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
        return finite_json(value.tolist())
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


#: The packages whose versions every sidecar names (``SoftwareVersions``).
SOFTWARE = ("SimpleITK", "nibabel", "nilearn", "nipype", "numpy", "scipy", "deepbet")


def software_versions() -> str:
    """``SoftwareVersions`` of a sidecar: a string, as BIDS defines it (``bidsdl 0.1.0, SimpleITK 2.4.1, ...``).
    The whole environment is in each run's ``logs/<run>/environment.json``."""
    from importlib.metadata import PackageNotFoundError, version

    versions = [f"bidsdl {__version__}"]
    for name in SOFTWARE:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(versions)


def derivative_path(
    output_dir: Path,
    source: Path | str,
    *,
    suffix: str,
    extension: str,
    datatype: str = "anat",
    **entities: str,
) -> Path:
    """Where a derivative of the BIDS file ``source`` goes; figures live in ``sub-<label>/figures/``.
    :data:`SOURCE_KIND`, as the suffix or an entity's value, is the source's kind (its suffix)."""
    kind = source_suffix(source)
    suffix = kind if suffix == SOURCE_KIND else suffix
    ents = {**source_entities(source), **{k: (kind if v == SOURCE_KIND else v) for k, v in entities.items() if v}}
    if datatype == "figures":
        name = build_path(ents, suffix=suffix, extension=extension, datatype=None).name
        return Path(output_dir) / f"sub-{ents['sub']}" / "figures" / name
    return Path(output_dir) / build_path(ents, suffix=suffix, extension=extension, datatype=datatype)


def spatial_reference(output_dir: Path, source: Path | str, *, suffix: str, **entities: str) -> str:
    """``SpatialReference`` of a derivative of ``source`` that lies on the grid of another one (``entities``,
    ``suffix``; :data:`SOURCE_KIND` stands for the source's kind): that image's path relative to OUTPUT_DIR
    (BIDS' dataset-relative form)."""
    path = derivative_path(output_dir, source, suffix=suffix, extension=".nii.gz", **entities)
    return path.relative_to(output_dir).as_posix()


def save_derivative(
    output_dir: Path,
    in_file: Path,
    *,
    source: Path | str,
    bids_dir: Path,
    suffix: str,
    metadata: Mapping[str, Any] | None = None,
    datatype: str = "anat",
    **entities: str,
) -> Path:
    """Copy ``in_file`` into OUTPUT_DIR under its BIDS-derivative name, atomically.

    NIfTI files and transforms get a JSON sidecar with Sources (BIDS URIs relative to the input
    and output datasets), the software versions and ``metadata``; JSON records are rewritten as
    strict JSON (they carry their own provenance).
    """
    in_file = Path(in_file)
    if in_file.suffix in (".nii", ".gz") and ".nii" in in_file.suffixes:
        extension = ".nii.gz"
    elif in_file.name.endswith(".surf.gii"):
        extension = ".surf.gii"
    else:
        extension = in_file.suffix
    target = derivative_path(output_dir, source, suffix=suffix, extension=extension, datatype=datatype, **entities)
    if extension == ".json":  # records: strict JSON whatever their writer
        write_json(target, json.loads(in_file.read_text()))
        return target
    with atomic_path(target) as tmp:
        if in_file.suffix == ".nii":  # compress once, reproducibly (no name or time in the gzip header)
            with (
                open(in_file, "rb") as raw,
                open(tmp, "wb") as handle,
                gzip.GzipFile(filename="", fileobj=handle, mode="wb", compresslevel=1, mtime=0) as packed,
            ):
                shutil.copyfileobj(raw, packed, 1 << 20)
        else:
            shutil.copyfile(in_file, tmp)
    if extension in (".nii.gz", ".nii", ".txt", ".h5", ".surf.gii"):
        rel_source = Path(source).relative_to(bids_dir).as_posix() if Path(source).is_absolute() else str(source)
        sidecar = {
            "Sources": [f"bids:raw:{rel_source}", *(metadata or {}).get("Sources", [])],
            **{k: v for k, v in (metadata or {}).items() if k != "Sources"},
            "SoftwareVersions": software_versions(),
        }
        write_json(target.with_name(target.name[: -len(extension)] + ".json"), sidecar)
    return target


def dataset_description(
    *, bids_dir: Path, source_description: Mapping[str, Any] | None, container: Mapping[str, str] | None
) -> dict[str, Any]:
    """The ``dataset_description.json`` of bidsdl's output dataset."""
    generated_by: dict[str, Any] = {"Name": "bidsdl", "Version": __version__, "CodeURL": CODE_URL}
    if container:
        generated_by["Container"] = dict(container)
    source: dict[str, Any] = {"URL": Path(bids_dir).resolve().as_uri()}
    if source_description:
        for key in ("Name", "DatasetDOI", "BIDSVersion"):
            if source_description.get(key):
                source[{"DatasetDOI": "DOI"}.get(key, key)] = source_description[key]
    return {
        "Name": "bidsdl derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()},
    }


def source_dataset(bids_dir: Path) -> dict[str, str]:
    """The identity of a BIDS dataset as its ``dataset_description.json`` gives it: its ``Name`` and ``DOI``
    (``DatasetDOI``) where present, and ``key``: the DOI, or else the name (empty when it has neither). Participant
    IDs are only comparable within one key (every dataset has a sub-01).

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "dataset_description.json").write_text('{"Name": "ds", "BIDSVersion": "1.9.0"}')
    >>> source_dataset(folder)
    {'Name': 'ds', 'key': 'ds'}
    """
    try:
        description = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, ValueError):
        description = {}
    out = {k: str(description[f]) for k, f in (("Name", "Name"), ("DOI", "DatasetDOI")) if description.get(f)}
    return {**out, "key": out.get("DOI") or out.get("Name", "")}


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """An exclusive lock on OUTPUT_DIR shared by concurrent bidsdl processes (e.g. array jobs)."""
    lock_file = Path(output_dir) / ".bidsdl.lock"
    with open(lock_file, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def participant_lock(output_dir: Path, subject: str) -> Iterator[bool]:
    """Try to hold ``sub-<label>/log/.bidsdl.lock`` for the block; yields False when another
    process holds it (the same participant submitted twice), without waiting."""
    lock_file = subject_log_dir(output_dir, subject) / ".bidsdl.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


#: OUTPUT_DIR's ``.bidsignore``: bidsdl's files that BIDS does not define, which the BIDS validator
#: then skips. bidsdl's own readers find them by the names built in this module.
def bidsignore() -> str:
    """OUTPUT_DIR's ``.bidsignore``: bidsdl's files that BIDS does not define (the kinds of :data:`DERIVATIVES`
    with ``bids=False`` and their sidecars; reports, logs, status records; the group level's files), which
    the BIDS validator then skips."""
    per_image = sorted({pattern for kind in DERIVATIVES.values() if not kind.bids and kind.datatype == "anat"
                        for pattern in kind.patterns})  # fmt: skip
    sidecars = sorted({sidecar_of(Path(p)).name for p in per_image if not p.endswith(".json")})
    lines = [
        f"# Files of bidsdl's outputs that the BIDS specification does not define (written by bidsdl {__version__}).",
        "# Reports, figures, logs and status records:",
        "*.html", "logs", "sub-*/figures", "sub-*/log",
        "# Per image: records (audit, quality metrics and verdict), transforms, meshes, predictions, attribution maps:",
        *per_image, *sidecars,
        "# The group level: dataset audit, manifest, quality table, splits, training runs, model packages:",
        *GROUP_FILES,
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


#: The group level's files and folders in OUTPUT_DIR, by name (none of them defined by BIDS): the table that the
#: group level, learning and the reports name them through, as :data:`DERIVATIVES` is for per-image files.
GROUP_OUTPUTS: dict[str, str] = {
    "group_audit": "group_audit.json", "manifest_record": "manifest.json", "manifest": "manifest.tsv",
    "qc_record": "qc.json", "qc": "qc.tsv", "predictions": "predictions.tsv", "predictions_record": "predictions.json",
    "external_evaluation": "external_evaluation.json", "external_case_scores": "external_case_scores.tsv",
    "learn": "learn", "models": "models", "methods": "methods.md", "references": "references.bib",
    "plan": "plan",
}  # fmt: skip
GROUP_FILES = tuple(GROUP_OUTPUTS.values())
#: Files inside a study's folder (``learn/target-<t>/arch-<a>/``), its folds' and a model package's, by name.
STUDY_OUTPUTS: dict[str, str] = {
    "results": "results.json", "case_scores": "case_scores.tsv", "fold_record": "fold.json",
    "predictions": "predictions.tsv", "history": "history.tsv", "model_record": "model.json",
    "baseline_predictions": "baseline_predictions.tsv", "search_trials": "search_trials.tsv",
    "volumes_baseline_predictions": "volumes_baseline_predictions.tsv",
    "trial_record": "trial.json", "distribution": "distribution.safetensors",
    "methods": "methods.md", "references": "references.bib",
}  # fmt: skip
#: The group report, in OUTPUT_DIR (the subject reports: :func:`subject_report_path`).
GROUP_REPORT = "group.html"


def group_path(output_dir: Path, name: str) -> Path:
    """The group-level file ``name`` (a key of :data:`GROUP_OUTPUTS`) in OUTPUT_DIR.

    >>> group_path(Path("out"), "qc").as_posix()
    'out/qc.tsv'
    """
    return Path(output_dir) / GROUP_OUTPUTS[name]


def subject_report_path(output_dir: Path, subject: str) -> Path:
    """The participant's report ``sub-<label>.html``."""
    return Path(output_dir) / f"sub-{subject}.html"


def study_dir(output_dir: Path, target: str, architecture: str, inputs: Sequence[str] = DEFAULT_CHANNELS) -> Path:
    """A study's folder: ``learn/target-<target>/arch-<architecture>/`` (the target in letters and digits), with
    ``_inputs-<a>+<b>`` when it learns from other inputs than the T1w alone (studies of one target share its splits,
    so a morphometry study and an intensity study are compared on the same participants).

    >>> study_dir(Path("out"), "diagnosis", "conv5fc3", ("GM", "logjacobian")).as_posix()
    'out/learn/target-diagnosis/arch-conv5fc3_inputs-GM+logjacobian'
    """
    folder = f"arch-{architecture}"
    if tuple(inputs) != tuple(DEFAULT_CHANNELS):
        folder += "_inputs-" + "+".join(bids_label(kind) for kind in inputs)
    return group_path(output_dir, "learn") / f"target-{bids_label(target) or 'target'}" / folder


def results_path(output_dir: Path, target: str, architecture: str, inputs: Sequence[str] = DEFAULT_CHANNELS) -> Path:
    """The study's ``results.json`` (what the group report shows of it)."""
    return study_dir(output_dir, target, architecture, inputs) / STUDY_OUTPUTS["results"]


README = """\
# bidsdl derivatives

Outputs of bidsdl {version} (<{url}>), a BIDS App for deep learning on brain MRI. `dataset_description.json`
names the input dataset and the software; every image has a JSON sidecar (its sources, the software
versions, what was done); `logs/<run>/` holds each run's log, effective configuration and environment.

- `sub-<label>[/ses-<label>]/anat/`: per T1w, the bias-corrected image (`desc-preproc_T1w`), the N4 field
  (`desc-biasfield_T1w`), the brain mask (`desc-brain_mask`, deepbet) and the template's mask brought
  back (`desc-template_mask`), the affine to {space} (`from-T1w_to-{space}_mode-image_xfm.txt`), the
  images and mask in template space (1 mm, and `res-<label>`: the grid models learn on), a brain-mask mesh,
  the audit (`desc-audit_T1w.json`) and the quality metrics with the verdict (`desc-iqm_T1w.json`).
- With a segmentation model: the predicted labels in each T1w's grid (`desc-<labels>_dseg`, with its lookup
  table `.tsv`) and on the model grid, one surface per structure (`label-<structure>_desc-<labels>_mesh`).
- `sub-<label>.html`: the participant's report (self-contained; its figures are in `sub-<label>/figures/`).
- `sub-<label>/log/`: the participant's status record and the crash files of failed steps.
- Group level: `group.html`, `group_audit.json`, `manifest.tsv`, `qc.tsv`, `learn/` (splits, training
  runs, results) and `models/` (self-describing model packages).

`.bidsignore` lists the files the BIDS specification does not define, so that the BIDS validator checks
the rest.
"""


def ensure_dataset_description(output_dir: Path, description: Mapping[str, Any]) -> Path:
    """Create ``dataset_description.json`` once (and ``README.md`` when missing; ``.bidsignore`` always
    matches this version); safe when several jobs start together.

    An existing description written by bidsdl is kept (a version change is logged); one written
    by another tool means OUTPUT_DIR belongs to another dataset, and is refused.
    """
    path = Path(output_dir) / "dataset_description.json"
    with output_lock(output_dir):
        if path.exists():
            try:
                existing = json.loads(path.read_text())
                generator = existing["GeneratedBy"][0]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise UsageError(
                    f"{path} exists but was not written by bidsdl. OUTPUT_DIR must be a new folder "
                    "or one bidsdl wrote before; choose another OUTPUT_DIR."
                ) from exc
            if generator.get("Name") != "bidsdl":
                raise UsageError(
                    f"{path} says this folder was generated by {generator.get('Name')!r}, not bidsdl. "
                    "Choose another OUTPUT_DIR."
                )
            if generator.get("Version") != __version__:
                LOGGER.warning(
                    "OUTPUT_DIR was started by bidsdl %s; this is bidsdl %s. Mixing versions in one "
                    "output makes results harder to reproduce.",
                    generator.get("Version"),
                    __version__,
                )
        else:
            write_json(path, description)
        _ensure_dataset_files(Path(output_dir))
        return path


def _ensure_dataset_files(output_dir: Path) -> None:
    """README.md when missing, and .bidsignore as this version writes it (under the output lock)."""
    ignore = bidsignore()
    ignore_file = output_dir / ".bidsignore"
    if not ignore_file.exists() or ignore_file.read_text() != ignore:
        write_text(ignore_file, ignore)
    readme = output_dir / "README.md"
    if not readme.exists():
        write_text(readme, README.format(version=__version__, url=CODE_URL, space=TEMPLATE_SPACE))


def check_writable(output_dir: Path) -> None:
    """Create OUTPUT_DIR if needed and prove it is writable, or raise :class:`OutputNotWritable`."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".bidsdl-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritable(
            f"OUTPUT_DIR {output_dir} cannot be created or written ({exc.strerror or exc}). "
            "Choose a folder you can write to. In a container: mount it writable (without ':ro'), e.g. "
            f"'-v /path/on/host:{output_dir}', and let the container's user write there (docker run "
            '--user "$(id -u):$(id -g)").'
        ) from exc
