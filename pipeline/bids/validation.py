"""BIDS validation of the input dataset: each problem names the file, what is wrong and the fix."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputDataError, Problem
from .audit import _READ_ERRORS, header_problems, load_spatial
from .layout import read_participants, subjects_on_disk

LOGGER = logging.getLogger(__name__)

#: Top-level folders the BIDS validator does not check.
_UNCHECKED_DIRS = ("derivatives", "sourcedata", "code", "stimuli", "models")


def check_dataset_description(bids_dir: Path) -> list[Problem]:
    path = Path(bids_dir) / "dataset_description.json"
    if not path.exists():
        return [
            Problem(
                "dataset_description.json",
                "is missing.",
                'Add it with at least {"Name": ..., "BIDSVersion": "1.9.0"}.',
            )
        ]
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [Problem("dataset_description.json", f"is not valid JSON ({exc}).", "Fix its syntax.")]
    if not isinstance(description, dict):
        return [
            Problem(
                "dataset_description.json",
                "does not hold a JSON object.",
                "Make it an object with Name and BIDSVersion.",
            )
        ]
    return [
        Problem("dataset_description.json", f"has no {key!r} field.", f"Add {key!r} to it.")
        for key in ("Name", "BIDSVersion")
        if not description.get(key)
    ]


def _bidsignore_patterns(bids_dir: Path) -> list[str]:
    path = Path(bids_dir) / ".bidsignore"
    if not path.exists():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        pat = pattern.lstrip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.rstrip("/") + "/*"):
            return True
        if "/" not in pat.rstrip("/") and fnmatch.fnmatch(Path(rel).name, pat):
            return True
    return False


def iter_checked_files(bids_dir: Path) -> Iterable[str]:
    """Relative paths of the files the validator checks (dotfiles and exempt folders skipped)."""
    bids_dir = Path(bids_dir)
    for root, dirs, files in os.walk(bids_dir):
        rel_root = Path(root).relative_to(bids_dir)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not (rel_root == Path(".") and d in _UNCHECKED_DIRS)
        )
        for name in sorted(files):
            if not name.startswith("."):
                yield (rel_root / name).as_posix()


def check_file_names(bids_dir: Path) -> list[Problem]:
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    patterns = _bidsignore_patterns(bids_dir)
    return [
        Problem(
            rel,
            "is not a BIDS-valid file name.",
            "Rename it following the BIDS specification, move it to sourcedata/, or list it in .bidsignore.",
        )
        for rel in iter_checked_files(bids_dir)
        if not _ignored(rel, patterns) and not validator.is_bids("/" + rel)
    ]


def check_json_files(bids_dir: Path) -> list[Problem]:
    problems = []
    for rel in iter_checked_files(bids_dir):
        if rel.endswith(".json"):
            try:
                json.loads((Path(bids_dir) / rel).read_text())
            except (OSError, ValueError) as exc:
                problems.append(Problem(rel, f"is not valid JSON ({exc}).", "Fix its syntax."))
    return problems


def check_participants_table(bids_dir: Path) -> list[Problem]:
    """Warnings when participants.tsv and the ``sub-*`` folders disagree."""
    try:
        table = read_participants(bids_dir)
    except InputDataError as exc:
        return [Problem("participants.tsv", str(exc), "See above.")]
    folders = {f"sub-{s}" for s in subjects_on_disk(bids_dir)}
    if table is None:
        return [
            Problem(
                "participants.tsv",
                "is missing.",
                "Add it (participant_id plus one column per variable) so labels can be joined to images.",
                "warning",
            )
        ]
    rows = set(table["participant_id"])
    problems = [
        Problem(
            f"{pid}/",
            "has no row in participants.tsv.",
            f"Add a row for {pid} to participants.tsv.",
            "warning",
        )
        for pid in sorted(folders - rows)
    ]
    problems += [
        Problem(
            "participants.tsv",
            f"has a row for {pid} but there is no {pid}/ folder.",
            f"Remove the row or add the data of {pid}.",
            "warning",
        )
        for pid in sorted(rows - folders)
    ]
    return problems


def check_images(bids_dir: Path, paths: Iterable[Path]) -> list[Problem]:
    """Header sanity of the selected T1w files.

    A bad image fails its own subject at the participant level (others still finish), so these
    are warnings here, not reasons to stop the whole run.
    """
    problems = []
    for path in paths:
        rel = Path(path).relative_to(bids_dir).as_posix()
        try:
            if Path(path).stat().st_size == 0:
                raise ValueError("the file is empty (0 bytes)")
            issues = header_problems(load_spatial(path))
        except _READ_ERRORS as exc:
            issues = [f"the header cannot be read ({exc})"]
        if issues:
            problems.append(
                Problem(
                    rel,
                    f"is not a usable T1w image: {'; '.join(issues)}.",
                    "Re-export or re-copy it; this subject will fail until then.",
                    "warning",
                )
            )
    return problems


def validate_dataset(bids_dir: Path, *, t1w_paths: Iterable[Path] = ()) -> list[Problem]:
    """Every problem found in BIDS_DIR; those with severity 'error' stop the run (exit 16)."""
    problems = check_dataset_description(bids_dir) + check_file_names(bids_dir) + check_json_files(bids_dir)
    problems += check_participants_table(bids_dir)
    problems += check_images(bids_dir, t1w_paths)
    return problems
