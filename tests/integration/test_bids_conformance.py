"""BIDS as the official validator reads it (bids-validator-deno), and T1w images that only a rarer entity
(echo, part, chunk, ...) tells apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import validator_issues

pytestmark = pytest.mark.integration


def _errors(dataset: Path) -> list[str]:
    return [f"{i['code']} {i.get('subCode', '')} {i.get('location', '')}" for i in validator_issues(dataset)
            if i["severity"] == "error"]  # fmt: skip


def test_the_official_validator_accepts_the_sample_and_both_levels_outputs(sample_run):
    bids, out, codes = sample_run
    assert codes == {"participant": 0, "group": 0}
    for dataset in (bids, out):
        assert _errors(dataset) == [], dataset
    ignored = (out / ".bidsignore").read_text()
    assert "*.html" in ignored and "sub-*/figures" in ignored
    assert "bidsdl derivatives" in (out / "README.md").read_text()


def test_sidecars_carry_the_fields_bids_defines(sample_run):
    _, out, _ = sample_run
    for sidecar in out.glob("sub-*/**/anat/*.json"):
        record = json.loads(sidecar.read_text())
        if "SoftwareVersions" in record:
            assert isinstance(record["SoftwareVersions"], str) and "bidsdl" in record["SoftwareVersions"]
        name = sidecar.name
        if name.endswith("_mask.json"):
            reference = out / record["SpatialReference"]
            assert reference.exists(), f"{name}: SpatialReference {record['SpatialReference']} does not exist"
        if "_res-" in name:
            assert record["Resolution"].startswith("2 mm isotropic"), name
        if name.endswith(("desc-preproc_T1w.json", "desc-biasfield_T1w.json")):
            assert record["SkullStripped"] is False
    text = "\n".join(p.read_text() for p in out.rglob("*.json") if ".bidsdl_work" not in p.parts)
    assert "NaN" not in text.replace('"NaN', "") and "Infinity" not in text  # strict JSON


@pytest.mark.slow  # a participant run of its own
def test_t1w_told_apart_only_by_echo_or_chunk_stay_apart(tmp_path, run_cli):
    """Two participants, each with two real (sample) heads that differ only by echo-<i> or chunk-<i>."""
    from pipeline.sample.generate import SampleOptions, write_sample_dataset
    from tests.helpers import set_read_only, snapshot

    sample = tmp_path / "sample"
    write_sample_dataset(sample, SampleOptions(n_subjects=2, seed=11, two_session_fraction=0.0, voxel_scale=3))
    heads = sorted(sample.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "entities", "BIDSVersion": "1.9.0"}))
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    names = {"01": [("echo-1", {"EchoTime": 0.003}), ("echo-2", {"EchoTime": 0.006})],
             "02": [("chunk-1", {}), ("chunk-2", {})]}  # fmt: skip
    for (subject, entities), head in zip(names.items(), heads, strict=True):
        anat = bids / f"sub-{subject}" / "anat"
        anat.mkdir(parents=True)
        for entity, metadata in entities:
            (anat / f"sub-{subject}_{entity}_T1w.nii.gz").write_bytes(head.read_bytes())
            (anat / f"sub-{subject}_{entity}_T1w.json").write_text(json.dumps(metadata))
    before = snapshot(bids)
    set_read_only(bids)
    out = tmp_path / "out"
    code, _, err = run_cli(bids, out, "participant", "--nprocs", "2")
    set_read_only(bids, False)
    assert snapshot(bids) == before
    assert code == 0, err
    for subject, entities in names.items():
        for entity, _ in entities:
            stem = out / f"sub-{subject}" / "anat" / f"sub-{subject}_{entity}"
            assert Path(f"{stem}_desc-preproc_T1w.nii.gz").exists()
            assert Path(f"{stem}_desc-brain_mask.nii.gz").exists()
            assert json.loads(Path(f"{stem}_desc-iqm_T1w.json").read_text())["source"].endswith(f"_{entity}_T1w.nii.gz")
    assert _errors(out) == []


def _rich(root: Path) -> None:
    """Sessions, runs, an inherited sidecar, a .bidsignore'd folder, a derivatives folder inside BIDS_DIR,
    participants.tsv with a row without a folder (sub-04) and a folder without a row (sub-03)."""
    from tests.helpers import make_bids, write_nifti

    make_bids(root, {"01": ["ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz", "ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
                            "ses-2/anat/sub-01_ses-2_acq-mp2rage+1_T1w.nii.gz"],
                     "02": ["anat/sub-02_T1w.nii.gz"], "03": ["anat/sub-03_T1w.nii.gz"]},
              participants=["sub-01", "sub-02", "sub-04"])  # fmt: skip
    (root / "T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
    (root / ".bidsignore").write_text("extra/\n")
    write_nifti(root / "extra" / "notes.nii.gz")
    fmriprep = root / "derivatives" / "fmriprep"
    write_nifti(fmriprep / "sub-01" / "anat" / "sub-01_space-MNIInfant+1_desc-preproc_T1w.nii.gz")
    (fmriprep / "dataset_description.json").write_text(
        json.dumps({"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )


def _derivatives(root: Path) -> None:
    from tests.helpers import make_bids

    make_bids(root, {"01": [f"anat/sub-01_desc-{d}_T1w.nii.gz" for d in ("preproc", "brain")]},
              description={"Name": "fMRIPrep outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                           "GeneratedBy": [{"Name": "fMRIPrep"}]})  # fmt: skip


def _templates(root: Path) -> None:
    from tests.helpers import write_nifti

    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "templates", "BIDSVersion": "1.9.0"}))
    write_nifti(root / "tpl-MNIInfant" / "cohort-1" / "tpl-MNIInfant_cohort-1_res-1_T1w.nii.gz")


def _empty(root: Path) -> None:
    from tests.helpers import make_bids

    make_bids(root, {})


#: layout -> (builder, exit code, what stdout lists or stderr says)
LAYOUTS = {
    "sessions_runs_inherited_ignored": (_rich, 0, "01\n02\n03"),
    "derivatives_given_as_input": (_derivatives, 16, "DatasetType 'derivative' (generated by fMRIPrep)"),
    "templates_only": (_templates, 16, "holds no participant folders (sub-<label>/) (it holds template folders"),
    "no_participants": (_empty, 16, "holds no participant folders"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_real_layouts_work_or_fail_cleanly(layout, tmp_path, run_cli, caplog):
    build, code, said = LAYOUTS[layout]
    bids = tmp_path / "bids"
    build(bids)
    got, out, err = run_cli(bids, tmp_path / "out", "participant", "--list-participants")
    assert "Traceback" not in err and got == code, err
    assert said in (out if code == 0 else err)
    if code == 16:  # one problem, not a line per file
        assert err.count("\n  - ") == 1, err
    else:
        warned = caplog.text + err  # warnings are logged (on stderr from the command line)
        assert "sub-03/: has no row in participants.tsv" in warned and "a row for sub-04" in warned
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert all(p.parent.name == "bids_index" for p in written), written  # listing writes only the index
