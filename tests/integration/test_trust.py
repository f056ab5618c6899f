"""Learning that earns trust, end to end on the small learning sample: the linear baseline beside the network, the
permutation control, a time limit that stops and resumes to the same weights, transfer with its leakage guard, and
a search run as array tasks then assembled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.learn.package import read_package
from tests.helpers import AFFINE, FAST, fresh_output, parallel_group_jobs, the_package

RUN = Path("learn") / "target-diagnosis" / "arch-conv5fc3"


def test_every_study_has_its_linear_baseline(trained_package):
    out = trained_package.parent.parent
    results = json.loads((out / RUN / "results.json").read_text())
    linear = results["baseline"]
    assert linear["model"] == "L2-regularised logistic regression" and linear["headline"] == "roc_auc"
    assert len(linear["folds"]) == 2 and {"ci", "metrics"} <= set(linear["test"])
    assert linear["test"]["n_subjects"] == results["test"]["n_subjects"]  # the same test participants
    assert set(linear["comparison"]["roc_auc"]) == {"difference", "ci", "share_a_higher"}
    low, high = linear["comparison"]["roc_auc"]["ci"]  # the verdict is the paired interval's, nothing else
    expected = ("undecided" if low is None or high is None  # JSON's null: no interval on this tiny test set
                else "better" if low > 0 else "worse" if high < 0 else "not_better")  # fmt: skip
    assert linear["verdict"]["result"] == expected, linear
    assert expected == "undecided" or low <= linear["comparison"]["roc_auc"]["difference"] <= high
    table = pd.read_csv(out / RUN / "baseline_predictions.tsv", sep="\t", dtype={"fold": str})
    assert set(table["fold"]) == {"0", "1", "ensemble"} and set(table["split"]) == {"validation", "test"}
    assert "train" not in set(table["split"])
    record = read_package(trained_package)
    assert record["baseline"]["metric"] == "roc_auc" and record["baseline"]["verdict"]["text"]
    html = (out / "group.html").read_text()
    assert 'id="baseline"' in html and "Against a linear baseline" in html and linear["verdict"]["text"] in html


def test_no_baseline_and_the_permutation_control(learning_sample, tmp_path, run_cli):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    code, _, err = run_cli(bids, out, "group", *FAST, "--no-baseline")
    assert code == 0, err
    results = json.loads((out / RUN / "results.json").read_text())
    assert results["baseline"] is None and not (out / RUN / "baseline_predictions.tsv").exists()
    assert 'id="baseline"' not in (out / "group.html").read_text()

    code, _, err = run_cli(bids, out, "group", *FAST, "--permutation-control")
    assert code == 0, err
    assert "Permutation control: the 2 fold(s) again on shuffled training targets" in err
    results = json.loads((out / RUN / "results.json").read_text())
    control = results["permutation_control"]
    assert control["headline"] == "roc_auc" and control["deep"]["n"] == results["test"]["n"]
    assert control["baseline"] is not None and len(control["folds"]) == 2
    assert (out / RUN / "permutation" / "fold-0" / "checkpoint.pt").exists()
    # the shuffled folds learned other targets than the real ones: with the same seeds, data order and settings, a
    # control that trained on the real targets (no shuffle) would give every fold's weights back bit for bit
    for k in (0, 1):
        real = load_file(str(out / RUN / f"fold-{k}" / "best-loss.safetensors"))
        shuffled = load_file(str(out / RUN / "permutation" / f"fold-{k}" / "best-loss.safetensors"))
        assert any(not torch.equal(real[name], shuffled[name]) for name in real), f"fold {k} learned the real targets"
    assert 'id="permutation"' in (out / "group.html").read_text()


def test_a_time_limit_stops_with_a_checkpoint_and_resumes_to_the_same_weights(
    learning_sample, trained_package, tmp_path, run_cli
):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    code, _, err = run_cli(bids, out, "group", *FAST, "--time-limit", "1s")
    assert code == 75, err
    assert "Stopped before the --time-limit of 1 s" in err and "--resume" in err
    checkpoint = torch.load(out / RUN / "fold-0" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and not checkpoint["finished"]  # one epoch per job at least
    assert not (out / "models").exists()
    code, _, err = run_cli(bids, out, "group", *FAST, "--resume")
    assert code == 0, err
    assert "resuming after epoch 1" in err
    package = the_package(out)
    assert package.name == trained_package.name
    for weights in trained_package.glob("fold-*.safetensors"):
        assert weights.read_bytes() == (package / weights.name).read_bytes()


@pytest.fixture(scope="module")
def second_dataset(learning_sample, trained_package, tmp_path_factory):
    """Another generated dataset, numbered sub-01.. like the learning sample, plus sub-07: a renamed copy of one of
    the trained package's training participants; preprocessed like the learning sample."""
    from pipeline.cli.run import main
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    source_bids, _ = learning_sample
    root = tmp_path_factory.mktemp("second")
    bids, out = root / "bids", root / "derivatives"
    write_sample_dataset(bids, SampleOptions(n_subjects=6, seed=7, two_session_fraction=0.0, voxel_scale=3, n_jobs=2))
    copied = read_package(trained_package)["training_subjects"][0]["participant_id"]
    image = next((source_bids / copied).rglob("*_T1w.nii.gz"))
    session = image.parent.parent.name
    target = bids / "sub-07" / session / "anat"
    target.mkdir(parents=True)
    for suffix in (".nii.gz", ".json"):
        shutil.copyfile(str(image).replace(".nii.gz", suffix), target / f"sub-07_{session}_T1w{suffix}")
    (bids / "sub-07" / "sub-07_sessions.tsv").write_text(f"session_id\n{session}\n")
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    row = pd.read_csv(source_bids / "participants.tsv", sep="\t", dtype=str).set_index("participant_id").loc[copied]
    table.loc[len(table)] = {"participant_id": "sub-07", **row.to_dict()}
    table.to_csv(bids / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    assert main([str(bids), str(out), "participant", "--nprocs", "2", "--model-resolution", "4", *AFFINE]) == 0
    return bids, out, copied


@pytest.mark.slow  # a second dataset preprocessed: ~2 min
def test_transfer_with_its_cross_study_guard(learning_sample, trained_package, second_dataset, tmp_path, run_cli):
    bids, derivatives = learning_sample
    source = read_package(trained_package)
    seen = {s["participant_id"] for s in source["training_subjects"]}
    assert source["dataset"]["key"] == "bidsdl sample dataset (synthetic, seed 6)"
    assert {s["dataset"] for s in source["training_subjects"]} == {source["dataset"]["key"]}
    out = fresh_output(derivatives, tmp_path / "out")
    other = ("--seed", "2", "--test-size", "0.5")
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--fold", "0", "--epochs", "1")  # splits of its own
    assert code == 0, err
    splits = pd.read_csv(out / "learn" / "target-diagnosis" / "splits.tsv", sep="\t")
    assert set(splits.loc[splits["split"] == "test", "participant_id"]) & seen  # fixed splits that test on them

    # fixed splits testing on participants the source model saw (the same dataset, the same IDs): refused
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--init-from", trained_package)
    assert code == 65 and "--resplit" in err
    assert "is a training subject of diagnosis_conv5fc3 (same participant ID and dataset; same image content)" in err
    # fresh splits: the source saw 6 of the 8, too few left to test and validate on
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--init-from", trained_package, "--resplit")
    assert code == 65 and "would be empty" in err and "never saw" in err

    # another dataset numbered sub-01..: its IDs are not the source's participants; its renamed copy is found
    bids, derivatives, copied = second_dataset
    out = fresh_output(derivatives, tmp_path / "second")
    code, _, err = run_cli(bids, out, "group", *FAST, "--init-from", trained_package, "--freeze")
    assert code == 0, err
    package = the_package(out)
    record = read_package(package)
    transferred = record["transfer"]
    assert [s["participant_id"] for s in transferred["seen_in_cohort"]] == ["sub-07"]
    reason = transferred["seen_in_cohort"][0]["reason"]
    assert f"voxel data of {copied} of dataset {source['dataset']['key']}" in reason
    splits = pd.read_csv(out / "learn" / "target-diagnosis" / "splits.tsv", sep="\t")
    assert set(splits.loc[splits["participant_id"] == "sub-07", "split"]) == {"train"}  # never tested or validated on
    assert {m["participant_id"] for m in transferred["moved_to_training"]} <= {"sub-07"}
    assert transferred["source_content_sha256"] == source["content_sha256"] and transferred["frozen"]
    assert {s["participant_id"] for s in transferred["seen_subjects"]} == seen  # the inference guard's
    assert record["dataset"]["key"] == "bidsdl sample dataset (synthetic, seed 7)"
    new, old = load_file(str(package / "fold-0.safetensors")), load_file(str(trained_package / "fold-0.safetensors"))
    encoder = [k for k in new if k.startswith("net.features.") and "num_batches" not in k]
    assert encoder and all(torch.equal(new[k], old[k]) for k in encoder)
    assert any(not torch.equal(new[k], old[k]) for k in new if k.startswith("net.classifier."))
    html = (out / "group.html").read_text()
    assert 'id="transfer"' in html and "Subjects of the source model (--init-from)" in html

    # without --freeze: every layer learns (the pretrained ones at a tenth of the rate), the guarded splits reused
    frozen_package = package
    code, _, err = run_cli(bids, out, "group", *FAST, "--init-from", trained_package)
    assert code == 0, err
    (package,) = [p for p in (out / "models").iterdir() if p != frozen_package]
    unfrozen = load_file(str(package / "fold-0.safetensors"))
    assert any(not torch.equal(unfrozen[k], old[k]) for k in encoder)
    assert not read_package(package)["transfer"]["frozen"]


def test_search_trials_as_array_tasks_then_the_assembly(learning_sample, tmp_path, run_cli, monkeypatch):
    from pipeline.learn.study import search

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    options = [*FAST, "--search", "2", "--epochs", "1"]
    for output in parallel_group_jobs(bids, out, options, "--trial", (1, 0)):
        assert "When every trial has finished, run the group level again without --trial" in output
    assert not (out / "models").exists()
    trials = [json.loads((out / RUN / "search" / f"trial-{k}" / "trial.json").read_text())["trial"] for k in (0, 1)]
    assert trials[0]["values"] != trials[1]["values"]

    # a trial is scored on validation participants alone: run trial 1 again here and watch what its folds load
    loaded: list[str] = []
    setup = search.fold_setup

    def watched(*args, **kwargs):
        found = setup(*args, **kwargs)
        loaded.extend(p for rows in found[0].values() for p in rows["participant_id"])
        return found

    monkeypatch.setattr(search, "fold_setup", watched)
    (out / RUN / "search" / "trial-1" / "trial.json").unlink()
    code, _, err = run_cli(bids, out, "group", *options, "--trial", "1")
    assert code == 0, err
    splits = pd.read_csv(out / "learn" / "target-diagnosis" / "splits.tsv", sep="\t")
    test_ids = set(splits.loc[splits["split"] == "test", "participant_id"])
    assert loaded and test_ids and not test_ids & set(loaded)  # no trial loads (or predicts) the test set
    again = json.loads((out / RUN / "search" / "trial-1" / "trial.json").read_text())["trial"]
    # and the trial, run again, scores the same (to float noise: the array task ran beside another one)
    assert np.allclose(again["fold_scores"], trials[1]["fold_scores"], equal_nan=True, atol=1e-6)

    code, _, err = run_cli(bids, out, "group", *options)
    assert code == 0, err
    assert err.count("finished earlier with these settings: reused") == 2
    results = json.loads((out / RUN / "results.json").read_text())
    searched = results["search"]
    assert [t["trial"] for t in searched["trials"]] == [0, 1] and searched["best"] in (0, 1)
    best = trials[searched["best"]]
    assert searched["best_values"] == best["values"]
    assert f"Fold 0 of search trial {searched['best']} is the study's fold 0" in err
    record = read_package(the_package(out))
    assert record["search"]["best_values"] == best["values"]
    assert record["learning_settings"]["search"] == 2
    table = pd.read_csv(out / RUN / "search_trials.tsv", sep="\t")
    assert list(table["trial"]) == [0, 1]
    assert 'id="search"' in (out / "group.html").read_text()
