"""The BIDS index: BIDS_DIR read and validated once, then shared by every run on it (array tasks above all).

The index is a small SQLite database (by default ``WORK_DIR/bids_index/bids_index.sqlite``, or under
``--bids-database-dir``) holding every file's size, modification and change times, the T1w images with
their entities and inherited metadata, and the validation's problems, each under its participant. It is
built under a lock into a temporary file and renamed into place, so tasks starting together build it
once; it is opened read-only and never modified in place (``immutable``: no locking on network disks).

How much of BIDS_DIR a run looks at before reusing it:

- every run: the top of BIDS_DIR (one directory listing and the dataset-level files' stats), so a
  participant added or removed, or a changed participants.tsv or .bidsignore, is noticed;
- a run over the whole dataset (``--list-participants``, no participant selection, the group level): the
  stat of every file, so any file added, removed or replaced is noticed;
- a run on some participants (``--participant-label``, ``--participant-index``): their folders, which it
  reads and validates again itself (:meth:`BidsIndex.refresh`); the other participants' validation is
  taken from the index, their errors re-checked on the files they name.

Anything else than a match (no index, another BIDS_DIR, another bidsdl version, a changed top) rebuilds it,
with the reason in the log. An index location that cannot be written gives a warning and an index in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Problem, UsageError
from ..kinds import REFERENCE_KIND
from .files import AnatImage
from .scan import (
    DatasetContext,
    FileStat,
    ParticipantScan,
    RootListing,
    dataset_problems,
    json_problems,
    list_root,
    read_json,
    scan_participant,
    stat_tree,
)
from .validation import file_name_problems

LOGGER = logging.getLogger(__name__)

#: Bumped whenever what the index holds or how it is read changes: an index of another format is rebuilt.
INDEX_FORMAT = 3  # 2: images carry their kind; 3: every processed kind, not only the reference
INDEX_FILE = "bids_index.sqlite"
_LOCK_FILE = ".bids_index.lock"
#: How long a run waits for another process that is building the index before it indexes in memory.
LOCK_WAIT_S = 900.0
#: Changes a message names before it says "and N more".
_SHOWN_CHANGES = 5

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE folders (label TEXT PRIMARY KEY);
CREATE TABLE files (rel TEXT PRIMARY KEY, participant TEXT NOT NULL, size INTEGER NOT NULL,
                    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL);
CREATE INDEX files_participant ON files (participant);
CREATE TABLE images (rel TEXT PRIMARY KEY, participant TEXT NOT NULL, subject TEXT NOT NULL, session TEXT,
                     entities TEXT NOT NULL, metadata TEXT NOT NULL, unread TEXT NOT NULL, kind TEXT NOT NULL);
CREATE INDEX images_participant ON images (participant);
CREATE TABLE problems (participant TEXT NOT NULL, path TEXT NOT NULL, issue TEXT NOT NULL, fix TEXT NOT NULL,
                       severity TEXT NOT NULL);
CREATE INDEX problems_participant ON problems (participant);
"""


def default_location(work_dir: Path) -> Path:
    """Where the index lives without ``--bids-database-dir``: beside the Nipype work dir, which array tasks share."""
    return Path(work_dir) / "bids_index"


class BidsIndex:
    """What BIDS_DIR holds, read from the index; participants read again by :meth:`refresh` override it."""

    def __init__(self, conn: sqlite3.Connection, bids_dir: Path, *, path: Path | None, state: str,
                 reason: str | None, before: list[str] | None = None) -> None:  # fmt: skip
        self._conn = conn
        self.bids_dir = Path(bids_dir)
        self.path = path  # None: in memory only
        self.state = state  # "reused", "built" or "memory"
        self.reason = reason  # why it was built; None when reused
        self._before = before  # the participant list of the index this one replaced, if it was readable
        self._fresh: dict[str, ParticipantScan] = {}
        self._context: DatasetContext | None = None

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    def folders(self) -> list[str]:
        """The labels of the ``sub-<label>/`` folders."""
        return [row[0] for row in self._conn.execute("SELECT label FROM folders ORDER BY label")]

    def participants(self, sessions: Sequence[str] = ()) -> list[str]:
        """The sorted labels of the participants with T1w images (in ``sessions``, when given)."""
        stored = set(self._stored_participants(sessions))
        for label, scan in self._fresh.items():
            stored.discard(label)
            stored |= {img.subject for img in scan.images
                       if img.kind == REFERENCE_KIND and (not sessions or img.session in sessions)}  # fmt: skip
        return sorted(stored)

    def _stored_participants(self, sessions: Sequence[str] = ()) -> list[str]:
        query, args = "SELECT DISTINCT subject FROM images WHERE kind = ?", [REFERENCE_KIND, *sessions]
        if sessions:
            query += f" AND session IN ({','.join('?' * len(sessions))})"
        return [row[0] for row in self._conn.execute(query + " ORDER BY subject", args)]

    def participant_list_changed(self) -> bool:
        """Whether this index, built anew, lists other participants with T1w than the one it replaced."""
        return self._before is not None and self._before != self._stored_participants()

    def t1w(self, subjects: Sequence[str] | None = None, sessions: Sequence[str] = ()) -> list[AnatImage]:
        """The T1w images (of ``subjects``, in ``sessions``), sorted by path; unreadable sidecars are logged."""
        return [image for image in self.images(subjects, sessions) if image.kind == REFERENCE_KIND]

    def images(self, subjects: Sequence[str] | None = None, sessions: Sequence[str] = ()) -> list[AnatImage]:
        """The images of every processed kind (of ``subjects``, in ``sessions``), sorted by path; unreadable
        sidecars are logged."""
        wanted = None if subjects is None else set(subjects)
        images: list[AnatImage] = []
        unread: dict[str, list[str]] = {}
        for label, scan in self._fresh.items():
            if wanted is None or label in wanted:
                images += scan.images
                unread.update(scan.metadata_problems)
        query, args = "SELECT rel, participant, subject, session, entities, metadata, unread, kind FROM images", []
        if wanted is not None:
            labels = sorted(wanted - set(self._fresh))
            if not labels:
                labels = [""]  # matches nothing
            query += f" WHERE participant IN ({','.join('?' * len(labels))})"
            args = labels
        for rel, label, subject, session, entities, metadata, problems, kind in self._conn.execute(query, args):
            if label in self._fresh:
                continue
            images.append(AnatImage(path=self.bids_dir / rel, subject=subject, session=session, kind=kind,
                                    entities=json.loads(entities), metadata=json.loads(metadata)))  # fmt: skip
            if problems != "[]":
                unread[rel] = json.loads(problems)
        if sessions:
            images = [img for img in images if img.session in sessions]
        for image in images:
            for problem in unread.get(image.relative_to(self.bids_dir), ()):
                LOGGER.warning("Sidecar metadata skipped: %s. Fix the JSON syntax.", problem)
        return sorted(images, key=lambda img: str(img.path))

    def problems(self, subjects: Sequence[str] | None = None) -> list[Problem]:
        """The validation's problems: all of them, or those a run on ``subjects`` reports.

        With ``subjects``: the dataset-level problems, those of the participants read again (:meth:`refresh`),
        and the other participants' errors that still hold (a file since fixed, renamed or removed no longer
        stops the run). The other participants' warnings are counted by :meth:`other_warnings`.
        """
        if subjects is None:
            return [_problem(row) for row in self._conn.execute("SELECT * FROM problems ORDER BY rowid")]
        problems = [_problem(r) for r in self._conn.execute("SELECT * FROM problems WHERE participant = ''")]
        for label in sorted(set(subjects) & set(self._fresh)):
            problems += self._fresh[label].problems
        rows = self._conn.execute("SELECT * FROM problems WHERE participant != '' AND severity = 'error'")
        problems += self._recheck([row for row in rows if row[0] not in set(subjects)])
        return problems

    def other_warnings(self, subjects: Sequence[str]) -> int:
        """How many warnings concern participants other than ``subjects`` (left out of their runs' logs)."""
        labels = sorted(set(subjects)) or [""]
        query = (f"SELECT COUNT(*) FROM problems WHERE participant != '' AND severity != 'error' "
                 f"AND participant NOT IN ({','.join('?' * len(labels))})")  # fmt: skip
        return int(self._conn.execute(query, labels).fetchone()[0])

    def _recheck(self, rows: Iterable[tuple[str, ...]]) -> list[Problem]:
        """Stored errors of files that still exist as indexed; those changed since are checked again."""
        problems = []
        for row in rows:
            rel = row[1]
            stored = self._conn.execute("SELECT size, mtime_ns, ctime_ns FROM files WHERE rel = ?", (rel,)).fetchone()
            try:
                st = (self.bids_dir / rel).stat()
            except OSError:
                continue  # removed or renamed since: the error is gone with it
            if stored is not None and tuple(stored) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                problems.append(_problem(row))
                continue
            parsed: dict[str, Any] = {}
            if rel.endswith(".json"):
                try:
                    parsed[rel] = read_json(self.bids_dir / rel)
                except (OSError, ValueError) as exc:
                    parsed[rel] = exc
            problems += file_name_problems([rel], self.context().ignore) + json_problems([rel], parsed)
        return problems

    def context(self) -> DatasetContext:
        if self._context is None:
            self._context = DatasetContext.read(self.bids_dir, list_root(self.bids_dir))
        return self._context

    def refresh(self, labels: Sequence[str]) -> list[str]:
        """Read and validate the folders of ``labels`` again (what a run on them always does); returns what
        changed in them since the index was built (empty when nothing did)."""
        stored: dict[str, dict[str, tuple[int, int, int]]] = {}
        marks = ",".join("?" * len(labels))
        for rel, label, *key in self._conn.execute(
            f"SELECT rel, participant, size, mtime_ns, ctime_ns FROM files WHERE participant IN ({marks})", list(labels)
        ):
            stored.setdefault(label, {})[rel] = tuple(key)
        changes = []
        for label in labels:
            scan = scan_participant(self.context(), label)
            self._fresh[label] = scan
            changes += _differences(stored.get(label, {}), {f.rel: f.key for f in scan.files})
        return changes

    def record(self) -> dict[str, Any]:
        """What a run's log records of the index it used."""
        meta = self.meta
        return {
            "path": str(self.path) if self.path else None,
            "state": self.state,
            "reason": self.reason,
            "built": meta.get("built"),
            "bidsdl_version": meta.get("bidsdl_version"),
            "participants": int(meta.get("n_participants", 0)),
            "files": int(meta.get("n_files", 0)),
            "read_again": sorted(f"sub-{label}" for label in self._fresh),
        }


def _problem(row: Sequence[str]) -> Problem:
    _, path, issue, fix, severity = row
    return Problem(path, issue, fix, severity)


def _differences(before: dict[str, tuple[int, int, int]], now: dict[str, tuple[int, int, int]]) -> list[str]:
    """What happened to the files between two stat listings, one line each."""
    changes = [f"{rel} added" for rel in sorted(now.keys() - before.keys())]
    changes += [f"{rel} removed" for rel in sorted(before.keys() - now.keys())]
    changes += [f"{rel} changed" for rel in sorted(before.keys() & now.keys()) if before[rel] != now[rel]]
    return changes


def describe(changes: Sequence[str]) -> str:
    """A short list of changes for a message.

    >>> describe(["a added", "b removed"])
    'a added, b removed'
    >>> describe([f"f{i} changed" for i in range(7)])
    'f0 changed, f1 changed, f2 changed, f3 changed, f4 changed and 2 more'
    """
    shown = ", ".join(changes[:_SHOWN_CHANGES])
    return shown + (f" and {len(changes) - _SHOWN_CHANGES} more" if len(changes) > _SHOWN_CHANGES else "")


# --- building ----------------------------------------------------------------------------------------------


def build(bids_dir: Path) -> sqlite3.Connection:
    """Read and validate all of BIDS_DIR into a new in-memory index."""
    started = time.monotonic()
    conn = sqlite3.connect(":memory:")
    conn.executescript(_SCHEMA)
    listing = list_root(bids_dir)
    context = DatasetContext.read(bids_dir, listing)
    problems, has_participants = dataset_problems(bids_dir, listing, context)
    conn.executemany("INSERT INTO folders VALUES (?)", [(label,) for label in listing.folders])
    _insert_files(conn, "", listing.files)
    _insert_problems(conn, "", problems)
    n_files, n_images, last_log = len(listing.files), 0, started
    labels = listing.folders if has_participants else ()
    for i, label in enumerate(labels):
        scan = scan_participant(context, label)
        _insert_scan(conn, scan, bids_dir)
        n_files += len(scan.files)
        n_images += len(scan.images)
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            LOGGER.info("Indexing BIDS_DIR: %d of %d participant folders read (%.0f s)", i + 1, len(labels),
                        last_log - started)  # fmt: skip
    meta = {
        "format": str(INDEX_FORMAT),
        "bidsdl_version": __version__,
        "bids_dir": str(Path(bids_dir).resolve()),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "built_by": f"{socket.gethostname()}:{os.getpid()}",
        "build_s": f"{time.monotonic() - started:.2f}",
        "n_participants": str(len(listing.folders)),
        "n_files": str(n_files),
        "n_images": str(n_images),
    }
    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
    conn.commit()
    return conn


def _insert_files(conn: sqlite3.Connection, participant: str, files: Iterable[FileStat]) -> None:
    rows = [(f.rel, participant, f.size, f.mtime_ns, f.ctime_ns) for f in files]
    conn.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?)", rows)


def _insert_problems(conn: sqlite3.Connection, participant: str, problems: Iterable[Problem]) -> None:
    conn.executemany(
        "INSERT INTO problems VALUES (?, ?, ?, ?, ?)",
        [(participant, p.path, p.issue, p.fix, p.severity) for p in problems],
    )


def _insert_scan(conn: sqlite3.Connection, scan: ParticipantScan, bids_dir: Path) -> None:
    _insert_files(conn, scan.label, scan.files)
    _insert_problems(conn, scan.label, scan.problems)
    rows = []
    for image in scan.images:
        rel = image.relative_to(bids_dir)
        rows.append((rel, scan.label, image.subject, image.session, json.dumps(image.entities),
                     json.dumps(image.metadata), json.dumps(scan.metadata_problems.get(rel, [])),
                     image.kind))  # fmt: skip
    conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)


# --- checking and opening ----------------------------------------------------------------------------------


def _stored_root(conn: sqlite3.Connection) -> RootListing:
    files = [FileStat(*row) for row in conn.execute(
        "SELECT rel, size, mtime_ns, ctime_ns FROM files WHERE participant = '' ORDER BY rel")]  # fmt: skip
    folders = [row[0] for row in conn.execute("SELECT label FROM folders ORDER BY label")]
    return RootListing(tuple(files), tuple(folders))


def changes_since(conn: sqlite3.Connection, bids_dir: Path, *, full: bool) -> list[str]:
    """What changed in BIDS_DIR since the index was built: its top always, every file with ``full``."""
    before, now = _stored_root(conn), list_root(bids_dir)
    changes = _differences({f.rel: f.key for f in before.files}, {f.rel: f.key for f in now.files})
    changes += [f"sub-{label}/ added" for label in sorted(set(now.folders) - set(before.folders))]
    changes += [f"sub-{label}/ removed" for label in sorted(set(before.folders) - set(now.folders))]
    if full and not changes:
        stored: dict[str, dict[str, tuple[int, int, int]]] = {}
        for rel, label, *key in conn.execute(
            "SELECT rel, participant, size, mtime_ns, ctime_ns FROM files WHERE participant != ''"
        ):
            stored.setdefault(label, {})[rel] = tuple(key)
        for label in now.folders:
            current = {f.rel: f.key for f in stat_tree(bids_dir, f"sub-{label}")}
            changes += _differences(stored.get(label, {}), current)
    return changes


def stale_reason(conn: sqlite3.Connection, bids_dir: Path, *, full: bool) -> str | None:
    """Why the index cannot be reused for BIDS_DIR, or None when it can."""
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    if meta.get("format") != str(INDEX_FORMAT) or meta.get("bidsdl_version") != __version__:
        return (f"it was built by bidsdl {meta.get('bidsdl_version', '?')} (index format {meta.get('format', '?')}); "
                f"this is bidsdl {__version__} (format {INDEX_FORMAT})")  # fmt: skip
    if meta.get("bids_dir") != str(Path(bids_dir).resolve()):
        return f"it indexes another BIDS_DIR ({meta.get('bids_dir')})"
    changes = changes_since(conn, bids_dir, full=full)
    if changes:
        return f"BIDS_DIR changed since it was built on {meta.get('built')}: {describe(changes)}"
    return None


def _open_stored(path: Path) -> sqlite3.Connection:
    """The index file, read-only and without locking (it is only ever replaced whole, never modified)."""
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
    conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()  # fails here when not an index
    return conn


def _check_stored(path: Path, bids_dir: Path, *, full: bool) -> tuple[sqlite3.Connection | None, str | None]:
    """The stored index when it can be reused, else None and why not."""
    if not path.exists():
        return None, f"there is none yet at {path}"
    try:
        conn = _open_stored(path)
        reason = stale_reason(conn, bids_dir, full=full)
    except sqlite3.Error as exc:
        return None, f"{path} is not a readable index ({exc})"
    if reason is None:
        return conn, None
    conn.close()
    return None, reason


def _participants_in(path: Path, bids_dir: Path) -> list[str] | None:
    """The participant list of the index at ``path`` when it is one of BIDS_DIR (to tell a rebuild's change)."""
    try:
        conn = _open_stored(path)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if meta.get("bids_dir") != str(Path(bids_dir).resolve()):
                return None
            return [row[0] for row in conn.execute("SELECT DISTINCT subject FROM images ORDER BY subject")]
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def open_index(bids_dir: Path, location: Path | None, *, full: bool = True) -> BidsIndex:
    """The index of BIDS_DIR kept in ``location``: reused when BIDS_DIR has not changed, else built (once, when
    several processes ask together) and stored. ``location`` None: an index in memory for this process only.

    ``full``: check every file's stat before reusing it (a run over the whole dataset); otherwise the top of
    BIDS_DIR only (a run on some participants, which reads their folders again with :meth:`BidsIndex.refresh`).
    """
    bids_dir = Path(bids_dir)
    if location is None:
        return BidsIndex(build(bids_dir), bids_dir, path=None, state="memory", reason="in memory for this run")
    location = Path(location)
    if location.resolve().is_relative_to(bids_dir.resolve()):
        raise UsageError(f"--bids-database-dir {location} is inside BIDS_DIR {bids_dir}: bidsdl never writes "
                         "there. Choose a folder outside it (the default is WORK_DIR/bids_index).")  # fmt: skip
    path = location / INDEX_FILE
    conn, reason = _check_stored(path, bids_dir, full=full)
    if conn is not None:
        LOGGER.debug("BIDS index reused: %s", path)
        return BidsIndex(conn, bids_dir, path=path, state="reused", reason=None)
    try:
        location.mkdir(parents=True, exist_ok=True)
        with _index_lock(location) as waited:
            if waited:  # another process held the lock: it has probably just built the index
                conn, reason_now = _check_stored(path, bids_dir, full=full)
                if conn is not None:
                    LOGGER.info("BIDS index built by another process meanwhile, reused: %s", path)
                    return BidsIndex(conn, bids_dir, path=path, state="reused", reason=None)
                reason = reason_now
            before = _participants_in(path, bids_dir)
            LOGGER.info("Indexing BIDS_DIR %s into %s: %s.", bids_dir, path, reason)
            built = build(bids_dir)
            _store(built, path)
            return BidsIndex(built, bids_dir, path=path, state="built", reason=reason, before=before)
    except (OSError, TimeoutError) as exc:
        LOGGER.warning(
            "The BIDS index cannot be kept in %s (%s): BIDS_DIR is indexed in memory for this run only, so other "
            "runs will index it again. Give --bids-database-dir a folder every run can write (on a cluster, "
            "one on the shared filesystem).", location, getattr(exc, "strerror", None) or exc,
        )  # fmt: skip
        return BidsIndex(build(bids_dir), bids_dir, path=None, state="memory", reason=reason)


def _store(conn: sqlite3.Connection, path: Path) -> None:
    """Write the in-memory index to ``path``: a temporary file beside it, flushed, then renamed into place."""
    for leftover in path.parent.glob(".bids_index.*.tmp"):  # of a builder killed before its rename (we hold the lock)
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".bids_index.{uuid.uuid4().hex[:8]}.tmp")
    try:
        target = sqlite3.connect(tmp)
        try:
            conn.backup(target)
        finally:
            target.close()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _index_lock(location: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """Hold the index's lock for the block; yields whether another process held it first (and we waited)."""
    with open(location / _LOCK_FILE, "a+") as handle:
        waited, deadline, said = False, time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as busy:
                waited = True
                if not said:
                    handle.seek(0)
                    LOGGER.info("Another bidsdl process (%s) is indexing BIDS_DIR; waiting for it.",
                                handle.read().strip() or "unknown")  # fmt: skip
                    said = True
                if time.monotonic() > deadline:
                    message = f"another process has held {location / _LOCK_FILE} for over {wait_s:.0f} s"
                    raise TimeoutError(message) from busy
                time.sleep(0.2)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{socket.gethostname()}:{os.getpid()}\n")
            handle.flush()
            yield waited
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
