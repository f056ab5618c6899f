"""CITATION.cff: the fields Citation File Format 1.2.0 requires, and the version bidsdl reports."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_citation_file_is_complete_and_current():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert {"message", "title", "authors"} <= set(citation)
    assert str(citation["version"]) == __version__, "CITATION.cff's version differs from bidsdl's: update it"
    for reference in citation["references"]:
        assert {"type", "title", "authors"} <= set(reference), reference.get("title")
