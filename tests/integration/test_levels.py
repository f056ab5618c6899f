"""Both levels end to end on the real sample dataset (read-only), and the evidence they leave."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import __version__
from pipeline.cli.run import main
from tests.helpers import AFFINE, external_links

pytestmark = pytest.mark.integration


def test_both_levels_succeed(sample_run):
    _, _, codes = sample_run
    assert codes == {"participant": 0, "group": 0}


def test_audit_records_for_every_image(sample_run):
    bids, out, _ = sample_run
    sources = sorted(p.relative_to(bids).as_posix() for p in bids.glob("sub-*/ses-*/anat/*_T1w.nii*"))
    audits = sorted(out.glob("sub-*/ses-*/anat/*_desc-audit_T1w.json"))
    assert len(audits) == len(sources) == 5
    for path in audits:
        record = json.loads(path.read_text())
        assert record["source"] in sources and record["readable"]
        assert set(record) >= {"file", "header", "intensity", "metadata", "flags", "Sources"}
        assert record["metadata"]["Manufacturer"]
        assert record["header"]["orientation"] and len(record["header"]["voxel_size_mm"]) == 3
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"


def test_output_dataset_description(sample_run):
    bids, out, _ = sample_run
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bidsdl"
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert description["SourceDatasets"][0]["URL"] == bids.resolve().as_uri()


def test_status_records(sample_run):
    _, out, _ = sample_run
    statuses = [json.loads(p.read_text()) for p in sorted(out.glob("sub-*/log/sub-*_status.json"))]
    assert len(statuses) == 4 and all(s["state"] == "done" for s in statuses)
    for status in statuses:
        assert len(status["config_hash"]) == 64 and status["inputs"][0]["sha256"]
        assert status["duration_s"] >= 0 and status["errors"] == []


def test_logs_hold_log_config_and_environment_per_invocation(sample_run):
    _, out, _ = sample_run
    runs = sorted((out / "logs").iterdir())
    assert [re.sub(r"^\d{8}-\d{6}_", "", r.name).split("_")[0] for r in runs] == ["participant", "group"]
    for run in runs:
        assert {p.name for p in run.iterdir()} >= {"bidsdl.log", "config.json", "environment.json"}
        config = json.loads((run / "config.json").read_text())
        assert config["seed"] == 42 and config["analysis_level"] in run.name
        environment = json.loads((run / "environment.json").read_text())
        assert environment["bidsdl_version"] == __version__ and "nipype" in environment["packages"]
        assert "bidsdl" in (run / "bidsdl.log").read_text()


def test_manifest_and_duplicate_flag(sample_run):
    bids, out, _ = sample_run
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(manifest) == 5
    assert {
        "participant_id",
        "session_id",
        "data_sha256",
        "orientation",
        "age",
        "diagnosis",
        "site",
        "duplicate_of",
        "session_age",
    } <= set(manifest.columns)
    planted = json.loads((bids / "sourcedata" / "generation.json").read_text())["planted"]["duplicate_subject"]
    flagged = manifest.loc[manifest["duplicate_of"] != "", ["participant_id", "duplicate_of"]].values.tolist()
    assert sorted(flagged) == sorted([[planted["original"], planted["copy"]], [planted["copy"], planted["original"]]])
    findings = json.loads((out / "group_audit.json").read_text())
    assert findings["duplicates"] == [sorted([planted["original"], planted["copy"]])]
    sidecar = json.loads((out / "manifest.json").read_text())
    assert set(manifest.columns) <= set(sidecar)


def test_group_report_is_self_contained(sample_run):
    _, out, _ = sample_run
    html = (out / "group.html").read_text()
    assert not external_links(html)
    assert "Dataset checks" in html and "fail" in html  # the planted duplicate
    assert "<script" not in html or "src=" not in html
    assert "Image quality" in html and "data:image/png;base64," in html


def test_a_group_report_that_cannot_be_rendered_is_not_a_success(sample_run, tmp_path, run_cli, monkeypatch):
    """A template error (a bug) must not leave an earlier run's group.html looking like this run's, nor exit 0."""
    import jinja2

    from pipeline.reports import render
    from tests.helpers import fresh_output

    bids, derivatives, _ = sample_run
    out = fresh_output(derivatives, tmp_path / "out")
    (out / "group.html").write_text("<html>an earlier run's report</html>")
    real = render.render

    def broken(template, context):
        if template == "group.html.j2":
            raise jinja2.UndefinedError("'dict object' has no attribute 'planted'")
        return real(template, context)

    monkeypatch.setattr(render, "render", broken)
    code, _, err = run_cli(bids, out, "group")
    assert code == 70, err
    assert "could not be made" in err and "manifest.tsv, qc.tsv and any model package are complete" in err
    page = (out / "group.html").read_text()
    assert "report unavailable" in page and "earlier run" not in page
    assert "No identical image under two participant IDs: fail" in page  # the planted duplicate, still said
    assert (out / "manifest.tsv").exists()


def test_rerun_resumes_from_the_work_dir(sample_run):
    bids, out, _ = sample_run
    work = out / ".bidsdl_work" / "bidsdl_wf"
    results = sorted(p for p in work.glob("sub_01_wf/anat_*_wf/*/*/result_*.pklz") if "/ds_" not in str(p))
    assert len(results) >= 2 * 7  # two images of sub-01, seven processing steps each
    stamps = [p.stat().st_mtime_ns for p in results]
    assert main([str(bids), str(out), "participant", "--participant-label", "01", *AFFINE]) == 0
    assert [p.stat().st_mtime_ns for p in results] == stamps  # cached steps were not re-run


def test_list_participants_and_index(sample_bids, tmp_path, run_cli):
    code, out, _ = run_cli(sample_bids, tmp_path / "out", "participant", "--list-participants")
    assert code == 0 and out.split() == ["01", "02", "03", "04"]
    written = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written == {".bidsdl_work/bids_index/bids_index.sqlite", ".bidsdl_work/bids_index/.bids_index.lock"}, (
        "listing writes the index of BIDS_DIR, nothing else"
    )
    code, out, _ = run_cli(
        sample_bids,
        tmp_path / "o",
        "participant",
        "--list-participants",
        "--participant-label",
        "sub-03",
        "02",
        "--participant-index",
        "1",
    )
    assert code == 0 and out.split() == ["03"]


def test_participant_index_runs_exactly_one(bids_factory, tmp_path, run_cli):
    code, _, _ = run_cli(bids_factory(), tmp_path / "out", "participant", "--participant-index", "2")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("sub-*") if p.is_dir()) == ["sub-03"]


def test_console_scripts_run_as_processes(tmp_path):
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "bidsdl"), "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"bidsdl {__version__}"
    result = subprocess.run([str(bin_dir / "bidsdl"), "x", "y"], capture_output=True, text=True, check=False)
    assert result.returncode == 64 and "bidsdl --help" in result.stderr
    result = subprocess.run(
        [str(bin_dir / "bidsdl"), str(tmp_path / "missing"), str(tmp_path / "o"), "group"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 66 and "does not exist" in result.stderr


def test_the_participant_log_shows_progress_and_the_index(sample_run):
    _, out, _ = sample_run
    run = sorted((out / "logs").glob("*_participant_*"))[0]
    assert "Progress: participants: 4 done, 0 left of 4 (100%)" in (run / "bidsdl.log").read_text()
    record = json.loads((run / "bids_validation.json").read_text())["index"]
    assert record["state"] in ("built", "reused") and record["participants"] == 4


def test_a_large_group_gets_a_bounded_report(tmp_path, run_cli):
    """520 participants (synthetic participant-level records): the manifest holds them all, the report shows 200
    rows, says so, and leaves the subject reports as they are (more than 500)."""
    from pipeline import derivatives
    from pipeline.bids.audit import audit_t1w
    from pipeline.ops import iqm
    from tests.helpers import make_bids, write_nifti

    n = 520
    bids = make_bids(tmp_path / "bids", {f"{i:03d}": [] for i in range(n)})
    out = tmp_path / "out"
    out.mkdir()
    derivatives.ensure_dataset_description(out, derivatives.dataset_description(
        bids_dir=bids, source_description=None, container=None))  # fmt: skip
    metrics = {"snr_wm": 25.0, "cnr": 2.6, "cjv": 0.5, "registration_ncc": 0.94, "mask_dice": 0.985, "wm_dice": 0.5,
               "gm_wm_ratio": 1.4}  # fmt: skip
    for i in range(n):
        label = f"{i:03d}"
        t1w = write_nifti(bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz",
                          np.full((4, 4, 4), i, np.int16))  # fmt: skip
        audit = audit_t1w(t1w, bids_dir=bids, metadata={})
        anat = out / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{label}_desc-audit_T1w.json").write_text(json.dumps(audit))
        record = {"source": audit["source"], "metrics": {k: v * (1 + i / 5000) for k, v in metrics.items()},
                  "qc": iqm.assess(metrics), "flags": audit["flags"]}  # fmt: skip
        (anat / f"sub-{label}_desc-iqm_T1w.json").write_text(json.dumps(record))
    code, _, err = run_cli(bids, out, "group")
    assert code == 0, err
    assert len(pd.read_csv(out / "manifest.tsv", sep="\t")) == n
    html = (out / "group.html").read_text()
    assert f"Showing 200 of {n} images" in html and html.count('.html">sub-') == 200
    assert "subject reports were not re-rendered" in html
    log = (sorted((out / "logs").glob("*_group_*"))[0] / "bidsdl.log").read_text()
    assert "Timing: gathering" in log and "Subject reports not re-rendered" in log
