"""Participant preprocessing on the real sample dataset: derivatives, accuracy, QC and reports."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.ops.template import TEMPLATE_SPACE, load_template
from tests.helpers import NO_CHROMIUM, browser_dom

pytestmark = pytest.mark.integration
SPACE = TEMPLATE_SPACE


def _images(bids: Path) -> list[Path]:
    return sorted(bids.glob("sub-*/ses-*/anat/*_T1w.nii*"))


def test_every_derivative_with_a_sidecar(sample_run):
    bids, out, _ = sample_run
    for source in _images(bids):
        stem = source.name.split("_T1w")[0]
        anat = out / source.parent.relative_to(bids)
        names = [
            f"{stem}_desc-preproc_T1w", f"{stem}_desc-biasfield_T1w", f"{stem}_desc-brain_mask",
            f"{stem}_space-{SPACE}_desc-preproc_T1w", f"{stem}_space-{SPACE}_res-2_desc-preproc_T1w",
            f"{stem}_space-{SPACE}_desc-brain_mask", f"{stem}_space-{SPACE}_res-2_desc-brain_mask",
        ]  # fmt: skip
        for name in names:
            assert (anat / f"{name}.nii.gz").exists(), name
            sidecar = json.loads((anat / f"{name}.json").read_text())
            assert sidecar["Sources"][0] == f"bids:raw:{source.relative_to(bids).as_posix()}"
            assert "SimpleITK" in sidecar["SoftwareVersions"]
        xfm = anat / f"{stem}_from-T1w_to-{SPACE}_mode-image_xfm.txt"
        assert xfm.read_text().startswith("#Insight Transform File")
        assert json.loads(xfm.with_suffix(".json").read_text())["Registration"]["metric"] == "MattesMutualInformation"
        model = json.loads((anat / f"{stem}_space-{SPACE}_res-2_desc-preproc_T1w.json").read_text())
        assert model["IntensityNormalization"]["iqr"] > 0 and model["res"] == "2"
        for fig in ("mosaic", "regsubject", "regtemplate", "biasfield", "mesh"):
            assert (out / source.parts[-4] / "figures" / f"{stem}_desc-{fig}_T1w.png").exists()
        # the brain-mask surface: a closed GIFTI mesh in world mm whose volume is the mask's
        mesh = nib.load(anat / f"{stem}_desc-brainmask_mesh.surf.gii")
        surface = json.loads((anat / f"{stem}_desc-brainmask_mesh.json").read_text())["Surface"]
        assert len(mesh.darrays) == 2 and surface["n_faces"] == len(mesh.darrays[1].data)
        mask = nib.load(anat / f"{stem}_desc-brain_mask.nii.gz")
        mask_ml = float(np.asanyarray(mask.dataobj).astype(bool).sum() * np.prod(mask.header.get_zooms()[:3])) / 1000
        assert abs(surface["volume_ml"] - mask_ml) / mask_ml < 0.05


def test_model_arrays_share_one_grid_and_are_normalised(sample_run):
    _, out, _ = sample_run
    paths = sorted(out.glob(f"sub-*/ses-*/anat/*_space-{SPACE}_res-2_desc-preproc_T1w.nii.gz"))
    images = [nib.load(p) for p in paths]
    assert len({img.shape for img in images}) == 1
    assert all(np.allclose(img.affine, images[0].affine) for img in images)
    assert np.allclose(nib.affines.voxel_sizes(images[0].affine), 2)
    mask = np.asanyarray(nib.load(str(paths[0]).replace("desc-preproc_T1w", "desc-brain_mask")).dataobj) > 0
    for img in images:
        inside = np.asanyarray(img.dataobj)[mask]
        assert abs(np.median(inside)) < 0.1  # median 0, IQR 1 inside the brain
        assert 0.8 < np.subtract(*np.percentile(inside, [75, 25])) < 1.2


def test_pybids_indexes_the_output_as_derivatives(sample_run):
    from bids import BIDSLayout

    bids, out, _ = sample_run
    layout = BIDSLayout(str(bids), derivatives=str(out), validate=False)
    found = layout.derivatives.get_pipeline("bidsdl").get(space=SPACE, res="2", desc="preproc", suffix="T1w",
                                                            extension=".nii.gz")  # fmt: skip
    assert len(found) == len(_images(bids))
    assert layout.get(scope="bidsdl", space=SPACE, desc="preproc", suffix="T1w", extension=".nii.gz", res=None)


def test_registration_matches_the_true_transform(sample_run):
    """Mean displacement over template brain voxels between the estimated affine and the best affine of the true
    mapping: < 1 mm."""
    bids, out, _ = sample_run
    template = load_template(2)
    ijk = np.argwhere(template.brain_mask)[::7]
    xyz = ijk @ template.affine[:3, :3].T + template.affine[:3, 3]
    for source in _images(bids):
        stem = source.name.split(".")[0]
        truth_file = bids / "sourcedata" / "truth" / f"{stem}.json"
        if not truth_file.exists():  # the planted duplicate is a copy: its truth is its original's
            continue
        # the least-squares affine of the true mapping (an individual's shape is not affine; its residual is the
        # floor of any affine registration's error, recorded beside it)
        truth = np.asarray(json.loads(truth_file.read_text())["TemplateToT1wBestAffine"])
        xfm = next(out.glob(f"**/{stem.removesuffix('_T1w')}_from-T1w_to-{SPACE}_mode-image_xfm.txt"))
        transform = sitk.ReadTransform(str(xfm))
        estimated = np.array([transform.TransformPoint((-x, -y, z)) for x, y, z in xyz]) * [-1, -1, 1]
        expected = xyz @ truth[:3, :3].T + truth[:3, 3]
        error = np.linalg.norm(estimated - expected, axis=1).mean()
        assert error < 1.0, f"{stem}: {error:.2f} mm"


def test_brain_masks_match_the_true_brain_necks_included(sample_run):
    """deepbet's mask against each sample head's true brain: recall >= 0.99 and leak <= 0.05, heads whose field
    of view reaches the shoulders included; the template's mask through the registration agrees with it."""
    bids, out, _ = sample_run
    large_fov = 0
    for source in _images(bids):
        stem = source.name.split(".")[0]
        truth_file = bids / "sourcedata" / "truth" / f"{stem}.json"
        if not truth_file.exists():  # the planted duplicate
            continue
        truth = json.loads(truth_file.read_text())
        large_fov += truth["large_fov"]
        anat = out / source.parent.relative_to(bids)
        found = np.asanyarray(nib.load(anat / f"{stem.removesuffix('_T1w')}_desc-brain_mask.nii.gz").dataobj) > 0
        true = np.asanyarray(nib.as_closest_canonical(nib.load(truth_file.with_name(truth["BrainMask"]))).dataobj) > 0
        recall, leak = (found & true).sum() / true.sum(), (found & ~true).sum() / found.sum()
        assert recall >= 0.99 and leak <= 0.05, f"{stem}: recall {recall:.4f}, leak {leak:.4f}"
        sidecar = json.loads((anat / f"{stem.removesuffix('_T1w')}_desc-brain_mask.json").read_text())
        assert sidecar["Software"] == "deepbet" and len(sidecar["NetworkSHA256"]["mask"]) == 64
        record = json.loads((anat / f"{stem.removesuffix('_T1w')}_desc-iqm_T1w.json").read_text())
        assert record["metrics"]["mask_dice"] > 0.94 and record["qc"]["verdict"] == "pass"
    assert large_fov >= 1  # the sample has a head with its neck and shoulders in view


def test_iqms_and_group_qc(sample_run):
    _, out, _ = sample_run
    records = [json.loads(p.read_text()) for p in sorted(out.glob("sub-*/ses-*/anat/*_desc-iqm_T1w.json"))]
    for record in records:
        metrics = record["metrics"]
        # each sample head has its own shape (an affine leaves ~2 mm apart): 0.70-0.75 (real heads: 0.38-0.44)
        assert metrics["registration_ncc"] > 0.6 and metrics["snr_wm"] > 5 and 0 < metrics["cjv"] < 1
        assert 1000 < metrics["brain_volume_ml"] < 2500 and metrics["wm_dice"] > 0.33
        assert record["qc"]["verdict"] == "pass" and record["tissues"]["converged"]
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    assert len(qc) == len(records) and "qc_outlier" in qc and "cnr_outlier" in qc
    assert json.loads((out / "qc.json").read_text())["OutlierRule"].startswith("|x - median| > 3")


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.ids: set[str] = set()
        self.images = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        self.ids |= {attributes["id"]} if "id" in attributes else set()
        self.images += tag == "img"


def test_subject_reports_are_complete_and_self_contained(sample_run):
    bids, out, _ = sample_run
    reports = sorted(out.glob("sub-*.html"))
    assert [r.stem for r in reports] == sorted({p.parts[-4] for p in _images(bids)})
    for report in reports:
        html = report.read_text()
        assert report.stat().st_size < 5 * 1024 * 1024
        parser = _Collector()
        parser.feed(html)
        assert {"summary", "audit", "preprocessing", "iqms", "methods", "provenance", "errors"} <= parser.ids
        assert "N4 [" in html and "deepbet" in html and "Inference" not in html  # methods: only what ran
        assert not [u for u in parser.urls if not u.startswith(("#", "data:"))]
        assert parser.images >= 4 and "(p" in html  # figures, and group percentiles after the group run
        assert "No errors." in html and "Registration check" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_subject_report_opens_in_a_real_browser_offline(sample_run, tmp_path):
    _, out, _ = sample_run
    dom = browser_dom(sorted(out.glob("sub-*.html"))[0], tmp_path)  # opened from a copy: nothing else needed
    assert "Quality metrics" in dom and "Registration check" in dom


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_the_rating_widget_writes_a_file_the_group_level_reads(sample_run, tmp_path):
    """A rating given in the subject report, offline, comes back as a --qc-ratings file the group level honours."""
    import html
    import re

    import pandas as pd

    from pipeline.ratings import apply_ratings, read_ratings

    _, out, _ = sample_run
    report = sorted(out.glob("sub-*.html"))[0]
    dom = browser_dom(report, tmp_path, fragment="qc-ratings-selftest")  # rates the first image bad, shows the file
    text = html.unescape(re.search(r'<pre id="qc-ratings-tsv"[^>]*>(.*?)</pre>', dom, re.S).group(1))
    header, row = text.splitlines()
    assert header == "participant_id\tsource\trating\trater\tcomment"
    subject = report.stem
    assert row.startswith(f"{subject}\t{subject}/") and row.endswith("\tbad\tselftest\tmotion in a tab")
    (tmp_path / "ratings.tsv").write_text(text)
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    rated, summary = apply_ratings(qc, read_ratings(tmp_path / "ratings.tsv"), path=tmp_path / "ratings.tsv")
    assert not summary["ignored"] and [r["source"] for r in summary["left_out"]] == [row.split("\t")[1]]
    assert "selftest: motion in a tab" in summary["left_out"][0]["reason"]
    assert set(rated.loc[rated["qc_rating"] == "bad", "source"]) == {row.split("\t")[1]}


def test_same_inputs_give_identical_outputs(bids_factory, run_cli, tmp_path):
    bids = bids_factory(subjects={"01": ["anat/sub-01_T1w.nii.gz"]})
    for name in ("a", "b"):
        assert run_cli(bids, tmp_path / name, "participant", "--omp-nthreads", "2")[0] == 0
    produced = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").glob("sub-01/**/*.nii.gz"))
    assert len(produced) == 8
    for rel in produced:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_stop_on_first_crash(bids_factory, run_cli, tmp_path):
    subjects = {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "02")}
    bids = bids_factory(
        subjects=subjects, prepare=lambda r: (r / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    )
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--stop-on-first-crash", "--nprocs", "1")
    assert code == 1 and "sub-01 failed" in err
    config = json.loads(next((tmp_path / "out" / "logs").glob("*/config.json")).read_text())
    assert config["stop_on_first_crash"] is True


def test_rerun_after_a_crash_redoes_only_what_failed(tmp_path, run_cli):
    from tests.helpers import make_bids

    bids = make_bids(tmp_path / "bids", {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "02")})
    good = (bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz").read_bytes()
    (bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    assert run_cli(bids, out, "participant")[0] == 1
    work = out / ".bidsdl_work" / "bidsdl_wf" / "sub_01_wf"
    done = sorted(p for p in work.glob("anat_*_wf/*/*/result_*.pklz") if "/ds_" not in str(p))  # sinks always re-save
    stamps = [p.stat().st_mtime_ns for p in done]
    (bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(good)  # the file is fixed
    assert run_cli(bids, out, "participant")[0] == 0
    assert [p.stat().st_mtime_ns for p in done] == stamps  # sub-01 was not recomputed
    assert json.loads((out / "sub-02" / "log" / "sub-02_status.json").read_text())["state"] == "done"
