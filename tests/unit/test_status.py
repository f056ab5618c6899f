"""The per-participant status record, from outputs and Nipype crash files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import __version__
from pipeline.bids.layout import AnatImage
from pipeline.participant import output_records, rerun_reason, subject_status


def _image(bids: Path, label: str) -> AnatImage:
    path = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
    return AnatImage(path=path, subject=label, session=None, entities={"subject": label})


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


def _done_status(out: Path, **changes) -> dict:
    sub = out / "sub-01" / "anat"
    sub.mkdir(parents=True, exist_ok=True)
    if not (sub / "sub-01_desc-audit_T1w.json").exists():
        (sub / "sub-01_desc-audit_T1w.json").write_text("{}")
    record = {
        "state": "done",
        "run_id": "R",
        "bidsdl_version": __version__,
        "config_hash": "c",
        "model_hashes": [],
        "inputs": [{"path": "sub-01/anat/sub-01_T1w.nii.gz", "sha256": "a"}],
        "outputs": [{"path": "sub-01/anat/sub-01_desc-audit_T1w.json", "size": 2}],
    }
    return {**record, **changes}


def test_rerun_reason_names_what_changed(tmp_path):
    inputs = [{"path": "sub-01/anat/sub-01_T1w.nii.gz", "sha256": "a"}]
    check = {"inputs": inputs, "config_hash": "c", "output_dir": tmp_path}
    assert rerun_reason(_done_status(tmp_path), **check) is None
    assert "never processed" in rerun_reason(None, **check)
    assert "failed" in rerun_reason(_done_status(tmp_path, state="failed"), **check)
    assert "never finished" in rerun_reason(_done_status(tmp_path, state="running"), **check)
    assert "interrupted" in rerun_reason(_done_status(tmp_path, state="interrupted"), **check)
    assert "bidsdl 0.0.1" in rerun_reason(_done_status(tmp_path, bidsdl_version="0.0.1"), **check)
    assert "configuration" in rerun_reason(_done_status(tmp_path, config_hash="other"), **check)
    assert "models" in rerun_reason(_done_status(tmp_path), **{**check, "model_hashes": ["m"]})
    changed = [{"path": "sub-01/anat/sub-01_T1w.nii.gz", "sha256": "b"}]
    assert "inputs changed: sub-01/anat/sub-01_T1w.nii.gz" in rerun_reason(
        _done_status(tmp_path), **{**check, "inputs": changed}
    )
    added = [*inputs, {"path": "sub-01/anat/sub-01_run-2_T1w.nii.gz", "sha256": "x"}]
    assert "run-2" in rerun_reason(_done_status(tmp_path), **{**check, "inputs": added})
    (tmp_path / "sub-01" / "anat" / "sub-01_desc-audit_T1w.json").write_text("{ }")  # size changed
    assert "missing or changed: sub-01/anat/sub-01_desc-audit_T1w.json" in rerun_reason(_done_status(tmp_path), **check)
    gone = {**_done_status(tmp_path), "outputs": [{"path": "sub-01/x.json", "size": 1}]}
    assert "missing or changed: sub-01/x.json" in rerun_reason(gone, **check)


def test_output_records_leave_out_logs_and_leftovers(tmp_path):
    for name in ("anat/sub-01_desc-preproc_T1w.nii.gz", "log/sub-01_status.json", "anat/.x.nii.gz.1234.tmp.nii.gz"):
        (tmp_path / "sub-01" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sub-01" / name).write_text("abc")
    assert output_records(tmp_path, "01") == [{"path": "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz", "size": 3}]
    assert output_records(tmp_path, "02") == []


def test_descendants_and_their_termination():
    import subprocess
    import sys

    from pipeline.processes import descendants, terminate_descendants

    sleeper = "import time; time.sleep(60)"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script])
    time.sleep(1.0)
    found = descendants()
    assert child.pid in found and len(descendants(child.pid)) == 1
    grandchild = descendants(child.pid)[0]
    stopped = terminate_descendants(grace_s=2)
    assert {child.pid, grandchild} <= set(stopped)
    assert child.wait(timeout=5) != 0
