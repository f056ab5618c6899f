"""The rating gallery: a strip per image with its metrics and linked mosaic; in a real browser, every one of 50
images rated by keys alone after sorting by a metric, and the file it makes read back by --qc-ratings' reader."""

from __future__ import annotations

import html
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline.ratings import apply_ratings, read_ratings
from pipeline.reports.gallery import GALLERY, gallery_context
from pipeline.reports.render import render
from tests.helpers import NO_CHROMIUM, browser_dom


def _qc(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    ids = [f"sub-{i:02d}" for i in range(1, n + 1)]
    return pd.DataFrame({
        "participant_id": ids, "source": [f"{p}/anat/{p}_T1w.nii.gz" for p in ids],
        "snr_wm": rng.normal(20, 4, n), "cnr": rng.normal(3, 0.5, n), "qc_verdict": ["pass"] * (n - 1) + ["fail"],
    })  # fmt: skip


def test_the_gallery_draws_a_strip_per_image_with_its_metrics_and_linked_mosaic(tmp_path):
    qc = _qc(3)
    figure = tmp_path / "sub-01" / "figures" / "sub-01_desc-mosaic_T1w.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"png")
    context = gallery_context(tmp_path, qc)
    assert context["metrics"] == ["snr_wm", "cnr"] and len(context["strips"]) == 3
    assert context["strips"][0]["figure"] == "sub-01/figures/sub-01_desc-mosaic_T1w.png"
    assert context["strips"][1]["figure"] is None  # no mosaic: said so, not a broken image
    page = render("gallery.html.j2", {"dataset_name": "<d>", **context})
    assert 'src="sub-01/figures/sub-01_desc-mosaic_T1w.png"' in page and "no mosaic for this image" in page
    assert f'data-snr-wm="{qc.snr_wm[2]}"' in page and "&lt;d&gt;" in page  # metrics to sort by; escaped


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_fifty_images_are_rated_by_keys_alone_and_read_back(tmp_path):
    qc = _qc(50)
    (tmp_path / GALLERY).write_text(render("gallery.html.j2", {"dataset_name": "d", **gallery_context(tmp_path, qc)}))
    dom = browser_dom(tmp_path / GALLERY, tmp_path, fragment="qc-ratings-selftest")  # sort, then b g g g ...
    text = html.unescape(re.search(r'<pre id="qc-ratings-tsv"[^>]*>(.*?)</pre>', dom, re.S).group(1))
    rows = [line.split("\t") for line in text.splitlines()[1:]]
    assert len(rows) == 50  # every image reached, in the sorted order, without going back
    by_snr = qc.sort_values("snr_wm", ascending=False)["source"].tolist()
    assert [r[1] for r in rows] == by_snr
    assert [r[2] for r in rows] == ["bad"] + ["good"] * 49 and {r[3] for r in rows} == {"selftest"}
    assert "50 of 50 rated" in dom
    (tmp_path / "ratings.tsv").write_text(text)
    _, summary = apply_ratings(qc, read_ratings(tmp_path / "ratings.tsv"), path=tmp_path / "ratings.tsv")
    assert [r["source"] for r in summary["left_out"]] == [by_snr[0]] and not summary["ignored"]
