"""People's quality ratings of the images (``--qc-ratings FILE``): read, matched to the images quality control knows,
combined across raters by one stated rule, and written into ``qc.tsv`` so that learning leaves out the images rated
bad with the raters' reasons.

The file is a TSV with a row per rating: ``participant_id`` and ``rating`` (``good``, ``doubtful`` or ``bad``), and
optionally ``source`` (the image, relative to BIDS_DIR, or its file name; without it a rating covers every image
of the participant), ``rater`` and ``comment``. Rows naming a participant or an image that quality control does not
know, or a rating outside the three, are listed and ignored; the rest is honoured. Each rater counts once per image
(their last row). **The rule**: an image is left out of learning when at least half of its raters rated it ``bad``;
raters who disagree are listed beside the decision (MRIQC's rating widget records the same three levels).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import InputDataError

RATINGS = ("good", "doubtful", "bad")
REQUIRED = ("participant_id", "rating")
#: The rule, as the report states it.
RULE = "an image is left out of learning when at least half of its raters rated it bad (each rater counts once)"


def read_ratings(path: Path) -> pd.DataFrame:
    """The ratings file as a table (every column text; ``rater`` ``anonymous`` and ``comment`` empty where missing).

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "r.tsv").write_text("participant_id\\trating\\n01\\tBad\\n")
    >>> read_ratings(folder / "r.tsv")[["participant_id", "rating", "rater"]].values.tolist()
    [['sub-01', 'bad', 'anonymous']]
    """
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputDataError(
            f"--qc-ratings {path}: cannot be read as a TSV ({exc}). Give a tab-separated file with the columns "
            f"{', '.join(REQUIRED)} (and optionally source, rater, comment)."
        ) from exc
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise InputDataError(f"--qc-ratings {path}: no column {', '.join(missing)} (its columns: "
                             f"{', '.join(table.columns) or 'none'}). Each row needs participant_id and rating "
                             f"({', '.join(RATINGS)}); source, rater and comment are optional.")  # fmt: skip
    for column, value in (("source", ""), ("rater", "anonymous"), ("comment", "")):
        if column not in table.columns:
            table[column] = value
    table["participant_id"] = [p.strip() if p.strip().startswith("sub-") else f"sub-{p.strip()}"
                               for p in table["participant_id"]]  # fmt: skip
    table["rating"] = table["rating"].str.strip().str.lower()
    table["rater"] = table["rater"].str.strip().replace("", "anonymous")
    table["source"] = table["source"].str.strip()
    return table.reset_index(drop=True).assign(row=lambda t: t.index + 2)  # the file's line number


def _matches(row: pd.Series, qc: pd.DataFrame, names: pd.Series) -> pd.Index:
    """The qc rows a rating row covers: its image (by path, or by file name: ``names``), or every image of its
    participant."""
    mine = qc["participant_id"] == row["participant_id"]
    if row["source"]:
        mine &= (qc["source"] == row["source"]) | (names == Path(row["source"]).name)
    return qc.index[mine]


def apply_ratings(qc: pd.DataFrame, ratings: pd.DataFrame, *, path: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """``qc`` with ``qc_rating`` (the decision: bad, doubtful, good, or empty when unrated), ``qc_raters`` (each
    rater's rating) and ``qc_rating_reason`` (why an image is left out; empty otherwise), and what the report
    shows: the rule, the rows ignored and why, the images left out and those whose raters disagree."""
    if qc.empty:  # no quality records: every row names an image this output does not know
        qc = pd.DataFrame(columns=["participant_id", "source"])
    names = qc["source"].map(lambda source: Path(source).name)  # once, not once per rating row
    votes: dict[Any, dict[str, tuple[str, str]]] = {}
    ignored = []
    for _, row in ratings.iterrows():
        if row["rating"] not in RATINGS:
            ignored.append({"row": int(row["row"]), "participant_id": row["participant_id"], "source": row["source"],
                            "reason": f"rating {row['rating']!r} is not one of {', '.join(RATINGS)}"})  # fmt: skip
            continue
        covered = _matches(row, qc, names)
        if not len(covered):
            what = f"image {row['source']}" if row["source"] else "participant"
            ignored.append({"row": int(row["row"]), "participant_id": row["participant_id"], "source": row["source"],
                            "reason": f"no such {what} in this output's quality table"})  # fmt: skip
            continue
        for index in covered:
            votes.setdefault(index, {})[row["rater"]] = (row["rating"], row["comment"])  # the rater's last row wins
    out = qc.assign(qc_rating="", qc_raters="", qc_rating_reason="")
    left_out, disagreements = [], []
    for index, by_rater in votes.items():
        levels = [rating for rating, _ in by_rater.values()]
        bad = [rater for rater, (rating, _) in by_rater.items() if rating == "bad"]
        decision = "bad" if 2 * len(bad) >= len(levels) else "doubtful" if "doubtful" in levels or bad else "good"
        out.at[index, "qc_rating"] = decision
        out.at[index, "qc_raters"] = "; ".join(f"{rater}: {rating}" for rater, (rating, _) in sorted(by_rater.items()))
        source = out.at[index, "source"]
        if decision == "bad":
            comments = "; ".join(f"{r}: {c}" for r, (rating, c) in sorted(by_rater.items()) if rating == "bad" and c)
            reason = (f"rated bad by {len(bad)} of {len(levels)} rater(s) ({', '.join(sorted(bad))})"
                      + (f": {comments}" if comments else "") + " (--qc-ratings)")  # fmt: skip
            out.at[index, "qc_rating_reason"] = reason
            left_out.append({"source": source, "reason": reason})
        if len(set(levels)) > 1:
            disagreements.append({"source": source, "raters": out.at[index, "qc_raters"], "decision": decision})
    summary = {
        "file": str(path) if path else None,
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None,
        "rule": RULE,
        "n_rows": len(ratings),
        "n_images_rated": len(votes),
        "raters": sorted(set(ratings["rater"])),
        "ignored": ignored,
        "left_out": sorted(left_out, key=lambda r: r["source"]),
        "disagreements": sorted(disagreements, key=lambda r: r["source"]),
    }
    return out, summary
