"""Learning that earns trust, piece by piece: the linear baseline, the permutation control, transfer and its guard,
the search's draws, the wall-time deadline, the sample cohort that can be failed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import InputDataError, TimeLimitReached, UsageError
from pipeline.learn import baseline, controls, search, transfer, walltime
from pipeline.learn.ensemble import training_matches
from pipeline.learn.models import ModelConfig, build_model
from pipeline.learn.registry import get_task


def _cohort(tmp_path: Path, n: int = 60, signal: float = 1.5, seed: int = 0) -> pd.DataFrame:
    """``n`` participants' arrays (one image each): the class shows in a few voxels, under noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = float(i % 2)
        array = rng.normal(size=(1, 6, 7, 5)).astype(np.float32)
        array[0, 2:4, 2:4, 1:3] += signal * y
        path = tmp_path / f"{i}.npy"
        np.save(path, array)
        rows.append({"participant_id": f"sub-{i:03d}", "y": y, "array": str(path), "target": ["CN", "AD"][int(y)],
                     "session_id": "n/a", "source": f"sub-{i:03d}_T1w.nii.gz"})  # fmt: skip
    return pd.DataFrame(rows)


def _members(images: pd.DataFrame, n_folds: int = 2, n_test: int = 20) -> list[dict[str, list[str]]]:
    ids = list(np.random.default_rng(0).permutation(images["participant_id"].tolist()))
    test, dev = ids[:n_test], ids[n_test:]
    folds = []
    for k in range(n_folds):
        validation = dev[k::n_folds]
        folds.append({"train": [p for p in dev if p not in validation], "validation": validation, "test": test})
    return folds


def test_span_features_are_the_centred_voxels_inner_products(tmp_path):
    images = _cohort(tmp_path, n=12)
    x = np.stack([np.load(p).reshape(-1) for p in images["array"]]).astype(np.float64)
    gram = baseline.gram_matrix([Path(p) for p in images["array"]])
    np.testing.assert_allclose(gram, x @ x.T, rtol=1e-10)
    train = np.arange(3, 12)
    z = baseline.span_features(gram, train)
    centred = x - x[train].mean(0)
    centred /= np.sqrt((centred[train] ** 2).sum(1).mean())
    np.testing.assert_allclose(z @ z[train].T, centred @ centred[train].T, atol=1e-8)


def test_linear_baseline_learns_and_never_tunes_on_test_data(tmp_path):
    task = get_task("classification")
    images = _cohort(tmp_path)
    members = _members(images)
    gram = baseline.gram_matrix([Path(p) for p in images["array"]])
    y = images["y"].to_numpy()
    fitted = controls.fit_baseline(task, images, members, y=y, n_classes=2, seed=0, gram=gram)
    auc = task.scores(fitted["test_rows"]["y"].to_numpy(), fitted["test_output"], fitted["threshold"])["roc_auc"]
    assert auc > 0.9
    assert all(f["inner_folds"] >= 2 for f in fitted["folds"])

    # the test participants' arrays and targets changed: regularisation, thresholds and validation outputs stay
    scrambled = images.copy()
    test = scrambled["participant_id"].isin(members[0]["test"]).to_numpy()
    for path in scrambled.loc[test, "array"]:
        np.save(path, np.random.default_rng(1).normal(size=(1, 6, 7, 5)).astype(np.float32) * 5)
    gram2 = baseline.gram_matrix([Path(p) for p in scrambled["array"]])
    y2 = np.where(test, 1 - y, y)
    again = controls.fit_baseline(task, scrambled, members, y=y2, n_classes=2, seed=0, gram=gram2)
    assert again["threshold"] == fitted["threshold"]
    for a, b in zip(fitted["folds"], again["folds"], strict=True):
        assert a["strength"] == b["strength"] and a["inner_scores"] == b["inner_scores"]
        np.testing.assert_allclose(a["validation_output"], b["validation_output"], atol=1e-9)


def test_regression_baseline_is_ridge_in_target_units(tmp_path):
    task = get_task("regression")
    images = _cohort(tmp_path, n=40, signal=3.0)
    images["y"] = images["y"] * 10 + 60  # ages 60 and 70
    gram = baseline.gram_matrix([Path(p) for p in images["array"]])
    fitted = controls.fit_baseline(task, images, _members(images, n_test=10), y=images["y"].to_numpy(),
                                   n_classes=1, seed=0, gram=gram)  # fmt: skip
    scores = task.scores(fitted["test_rows"]["y"].to_numpy(), fitted["test_output"], 0.5)
    assert scores["mae"] < 2.5 and fitted["test_output"].ndim == 1  # predicting the mean: 5


def test_permutation_control_sits_near_chance(tmp_path):
    task = get_task("classification")
    images = _cohort(tmp_path, n=120, signal=2.0)
    members = _members(images, n_test=60)
    y = controls.permuted_targets(images, members[0]["test"], seed=3)
    test = images["participant_id"].isin(members[0]["test"]).to_numpy()
    assert np.array_equal(y[test], images["y"].to_numpy()[test])  # the test targets untouched
    assert sorted(y[~test]) == sorted(images["y"].to_numpy()[~test])  # the others shuffled among themselves
    evaluation = controls.permuted_baseline(task, images, members, y=y, classes=["CN", "AD"], seed=0)
    assert abs(evaluation["metrics"]["roc_auc"] - 0.5) < 0.2


def test_permuted_targets_keep_one_target_per_participant():
    images = pd.DataFrame({"participant_id": ["a", "a", "b", "c", "c", "d"], "y": [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]})
    for seed in range(5):
        y = controls.permuted_targets(images, ["d"], seed)
        assert y[0] == y[1] and y[3] == y[4] and y[5] == 1.0


def test_paired_difference_and_verdict():
    task = get_task("classification")
    rng = np.random.default_rng(0)
    truth = np.array([0, 1] * 30, dtype=float)
    good = np.stack([1 - truth * 0.8 - 0.1, truth * 0.8 + 0.1], axis=1)
    noise = rng.random(60)
    poor = np.stack([1 - noise, noise], axis=1)
    groups = [f"s{i}" for i in range(60)]
    comparison = baseline.paired_difference(lambda i: task.scores(truth[i], good[i], 0.5),
                                            lambda i: task.scores(truth[i], poor[i], 0.5), groups, seed=0)
    assert comparison["roc_auc"]["ci"][0] > 0 and comparison["roc_auc"]["share_a_higher"] > 0.95
    assert baseline.verdict("roc_auc", comparison["roc_auc"], True)["result"] == "better"
    reverse = baseline.paired_difference(lambda i: task.scores(truth[i], poor[i], 0.5),
                                         lambda i: task.scores(truth[i], good[i], 0.5), groups, seed=0)
    assert baseline.verdict("roc_auc", reverse["roc_auc"], True)["result"] == "worse"
    # lower is better for an error: a smaller MAE is better
    assert baseline.verdict("mae", {"difference": -2.0, "ci": [-3.0, -1.0]}, False)["result"] == "better"


def test_fast_scores_match_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 50), rng.random(50)
    p[:5] = p[5]  # ties
    task = get_task("classification")
    scores = task.scores(y.astype(float), np.stack([1 - p, p], 1), 0.5)
    assert scores["roc_auc"] == pytest.approx(roc_auc_score(y, p))


# --- transfer -------------------------------------------------------------------------------------------------
def _source(tmp_path: Path, *, target: str = "diagnosis", n_outputs: int = 2) -> transfer.Source:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = build_model(ModelConfig("conv5fc3", n_outputs, (24, 24, 24)))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "fold-0.safetensors"))
    record = {"name": "src", "target": target, "model": {"architecture": "conv5fc3"},
              "weights": [{"file": "fold-0.safetensors"}],
              "training_subjects": [{"participant_id": "sub-01", "images": [{"data_sha256": "h1"}]}]}  # fmt: skip
    return transfer.Source(tmp_path, record)


@pytest.mark.parametrize("same_targets", [True, False])
def test_transfer_loads_the_source_and_draws_a_new_head_for_new_targets(tmp_path, same_targets):
    source = _source(tmp_path)
    theirs = dict(build_model(ModelConfig("conv5fc3", 2, (24, 24, 24))).state_dict())  # not the source
    torch.manual_seed(0)
    expected = build_model(ModelConfig("conv5fc3", 2, (24, 24, 24))).state_dict()  # the source's weights
    torch.manual_seed(5)
    net = build_model(ModelConfig("conv5fc3", 2, (24, 24, 24)))
    info = transfer.initialise(net, source, fold=3, freeze=False, same_targets=same_targets)
    assert info["source_fold"] == 0  # 3 modulo the source's one fold
    state = net.state_dict()
    assert torch.equal(state["net.features.0.0.weight"], expected["net.features.0.0.weight"])
    head = "net.classifier.8.weight"
    assert torch.equal(state[head], expected[head]) == same_targets
    assert (head in info["reinitialised"]) != same_targets
    assert not torch.equal(state["net.features.0.0.weight"], theirs["net.features.0.0.weight"])
    groups = transfer.param_groups(net, 1e-3)
    rates = sorted(g["lr"] for g in groups)
    assert rates == [pytest.approx(1e-4), pytest.approx(1e-3)] if not same_targets else rates == [pytest.approx(1e-4)]


def test_freeze_keeps_the_encoder_and_its_batch_norm_statistics(tmp_path):
    source = _source(tmp_path)
    net = build_model(ModelConfig("conv5fc3", 3, (24, 24, 24)))  # three classes: the head's shape differs
    info = transfer.initialise(net, source, fold=0, freeze=True, same_targets=False)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("net.classifier.") for n in trainable) and info["frozen"] > 0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    transfer.keep_frozen_norms(net)
    optimizer = torch.optim.AdamW(transfer.param_groups(net, 1e-2))
    loss = net(torch.randn(2, 1, 24, 24, 24)).sum()
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == name.startswith("net.classifier.") or name in ("mean", "scale"), name


def test_the_cross_study_guard_matches_content_anywhere_and_ids_within_a_dataset():
    images = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-09", "sub-10"],
                           "data_sha256": ["h1", "h2", "h3", "h4"], "input_sha256": ["i1", "i2", "i3", "i4"]})
    seen_subjects = [{"participant_id": "sub-01", "dataset": "A", "images": [{"data_sha256": "x1"}]},
                     {"participant_id": "sub-02", "dataset": "B", "images": [{"data_sha256": "x2"}]},
                     {"participant_id": "sub-77", "dataset": "B", "images": [{"data_sha256": "h3"}]},
                     {"participant_id": "sub-78", "dataset": "B", "images": [{"input_sha256": "i4"}]}]  # fmt: skip
    seen = transfer.seen_participants(images, seen_subjects, "src", dataset="A")
    # dataset B's sub-02 is not this dataset's sub-02; B's sub-77 renamed as sub-09 is caught by its voxels, and
    # sub-78's preprocessed input as sub-10's
    assert set(seen) == {"sub-01", "sub-09", "sub-10"}
    assert seen["sub-01"].endswith("(same participant ID and dataset)")
    assert "voxel data of sub-77 of dataset B" in seen["sub-09"] and "(same image content)" in seen["sub-09"]
    assert "preprocessed model input of sub-78" in seen["sub-10"]
    assert transfer.seen_participants(images, seen_subjects, "src", dataset="B").keys() == {"sub-02", "sub-09",
                                                                                            "sub-10"}  # fmt: skip
    old = transfer.seen_participants(images, [{"participant_id": "sub-02", "images": []}], "src", dataset="A")
    assert "the source package names no dataset" in old["sub-02"]  # an older package: by ID, and it says so


def test_the_cross_study_guard_keeps_seen_participants_out_of_test_and_validation():
    seen = {"sub-01": "seen by ID", "sub-09": "seen by content"}
    splits = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-09", "sub-03", "sub-04", "sub-03", "sub-09",
                                              "sub-04", "sub-05", "sub-05"],
                           "split": ["test", "test", "train", "train", "validation", "validation", "validation",
                                     "train", "train", "train"],
                           "fold": pd.array([None, None, 0, 0, 0, 1, 1, 1, 0, 1], dtype="Int64")})  # fmt: skip
    table, moved = transfer.guard_splits(splits, seen, reused=False, splits_file=Path("splits.tsv"))
    assert set(table.loc[table["split"] == "test", "participant_id"]) == {"sub-02"}
    assert set(table.loc[table["split"] == "validation", "participant_id"]) == {"sub-03", "sub-04"}
    assert [(m["participant_id"], m["from"]) for m in moved] == [("sub-01", "test"), ("sub-09", "validation")]
    for pid in seen:  # in every fold's training, once
        rows = table[table["participant_id"] == pid]
        assert set(rows["split"]) == {"train"} and sorted(rows["fold"]) == [0, 1]
    with pytest.raises(InputDataError, match=r"test set or a validation fold.*--resplit"):
        transfer.guard_splits(splits, {"sub-09": "x"}, reused=True, splits_file=Path("splits.tsv"))
    with pytest.raises(InputDataError, match=r"validation fold 0 would be empty"):
        transfer.guard_splits(splits, {**seen, "sub-04": "x"}, reused=False, splits_file=Path("splits.tsv"))
    with pytest.raises(InputDataError, match=r"the test set .*would be empty"):
        transfer.guard_splits(splits, {**seen, "sub-02": "x"}, reused=False, splits_file=Path("splits.tsv"))
    assert transfer.guard_splits(splits, {"sub-05": "x"}, reused=True, splits_file=Path("s"))[1] == []  # training


def test_inference_guard_covers_the_source_models_subjects_within_their_datasets():
    record = {"name": "target", "dataset": {"key": "T"},
              "training_subjects": [{"participant_id": "sub-05", "images": [{"data_sha256": "h5"}]}],
              "transfer": {"source": "src", "seen_subjects": [
                  {"participant_id": "sub-01", "dataset": "S", "images": [{"data_sha256": "h1"}]}]}}  # fmt: skip
    assert training_matches([record], "sub-01", ["zz"], dataset="S") == [
        "sub-01 is a training subject of src, the source model of target (same participant ID and dataset)"]
    assert training_matches([record], "sub-01", ["zz"], dataset="T") == []  # the target dataset's own sub-01
    assert training_matches([record], "sub-05", ["zz"], dataset="T")
    assert training_matches([record], "sub-05", ["zz"], dataset="new") == []
    assert "voxel data of sub-01 of dataset S" in training_matches([record], "sub-42", ["h1"], dataset="new")[0]
    assert training_matches([record], "sub-42", ["h9"], dataset="T") == []


def test_load_source_refuses_another_network(tmp_path):
    from pipeline.learn.package import write_package

    (tmp_path / "a").mkdir()
    _source(tmp_path / "a")
    record = {"name": "src", "task": "classification", "target": "diagnosis", "classes": ["CN", "AD"],
              "model": {"architecture": "conv5fc3", "n_outputs": 2, "in_shape": [24, 24, 24]},
              "input": {"channels": ["T1w"], "resolution_mm": 4.0}, "training_subjects": []}  # fmt: skip
    folder = write_package(tmp_path / "models", record=record, weights={"fold-0.safetensors": tmp_path / "a" /
                                                                        "fold-0.safetensors"}, files={})  # fmt: skip
    assert transfer.load_source(folder, architecture="conv5fc3", inputs=("T1w",), resolution_mm=4.0).n_folds == 1
    with pytest.raises(UsageError, match="its network is conv5fc3, this study's --architecture resnet10"):
        transfer.load_source(folder, architecture="resnet10", inputs=("T1w",), resolution_mm=4.0)
    with pytest.raises(UsageError, match=r"it learned at 4\.0 mm"):
        transfer.load_source(folder, architecture="conv5fc3", inputs=("T1w",), resolution_mm=2.0)


# --- search ---------------------------------------------------------------------------------------------------
def test_search_draws_depend_on_seed_and_trial_only():
    assert search.draw_trial(42, 3) == search.draw_trial(42, 3)
    assert search.draw_trial(42, 3) != search.draw_trial(43, 3)
    for k in range(20):
        values = search.draw_trial(7, k)
        for dimension in search.SPACE:
            assert dimension.low <= values[dimension.name] <= dimension.high


@pytest.mark.parametrize("architecture", ["conv5fc3", "resnet10", "densenet121", "unet"])
def test_search_widths_build_the_networks(architecture):
    kwargs = search.architecture_kwargs(architecture, 0.5, 0.3)
    shape = (32, 32, 32)
    net = build_model(ModelConfig(architecture, 2, shape, kwargs=kwargs)).eval()
    assert net(torch.zeros(1, 1, *shape)).shape[:2] == (1, 2)
    assert ("dropout" in search.searched_names(architecture)) == (architecture != "resnet10")


def test_best_trial_follows_the_metrics_direction():
    trials = [{"trial": 0, "score": 0.4}, {"trial": 1, "score": 0.2}, {"trial": 2, "score": 0.2}]
    assert search.best_trial(trials, larger_is_better=False)["trial"] == 1
    assert search.best_trial(trials, larger_is_better=True)["trial"] == 0
    with pytest.raises(UsageError):
        search.best_trial([{"trial": 0, "score": float("nan")}], True)


# --- wall time ------------------------------------------------------------------------------------------------
def test_durations_and_the_slurm_deadline():
    assert walltime.parse_duration("2h30m") == 9000.0
    assert walltime.parse_duration("00:45") == 45.0  # SLURM's MM:SS
    with pytest.raises(UsageError, match="90m, 2h"):
        walltime.parse_duration("two hours")
    deadline = walltime.deadline(None, environ={"SLURM_JOB_END_TIME": "2000"})
    assert deadline.at == 2000.0 and "SLURM" in deadline.source
    assert walltime.deadline(10.0, environ={"SLURM_JOB_END_TIME": "1"}).at == 1.0  # the earlier one
    assert not walltime.deadline(None, environ={}).active


def test_a_deadline_stops_when_the_next_epoch_would_not_fit():
    deadline = walltime.Deadline(1000.0, "the test's limit")
    needed = 100 * walltime.EPOCH_MARGIN + walltime.RESERVE_S
    assert not deadline.short(100.0, now=1000.0 - needed - 1)
    assert deadline.short(100.0, now=1000.0 - needed + 1)
    error = deadline.error(100.0, what="epoch 3")
    assert isinstance(error, TimeLimitReached) and error.exit_code == 75 and "--resume" in str(error)
    assert not walltime.NO_DEADLINE.short(1e9)
    # a fold about to start is expected to take as long as the slowest epoch of this job so far
    deadline = walltime.Deadline(time.time() + 80, "the test's limit")
    deadline.check_before(what="fold 2")  # no epoch yet: every job trains one at least
    deadline.note_epoch(30.0)
    with pytest.raises(TimeLimitReached, match="fold 2 needs"):
        deadline.check_before(what="fold 2")
    walltime.NO_DEADLINE.note_epoch(5.0)
    assert walltime.NO_DEADLINE.slowest_epoch() == 0.0  # the shared "no limit" keeps no record


# --- the cohort that can be failed ----------------------------------------------------------------------------
def test_sample_cohort_has_graded_effects_and_label_noise(tmp_path):
    from pipeline.sample.generate import SampleOptions, learning_truth, plan_dataset

    options = SampleOptions(n_subjects=80, seed=3)
    participants, _ = plan_dataset(options)
    truth = learning_truth(participants, options)
    assert 0.75 < truth["best_possible_auc"] < 0.97
    severities = [p["severity"] for p in participants if p["severity"] > 0]
    assert len(set(severities)) == len(severities)  # graded, not one effect size
    disagree = sum((p["diagnosis"] == "AD") != (p["severity"] > 0) for p in participants)
    assert 0 < disagree < 20
    # the noise leaves every other draw as it was
    clean, _ = plan_dataset(SampleOptions(n_subjects=80, seed=3, label_noise=0.0))
    assert [p["diagnosis"] for p in clean] == [p["diagnosis"] for p in participants]
    assert json.dumps(truth)  # JSON-ready for sourcedata/generation.json
