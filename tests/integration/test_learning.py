"""The group level's learning, end to end on a small real sample (participant level at 4 mm, short training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.learn.data import Volumes
from pipeline.learn.package import load_package, read_package
from pipeline.learn.registry import get_task
from pipeline.learn.train import predict
from tests.helpers import FAST, fresh_output, parallel_group_jobs, set_read_only, the_package, validator_issues


def test_the_official_validator_accepts_a_study_s_outputs(trained_package):
    trained_out = trained_package.parents[1]  # OUTPUT_DIR/models/<package>
    assert (trained_out / "learn").is_dir()
    errors = [f"{i['code']} {i.get('subCode', '')} {i.get('location', '')}" for i in validator_issues(trained_out)
              if i["severity"] == "error"]  # fmt: skip
    assert errors == [], trained_out


def test_training_end_to_end_is_reproducible_and_resumable(learning_sample, trained_package, tmp_path, run_cli):
    bids, derivatives = learning_sample
    out = trained_package.parent.parent  # 'bidsdl BIDS OUT group *FAST' on a fresh copy of the derivatives

    # splits: subject level, every session of a participant together, test used once
    splits = pd.read_csv(out / "learn" / "target-diagnosis" / "splits.tsv", sep="\t")
    assert set(splits["split"]) == {"train", "validation", "test"}
    test = set(splits.loc[splits["split"] == "test", "participant_id"])
    assert test and not test & set(splits.loc[splits["split"] != "test", "participant_id"])
    for _, fold in splits.dropna(subset=["fold"]).groupby("fold"):
        assert fold["participant_id"].is_unique

    # the package: complete, checked, loadable alone, and it reproduces its own test predictions
    package = the_package(out)
    assert package.name.startswith("diagnosis_conv5fc3_")
    for name in ("model.json", "fold-0.safetensors", "fold-1.safetensors", "config.json", "environment.json",
                 "splits.tsv", "predictions.tsv", "logs/history_fold-0.tsv"):  # fmt: skip
        assert (package / name).exists(), name
    assert not list(package.glob("*.pt")) and not list(package.glob("*.pkl"))
    record = read_package(package)
    assert record["classes"] == ["CN", "AD"] and record["positive_class"] == "AD"
    assert record["input"]["shape"] == record["model"]["in_shape"]
    assert {s["participant_id"] for s in record["training_subjects"]}.isdisjoint(record["test_subjects"])
    assert all(img["data_sha256"] for s in record["training_subjects"] for img in s["images"])
    environment = json.loads((package / "environment.json").read_text())
    assert environment["determinism"]["deterministic_algorithms"] and environment["hardware"]["cpu_model"] is not None
    assert "seed" in environment
    predictions = pd.read_csv(package / "predictions.tsv", sep="\t", dtype={"fold": str})
    assert {"train", "validation", "test"} <= set(predictions["split"])
    ensemble = predictions[predictions["fold"] == "ensemble"].reset_index(drop=True)
    _, networks = load_package(package)
    cache = sorted((out / ".bidsdl_work" / "learn_cache").glob("*.npy"))
    stems = [Path(src).name.split("_T1w")[0] + "_" for src in ensemble["source"]]
    data = Volumes([next(p for p in cache if p.name.startswith(stem)) for stem in stems], np.zeros(len(stems)))
    cpu = torch.device("cpu")
    mean = np.mean([predict(n, data, task=get_task("classification"), device=cpu)[:, 1] for n in networks], axis=0)
    np.testing.assert_allclose(mean, ensemble["probability"], atol=1e-5)

    # the report shows every learning section, self-contained
    html = (out / "group.html").read_text()
    for anchor in ('id="dataset"', 'id="splits"', 'id="leakage"', 'id="training"', 'id="evaluation"', 'id="worst"',
                   'id="provenance"', "No near-identical image", "Site/scanner", "95% CI",
                   "Against chance (roc_auc 0.5): the network scored"):  # fmt: skip
        assert anchor in html, anchor
    assert "http://" not in html.replace("http://www.w3.org", "") and 'src="http' not in html

    # the methods text: what ran (the participant level's steps as its records say, the study), nothing else
    methods = (out / "methods.md").read_text()
    for text in ("## Anatomical preprocessing", "## Quality control", "## Learning", "N4 [@n4]", "[@deepbet]",
                 "AdamW [@adamw]", "A linear baseline", "No participant in two splits: pass", "95% CI"):  # fmt: skip
        assert text in methods, text
    assert "## Inference" not in methods and "new dataset" not in methods
    bib = (out / "references.bib").read_text()
    assert "@article{n4," in bib and "@misc{monai," not in bib  # only what the text cites
    study = out / "learn" / "target-diagnosis" / "arch-conv5fc3"
    assert (study / "methods.md").read_text() == methods and (study / "references.bib").exists()
    assert 'id="methods"' in html and "[@" not in html  # the report numbers the citations

    # the same command in a fresh copy gives the same package, bit for bit
    again = fresh_output(derivatives, tmp_path / "b")
    assert run_cli(bids, again, "group", *FAST)[0] == 0
    assert the_package(again).name == package.name
    for weights in package.glob("fold-*.safetensors"):
        assert weights.read_bytes() == (the_package(again) / weights.name).read_bytes()

    # --resume with other settings is refused, naming the difference; with the same ones it finishes at once
    code, _, err = run_cli(bids, out, "group", *FAST, "--resume", "--lr", "0.01")
    assert code == 64 and "lr: 0.001 -> 0.01" in err
    checkpoint = out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "fold-0" / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    assert run_cli(bids, out, "group", *FAST, "--resume")[0] == 0
    assert checkpoint.stat().st_mtime_ns == stamp
    assert the_package(out).name == package.name

    # --reports-only re-renders from results.json without training
    (out / "group.html").unlink()
    assert run_cli(bids, out, "group", *FAST, "--reports-only")[0] == 0
    assert 'id="evaluation"' in (out / "group.html").read_text() and checkpoint.stat().st_mtime_ns == stamp

    # the data changed (a participant left): the old splits are not silently reused
    code, _, err = run_cli(bids, out, "group", *FAST, "--participant-label", *[f"{i:02d}" for i in range(1, 8)])
    assert code == 65 and "--resplit" in err


def test_folds_trained_as_parallel_jobs_assemble_into_the_same_package(
    learning_sample, trained_package, tmp_path, run_cli
):
    """Two --fold jobs at once (as two SLURM array tasks), then the plain command: the package of one run."""
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    for output in parallel_group_jobs(bids, out, list(FAST), "--fold", (1, 0)):
        assert "When every fold has finished, run the group level again without --fold" in output
    run_dir = out / "learn" / "target-diagnosis" / "arch-conv5fc3"
    assert {p.parent.name for p in run_dir.glob("fold-*/fold.json")} == {"fold-0", "fold-1"}
    assert not (out / "models").exists() and not (run_dir / "results.json").exists()

    checkpoints = {k: (run_dir / f"fold-{k}" / "checkpoint.pt").stat().st_mtime_ns for k in (0, 1)}
    code, _, err = run_cli(bids, out, "group", *FAST)  # the assembly: trains nothing
    assert code == 0, err
    assert err.count("finished earlier with these settings and splits") == 2
    assert {k: (run_dir / f"fold-{k}" / "checkpoint.pt").stat().st_mtime_ns for k in (0, 1)} == checkpoints
    package = the_package(out)
    assert package.name == trained_package.name
    for weights in trained_package.glob("fold-*.safetensors"):
        assert weights.read_bytes() == (package / weights.name).read_bytes()

    # a fold trained with other settings is not taken: the assembly says so and trains it again
    assert run_cli(bids, out, "group", *FAST, "--fold", "0", "--lr", "0.01")[0] == 0
    code, _, err = run_cli(bids, out, "group", *FAST)
    assert code == 0 and "Fold(s) 0 have no finished training with these settings and splits" in err
    assert err.count("finished earlier with these settings and splits") == 1
    assert (run_dir / "fold-1" / "checkpoint.pt").stat().st_mtime_ns == checkpoints[1]
    again = (the_package(out) / "fold-0.safetensors").read_bytes()
    assert again == (trained_package / "fold-0.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (("--fold", "2"), 64, "--fold 2 is out of range: --n-folds 2 makes folds 0 to 1"),
        (("--target", "handedness"), 65, "Columns found: age, diagnosis, sex, site."),
        (("--participant-label", "02", "04", "05", "07"), 65, "has one class only"),
        (("--n-folds", "4"), 65, "at least"),
        (("--model-resolution", "2"), 65, "Run the participant level first"),
    ],
)
def test_bad_learning_input(learning_sample, tmp_path, run_cli, extra, code, message):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    got, _, err = run_cli(bids, out, "group", *FAST, *extra)
    assert got == code and message in err, err
    assert not (out / "models").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_requested_without_gpu(learning_sample, tmp_path, run_cli):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    code, _, err = run_cli(bids, out, "group", *FAST, "--device", "cuda")
    assert code == 64 and "no CUDA GPU" in err


def test_missing_target_values_are_excluded_and_listed(learning_sample, tmp_path, run_cli, monkeypatch):
    from pipeline.learn.study import stages
    from pipeline.reports import group_tables

    bids, derivatives = learning_sample
    copy = tmp_path / "bids"
    shutil.copytree(bids, copy)
    set_read_only(copy, False)
    table = pd.read_csv(copy / "participants.tsv", sep="\t")
    table.loc[table["participant_id"] == "sub-08", "diagnosis"] = "n/a"
    table.to_csv(copy / "participants.tsv", sep="\t", index=False)
    out = fresh_output(derivatives, tmp_path / "out")
    code, _, err = run_cli(copy, out, "group", *FAST, "--epochs", "1", "--skip-bids-validation")
    assert code == 0, err
    assert "Not learning from sub-08/ses-01/anat/sub-08_ses-01_T1w.nii.gz: no value for diagnosis" in err
    results_path = out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "results.json"
    results = json.loads(results_path.read_text())
    assert [e["source"] for e in results["excluded"]] == ["sub-08/ses-01/anat/sub-08_ses-01_T1w.nii.gz"]
    assert "sub-08" not in (out / "learn" / "target-diagnosis" / "splits.tsv").read_text()
    assert "no value for diagnosis" in (out / "group.html").read_text()

    # many left out for one reason (10,000 participants, 4% failing QC): one log line, a bounded report list
    table.loc[table["participant_id"] == "sub-07", "diagnosis"] = "n/a"
    table.to_csv(copy / "participants.tsv", sep="\t", index=False)
    monkeypatch.setattr(stages, "EXCLUDED_LISTED", 1)
    monkeypatch.setattr(group_tables, "LIST_ITEMS", 1)
    code, _, err = run_cli(copy, out, "group", *FAST, "--epochs", "1", "--skip-bids-validation", "--resplit")
    assert code == 0, err
    excluded = [e["source"] for e in json.loads(results_path.read_text())["excluded"]]
    assert len(excluded) == 2 and "sub-07" in excluded[0]
    assert (f"Not learning from 2 images: no value for diagnosis: {excluded[0]} and 1 more (all in "
            "OUTPUT_DIR/learn/target-diagnosis/arch-conv5fc3/results.json, under excluded).") in err  # fmt: skip
    assert "Not learning from sub-08" not in err
    report = (out / "group.html").read_text()
    section = report.split("2 image(s) left out", 1)[1].split("</details>", 1)[0]
    assert excluded[0] in section and excluded[1] not in section
    where = "learn/target-diagnosis/arch-conv5fc3/results.json, under excluded"
    assert f"and 1 more (all in <code>{where}</code>)" in report


def test_images_rated_bad_by_people_are_left_out_with_the_raters_reason(learning_sample, tmp_path, run_cli):
    bids, derivatives = learning_sample
    ratings = tmp_path / "ratings.tsv"
    ratings.write_text(
        "participant_id\tsource\trating\trater\tcomment\n"
        "sub-08\t\tbad\tana\tsevere motion\n"
        "sub-08\t\tbad\tben\tringing\n"
        "sub-03\t\tbad\tana\t\n"
        "sub-03\t\tgood\tben\t\n"
        "sub-03\t\tgood\tcai\t\n"
        "sub-99\t\tbad\tana\t\n"
        "sub-01\tsub-01_ses-01_FLAIR.nii.gz\tbad\tana\t\n"
    )
    out = fresh_output(derivatives, tmp_path / "out")
    code, _, err = run_cli(bids, out, "group", *FAST, "--epochs", "1", "--qc-ratings", ratings)
    assert code == 0, err
    results = json.loads((out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "results.json").read_text())
    excluded = {e["source"]: e["reason"] for e in results["excluded"]}
    sub08 = next(s for s in excluded if s.startswith("sub-08/"))
    assert excluded[sub08] == "rated bad by 2 of 2 rater(s) (ana, ben): ana: severe motion; ben: ringing (--qc-ratings)"
    assert not any(s.startswith("sub-03/") for s in excluded)  # 1 of 3 raters: doubtful, kept (the stated rule)
    splits = (out / "learn" / "target-diagnosis" / "splits.tsv").read_text()
    assert "sub-08" not in splits and "sub-03" in splits
    qc = pd.read_csv(out / "qc.tsv", sep="\t", keep_default_na=False)
    assert set(qc.loc[qc["participant_id"] == "sub-08", "qc_rating"]) == {"bad"}
    assert set(qc.loc[qc["participant_id"] == "sub-03", "qc_rating"]) == {"doubtful"}
    assert "ana: bad; ben: good; cai: good" in set(qc["qc_raters"])
    assert "at least half" in json.loads((out / "qc.json").read_text())["qc_rating"]
    audit = json.loads((out / "group_audit.json").read_text())["qc_ratings"]
    assert [r["row"] for r in audit["ignored"]] == [7, 8] and len(audit["sha256"]) == 64
    report = (out / "group.html").read_text()
    assert "at least half of its raters rated it bad" in report and "no such participant" in report
    assert "the raters disagree (ana: bad; ben: good; cai: good): doubtful" in report
    gallery = (out / "gallery.html").read_text()  # the rating gallery shows the decision beside each strip
    assert "rated bad (ana: bad; ben: bad)" in gallery and 'src="sub-01/figures/' in gallery
