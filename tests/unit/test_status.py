"""The per-participant status record, from outputs and Nipype crash files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.bids.layout import T1wImage
from pipeline.participant import subject_status


def _image(bids: Path, label: str) -> T1wImage:
    path = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
    return T1wImage(path=path, subject=label, session=None, entities={"subject": label})


def test_status_done_failed_and_crashed(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    started = time.time()
    audit = out / "sub-01" / "anat" / "sub-01_desc-audit_T1w.json"
    audit.parent.mkdir(parents=True)
    audit.write_text(json.dumps({"readable": True, "errors": [], "flags": [], "file": {"sha256": "f"}}))
    kwargs = {
        "output_dir": out,
        "bids_dir": bids,
        "run_id": "R",
        "config_hash": "h",
        "started": started,
        "finished": started + 2,
    }
    done = subject_status(subject="01", images=[_image(bids, "01")], **kwargs)
    assert done["state"] == "done" and done["inputs"] == [{"path": "sub-01/anat/sub-01_T1w.nii.gz", "sha256": "f"}]
    assert done["duration_s"] == 2

    crash_dir = out / "sub-02" / "log" / "R"
    crash_dir.mkdir(parents=True)
    (crash_dir / "crash-1-audit.txt").write_text(
        "Node: bidsdl_wf.sub_02_wf.anat_T1w_wf.audit\nWorking directory: /w\n\nTraceback:\n"
        "  File x\nMemoryError: out of memory\n"
    )
    crashed = subject_status(subject="02", images=[_image(bids, "02")], **kwargs)
    assert crashed["state"] == "failed"
    assert crashed["crash_files"] == ["sub-02/log/R/crash-1-audit.txt"]
    assert "bidsdl_wf.sub_02_wf.anat_T1w_wf.audit failed: MemoryError: out of memory" in crashed["errors"][0]


def test_stale_audit_from_an_earlier_run_does_not_count(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    audit = out / "sub-01" / "anat" / "sub-01_desc-audit_T1w.json"
    audit.parent.mkdir(parents=True)
    audit.write_text(json.dumps({"readable": True, "errors": [], "flags": []}))
    later = time.time() + 60
    status = subject_status(
        subject="01",
        images=[_image(bids, "01")],
        output_dir=out,
        bids_dir=bids,
        run_id="R",
        config_hash="h",
        started=later,
        finished=later + 1,
    )
    assert status["state"] == "failed" and "no audit was written" in status["errors"][0]
