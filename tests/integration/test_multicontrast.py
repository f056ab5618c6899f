"""The participant level with FLAIRs beside the T1w: co-registration end to end, the official validator on the new
derivatives, the report, and bad input (two FLAIRs in a session, one without a T1w, a 4D one)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline import derivatives
from tests.helpers import AFFINE, set_read_only, snapshot, validator_issues

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
    sidecar = json.loads((anat / "sub-01_ses-01_acq-3d_FLAIR.json").read_text())  # a sidecar of another grid
    (anat / "sub-01_ses-01_acq-3d_FLAIR.json").write_text(json.dumps({**sidecar, "SliceThickness": 1.0}))
    with open(bids / "sub-01" / "sub-01_sessions.tsv", "a") as table:
        table.write("ses-09\t70.0\n")
    flair = bids / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_acq-2d_FLAIR.nii.gz"
    img = nib.load(flair)
    data = np.asanyarray(img.dataobj)
    nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine, img.header).to_filename(flair)
    before = snapshot(bids)
    set_read_only(bids)
    out = root / "derivatives"
    code = main([str(bids), str(out), "participant", "--nprocs", "2", "-w", str(root / "work"), *AFFINE,
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
    assert "sidecar_mismatch" in by_name["sub-01_ses-01_acq-3d_FLAIR.nii.gz"]["flags"]
    assert "sidecar_mismatch" not in by_name["sub-01_ses-01_acq-2d_FLAIR.nii.gz"]["flags"]
    audit = json.loads((out / by_name["sub-01_ses-01_acq-3d_FLAIR.nii.gz"]["audit"]).read_text())
    assert audit["sidecar_mismatches"] == ["the sidecar says SliceThickness 1 mm; the header's voxel edges are "
                                           "1.35 x 1.35 x 4.5 mm"]  # fmt: skip
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
    template_image = derivatives.named_path(out, source, "preproc_template")
    in_template = json.loads(derivatives.sidecar_of(template_image).read_text())
    assert in_template["Sources"][:2] == sidecar["Sources"][:2]  # both sources
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


@pytest.fixture(scope="module")
def lesion_learning(tmp_path_factory):
    """Seven participants at 2 mm: T1w, 2D FLAIR and lesions for six, a T1w alone for one; preprocessed, then a
    two-channel lesion model trained (one short epoch). Three new people with FLAIRs and lesions."""
    from pipeline.cli.run import main
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    root = tmp_path_factory.mktemp("lesion_learning")
    bids, new = root / "bids", root / "new"
    # 2 mm T1w, 1.8 x 1.8 x 6 mm FLAIR slices: at 3 x 3 x 9 mm a FLAIR of a head with its own shape is too coarse to
    # co-register reliably (errors of 3-13 mm were measured, some caught by the co-registration's QC)
    options = {"two_session_fraction": 0, "large_fov_fraction": 0, "voxel_scale": 2, "lesion_fraction": 1.0,
               "n_jobs": 2}  # fmt: skip
    write_sample_dataset(bids, SampleOptions(n_subjects=7, seed=12, flair_fraction=1.0, **options))
    for path in (bids / "sub-07").rglob("*_FLAIR.*"):  # a T1w without a FLAIR in its session
        path.unlink()
    write_sample_dataset(new, SampleOptions(n_subjects=3, seed=13, flair_fraction=1.0, label_prefix="ext", **options))
    out = root / "derivatives"
    assert main([str(bids), str(out), "participant", "--nprocs", "2", "-w", str(root / "work"), *AFFINE]) == 0
    lesions = ["--task", "segmentation", "--labels", str(bids / "derivatives" / "lesions"), "--label-desc", "lesion",
               "--inputs", "T1w", "FLAIR", "--model-resolution", "4", "--patch-size", "16", "--n-folds", "1",
               "--epochs", "1", "--test-size", "0.2", "--nprocs", "1"]  # fmt: skip
    assert main([str(bids), str(out), "group", "-w", str(root / "work"), *lesions]) == 0
    return bids, new, out, next((out / "models").glob("lesion_*")), root


@pytest.mark.slow  # a lesion cohort preprocessed and a model trained: ~6 min
def test_a_two_channel_lesion_model_records_its_channels_and_scores_lesion_wise(lesion_learning):
    _, _, out, package, _ = lesion_learning
    record = json.loads((package / "model.json").read_text())
    assert record["input"]["channels"] == ["T1w", "FLAIR"] and "per channel" in record["input"]["normalisation"]
    assert record["model"]["in_channels"] == 2
    assert "each lesion's voxels" in record["loss"] and "each connected component" in record["patch_sampling"]
    assert record["postprocessing"]["min_lesion_voxels"] in (0, 2, 4, 8, 16, 32) and "min_lesion_ml" in record[
        "postprocessing"]  # fmt: skip
    results = json.loads(next((out / "learn").glob("target-lesion/arch-*/results.json")).read_text())
    left_out = {e["source"]: e["reason"] for e in results["excluded"]}
    assert left_out["sub-07/ses-01/anat/sub-07_ses-01_T1w.nii.gz"].startswith("no FLAIR aligned to it")
    for metric in ("dice", "lesion_recall", "lesion_precision", "lesion_f1", "avd_percent"):
        assert metric in results["test_native"]["metrics"], metric
    cases = pd.read_csv(package / "case_scores.tsv", sep="\t")
    assert {"lesion_f1", "lesion_recall", "n_lesions_ref", "n_lesions_pred"} <= set(cases.columns)


@pytest.mark.slow  # a lesion cohort preprocessed and a model trained: ~6 min
def test_new_people_are_labelled_from_both_channels_and_evaluated_lesion_wise(lesion_learning, run_cli):
    _, new, _, package, root = lesion_learning
    out = root / "new_out"
    code, _, err = run_cli(new, out, "participant", "--model", package, "--nprocs", "2", "-w", root / "work_new")
    assert code == 0, err
    for t1w in sorted(new.rglob("sub-*/ses-*/anat/*_T1w.nii.gz")):
        dseg = derivatives.named_path(out, t1w.relative_to(new).as_posix(), "dseg", label_desc="lesion")
        assert nib.load(dseg).shape == nib.load(t1w).shape
    code, _, err = run_cli(new, out, "group", "--model", package, "--labels", new / "derivatives" / "lesions",
                           "--label-desc", "lesion")  # fmt: skip
    assert code == 0, err
    evaluation = json.loads((out / "external_evaluation.json").read_text())
    assert evaluation["task"] == "segmentation" and "lesion_f1" in evaluation["evaluation"]["metrics"]
    # a new person without the FLAIR the model needs: its prediction fails, naming the kind; exit 1
    bare = root / "bare"
    shutil.copytree(new, bare)
    for path in bare.rglob("sub-ext01*_FLAIR.*"):
        path.unlink()
    code, _, err = run_cli(bare, root / "bare_out", "participant", "--model", package, "--participant-label", "ext01",
                           "-w", root / "work_bare")  # fmt: skip
    assert code == 1
    status = json.loads(derivatives.status_path(root / "bare_out", "ext01").read_text())
    assert any("no FLAIR was aligned to this T1w" in e for e in status["errors"]), status["errors"]
