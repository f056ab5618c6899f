"""BIDS validation findings: each names the file, what is wrong and the fix."""

from __future__ import annotations

import json

from pipeline.bids.layout import validate_dataset
from tests.helpers import make_bids


def errors(problems):
    return [p for p in problems if p.severity == "error"]


def test_valid_dataset_has_no_problems(tmp_path):
    root = make_bids(tmp_path / "bids")
    assert validate_dataset(root, t1w_paths=sorted(root.rglob("*_T1w.nii.gz"))) == []


def test_missing_description(tmp_path):
    root = make_bids(tmp_path / "bids", description=False)
    (problem,) = errors(validate_dataset(root))
    assert problem.path == "dataset_description.json" and "missing" in problem.issue and "BIDSVersion" in problem.fix


def test_description_without_name(tmp_path):
    root = make_bids(tmp_path / "bids", description={"BIDSVersion": "1.9.0"})
    (problem,) = errors(validate_dataset(root))
    assert "'Name'" in problem.issue


def test_invalid_file_names_and_bidsignore(tmp_path):
    root = make_bids(tmp_path / "bids")
    (root / "sub-01" / "anat" / "sub-01_T1w_backup.nii.gz").write_bytes(b"x")
    (root / "notes.txt").write_text("hello")
    (root / "sourcedata").mkdir()
    (root / "sourcedata" / "anything.dcm").write_bytes(b"x")
    found = {p.path for p in errors(validate_dataset(root))}
    assert found == {"sub-01/anat/sub-01_T1w_backup.nii.gz", "notes.txt"}
    (root / ".bidsignore").write_text("notes.txt\n*_backup.nii.gz\n")
    assert errors(validate_dataset(root)) == []


def test_participants_table_mismatch_warns_both_ways(tmp_path):
    root = make_bids(tmp_path / "bids", participants=["sub-01", "sub-02", "sub-99"])
    problems = validate_dataset(root)
    assert errors(problems) == []
    messages = {(p.path, p.issue) for p in problems}
    assert ("sub-03/", "has no row in participants.tsv.") in messages
    assert any(p.path == "participants.tsv" and "sub-99" in p.issue for p in problems)


def test_participants_table_without_id_column(tmp_path):
    root = make_bids(tmp_path / "bids")
    (root / "participants.tsv").write_text("subject\tage\nsub-01\t3\n")
    (problem,) = [p for p in validate_dataset(root) if p.path == "participants.tsv"]
    assert "participant_id" in problem.issue


def test_unusable_image_is_a_warning_naming_the_file(tmp_path):
    root = make_bids(tmp_path / "bids")
    bad = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(b"")
    problems = validate_dataset(root, t1w_paths=sorted(root.rglob("*_T1w.nii.gz")))
    assert errors(problems) == []
    (problem,) = problems
    assert problem.path == "sub-02/anat/sub-02_T1w.nii.gz" and "empty" in problem.issue
    assert json.dumps(problem.as_dict())
