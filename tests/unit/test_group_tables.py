"""The group report's per-image lists stay bounded, the images needing attention first."""

from __future__ import annotations

import pandas as pd

from pipeline.reports.group_tables import capped, manifest_rows


def _manifest(n: int) -> pd.DataFrame:
    table = pd.DataFrame({
        "participant_id": [f"sub-{i:05d}" for i in range(n)], "flags": [""] * n, "duplicate_of": [""] * n,
        "readable": [True] * n,
    })  # fmt: skip
    table.loc[n - 1, "flags"] = "oblique,anisotropic"
    table.loc[n - 2, "duplicate_of"] = "sub-00000"
    table.loc[n - 3, "readable"] = False
    return table


def test_a_large_manifest_shows_the_images_needing_attention_first():
    shown = manifest_rows(_manifest(10_000), limit=200)
    assert (shown["shown"], shown["total"], shown["attention"]) == (200, 10_000, 3)
    assert [r["participant_id"] for r in shown["rows"][:3]] == ["sub-09997", "sub-09998", "sub-09999"]
    assert shown["rows"][2]["flags"] == ["oblique", "anisotropic"] and shown["rows"][3]["participant_id"] == "sub-00000"


def test_a_small_manifest_is_shown_whole_in_its_order():
    shown = manifest_rows(_manifest(10), limit=200)
    assert shown["shown"] == shown["total"] == 10
    assert [r["participant_id"] for r in shown["rows"]] == [f"sub-{i:05d}" for i in range(10)]


def test_lists_say_how_many_more_and_where():
    assert capped(["a"] * 120, "qc.tsv") == {"shown": ["a"] * 50, "more": 70, "where": "qc.tsv"}
    assert capped([], "qc.tsv")["more"] == 0
