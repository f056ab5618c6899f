"""The input channels of learning (``--inputs T1w FLAIR``): for each T1w, the images of the listed kinds that the
participant level aligned to it, found through their records in OUTPUT_DIR.

A learning row is a T1w (what the manifest, the splits and the leakage checks count); each channel is an image of
that kind co-registered to it (its ``desc-iqm`` record names the T1w as ``reference``), or one of the T1w's own
morphometry maps on the model grid (``GM``, ``WM``, ``CSF``: modulated tissue maps; ``logjacobian``). A T1w
without one of the channels is left out with the reason, never a crash. When a session holds two images of a kind
aligned to the same T1w (two FLAIRs), the first by name is used and recorded.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import derivatives
from ..errors import InputDataError
from ..kinds import DEFAULT_CHANNELS, MORPHOMETRY_CHANNELS, MORPHOMETRY_INPUTS, REFERENCE_KIND, package_channels


@dataclass(frozen=True)
class Channels:
    """One T1w's channel images (sources relative to BIDS_DIR, in channel order), or why it has none."""

    sources: tuple[str, ...] | None
    reason: str = ""
    failed_qc: tuple[str, ...] = ()

    def left_out(self, inputs: Sequence[str], include_failed_qc: bool) -> str | None:
        """Why the T1w is not learned from for its channels (None: it is)."""
        if self.reason:
            return f"{self.reason}; --inputs {' '.join(inputs)}"
        if self.failed_qc and not include_failed_qc:
            return f"its {', '.join(self.failed_qc)} failed quality control (--include-failed-qc keeps it)"
        return None


def _aligned_records(output_dir: Path, t1w_source: str, kind: str) -> list[tuple[str, dict]]:
    """The ``desc-iqm`` records of images of ``kind`` aligned to ``t1w_source``, by name."""
    folder = derivatives.named_path(output_dir, t1w_source, "iqm").parent
    patterns = derivatives.DERIVATIVES["iqm"].patterns_of((kind,))
    try:
        names = sorted(entry.name for entry in os.scandir(folder)
                       if any(fnmatch.fnmatchcase(entry.name, p) for p in patterns))  # fmt: skip
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if record.get("reference") == t1w_source:
            found.append((record["source"], record))
    return found


def channel_file(output_dir: Path, kind: str, source: str, resolution_mm: float) -> Path:
    """The model-grid image of the channel ``kind`` whose source image is ``source``: its ``preproc_model``, or for
    a morphometry map (:data:`~pipeline.kinds.MORPHOMETRY_CHANNELS`) that map of the T1w ``source``.

    >>> channel_file(Path("out"), "GM", "sub-01/anat/sub-01_T1w.nii.gz", 2.0).name
    'sub-01_space-MNI152NLin2009aSym_res-2_label-GM_desc-modulated_probseg.nii.gz'
    >>> channel_file(Path("out"), "FLAIR", "sub-01/anat/sub-01_FLAIR.nii.gz", 2.0).name
    'sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_FLAIR.nii.gz'
    """
    name, structure = MORPHOMETRY_CHANNELS.get(kind, ("preproc_model", None))
    return derivatives.named_path(output_dir, source, name, model_resolution=resolution_mm, structure=structure)


def missing_morphometry(kind: str, example: Path) -> str:
    """Why a T1w has no morphometry map ``kind``, and the command that makes it."""
    return (f"no {kind} map ({example.name}: made by the participant level's nonlinear registration, --registration "
            "syn, the default; these outputs were made with --registration affine or before it existed: run "
            "'bidsdl BIDS_DIR OUTPUT_DIR participant' again without --registration affine)")  # fmt: skip


def default_inputs(output_dir: Path, sources: Sequence[str], resolution_mm: float) -> tuple[tuple[str, ...], str]:
    """The inputs of a whole-image study without ``--inputs``, and why: the morphometry maps
    (:data:`~pipeline.kinds.MORPHOMETRY_INPUTS`) when every processed T1w of ``sources`` has them on the model grid,
    else the T1w intensities (a cohort is never split between two kinds of input).

    >>> default_inputs(Path("/nowhere"), ["sub-01/anat/sub-01_T1w.nii.gz"], 2.0)[0]
    ('T1w',)
    """
    processed = [s for s in sources if channel_file(output_dir, REFERENCE_KIND, s, resolution_mm).exists()]
    lacking = [s for s in processed if not all(channel_file(output_dir, kind, s, resolution_mm).exists()
                                               for kind in MORPHOMETRY_INPUTS)]  # fmt: skip
    if not processed:
        return DEFAULT_CHANNELS, f"the {REFERENCE_KIND} intensities: no processed {REFERENCE_KIND} yet"
    if lacking:
        return DEFAULT_CHANNELS, (
            f"the {REFERENCE_KIND} intensities: {len(lacking)} of {len(processed)} processed {REFERENCE_KIND} have "
            f"no morphometry maps (e.g. {lacking[0]}: made with --registration affine or before it existed); the "
            f"default is {' and '.join(MORPHOMETRY_INPUTS)} when every one has them"
        )
    return MORPHOMETRY_INPUTS, (
        f"{' and '.join(MORPHOMETRY_INPUTS)}: the modulated grey-matter map and the log-Jacobian of the nonlinear "
        f"registration, which every processed {REFERENCE_KIND} has; on generated cohorts of tens of participants "
        f"they let the network find atrophy the {REFERENCE_KIND} intensities hide (benchmarks/small_cohort.py); "
        f"--inputs {REFERENCE_KIND} for the intensities"
    )


def channel_sources(output_dir: Path, t1w_source: str, channels: Sequence[str]) -> Channels:
    """The images of ``channels`` (kinds, in order) for the T1w ``t1w_source`` (relative to BIDS_DIR).

    >>> channel_sources(Path("/nowhere"), "sub-01/anat/sub-01_T1w.nii.gz", ["T1w"]).sources
    ('sub-01/anat/sub-01_T1w.nii.gz',)
    >>> channel_sources(Path("/nowhere"), "sub-01/anat/sub-01_T1w.nii.gz", ["T1w", "FLAIR"]).reason
    'no FLAIR aligned to it (a FLAIR of its session, processed at the participant level)'
    """
    sources, failed = [], []
    for kind in channels:
        if kind == REFERENCE_KIND or kind in MORPHOMETRY_CHANNELS:  # the T1w's own image or map
            sources.append(t1w_source)
            continue
        aligned = _aligned_records(Path(output_dir), t1w_source, kind)
        if not aligned:
            return Channels(None, f"no {kind} aligned to it (a {kind} of its session, processed at the participant "
                                  "level)")  # fmt: skip
        source, record = aligned[0]
        sources.append(source)
        if (record.get("qc") or {}).get("verdict") == "fail":
            failed.append(source)
    return Channels(tuple(sources), failed_qc=tuple(failed))


def channel_files(record: dict[str, Any], reference: str, others: Sequence[str]) -> list[str]:
    """The input files in the model's channel order: the T1w's (``reference``) where its kind stands, the images of
    the other kinds (``others``, in the channels' order) elsewhere.

    >>> channel_files({"input": {"channels": ["FLAIR", "T1w"]}}, "t1.nii", ["flair.nii"])
    ['flair.nii', 't1.nii']
    """
    channels = package_channels(record)
    rest = iter(others)
    files = [reference if kind == REFERENCE_KIND else next(rest, None) for kind in channels]
    if any(f is None for f in files):
        needed = ", ".join(k for k in channels if k != REFERENCE_KIND)
        raise InputDataError(
            f"The model {record.get('name')} takes the channels {', '.join(channels)} (in that order); no {needed} "
            f"was aligned to this {REFERENCE_KIND} (an image of that kind in its session, whose co-registration "
            "passed quality control). Add it to BIDS_DIR, or predict with a model of the channels this participant "
            "has."
        )
    return [str(f) for f in files]
