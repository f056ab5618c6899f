"""Discovery of T1w images with pybids, participant selection, and the group manifest."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.bids import manifest as mf
from pipeline.bids.layout import collect_t1w, index_dataset, read_participants, select_participants
from pipeline.errors import NoDataSelected
from tests.helpers import make_bids


def test_collect_t1w_finds_sessions_runs_acquisitions_and_both_extensions(tmp_path):
    root = make_bids(
        tmp_path / "bids",
        {
            "01": [
                "ses-a/anat/sub-01_ses-a_T1w.nii.gz",
                "ses-b/anat/sub-01_ses-b_run-1_T1w.nii",
                "ses-b/anat/sub-01_ses-b_acq-fast_run-2_T1w.nii.gz",
            ],
            "02": ["anat/sub-02_T1w.nii.gz"],
        },
    )
    (root / "sub-02" / "anat" / "sub-02_T2w.nii.gz").write_bytes(b"")
    images = collect_t1w(index_dataset(root))
    assert [img.relative_to(root) for img in images] == [
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_acq-fast_run-2_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_run-1_T1w.nii",
        "sub-02/anat/sub-02_T1w.nii.gz",
    ]
    assert images[0].session == "a" and images[3].session is None
    assert images[0].metadata["Manufacturer"] == "TestVendor"
    only_b = collect_t1w(index_dataset(root), sessions=["b"])
    assert {img.session for img in only_b} == {"b"}


def test_selection_by_label_and_index():
    available = ["03", "01", "02"]
    assert select_participants(available) == ["01", "02", "03"]
    assert select_participants(available, requested=["03", "01"]) == ["01", "03"]
    assert select_participants(available, requested=["03", "01"], index=1) == ["03"]
    with pytest.raises(NoDataSelected, match="out of range"):
        select_participants(available, index=3)
    with pytest.raises(NoDataSelected, match="sub-07"):
        select_participants(available, requested=["07"])
    with pytest.raises(NoDataSelected):
        select_participants([])


def test_participants_ids_are_normalised(tmp_path):
    (tmp_path / "participants.tsv").write_text("participant_id\tage\n01\t5\nsub-02\tn/a\n")
    table = read_participants(tmp_path)
    assert list(table["participant_id"]) == ["sub-01", "sub-02"]
    assert pd.isna(table.loc[1, "age"])


def _record(source: str, data_hash: str, flags=(), readable=True):
    return (
        {
            "source": source,
            "readable": readable,
            "flags": list(flags),
            "intensity": {"data_sha256": data_hash},
            "header": {"shape": [2, 2, 2], "voxel_size_mm": [1, 1, 1]},
            "metadata": {},
        },
        source.replace("_T1w.nii.gz", "_desc-audit_T1w.json"),
    )


def test_manifest_flags_duplicates_missing_and_orphans():
    audits = [
        _record("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "aaa"),
        _record("sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz", "bbb"),
        _record("sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "aaa"),
        _record("sub-04/ses-1/anat/sub-04_ses-1_T1w.nii.gz", "", flags=["unreadable"], readable=False),
    ]
    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"], "age": ["70", "71", "72"]})
    sessions = {"sub-01": pd.DataFrame({"session_id": ["ses-1", "ses-2"], "age": ["70", "72"]})}
    table, findings = mf.build_manifest(
        audits, participants=participants, sessions=sessions, subjects_on_disk=["01", "02", "04", "05"]
    )
    assert findings["duplicates"] == [["sub-01", "sub-02"]]
    assert list(table["duplicate_of"]) == ["sub-02", "", "sub-01", ""]
    assert findings["participants_without_images"] == ["sub-03", "sub-05"]
    assert findings["images_without_participants_row"] == ["sub-04/ses-1/anat/sub-04_ses-1_T1w.nii.gz"]
    assert findings["unreadable_images"] == ["sub-04/ses-1/anat/sub-04_ses-1_T1w.nii.gz"]
    assert list(table["age"]) == ["70", "70", "71", None] or table["age"].isna().iloc[-1]
    assert list(table["session_age"][:2]) == ["70", "72"]
    sidecar = mf.manifest_sidecar(table, {"age": {"Description": "Age", "Units": "year"}})
    assert sidecar["age"]["Units"] == "year" and "session_age" in sidecar


def test_sidecar_inheritance_and_broken_sidecars(tmp_path):
    from pipeline.bids.layout import sidecar_metadata

    root = make_bids(tmp_path / "bids", {"01": ["ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz"]})
    (root / "T1w.json").write_text('{"Manufacturer": "Top", "EchoTime": 0.003}')
    (root / "sub-01" / "sub-01_T1w.json").write_text('{"FlipAngle": 9}')
    (root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-1_T1w.json").write_text('{"Manufacturer": "Deep"}')
    (root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-2_T1w.json").write_text('{"Manufacturer": "Other"}')
    image = root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-1_T1w.nii.gz"
    metadata, problems = sidecar_metadata(root, image)
    assert metadata == {"Manufacturer": "Deep", "EchoTime": 0.003, "FlipAngle": 9} and problems == []
    (root / "sub-01" / "sub-01_T1w.json").write_text("{oops")
    metadata, problems = sidecar_metadata(root, image)
    assert metadata["Manufacturer"] == "Deep" and problems[0].startswith("sub-01/sub-01_T1w.json: not valid JSON")
