"""--plan at both levels, end to end: the representative job measured in a scratch folder, plan/ written (the
measurements, the configuration and scripts sized from them), BIDS_DIR and OUTPUT_DIR's outputs left alone."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import FAST, fresh_output, make_bids, snapshot

pytestmark = pytest.mark.integration


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow  # a measured participant run and its plan
def test_participant_plan_measures_the_heaviest_participant_and_writes_the_array(tmp_path, run_cli):
    bids = make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"],
                                         "02": ["ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                                                "ses-2/anat/sub-02_ses-2_T1w.nii.gz"]})  # fmt: skip
    before = snapshot(bids)
    out, work = tmp_path / "out", tmp_path / "work"
    code, stdout, err = run_cli(bids, out, "participant", "--plan", "-w", work, "--nprocs", "1",
                                "--model-resolution", "4")  # fmt: skip
    assert code == 0, err
    assert snapshot(bids) == before
    plan = _json(out / "plan" / "participant.json")
    assert plan["measured_participant"] == "sub-02" and plan["images_of_that_participant"] == 2
    usage = plan["usage"]
    assert usage["exit_code"] == 0 and usage["peak_rss_gb"] > 0.2 and usage["wall_s"] > 1 and usage["cpu_s"] > 0
    assert plan["participants"] == 2 and plan["disk_written_gb"] > 0
    assert any(step["step"] == "brain_extraction" for step in plan["steps"])
    assert all(asset["present"] for asset in plan["offline"])
    (job,) = plan["jobs"]
    assert job["array"] == 2 and job["cpus"] == 1 and job["mem_gb"] >= usage["peak_rss_gb"] * 1.25
    script = (out / "plan" / "participant.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and f"#SBATCH --mem={job['mem_gb']}G" in script
    assert "--cleanenv" in script and f"-B {bids}:{bids}:ro" in script and "--participant-index" in script
    config = _json(out / "plan" / "participant_config.json")
    assert config["registration"] == "affine" and config["model_resolution"] == 4.0 and not config["plan"]
    assert stdout.startswith("participant: ") and "CPU-hours" in stdout
    if shutil.which("sbatch") is None:
        assert "SLURM was not found" in err and "not found" in plan["slurm"]
    # nothing of the measured run is left in OUTPUT_DIR or the work folder: only the plan
    assert not list(out.glob("sub-*")) and not (work / "plan" / "participant").exists()


def test_group_plan_measures_one_epoch_and_plans_the_folds(learning_sample, tmp_path, run_cli):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    before = snapshot(out)
    code, stdout, err = run_cli(bids, out, "group", "--plan", *FAST, "-w", tmp_path / "work")
    assert code == 0, err
    plan = _json(out / "plan" / "group.json")
    assert plan["fold_trainings"] == 2 and plan["epoch_s"] > 0 and plan["epochs"] == 2
    assert plan["predicted_wall_s"] >= plan["usage"]["wall_s"] and plan["outer_folds"] is None
    assert [j["name"] for j in plan["jobs"]] == ["group", "group_folds", "group_assemble"]
    assert _json(out / "plan" / "group_config.json")["outer_folds"] == 0  # the array and the assembly agree
    assert "--fold \"$SLURM_ARRAY_TASK_ID\"" in (out / "plan" / "group_folds.sbatch").read_text()
    assert "group_folds.sbatch" in (out / "plan" / "submit_group.sh").read_text()
    assert stdout.startswith("group: ")
    # the participants' outputs were read, not written; no study was left in OUTPUT_DIR
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.startswith("sub-")} == {k: v for k, v in before.items()
                                                                        if k.startswith("sub-")}  # fmt: skip
    assert not (out / "learn").exists() and not (out / "models").exists()


def test_plan_and_list_participants_do_not_combine(tmp_path, run_cli):
    bids = make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"]})
    code, _, err = run_cli(bids, tmp_path / "out", "participant", "--plan", "--list-participants")
    assert code == 64 and "--plan" in err


def test_a_failing_measured_run_writes_no_plan_and_says_where_its_log_is(tmp_path, run_cli):
    bids = make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"]})
    (bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    code, _, err = run_cli(bids, out, "participant", "--plan", "--skip-bids-validation", "-w", tmp_path / "work")
    assert code == 1, err
    assert "no plan is written" in err and (out / "plan" / "participant_measured.log").exists()
    assert not (out / "plan" / "participant.json").exists()
