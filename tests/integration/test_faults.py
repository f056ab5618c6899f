"""Processes that die or are stopped, jobs that share an output, and re-submissions.

Each test runs the ``bidsdl`` console script as its own process, as a SLURM array task would; with the
container and SLURM tests, they run in ``make test-infra`` (minutes of real runs that are killed and resumed).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.derivatives import participant_lock
from tests.helpers import AFFINE

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BIDSDL = str(Path(sys.executable).parent / "bidsdl")


def _command(bids: Path, out: Path, *extra: str) -> list[str]:
    work = out.parent / f"{out.name}_work"
    return [BIDSDL, str(bids), str(out), "participant", "-w", str(work), "--model-resolution", "4", *AFFINE, *extra]


def _wait_for(predicate: Callable[[], bool], job: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert job.poll() is None, f"bidsdl ended (exit {job.returncode}) before the moment to stop it"
        assert time.monotonic() < deadline, "timed out waiting for bidsdl"
        time.sleep(0.05)


def _status(out: Path, label: str) -> dict:
    return json.loads((out / f"sub-{label}" / "log" / f"sub-{label}_status.json").read_text())


def _check_every_file(out: Path) -> list[str]:
    """Every visible file under ``out`` opens as what its name says; returns their paths."""
    checked = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if any(part.startswith(".") for part in rel.parts):
            continue  # the lock file, and temporary files no tool reads
        if path.name.endswith(".json"):
            json.loads(path.read_text())
        elif path.name.endswith((".nii.gz", ".surf.gii")):
            image = nib.load(path)
            if path.name.endswith(".nii.gz"):
                np.asanyarray(image.dataobj)
        elif path.suffix == ".png":
            Image.open(path).load()
        elif path.suffix in (".tsv", ".html", ".log", ".txt"):
            path.read_text()
        checked.append(rel.as_posix())
    return checked


def _derivative_files(out: Path) -> set[str]:
    return {
        p.relative_to(out).as_posix()
        for p in out.glob("sub-*/**/*")
        if p.is_file() and "/log/" not in p.relative_to(out).as_posix() and not p.name.startswith(".")
    }


def _voxels(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): np.asanyarray(nib.load(p).dataobj).tobytes()
        for p in sorted(out.glob("sub-*/**/*.nii.gz"))
    }


def test_killed_run_resumes_to_the_uninterrupted_result(bids_factory, tmp_path):
    """SIGKILL mid-run leaves no file that looks complete but is not; a re-run completes it."""
    bids = bids_factory(subjects={"01": ["anat/sub-01_T1w.nii.gz"]})
    reference = tmp_path / "reference"
    assert subprocess.run(_command(bids, reference, "--nprocs", "1", "-q"), check=False).returncode == 0

    out = tmp_path / "killed"
    job = subprocess.Popen(_command(bids, out, "--nprocs", "1", "-q"), stderr=subprocess.DEVNULL)
    _wait_for(lambda: bool(list(out.glob("sub-01/anat/*desc-preproc_T1w.nii.gz"))), job)
    job.kill()
    job.wait(timeout=30)
    assert _status(out, "01")["state"] == "running"  # what the next run sees: not done
    _check_every_file(out)
    assert not (out / "sub-01.html").exists()

    result = subprocess.run(_command(bids, out, "--nprocs", "1"), capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "never finished" in result.stderr
    assert _status(out, "01")["state"] == "done"
    assert not list(out.rglob(".*.tmp*")), "temporary files of the killed run are left"
    _check_every_file(out)
    assert _derivative_files(out) == _derivative_files(reference)
    assert _voxels(out) == _voxels(reference)


def test_sigterm_stops_workers_and_records_the_interruption(bids_factory, tmp_path):
    """SIGTERM (SLURM's time limit, docker stop): exit 143 at once, workers gone, status 'interrupted';
    the re-run finishes; a third run skips the done participants; --force runs them again."""
    bids = bids_factory(subjects={s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "02")})
    out = tmp_path / "out"
    job = subprocess.Popen(_command(bids, out, "--nprocs", "2"), stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: bool(list(out.glob("sub-*/anat/*desc-preproc_T1w.nii.gz"))), job)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "re-run the same command" in err
    states = {label: _status(out, label) for label in ("01", "02")}
    assert {s["state"] for s in states.values()} == {"interrupted"}
    assert "SIGTERM" in states["01"]["errors"][0]
    time.sleep(0.5)
    assert not [cmd for cmd in _command_lines() if str(out) in cmd], "worker processes outlived bidsdl"

    assert subprocess.run(_command(bids, out, "--nprocs", "2", "-q"), check=False).returncode == 0
    done = {label: _status(out, label) for label in ("01", "02")}
    assert {s["state"] for s in done.values()} == {"done"}
    _check_every_file(out)

    again = subprocess.run(_command(bids, out, "--nprocs", "2"), capture_output=True, text=True, check=False)
    assert again.returncode == 0 and again.stderr.count("is up to date") == 2, again.stderr
    assert "2 already up to date, skipped" in again.stderr
    assert {label: _status(out, label)["run_id"] for label in done} == {k: s["run_id"] for k, s in done.items()}

    forced = subprocess.run(
        _command(bids, out, "--nprocs", "2", "--participant-label", "02", "--force"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert forced.returncode == 0, forced.stderr
    assert _status(out, "02")["run_id"] != done["02"]["run_id"]
    assert _status(out, "01")["run_id"] == done["01"]["run_id"]

    # the same participant submitted twice: the second process leaves it to the first
    with participant_lock(out, "01"):
        twice = subprocess.run(_command(bids, out, "--participant-label", "01", "--force"),
                               capture_output=True, text=True, check=False)  # fmt: skip
    assert twice.returncode == 1 and "being processed by another bidsdl process" in twice.stderr, twice.stderr
    assert _status(out, "01")["run_id"] == done["01"]["run_id"]


def _session_members(session: int) -> list[str]:
    """The live processes of a session (a run started with ``start_new_session``: its own and its children's)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(f"{stat.parent.name} {text[text.index('(') + 1 : text.rindex(')')]}")
    return members


def test_no_process_outlives_a_run_killed_outright(bids_factory, tmp_path):
    """SIGKILL of the main process (the OOM killer's way) runs no handler: its MultiProc workers and helper
    interpreter must end by themselves, at once; the re-run then resumes."""
    from pipeline.processes import descendants

    bids = bids_factory(subjects={s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "02")})
    out = tmp_path / "out"
    job = subprocess.Popen(_command(bids, out, "--nprocs", "2", "-q"), stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    _wait_for(lambda: len(descendants(job.pid)) >= 3 and bool(list(out.glob("sub-*/anat/*desc-audit*"))), job)
    assert len(_session_members(job.pid)) >= 4  # bidsdl, two workers, the brain-extraction helper
    job.kill()
    job.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _session_members(job.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session_members(job.pid) == [], "processes of the killed run are still alive"
    assert {_status(out, s)["state"] for s in ("01", "02")} == {"running"}
    assert subprocess.run(_command(bids, out, "--nprocs", "2", "-q"), check=False).returncode == 0
    assert {_status(out, s)["state"] for s in ("01", "02")} == {"done"}


def _command_lines() -> list[str]:
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return lines


def test_four_array_tasks_at_once_share_one_output(bids_factory, tmp_path):
    """Four participant processes started together into one OUTPUT_DIR (and one work dir): every
    shared file stays whole, each run keeps its own log, every participant finishes."""
    labels = ("01", "02", "03", "04")
    bids = bids_factory(subjects={s: [f"anat/sub-{s}_T1w.nii.gz"] for s in labels})
    out = tmp_path / "shared_output"
    jobs = [
        subprocess.Popen(
            _command(bids, out, "--participant-index", str(i), "--nprocs", "1", "-q"),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "bidsdl"
    checked = _check_every_file(out)
    assert sorted(p.name for p in out.glob("sub-*") if p.is_dir()) == [f"sub-{s}" for s in labels]
    assert {_status(out, s)["state"] for s in labels} == {"done"}
    assert all(f"sub-{s}.html" in checked for s in labels)
    runs = sorted((out / "logs").iterdir())
    assert len(runs) == 4
    logged = set()
    for run in runs:
        log = (run / "bidsdl.log").read_text()
        mentioned = {s for s in labels if f"sub-{s} done" in log}
        assert len(mentioned) == 1, f"{run.name}: one participant per log, got {mentioned}"
        logged |= mentioned
        assert json.loads((run / "config.json").read_text())["participant_index"] is not None
    assert logged == set(labels)
    assert not list(out.rglob(".*.tmp*"))
    # the index of BIDS_DIR: built by one of them while the others waited, then reused by those
    index_states = [json.loads((run / "bids_validation.json").read_text())["index"]["state"] for run in runs]
    assert sorted(index_states) == ["built", "reused", "reused", "reused"], index_states
    top = out.parent / f"{out.name}_work" / "bidsdl_wf"
    assert not [p.name for p in top.iterdir() if p.is_file()], "files at the top of the shared work dir"
