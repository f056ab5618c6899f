"""The index of BIDS_DIR through the command line: built by the listing, reused, rebuilt when BIDS_DIR changes,
and a clear message (and a run that still works) when its location cannot be written."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import make_bids, snapshot, write_nifti

pytestmark = pytest.mark.integration

TINY = np.zeros((4, 4, 4), np.int16)


@pytest.fixture
def bids(tmp_path):
    root = make_bids(tmp_path / "bids", {s: [] for s in ("01", "02", "03")})
    for label in ("01", "02", "03"):
        write_nifti(root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz", TINY)
    return root


def test_the_listing_builds_the_index_the_next_runs_reuse(bids, tmp_path, run_cli):
    out = tmp_path / "out"
    before = snapshot(bids)
    code, listed, _ = run_cli(bids, out, "participant", "--list-participants")
    assert code == 0 and listed.split() == ["01", "02", "03"]
    index = out / ".bidsdl_work" / "bids_index" / "bids_index.sqlite"
    stamp = index.stat().st_mtime_ns
    assert run_cli(bids, out, "participant", "--list-participants")[0] == 0
    assert index.stat().st_mtime_ns == stamp  # reused, not written again
    write_nifti(bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz", TINY)
    before = snapshot(bids)
    code, listed, err = run_cli(bids, out, "participant", "--list-participants", "--participant-index", "0")
    assert code == 0 and listed.split() == ["01"]
    assert index.stat().st_mtime_ns != stamp  # rebuilt: a participant was added
    assert "--participant-index 0 counts in the new list (4 participants)" in err
    code, listed, _ = run_cli(bids, out, "participant", "--list-participants")
    assert listed.split() == ["01", "02", "03", "04"]
    assert snapshot(bids) == before  # nothing written into BIDS_DIR


def test_an_unwritable_index_location_still_lists(bids, tmp_path, run_cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, listed, err = run_cli(bids, tmp_path / "out", "participant", "--list-participants",
                                "--bids-database-dir", blocker / "index")  # fmt: skip
    assert code == 0 and listed.split() == ["01", "02", "03"]
    assert "The BIDS index cannot be kept in" in err and "indexed in memory for this run only" in err


def test_an_index_location_inside_bids_dir_is_refused(bids, tmp_path, run_cli):
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--list-participants",
                           "--bids-database-dir", bids / "derivatives" / "index")  # fmt: skip
    assert code == 64 and "inside BIDS_DIR" in err
    assert not (bids / "derivatives").exists()
