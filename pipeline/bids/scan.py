"""Read a BIDS dataset's files once: their stats, the T1w images with their entities and inherited metadata,
and the file-level validation (names, JSON syntax), one participant at a time.

The index (:mod:`pipeline.bids.index`) stores what these functions read, so that a participant can be read
again alone (an array task reads only its own) and a changed file is found by its stat, not its contents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..derivatives import PYBIDS_ENTITIES, parse_bids_name
from ..errors import InputDataError, Problem
from ..kinds import IMAGE_EXTENSIONS, PROCESSED_KINDS
from .files import AnatImage
from .validation import (
    bidsignore_patterns,
    check_dataset_description,
    check_dataset_kind,
    check_participants_table,
    file_name_problems,
    is_unchecked_dir,
)

#: pybids' entity names by BIDS key (``sub`` -> ``subject``), for the entities a T1w keeps.
_LONG_NAMES = {short: long for long, short in PYBIDS_ENTITIES.items()}


@dataclass(frozen=True)
class FileStat:
    """A file relative to BIDS_DIR and what tells a change of it: size, modification and change times.

    The change time (ctime) cannot be set by users: a file replaced by another of the same size and
    modification time (``cp -p``, ``rsync -a``) is still seen as changed.
    """

    rel: str
    size: int
    mtime_ns: int
    ctime_ns: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.size, self.mtime_ns, self.ctime_ns)


def stat_tree(bids_dir: Path, rel_dir: str) -> list[FileStat]:
    """Every file under ``rel_dir`` (dot entries skipped, as BIDS tools do), sorted by path."""
    found: list[FileStat] = []
    root = os.fspath(bids_dir)
    todo = [rel_dir]
    while todo:
        rel = todo.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir():
                todo.append(child)
            else:
                found.append(_stat(entry, child))
    found.sort(key=lambda f: f.rel)
    return found


def _stat(entry: os.DirEntry[str], rel: str) -> FileStat:
    try:
        st = entry.stat()
    except OSError:  # a broken link, or removed meanwhile: a file that cannot be read is still a file
        return FileStat(rel, -1, 0, 0)
    return FileStat(rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class RootListing:
    """What lies at the top of BIDS_DIR, outside the participants' folders: the dataset-level files (those the
    validator checks, in top-level folders too, and ``.bidsignore``) and the participant folders' labels."""

    files: tuple[FileStat, ...]
    folders: tuple[str, ...]


def list_root(bids_dir: Path) -> RootListing:
    """The dataset-level part of BIDS_DIR: one directory listing, plus the few non-participant folders."""
    bids_dir = Path(bids_dir)
    files: list[FileStat] = []
    folders: list[str] = []
    for entry in os.scandir(bids_dir):
        if entry.name.startswith(".") and entry.name != ".bidsignore":
            continue
        if entry.is_dir():
            if entry.name.startswith("sub-"):
                folders.append(entry.name[4:])
            elif not is_unchecked_dir(entry.name):
                files += stat_tree(bids_dir, entry.name)
        else:
            files.append(_stat(entry, entry.name))
    return RootListing(tuple(sorted(files, key=lambda f: f.rel)), tuple(sorted(folders)))


def read_json(path: Path) -> Any:
    """The parsed JSON file; :class:`ValueError` (syntax) or :class:`OSError` (unreadable) otherwise."""
    return json.loads(Path(path).read_text())


def json_problems(rels: Iterable[str], parsed: Mapping[str, Any]) -> list[Problem]:
    """One problem per ``.json`` among ``rels`` that ``parsed`` holds as an exception (its syntax failed)."""
    return [
        Problem(rel, f"is not valid JSON ({parsed[rel]}).", "Fix its syntax.")
        for rel in rels
        if rel.endswith(".json") and isinstance(parsed.get(rel), Exception)
    ]


def _parse_all(bids_dir: Path, rels: Iterable[str]) -> dict[str, Any]:
    """Every ``.json`` among ``rels``: its content, or the exception that reading it raised."""
    parsed: dict[str, Any] = {}
    for rel in rels:
        if rel.endswith(".json"):
            try:
                parsed[rel] = read_json(Path(bids_dir) / rel)
            except (OSError, ValueError) as exc:
                parsed[rel] = exc
    return parsed


def inherited_metadata(
    image_rel: str, sidecars_in: Callable[[str], Sequence[str]], content: Callable[[str], Any]
) -> tuple[dict[str, Any], list[str]]:
    """The metadata of an image by the BIDS inheritance principle, and the sidecars that failed to read.

    Sidecars from the dataset root down to the image's folder apply when their entities are a subset of the
    image's and their suffix matches; deeper and more specific ones win. ``sidecars_in(folder)`` names the
    ``.json`` files of a folder (relative to BIDS_DIR; ``""`` is the root); ``content(rel)`` reads one
    (raising :class:`ValueError` or :class:`OSError`).
    """
    entities, suffix, _ = parse_bids_name(image_rel.rsplit("/", 1)[-1])
    parts = image_rel.split("/")[:-1]
    folders = [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]
    metadata: dict[str, Any] = {}
    problems: list[str] = []
    for folder in folders:
        candidates = []
        for rel in sidecars_in(folder):
            try:
                side_entities, side_suffix, _ = parse_bids_name(rel.rsplit("/", 1)[-1])
            except InputDataError:
                continue
            if side_suffix == suffix and side_entities.items() <= entities.items():
                candidates.append((len(side_entities), rel))
        for _, rel in sorted(candidates):
            try:
                data = content(rel)
            except (OSError, ValueError) as exc:
                problems.append(f"{rel}: not valid JSON ({exc})")
                continue
            if isinstance(data, dict):
                metadata.update(data)
            else:
                problems.append(f"{rel}: does not hold a JSON object")
    return metadata, problems


def image_entities(rel: str, kinds: Sequence[str] = PROCESSED_KINDS) -> tuple[str, dict[str, str]] | None:
    """The kind and pybids-named entities of ``sub-<label>/[ses-<label>/]anat/<name>_<kind>.nii[.gz]`` when
    ``<kind>`` is one of ``kinds`` (:mod:`pipeline.kinds`), else None.

    >>> image_entities("sub-01/ses-a/anat/sub-01_ses-a_run-2_T1w.nii.gz")
    ('T1w', {'subject': '01', 'session': 'a', 'run': '2'})
    >>> image_entities("sub-01/anat/sub-01_acq-2d_FLAIR.nii.gz")
    ('FLAIR', {'subject': '01', 'acquisition': '2d'})
    >>> image_entities("sub-01/anat/sub-01_T2w.nii.gz", kinds=("T1w",)) is None
    True
    """
    parts = rel.split("/")
    if len(parts) not in (3, 4) or parts[-2] != "anat" or not parts[-1].endswith(IMAGE_EXTENSIONS):
        return None
    try:
        entities, suffix, extension = parse_bids_name(parts[-1])
    except InputDataError:
        return None
    if suffix not in kinds or extension not in IMAGE_EXTENSIONS or "sub" not in entities:
        return None
    return suffix, {_LONG_NAMES[k]: v for k, v in entities.items() if k in _LONG_NAMES}


@dataclass
class DatasetContext:
    """What reading one participant needs of the dataset's top: the .bidsignore patterns and the root's sidecars."""

    bids_dir: Path
    ignore: list[str]
    root_sidecars: list[str]
    root_content: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, bids_dir: Path, listing: RootListing) -> DatasetContext:
        sidecars = [f.rel for f in listing.files if "/" not in f.rel and f.rel.endswith(".json")]
        return cls(Path(bids_dir), bidsignore_patterns(bids_dir), sidecars, _parse_all(bids_dir, sidecars))


@dataclass(frozen=True)
class ParticipantScan:
    """One participant's folder as read: its files, its T1w images and their metadata, and its problems."""

    label: str
    files: tuple[FileStat, ...]
    images: tuple[AnatImage, ...]
    metadata_problems: Mapping[str, list[str]]  # image rel -> sidecars that could not be read
    problems: tuple[Problem, ...]


def scan_participant(context: DatasetContext, label: str) -> ParticipantScan:
    """Read ``sub-<label>/``: stat every file, check names and JSON syntax, collect its T1w and their metadata."""
    bids_dir = context.bids_dir
    files = stat_tree(bids_dir, f"sub-{label}")
    rels = [f.rel for f in files]
    parsed = _parse_all(bids_dir, rels)
    problems = file_name_problems(rels, context.ignore) + json_problems(rels, parsed)
    by_folder: dict[str, list[str]] = {"": context.root_sidecars}
    for rel in parsed:
        by_folder.setdefault(rel.rsplit("/", 1)[0], []).append(rel)

    def content(rel: str) -> Any:
        value = parsed[rel] if rel in parsed else context.root_content[rel]
        if isinstance(value, Exception):
            raise value
        return value

    images, metadata_problems = [], {}
    for rel in rels:
        found = image_entities(rel)
        if found is None:
            continue
        kind, entities = found
        metadata, unread = inherited_metadata(rel, lambda folder: by_folder.get(folder, ()), content)
        if unread:
            metadata_problems[rel] = unread
        images.append(AnatImage(path=bids_dir / rel, subject=entities["subject"], session=entities.get("session"),
                               entities=entities, metadata=metadata, kind=kind))  # fmt: skip
    return ParticipantScan(label, tuple(files), tuple(images), metadata_problems, tuple(problems))


def dataset_problems(bids_dir: Path, listing: RootListing, context: DatasetContext) -> tuple[list[Problem], bool]:
    """The dataset-level problems, and whether BIDS_DIR is a dataset of participants at all.

    A derivatives dataset or one without participant folders gets that one problem (not one line per file).
    """
    problems = check_dataset_description(bids_dir)
    kind = check_dataset_kind(bids_dir)
    if kind:
        return problems + kind, False
    rels = [f.rel for f in listing.files if f.rel != ".bidsignore"]
    problems += file_name_problems(rels, context.ignore)
    problems += json_problems(rels, {**_parse_all(bids_dir, [r for r in rels if "/" in r]), **context.root_content})
    problems += check_participants_table(bids_dir, folders=listing.folders)
    return problems, True
