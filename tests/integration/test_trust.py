"""Learning that earns trust, end to end on the small learning sample: the linear baseline beside the network, the
permutation control, a time limit that stops and resumes to the same weights, transfer with its leakage guard, and
a search run as array tasks then assembled."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from pipeline.learn.package import read_package
from tests.helpers import FAST, fresh_output, parallel_group_jobs, the_package

RUN = Path("learn") / "target-diagnosis" / "arch-conv5fc3"


def test_every_study_has_its_linear_baseline(trained_package):
    out = trained_package.parent.parent
    results = json.loads((out / RUN / "results.json").read_text())
    linear = results["baseline"]
    assert linear["model"] == "L2-regularised logistic regression" and linear["headline"] == "roc_auc"
    assert len(linear["folds"]) == 2 and {"ci", "metrics"} <= set(linear["test"])
    assert linear["test"]["n_subjects"] == results["test"]["n_subjects"]  # the same test participants
    assert set(linear["comparison"]["roc_auc"]) == {"difference", "ci", "share_a_higher"}
    assert linear["verdict"]["result"] in ("better", "not_better", "worse", "undecided")
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
    # the shuffled folds learned other targets than the real ones
    assert control["agreement"] < 1
    differ = []
    for k in (0, 1):
        real = load_file(str(out / RUN / f"fold-{k}" / "best-loss.safetensors"))
        shuffled = load_file(str(out / RUN / "permutation" / f"fold-{k}" / "best-loss.safetensors"))
        differ.append(any(not torch.equal(real[name], shuffled[name]) for name in real))
    assert any(differ)
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


def test_transfer_with_its_cross_study_guard(learning_sample, trained_package, tmp_path, run_cli):
    bids, derivatives = learning_sample
    source = read_package(trained_package)
    seen = {s["participant_id"] for s in source["training_subjects"]}
    out = fresh_output(derivatives, tmp_path / "out")
    other = ("--seed", "2", "--test-size", "0.5")
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--fold", "0", "--epochs", "1")  # splits of its own
    assert code == 0, err
    splits = pd.read_csv(out / "learn" / "target-diagnosis" / "splits.tsv", sep="\t")
    assert set(splits.loc[splits["split"] == "test", "participant_id"]) & seen  # fixed splits that test on them

    # fixed splits testing on participants the source model saw: refused
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--init-from", trained_package)
    assert code == 65 and "--resplit" in err and "is a training subject of diagnosis_conv5fc3" in err

    # fresh splits: they move into training, each logged; the encoder stays the source's
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--init-from", trained_package, "--freeze", "--resplit")
    assert code == 0, err
    assert "from the test set into training" in err
    splits = pd.read_csv(out / "learn" / "target-diagnosis" / "splits.tsv", sep="\t")
    assert not set(splits.loc[splits["split"] == "test", "participant_id"]) & seen
    package = the_package(out)
    record = read_package(package)
    assert record["transfer"]["source_content_sha256"] == source["content_sha256"]
    assert record["transfer"]["frozen"] and record["transfer"]["moved_to_training"]
    assert {s["participant_id"] for s in record["transfer"]["seen_subjects"]} == seen  # the inference guard's
    new, old = load_file(str(package / "fold-0.safetensors")), load_file(str(trained_package / "fold-0.safetensors"))
    encoder = [k for k in new if k.startswith("net.features.") and "num_batches" not in k]
    assert encoder and all(torch.equal(new[k], old[k]) for k in encoder)
    assert any(not torch.equal(new[k], old[k]) for k in new if k.startswith("net.classifier."))
    html = (out / "group.html").read_text()
    assert 'id="transfer"' in html and "Subjects of the source model (--init-from)" in html

    # without --freeze: every layer learns (the pretrained ones at a tenth of the rate), the guarded splits reused
    frozen_package = package
    code, _, err = run_cli(bids, out, "group", *FAST, *other, "--init-from", trained_package)
    assert code == 0, err
    (package,) = [p for p in (out / "models").iterdir() if p != frozen_package]
    unfrozen = load_file(str(package / "fold-0.safetensors"))
    assert any(not torch.equal(unfrozen[k], old[k]) for k in encoder)
    assert not read_package(package)["transfer"]["frozen"]


def test_search_trials_as_array_tasks_then_the_assembly(learning_sample, tmp_path, run_cli):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    options = [*FAST, "--search", "2", "--epochs", "1"]
    for output in parallel_group_jobs(bids, out, options, "--trial", (1, 0)):
        assert "When every trial has finished, run the group level again without --trial" in output
    assert not (out / "models").exists()
    trials = [json.loads((out / RUN / "search" / f"trial-{k}" / "trial.json").read_text())["trial"] for k in (0, 1)]
    assert trials[0]["values"] != trials[1]["values"]
    assert not list((out / RUN / "search").rglob("predictions.tsv"))  # no trial predicts the test set

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
