"""Bad input: a clear message naming the file and the fix, the right exit code, BIDS_DIR untouched.

Every dataset here comes from ``bids_factory``: read-only, and checked unchanged at teardown.
"""

from __future__ import annotations

import gzip
import html
import json
import os

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import small_head, write_nifti

pytestmark = pytest.mark.integration


def _status(out, label):
    return json.loads((out / f"sub-{label}" / "log" / f"sub-{label}_status.json").read_text())


def _assert_failed_report(out, label, *said):
    """A failed participant still gets its report: the state, the errors (what, where, the fix)."""
    page = (out / f"sub-{label}.html").read_text()
    assert "report unavailable" not in page, "the full report could not be rendered"
    assert 'class="state-failed"' in page and f"sub-{label}/anat/sub-{label}_T1w.nii.gz" in page
    for text in said:
        assert text in html.unescape(page), text


def test_missing_bids_dir(tmp_path, run_cli):
    code, _, err = run_cli(tmp_path / "nope", tmp_path / "out", "participant")
    assert code == 66 and "does not exist" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["inside", "same"])
def test_output_inside_bids_is_refused(bids_factory, run_cli, where):
    bids = bids_factory()
    out = bids / "derivatives" / "bidsdl" if where == "inside" else bids
    code, _, err = run_cli(bids, out, "participant")
    assert code == 64 and "never writes into the input dataset" in err


def test_work_dir_inside_bids_is_refused(bids_factory, run_cli, tmp_path):
    bids = bids_factory()
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "-w", bids / "work")
    assert code == 64 and "--work-dir" in err


def test_no_dataset_description(bids_factory, run_cli, tmp_path):
    bids = bids_factory(description=False)
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--nprocs", "1")
    assert code == 16
    assert "dataset_description.json: is missing." in err and "Fix:" in err and "--skip-bids-validation" in err
    report = json.loads(next((tmp_path / "out" / "logs").glob("*/bids_validation.json")).read_text())
    assert report["problems"][0]["path"] == "dataset_description.json"
    code, _, _ = run_cli(bids, tmp_path / "out2", "participant", "--skip-bids-validation", "--participant-label", "01")
    assert code == 0


def test_invalid_file_name_fails_validation(bids_factory, run_cli, tmp_path):
    def prepare(root):
        write_nifti(root / "sub-01" / "anat" / "sub-01_T1w_copy.nii.gz")

    bids = bids_factory(prepare=prepare)
    code, _, err = run_cli(bids, tmp_path / "out", "participant")
    assert code == 16 and "sub-01/anat/sub-01_T1w_copy.nii.gz: is not a BIDS-valid file name" in err
    assert ".bidsignore" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--participant-label", "05"), "No T1w images for participant(s) sub-05. Participants with T1w images: sub-"),
        (("--participant-index", "3"), "--participant-index 3 is out of range: 3 participant(s)"),
        (("--session-label", "x"), "The filters selected no T1w images"),
        (("--participant-label", "01", "--participant-index", "1"), "--participant-index 1 is out of range: 1 "),
    ],
)
def test_filters_selecting_nothing(bids_factory, run_cli, tmp_path, args, message):
    """Each filter that selects nothing says which, and why (exit 18)."""
    bids = bids_factory()
    code, _, err = run_cli(bids, tmp_path / "out", "participant", *args)
    assert code == 18
    assert message in " ".join(err.split()), err


def test_participant_label_with_path_characters(bids_factory, run_cli, tmp_path):
    bids = bids_factory()
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--participant-label", "../x")
    assert code == 64 and "'../x'" in err


def _zero_byte(path):
    path.write_bytes(b"")


def _truncated(path):
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _garbage(path):
    path.write_bytes(gzip.compress(os.urandom(4000)))


CORRUPTIONS = {"02": _zero_byte, "03": _truncated, "04": _garbage}


def test_corrupt_images_fail_only_their_subjects(bids_factory, run_cli, tmp_path):
    """A zero-byte, a truncated and a garbage .nii.gz, each its own participant's; sub-01 is sound."""
    subjects = {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", *CORRUPTIONS)}

    def prepare(root):
        for label, corrupt in CORRUPTIONS.items():
            corrupt(root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")

    bids = bids_factory(subjects=subjects, prepare=prepare)
    out = tmp_path / "out"
    code, _, err = run_cli(bids, out, "participant", "--nprocs", "2")
    assert code == 1
    for label in CORRUPTIONS:
        assert f"sub-{label} failed" in err and f"sub-{label}/anat/sub-{label}_T1w.nii.gz" in err
        failed = _status(out, label)
        assert failed["state"] == "failed"
        assert failed["errors"][0].startswith(f"sub-{label}/anat/sub-{label}_T1w.nii.gz:")
        assert "re-export" in failed["errors"][0] or "Re-export" in failed["errors"][0]
        _assert_failed_report(out, label, failed["errors"][0])
    assert "Crash file" in (out / "sub-04.html").read_text()  # the garbage file's crash text, from prepare
    assert _status(out, "01")["state"] == "done"
    assert (out / "sub-01" / "anat" / "sub-01_desc-audit_T1w.json").exists()
    # the group level still gathers the dataset and reports the unreadable images
    assert run_cli(bids, out, "group")[0] == 0
    findings = json.loads((out / "group_audit.json").read_text())
    assert findings["unreadable_images"] == [f"sub-{s}/anat/sub-{s}_T1w.nii.gz" for s in CORRUPTIONS]


def test_nan_voxels_are_cleaned_and_flagged(bids_factory, run_cli, tmp_path):
    def prepare(root):
        img = small_head("nan")
        data = np.asanyarray(img.dataobj).astype(np.float32)
        data[:3] = np.nan
        write_nifti(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz", data, img.affine)

    bids = bids_factory(prepare=prepare)
    out = tmp_path / "out"
    code, _, err = run_cli(bids, out, "participant", "--nprocs", "2", "--participant-label", "02")
    assert code == 0, err
    audit = json.loads((out / "sub-02" / "anat" / "sub-02_desc-audit_T1w.json").read_text())
    assert "non_finite" in audit["flags"] and audit["intensity"]["nan_count"] > 0
    iqms = json.loads((out / "sub-02" / "anat" / "sub-02_desc-iqm_T1w.json").read_text())
    assert iqms["preparation"]["non_finite_voxels_zeroed"] == audit["intensity"]["nan_count"]
    assert "non_finite" in iqms["flags"]
    preproc = nib.load(out / "sub-02" / "anat" / "sub-02_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz")
    assert np.isfinite(np.asanyarray(preproc.dataobj)).all()


def test_4d_image_fails_its_subject_with_a_clear_message(bids_factory, run_cli, tmp_path):
    def prepare(root):
        rng = np.random.default_rng(0)
        write_nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", rng.random((24, 28, 24, 2)).astype(np.float32))

    bids = bids_factory(prepare=prepare)
    out = tmp_path / "out"
    code, _, err = run_cli(bids, out, "participant", "--nprocs", "2", "--participant-label", "01", "02")
    assert code == 1
    assert "sub-01/anat/sub-01_T1w.nii.gz" in err and "holds 2 volumes" in err and "Average or pick one volume" in err
    audit = json.loads((out / "sub-01" / "anat" / "sub-01_desc-audit_T1w.json").read_text())
    assert "4d" in audit["flags"] and audit["header"]["shape"] == [24, 28, 24, 2]
    _assert_failed_report(out, "01", "holds 2 volumes")
    assert _status(out, "02")["state"] == "done"


def test_participants_table_mismatches_are_warnings(bids_factory, run_cli, tmp_path):
    subjects = {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "03")}
    bids = bids_factory(subjects=subjects, participants=["sub-01", "sub-07"])  # sub-03 has data but no row
    out = tmp_path / "out"
    code, _, err = run_cli(bids, out, "participant", "--nprocs", "2")
    assert code == 0
    assert "sub-03/: has no row in participants.tsv" in err and "sub-07" in err
    code, _, err = run_cli(bids, out, "group")
    assert code == 0 and "has no row in participants.tsv" in err
    findings = json.loads((out / "group_audit.json").read_text())
    assert findings["participants_without_images"] == ["sub-07"]
    assert findings["images_without_participants_row"] == ["sub-03/anat/sub-03_T1w.nii.gz"]


def test_unwritable_output_dir(bids_factory, run_cli, tmp_path):
    bids = bids_factory()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run_cli(bids, blocker / "out", "participant")
    assert code == 73 and "cannot be created or written" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_dir(bids_factory, run_cli, tmp_path):
    bids = bids_factory()
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    code, _, _ = run_cli(bids, out, "participant")
    out.chmod(0o755)
    assert code == 73


def test_group_before_participant(bids_factory, run_cli, tmp_path):
    bids = bids_factory()
    code, _, err = run_cli(bids, tmp_path / "out", "group")
    assert code == 65 and "participant' first" in err


def test_unreadable_sidecar_does_not_stop_the_audit(bids_factory, run_cli, tmp_path):
    def prepare(root):
        (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{not json")

    bids = bids_factory(prepare=prepare)
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--participant-label", "01", "--skip-bids-validation")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-audit_T1w.json").read_text())
    assert record["readable"]


def test_foreign_image_header(bids_factory, run_cli, tmp_path):
    """A 2D image named T1w fails its subject with the reason, at validation and in the record."""

    def prepare(root):
        nib.Nifti1Image(np.ones((10, 10), np.float32), np.eye(4)).to_filename(
            root / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
        )

    bids = bids_factory(prepare=prepare)
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--participant-label", "03")
    assert code == 1 and "2 dimensions" in err
    assert _status(tmp_path / "out", "03")["state"] == "failed"
    _assert_failed_report(tmp_path / "out", "03", "2 dimensions")
