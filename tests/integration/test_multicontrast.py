"""The participant level with FLAIRs beside the T1w: co-registration end to end, the official validator on the new
derivatives, the report, and bad input (two FLAIRs in a session, one without a T1w, a 4D one)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline import derivatives
from tests.helpers import set_read_only, snapshot, validator_issues

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def multicontrast_run(tmp_path_factory):
    """Three participants with lesions, each T1w with a 2D FLAIR; sub-01 also has a second FLAIR in that session, a
    FLAIR in a session without T1w and its lesion mask beside the T1w (label-lesion_roi); sub-02's FLAIR holds two
    volumes; sub-03's lesion mask is on another grid. Run once at the participant level with --lesion-masks."""
    from pipeline.cli.run import main
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    root = tmp_path_factory.mktemp("multicontrast")
    bids = root / "bids"
    write_sample_dataset(bids, SampleOptions(n_subjects=3, seed=8, two_session_fraction=0, large_fov_fraction=0,
                                             voxel_scale=1.5, flair_fraction=1.0, lesion_fraction=1.0, n_jobs=2))
    lesions = bids / "derivatives" / "lesions"
    shutil.copyfile(lesions / "sub-01/ses-01/anat/sub-01_ses-01_desc-lesion_mask.nii.gz",
                    bids / "sub-01/ses-01/anat/sub-01_ses-01_label-lesion_roi.nii.gz")
    (bids / ".bidsignore").write_text("*_roi.nii.gz\n")  # BIDS does not define it yet (fMRIPrep reads it)
    wrong = lesions / "sub-03/ses-01/anat/sub-03_ses-01_desc-lesion_mask.nii.gz"
    img = nib.load(wrong)
    nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, ::2], img.affine @ np.diag([1, 1, 2, 1])).to_filename(wrong)
    anat = bids / "sub-01" / "ses-01" / "anat"
    for stem in ("sub-01_ses-01_acq-3d_FLAIR", "../../ses-09/anat/sub-01_ses-09_FLAIR"):
        (anat / stem).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(anat / "sub-01_ses-01_acq-2d_FLAIR.nii.gz", anat / f"{stem}.nii.gz")
        shutil.copyfile(anat / "sub-01_ses-01_acq-2d_FLAIR.json", anat / f"{stem}.json")
    with open(bids / "sub-01" / "sub-01_sessions.tsv", "a") as table:
        table.write("ses-09\t70.0\n")
    flair = bids / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_acq-2d_FLAIR.nii.gz"
    img = nib.load(flair)
    data = np.asanyarray(img.dataobj)
    nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine, img.header).to_filename(flair)
    before = snapshot(bids)
    set_read_only(bids)
    out = root / "derivatives"
    code = main([str(bids), str(out), "participant", "--nprocs", "2", "-w", str(root / "work"),
                 "--lesion-masks", str(lesions)])  # fmt: skip
    yield bids, out, code
    set_read_only(bids, False)
    assert snapshot(bids) == before


def _status(out, subject):
    return json.loads(derivatives.status_path(out, subject).read_text())


def test_flairs_are_co_registered_and_described(multicontrast_run):
    bids, out, code = multicontrast_run
    assert code == 1  # sub-02's 4D FLAIR failed; sub-01 finished
    status = _status(out, "01")
    assert status["state"] == "done", status["errors"]
    by_name = {entry["source"].split("/")[-1]: entry for entry in status["images"]}
    for name in ("sub-01_ses-01_acq-2d_FLAIR.nii.gz", "sub-01_ses-01_acq-3d_FLAIR.nii.gz"):  # both, never a pick
        entry = by_name[name]
        assert entry["state"] == "done" and entry["qc_verdict"] == "pass", entry
        assert entry["reference"] == "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
        assert entry["pairing"] == "the only T1w of ses-01"
    lone = by_name["sub-01_ses-09_FLAIR.nii.gz"]
    assert (lone["state"], lone["reason"]) == ("not processed", "no T1w in ses-09")
    source = bids / "sub-01/ses-01/anat/sub-01_ses-01_acq-2d_FLAIR.nii.gz"
    on_t1w = derivatives.named_path(out, source, "preproc_reference")
    assert on_t1w.name == "sub-01_ses-01_acq-2d_space-T1w_desc-preproc_FLAIR.nii.gz"
    t1w_grid = nib.load(derivatives.named_path(out, bids / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", "preproc"))
    assert nib.load(on_t1w).shape == t1w_grid.shape and np.allclose(nib.load(on_t1w).affine, t1w_grid.affine)
    sidecar = json.loads(derivatives.sidecar_of(on_t1w).read_text())
    assert sidecar["SpatialReference"] == "sub-01/ses-01/anat/sub-01_ses-01_desc-preproc_T1w.nii.gz"
    assert sidecar["Sources"][:2] == ["bids:raw:sub-01/ses-01/anat/sub-01_ses-01_acq-2d_FLAIR.nii.gz",
                                      "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"]  # fmt: skip
    assert sidecar["Pairing"] == "the only T1w of ses-01" and sidecar["Coregistration"]["final_metric"] < 0
    for name in ("xfm_reference", "preproc_template", "preproc_model", "fig_coregimage", "fig_coregreference"):
        assert derivatives.named_path(out, source, name, model_resolution=2.0).exists(), name
    iqms = json.loads(derivatives.named_path(out, source, "iqm").read_text())
    assert iqms["metrics"]["coreg_edge_corr"] > 0.6 and iqms["metrics"]["coreg_brain_coverage"] > 0.95
    report = derivatives.subject_report_path(out, "01").read_text()
    assert "Co-registration to sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz" in report
    assert "sub-01/ses-09/anat/sub-01_ses-09_FLAIR.nii.gz: no T1w in ses-09; listed, not processed" in report


def test_a_4d_flair_fails_by_name_and_its_t1w_stands(multicontrast_run):
    bids, out, _ = multicontrast_run
    status = _status(out, "02")
    assert status["state"] == "failed"
    by_kind = {entry["kind"]: entry for entry in status["images"]}
    assert by_kind["T1w"]["state"] == "done" and by_kind["T1w"]["qc_verdict"] == "pass"
    assert any("sub-02_ses-01_acq-2d_FLAIR.nii.gz" in e and "holds 2 volumes" in e for e in status["errors"]), status
    t1w = bids / "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz"
    assert derivatives.named_path(out, t1w, "preproc_model", model_resolution=2.0).exists()


def test_lesion_masks_are_left_out_of_the_registrations_and_drawn(multicontrast_run):
    bids, out, _ = multicontrast_run
    t1w = bids / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
    mask = derivatives.named_path(out, t1w, "lesion_mask")
    assert mask.name == "sub-01_ses-01_label-lesion_mask.nii.gz"
    sidecar = json.loads(derivatives.sidecar_of(mask).read_text())
    # the mask beside the T1w wins over the derivatives dataset's
    assert sidecar["Sources"][-1] == "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_label-lesion_roi.nii.gz"
    assert sidecar["VolumeMl"] > 0 and sidecar["Type"] == "Lesion"
    assert derivatives.named_path(out, t1w, "lesion_mask_template").exists()
    registration = json.loads(derivatives.sidecar_of(derivatives.named_path(out, t1w, "xfm")).read_text())
    assert registration["Registration"]["lesion_masked"] is True
    flair = bids / "sub-01/ses-01/anat/sub-01_ses-01_acq-2d_FLAIR.nii.gz"
    coreg = json.loads(derivatives.sidecar_of(derivatives.named_path(out, flair, "xfm_reference")).read_text())
    assert coreg["Coregistration"]["lesion_masked"] is True
    from_dataset = json.loads(derivatives.sidecar_of(derivatives.named_path(
        out, bids / "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz", "lesion_mask")).read_text())  # fmt: skip
    assert from_dataset["Sources"][-1] == (
        "bids:raw:derivatives/lesions/sub-02/ses-01/anat/sub-02_ses-01_desc-lesion_mask.nii.gz")
    assert "Lesion mask" in derivatives.subject_report_path(out, "01").read_text()


def test_a_lesion_mask_on_another_grid_fails_its_t1w_by_name(multicontrast_run):
    _, out, _ = multicontrast_run
    status = _status(out, "03")
    assert status["state"] == "failed"
    assert any("sub-03_ses-01_desc-lesion_mask.nii.gz is not on the grid of its T1w" in e and "shape" in e
               for e in status["errors"]), status["errors"]  # fmt: skip


def test_the_validator_accepts_the_multicontrast_outputs(multicontrast_run):
    bids, out, _ = multicontrast_run
    for dataset in (bids, out):
        errors = [f"{i['code']} {i.get('location', '')}" for i in validator_issues(dataset) if i["severity"] == "error"]
        assert errors == [], dataset
