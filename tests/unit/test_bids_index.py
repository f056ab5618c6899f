"""The BIDS index: built once, reused while BIDS_DIR is unchanged, rebuilt (with the reason) when it changed,
shared by processes that start together, and readable by pybids' rules."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from pipeline.bids import index as bids_index
from pipeline.bids.index import INDEX_FILE, open_index
from pipeline.derivatives import PYBIDS_ENTITIES
from pipeline.errors import UsageError
from tests.helpers import make_bids, write_nifti

SUBJECTS = {
    "01": ["ses-a/anat/sub-01_ses-a_T1w.nii.gz", "ses-b/anat/sub-01_ses-b_acq-fast_run-2_T1w.nii.gz"],
    "02": ["anat/sub-02_T1w.nii.gz"],
    "03": ["anat/sub-03_run-1_T1w.nii", "anat/sub-03_run-2_T1w.nii.gz"],
}
TINY = np.zeros((4, 4, 4), np.int16)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bids(tmp_path_factory.mktemp("template") / "bids", SUBJECTS)


@pytest.fixture
def bids(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "bids"))


def _replace_keeping_stat(path: Path, content: bytes) -> None:
    """Overwrite ``path`` with other bytes of the same size and put its modification time back (as ``cp -p``)."""
    st = path.stat()
    assert len(content) == st.st_size
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_built_once_then_reused(bids, tmp_path, caplog):
    location = tmp_path / "index"
    with caplog.at_level(logging.INFO, logger="pipeline.bids.index"):
        first = open_index(bids, location)
    assert first.state == "built" and "there is none yet" in first.reason
    assert "Indexing BIDS_DIR" in caplog.text
    stamp = (location / INDEX_FILE).stat().st_mtime_ns
    again = open_index(bids, location)
    assert again.state == "reused" and again.reason is None
    assert (location / INDEX_FILE).stat().st_mtime_ns == stamp  # not written again
    assert again.participants() == ["01", "02", "03"] == first.participants()
    assert again.participants(["b"]) == ["01"]
    assert [i.relative_to(bids) for i in again.t1w(["01"])] == [
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_acq-fast_run-2_T1w.nii.gz",
    ]
    assert again.t1w(["02"])[0].metadata == {"Manufacturer": "TestVendor", "MagneticFieldStrength": 3}
    assert again.record()["participants"] == 3 and again.record()["files"] > 8


@pytest.mark.parametrize(
    "change, seen_by_root_check",
    [
        ("file added in a participant", False),
        ("file removed from a participant", False),
        ("file replaced, same size and mtime", False),
        ("participant added", True),
        ("participant removed", True),
        ("participants.tsv edited", True),
        ("top-level sidecar added", True),
    ],
)
def test_changes_are_detected(bids, tmp_path, change, seen_by_root_check):
    location = tmp_path / "index"
    open_index(bids, location)
    t1w = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    if change == "file added in a participant":
        write_nifti(bids / "sub-02" / "anat" / "sub-02_run-2_T1w.nii.gz", TINY)
    elif change == "file removed from a participant":
        (bids / "sub-03" / "anat" / "sub-03_run-1_T1w.nii").unlink()
    elif change == "file replaced, same size and mtime":
        _replace_keeping_stat(t1w, bytes(reversed(t1w.read_bytes())))
    elif change == "participant added":
        write_nifti(bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz", TINY)
    elif change == "participant removed":
        shutil.rmtree(bids / "sub-03")
    elif change == "participants.tsv edited":
        with open(bids / "participants.tsv", "a") as handle:
            handle.write("sub-09\t70\tCN\n")
    else:
        (bids / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5}))
    rebuilt = open_index(bids, location, full=True)
    assert rebuilt.state == "built" and "changed since it was built" in rebuilt.reason
    root_only = open_index(bids, location, full=False)
    assert root_only.state == "reused"  # the index just built is fresh
    if change == "top-level sidecar added":  # inherited by every T1w without a deeper value
        assert {img.metadata["MagneticFieldStrength"] for img in rebuilt.t1w()} == {3}
        assert "T1w.json added" in rebuilt.reason
    if change == "participant added":
        assert rebuilt.participants() == ["01", "02", "03", "04"]


def test_a_run_on_one_participant_checks_the_top_and_reads_its_own_folder_again(bids, tmp_path):
    location = tmp_path / "index"
    open_index(bids, location)
    sidecar = bids / "sub-02" / "anat" / "sub-02_T1w.json"
    sidecar.write_text(json.dumps({"Manufacturer": "Other", "MagneticFieldStrength": 7}))
    write_nifti(bids / "sub-01" / "ses-a" / "anat" / "sub-01_ses-a_run-9_T1w.nii.gz", TINY)  # another participant's
    index = open_index(bids, location, full=False)
    assert index.state == "reused"  # the top of BIDS_DIR did not change
    changes = index.refresh(["02"])
    assert changes == ["sub-02/anat/sub-02_T1w.json changed"]
    assert index.t1w(["02"])[0].metadata["MagneticFieldStrength"] == 7  # read again, not the stored value
    assert len(index.t1w(["01"])) == 2  # not read again: the index's view
    assert index.record()["read_again"] == ["sub-02"]
    assert open_index(bids, location, full=True).state == "built"  # a whole-dataset run sees both


def test_other_participants_errors_come_from_the_index_and_are_checked_again(bids, tmp_path):
    bad = bids / "sub-03" / "anat" / "sub-03_T1w_copy.nii.gz"
    bad.write_bytes(b"x")
    (bids / "sub-02" / "anat" / "sub-02_T1w.json").write_text("{broken")
    location = tmp_path / "index"
    index = open_index(bids, location)
    assert {p.path for p in index.problems() if p.severity == "error"} == {
        "sub-03/anat/sub-03_T1w_copy.nii.gz",
        "sub-02/anat/sub-02_T1w.json",
    }
    task = open_index(bids, location, full=False)
    task.refresh(["01"])
    assert {p.path for p in task.problems(["01"]) if p.severity == "error"} == {
        "sub-03/anat/sub-03_T1w_copy.nii.gz",
        "sub-02/anat/sub-02_T1w.json",
    }
    bad.unlink()  # fixed: the copy removed
    (bids / "sub-02" / "anat" / "sub-02_T1w.json").write_text('{"Manufacturer": "Fixed"}')  # fixed in place
    task = open_index(bids, location, full=False)
    task.refresh(["01"])
    assert [p for p in task.problems(["01"]) if p.severity == "error"] == []


def test_another_dataset_an_older_bidsdl_and_a_corrupt_file_rebuild(bids, tmp_path, caplog):
    location = tmp_path / "index"
    open_index(bids, location)
    other = make_bids(tmp_path / "other", {"07": []})
    write_nifti(other / "sub-07" / "anat" / "sub-07_T1w.nii.gz", np.zeros((4, 4, 4), np.int16))
    moved = open_index(other, location)
    assert moved.state == "built" and "another BIDS_DIR" in moved.reason and moved.participants() == ["07"]
    with sqlite3.connect(location / INDEX_FILE) as conn:
        conn.execute("UPDATE meta SET value = '0.0.1' WHERE key = 'bidsdl_version'")
    older = open_index(other, location)
    assert older.state == "built" and "built by bidsdl 0.0.1" in older.reason
    (location / INDEX_FILE).write_bytes(b"not a database at all" * 100)
    with caplog.at_level(logging.INFO, logger="pipeline.bids.index"):
        corrupt = open_index(other, location)
    assert corrupt.state == "built" and "not a readable index" in corrupt.reason
    assert "not a readable index" in caplog.text


def test_an_unwritable_location_indexes_in_memory_with_a_warning(bids, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="pipeline.bids.index"):
        index = open_index(bids, blocker / "index")  # a folder under a file cannot be made, even by root
    assert index.state == "memory" and index.path is None
    assert index.participants() == ["01", "02", "03"]
    assert "cannot be kept in" in caplog.text and "--bids-database-dir" in caplog.text


def test_a_location_inside_bids_dir_is_refused(bids):
    with pytest.raises(UsageError, match="inside BIDS_DIR"):
        open_index(bids, bids / "derivatives" / "index")


def _open_together(bids: str, location: str, start, results) -> None:
    start.wait()
    index = open_index(Path(bids), Path(location))
    results.put((index.state, index.participants()))


def test_processes_starting_together_build_it_once(bids, tmp_path, monkeypatch):
    location = tmp_path / "index"
    context = mp.get_context("fork")
    start, results = context.Event(), context.Queue()
    slow_build = bids_index.build

    def build(path):  # long enough for the others to find the lock taken
        import time

        time.sleep(0.5)
        return slow_build(path)

    monkeypatch.setattr(bids_index, "build", build)
    workers = [context.Process(target=_open_together, args=(str(bids), str(location), start, results))
               for _ in range(4)]  # fmt: skip
    for worker in workers:
        worker.start()
    start.set()
    states = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert [s for s, _ in states].count("built") == 1
    assert [s for s, _ in states].count("reused") == 3
    assert all(p == ["01", "02", "03"] for _, p in states)
    assert list(location.glob(".bids_index.*.tmp")) == []  # no temporary file left behind


def test_the_index_finds_what_pybids_finds(bids):
    from bids import BIDSLayout, BIDSLayoutIndexer

    write_nifti(bids / "sub-02" / "anat" / "sub-02_T2w.nii.gz", TINY)
    (bids / "sub-02" / "anat" / "sub-02_desc-x_T1w.txt").write_text("")
    write_nifti(bids / "sub-03" / "anat" / "sub-03_ce-gad_rec-norm_echo-1_part-mag_T1w.nii.gz", TINY)
    layout = BIDSLayout(str(bids), validate=False, indexer=BIDSLayoutIndexer(validate=False))
    expected = {}
    for f in layout.get(suffix="T1w", datatype="anat", extension=[".nii", ".nii.gz"], return_type="object"):
        entities = {k: str(v) for k, v in f.get_entities().items() if k in PYBIDS_ENTITIES}
        expected[Path(f.path).relative_to(bids).as_posix()] = entities
    found = {img.relative_to(bids): img.entities for img in open_index(bids, None).t1w()}
    assert found == expected
