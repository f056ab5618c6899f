"""The repository's SLURM recipe, submitted to a real cluster with the local ``bidsdl`` command.

Skipped where no SLURM answers (``.ci/run`` starts a single-node cluster where the machine has the
setup script).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_bids

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "scripts" / "slurm" / "submit.sh"


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no SLURM here: sbatch is not on PATH"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SLURM does not answer: {exc}"
    if result.returncode != 0 or "up" not in result.stdout:
        return f"SLURM has no partition up: {result.stdout.strip() or result.stderr.strip()}"
    return None


WHY_NOT = _cluster_problem()
pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.skipif(bool(WHY_NOT), reason=str(WHY_NOT))]


def _job_states(job_id: str) -> list[str]:
    """JobState of a job, or of every task of an array job."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=False)
    return re.findall(r"\bJobState=(\S+)", result.stdout)


def _reason(job_id: str) -> str:
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=False)
    found = re.search(r"\bReason=(\S+)", result.stdout)
    return found.group(1) if found else ""


def _wait(job_id: str, *, timeout: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        states = _job_states(job_id)
        if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s in states):
            return states
        if states and all(s == "PENDING" for s in states) and _reason(job_id) == "DependencyNeverSatisfied":
            return ["NEVER_RAN"]
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            pytest.fail(f"SLURM job {job_id} still {states} after {timeout} s")
        time.sleep(1)


def _submit(bids: Path, out: Path) -> tuple[str, str]:
    env = {
        **os.environ,
        "BIDS_DIR": str(bids),
        "OUTPUT_DIR": str(out),
        "BIDSDL": str(Path(sys.executable).parent / "bidsdl"),  # the same recipe, without a container
        "PARTICIPANT_ARGS": "--model-resolution 4 --registration affine",
    }
    # the test cluster has 2 CPUs: ask for less than the recipe's defaults (options win over #SBATCH)
    result = subprocess.run(
        ["bash", str(SUBMIT), "--cpus-per-task=1", "--mem=3G", "--time=00:20:00"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=out.parent,
    )
    assert result.returncode == 0, result.stderr
    array_id, group_id = result.stdout.split()
    return array_id, group_id


def test_participant_array_then_group_on_slurm(tmp_path):
    labels = ("01", "02", "03", "04")
    bids = make_bids(tmp_path / "bids", {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in labels})
    good = (bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz").read_bytes()
    (bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz").write_bytes(good[: len(good) // 3])  # truncated download
    out = tmp_path / "derivatives"

    # 1. one task fails: the others finish, and the group job never starts
    array_id, group_id = _submit(bids, out)
    states = _wait(array_id)
    assert sorted(states) == ["COMPLETED"] * 3 + ["FAILED"], states
    assert _wait(group_id, timeout=120)[0] in ("CANCELLED", "NEVER_RAN")
    subprocess.run(["scancel", group_id], check=False)
    assert not (out / "group.html").exists()
    assert json.loads((out / "sub-04" / "log" / "sub-04_status.json").read_text())["state"] == "failed"
    first_runs = {s: json.loads((out / f"sub-{s}" / "log" / f"sub-{s}_status.json").read_text()) for s in labels[:3]}
    assert {r["state"] for r in first_runs.values()} == {"done"}
    logs = sorted((out / "logs" / "slurm").glob("participant-*.log"))
    assert len(logs) == 4

    # 2. the file is fixed and the same recipe re-submitted: only sub-04 runs; then the group job
    (bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz").write_bytes(good)
    array_id, group_id = _submit(bids, out)
    assert sorted(_wait(array_id)) == ["COMPLETED"] * 4
    assert _wait(group_id, timeout=300) == ["COMPLETED"]
    for label in labels:
        status = json.loads((out / f"sub-{label}" / "log" / f"sub-{label}_status.json").read_text())
        assert status["state"] == "done"
        if label in first_runs:
            assert status["run_id"] == first_runs[label]["run_id"], f"sub-{label} was redone"
        assert (out / f"sub-{label}.html").exists()
        assert list((out / f"sub-{label}" / "anat").glob("*_space-MNI152NLin2009aSym_res-4_desc-preproc_T1w.nii.gz"))
    skipped = [
        p for p in (out / "logs" / "slurm").glob(f"participant-{array_id}_*.log") if "up to date" in p.read_text()
    ]
    assert len(skipped) == 3
    assert (out / "group.html").exists() and (out / "manifest.tsv").exists()
    manifest = (out / "manifest.tsv").read_text().splitlines()
    assert len(manifest) == 1 + 4
    group_log = (out / "logs" / "slurm" / f"group-{group_id}.log").read_text()
    assert "Group report" in group_log


def test_the_planned_participant_array_runs_on_slurm_within_its_requests(tmp_path):
    """--plan's scripts as written (their --mem, --time and --cpus-per-task), submitted by its submit script."""
    from pipeline.cli.run import main

    bids = make_bids(tmp_path / "bids", {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "02", "03")})
    out, work = tmp_path / "derivatives", tmp_path / "work"
    assert main([str(bids), str(out), "participant", "--plan", "-w", str(work), "--nprocs", "1",
                 "--registration", "affine", "--model-resolution", "4"]) == 0  # fmt: skip
    plan = json.loads((out / "plan" / "participant.json").read_text())
    env = {**os.environ, "BIDSDL": str(Path(sys.executable).parent / "bidsdl")}
    result = subprocess.run(["bash", str(out / "plan" / "submit_participant.sh")], env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (job_id,) = re.findall(r"participant: job (\S+)", result.stderr)
    assert sorted(_wait(job_id)) == ["COMPLETED"] * 3
    for label in ("01", "02", "03"):
        assert json.loads((out / f"sub-{label}" / "log" / f"sub-{label}_status.json").read_text())["state"] == "done"
    assert plan["jobs"][0]["mem_gb"] >= 1


def test_folds_as_an_array_then_the_assembly_on_slurm(learning_sample, trained_package, tmp_path):
    """submit_group.sh: one array task per fold, then the assembly; the package of a single run, bit for bit."""
    from tests.helpers import FAST, fresh_output, the_package

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "derivatives")
    args = list(FAST)
    for option in ("--n-folds", "--outer-folds"):  # the script sets them (N_FOLDS; one test set without N_OUTER)
        del args[args.index(option) : args.index(option) + 2]
    env = {**os.environ, "BIDS_DIR": str(bids), "OUTPUT_DIR": str(out), "N_FOLDS": "2", "GROUP_ARGS": " ".join(args),
           "BIDSDL": str(Path(sys.executable).parent / "bidsdl")}  # fmt: skip
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm" / "submit_group.sh"), "--cpus-per-task=1", "--mem=3G",
         "--time=00:20:00"],
        env=env, capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folds_id, assembly_id = result.stdout.split()
    assert sorted(_wait(folds_id)) == ["COMPLETED"] * 2
    assert _wait(assembly_id, timeout=300) == ["COMPLETED"]
    logs = out / "logs" / "slurm"
    for k in (0, 1):
        assert "Trained fold(s) " + str(k) in (logs / f"group-fold-{folds_id}_{k}.log").read_text()
    assembly = (logs / f"group-{assembly_id}.log").read_text()
    assert assembly.count("finished earlier with these settings and splits") == 2 and "Model package" in assembly
    package = the_package(out)
    assert package.name == trained_package.name
    for weights in trained_package.glob("fold-*.safetensors"):
        assert weights.read_bytes() == (package / weights.name).read_bytes()
    # each job was handed the time its allocation had left (squeue's end time) as --time-limit
    configs = [json.loads(p.read_text()) for p in (out / "logs").glob("*/config.json")]
    limits = [c["time_limit"] for c in configs if c["analysis_level"] == "group"]
    assert limits and all(limits) and all(900 < t <= 1200 for t in limits), limits


def test_a_job_stopped_before_its_time_limit_requeues_itself_and_resumes(learning_sample, trained_package, tmp_path):
    """group.sbatch: bidsdl stops before the limit (exit 75), the job requeues itself, the requeued run resumes
    (--resume) and ends with the package of an uninterrupted run."""
    from tests.helpers import FAST, fresh_output, the_package

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "derivatives")
    (out / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    args = [*FAST, "--epochs", "1", "--time-limit", "5s"]  # fold 0, then the limit stops the job before fold 1
    env = {**os.environ, "BIDS_DIR": str(bids), "OUTPUT_DIR": str(out), "BIDSDL_ARGS": " ".join(args),
           "BIDSDL": str(Path(sys.executable).parent / "bidsdl")}  # fmt: skip
    result = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=3G", "--time=00:20:00", "--open-mode=append",
         f"--output={out}/logs/slurm/group-%j.log", str(ROOT / "scripts" / "slurm" / "group.sbatch")],
        env=env, capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    states = _wait(job, timeout=600)
    log = (out / "logs" / "slurm" / f"group-{job}.log").read_text()
    assert states == ["COMPLETED"], log
    assert "Stopped before the --time-limit of 5 s" in log and "requeueing job" in log
    assert "Model package" in log
    configs = [json.loads(p.read_text()) for p in sorted((out / "logs").glob("*/config.json"))]
    assert [c["resume"] for c in configs if c["analysis_level"] == "group"] == [False, True]  # the requeue resumed
    # the same package as one uninterrupted run of the same settings
    plain = fresh_output(derivatives, tmp_path / "plain")
    from pipeline.cli.run import main

    assert main([str(bids), str(plain), "group", *FAST, "--epochs", "1"]) == 0
    for weights in the_package(plain).glob("fold-*.safetensors"):
        assert weights.read_bytes() == (the_package(out) / weights.name).read_bytes()


def test_one_model_on_two_srun_tasks(learning_sample, trained_package, tmp_path):
    """group.sbatch with --ntasks 2: one model by DDP over two srun tasks (gloo), the package torchrun makes."""
    from tests.helpers import FAST, fresh_output, the_package
    from tests.integration.test_distributed import torchrun

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "derivatives")
    (out / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BIDS_DIR": str(bids), "OUTPUT_DIR": str(out), "BIDSDL_ARGS": " ".join(FAST),
           "BIDSDL": str(Path(sys.executable).parent / "bidsdl"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--mem=6G", "--time=00:20:00",
         f"--output={out}/logs/slurm/group-%j.log", str(ROOT / "scripts" / "slurm" / "group.sbatch")],
        env=env, capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    states = _wait(job)
    log = (out / "logs" / "slurm" / f"group-{job}.log").read_text()
    assert states == ["COMPLETED"], log
    assert "[rank 1] INFO: Rank 1 of 2: trained 2 fold(s) with rank 0; wrote nothing" in log
    package = the_package(out)
    assert json.loads((package / "environment.json").read_text())["distributed"]["launcher"] == "srun"
    other = fresh_output(derivatives, tmp_path / "torchrun")
    assert torchrun(bids, other, *FAST)[0] == 0  # the same 2 processes under torchrun: the same weights
    for weights in package.glob("fold-*.safetensors"):
        assert weights.read_bytes() == (the_package(other) / weights.name).read_bytes()
