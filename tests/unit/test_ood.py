"""The distribution check (pipeline.learn.ood), the ensemble's uncertainty and the unfamiliar sample images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.learn import ood
from pipeline.learn.external import by_distribution
from pipeline.learn.models import ModelConfig, build_model
from pipeline.learn.registry import get_task
from pipeline.learn.tasks.segmentation.inference import entropy_map, structure_uncertainty


def _cohort(rng: np.random.Generator, n: int, d: int = 32, shift: float = 0.0, kind: int = 99) -> np.ndarray:
    """Correlated features, as a network's are: a few latent factors (their pattern drawn from ``kind``) plus
    noise."""
    mixing = np.random.default_rng(kind).normal(size=(4, d))
    return rng.normal(size=(n, 4)) @ mixing + 0.3 * rng.normal(size=(n, d)) + shift


def _study(rng: np.random.Generator, n_train: int, d: int) -> tuple[list, dict]:
    """A simulated study as bidsdl runs it: a pool split into K folds, each fold's description fitted on the others
    (``n_train`` images) and its validation images scored by it; the folds' descriptions and the calibration."""
    n_folds = 4 if n_train < 6 else 5
    pool = _cohort(rng, n_train * n_folds // (n_folds - 1), d)
    folds = np.arange(len(pool)) % n_folds
    references = [ood.fit_reference(pool[folds != k]) for k in range(n_folds)]
    validation = np.concatenate([ref.score(pool[folds == k]) for k, ref in enumerate(references)])
    return references, ood.calibrate(validation)


def _scores(references: list, calibration: dict, features: np.ndarray) -> np.ndarray:
    """Each image's score at inference (the same features by every fold, as in :func:`_study`)."""
    return np.array([ood.image_score(references, [row[None]] * len(references), calibration) for row in features])


@pytest.mark.parametrize(("n_train", "studies"), [(3, 250), (8, 100), (60, 20), (300, 4)])
def test_familiar_images_are_flagged_at_about_the_stated_rate_by_the_score_used_at_inference(n_train, studies):
    """The threshold is set on one fold's validation scores, an image is scored at inference by every fold: over
    many simulated studies 1% to 5% of new familiar images are flagged (the stated 2.5%; 512 features). The mean
    over the folds (the rule before) flagged 0.6% to 1.8% here; a threshold that flags nothing fails too."""
    rng = np.random.default_rng(n_train)
    rates = []
    for _ in range(studies):
        references, calibration = _study(rng, n_train, 512)
        new = _cohort(rng, 200, 512)
        scores = ood.combined_score(calibration, np.array([ref.score(new) for ref in references]))
        rates.append(float(np.mean(scores > calibration["threshold"])))
    assert 0.01 <= np.mean(rates) <= 0.05, np.mean(rates)


@pytest.mark.parametrize("n_train", [3, 8, 60])
def test_images_unlike_the_training_ones_are_told(n_train):
    rng = np.random.default_rng(n_train)
    references, calibration = _study(rng, n_train, 32)
    assert all(0 < r.residual <= 1 and len(r.variances) <= n_train for r in references)
    assert _scores(references, calibration, _cohort(rng, 5)).max() < calibration["threshold"] + 3
    # what is unlike, and from how many training images on it is always told (three describe little)
    # (three training images and four validation images set a wide threshold, honestly: nothing is sure to be told)
    unlike = {"shifted": (_cohort(rng, 20, shift=6.0), 8), "stronger": (8 * _cohort(rng, 20), 8),
              "another pattern": (2 * _cohort(rng, 20, kind=7), 60)}  # fmt: skip
    for name, (features, enough) in unlike.items():
        if n_train >= enough:
            assert (_scores(references, calibration, features) > calibration["threshold"]).all(), name


def test_the_threshold_is_a_prediction_bound_of_the_validation_scores_alone():
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):  # over many draws of a validation set, about 2.5% of new familiar scores lie above it
        threshold = ood.calibrate(rng.normal(size=20))["threshold"]
        rates.append(float(np.mean(rng.normal(size=2000) > threshold)))
    assert 0.015 < np.mean(rates) < 0.035
    for n in (2, 3, 4):  # few validation images: a wide bound, still 2.5% on average, not max + 3
        rates = [float(np.mean(rng.normal(size=500) > ood.calibrate(rng.normal(size=n))["threshold"]))
                 for _ in range(3000)]  # fmt: skip
        assert 0.015 < np.mean(rates) < 0.035, (n, np.mean(rates))
    one = ood.calibrate([0.3])
    assert one["threshold"] is None and "too few" in one["note"]


def test_the_folds_scores_are_joined_on_the_thresholds_scale():
    calibration = ood.calibrate(np.random.default_rng(0).normal(size=40))
    threshold = calibration["threshold"]
    assert ood.combined_score(calibration, [threshold] * 5) == pytest.approx(threshold)  # agreeing folds: that score
    assert ood.combined_score(calibration, [threshold + 2, threshold - 1]) > threshold  # one fold sure is enough
    assert ood.combined_score(calibration, [threshold - 0.5] * 5) < threshold
    old = {"threshold": 1.0}  # a package made before the combination: the mean over the folds, as it was calibrated
    reference = ood.fit_reference(_cohort(np.random.default_rng(1), 10))
    probe = _cohort(np.random.default_rng(2), 1)
    assert ood.image_score([reference, reference], [probe, probe], old) == pytest.approx(reference.score(probe)[0])


@pytest.mark.parametrize(("n", "d"), [(12, 40), (400, 40), (60, 200), (300, 200)])
def test_the_distance_is_the_exact_mahalanobis_distance_under_the_shrunk_correlation(n, d):
    x = _cohort(np.random.default_rng(n + d), n, d)
    reference = ood.fit_reference(x)
    z = (x - reference.mean) / reference.sd
    alpha = reference.residual
    shrunk = alpha * np.eye(d) + (1 - alpha) * np.cov(z, rowvar=False)
    probe = _cohort(np.random.default_rng(3), 5, d)
    zp = (probe - reference.mean) / reference.sd
    exact = np.sqrt(np.einsum("ij,jk,ik->i", zp, np.linalg.inv(shrunk), zp) / d)
    assert np.allclose(reference.distance(probe), exact, rtol=1e-6)


def test_shrinkage_is_strong_with_few_images_and_weak_with_many():
    rng = np.random.default_rng(2)
    few, many = _cohort(rng, 4), _cohort(rng, 400)
    z = lambda x: (x - x.mean(0)) / x.std(0, ddof=1)  # noqa: E731
    assert ood.shrinkage(z(few)) > ood.shrinkage(z(many))
    assert ood.shrinkage(z(few)[:2]) == 1.0


def test_a_feature_that_never_varied_in_training_gets_a_floor_not_infinity():
    x = np.random.default_rng(4).normal(size=(10, 6))
    x[:, 2] = 0.0  # a dead channel
    reference = ood.fit_reference(x)
    moved = x[0].copy()
    moved[2] = 5.0
    assert np.isfinite(reference.score(moved)).all() and reference.score(moved)[0] > reference.score(x[0])[0]


def test_references_round_trip_through_safetensors(tmp_path):
    refs = [ood.fit_reference(_cohort(np.random.default_rng(k), 6)) for k in range(2)]
    ood.save_references(refs, tmp_path / ood.FILE)
    record = {"file": ood.FILE, "folds": [ood.fold_record(r, 6) for r in refs]}
    loaded = ood.load_references(tmp_path, json.loads(json.dumps(record)))
    probe = _cohort(np.random.default_rng(9), 3)
    for a, b in zip(refs, loaded, strict=True):
        assert np.allclose(a.score(probe), b.score(probe))
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / ood.FILE).read_bytes()[8:9] == b"{"


def test_quality_metric_ranges_come_from_training_and_name_what_is_outside():
    rng = np.random.default_rng(5)
    table = pd.DataFrame({"cnr": rng.normal(3, 0.3, 8), "snr_wm": [10.0, 12.0, np.nan, 11, 12, 10, 11, 12],
                          "bias_range": rng.uniform(0.1, 0.3, 8)})  # fmt: skip
    ranges = ood.metric_ranges(table)
    assert set(ranges) == {"cnr", "snr_wm"}  # bias is an artefact quality control judges, not a distribution
    assert ranges["snr_wm"]["n"] == 7 and ranges["cnr"]["low"] < ranges["cnr"]["min"] < 3 < ranges["cnr"]["high"]
    assert ood.metric_reasons(ranges, {"cnr": 3.4, "snr_wm": 11.0}) == []
    assert ood.metric_reasons(ranges, {"cnr": 9.0})[0].startswith("cnr 9 is outside the training range")
    # together the metrics flag few new images drawn like the training ones
    new = pd.DataFrame({"cnr": rng.normal(3, 0.3, 4000), "snr_wm": rng.normal(11.1, 0.9, 4000)})
    flagged = np.mean([bool(ood.metric_reasons(ranges, row)) for row in new.to_dict("records")])
    assert flagged < 0.1, flagged
    same = ood.metric_ranges(pd.DataFrame({"brain_volume_ml": [1500.0, 1500.0, 1500.0]}))["brain_volume_ml"]
    assert same["low"] < 1500 < same["high"]  # at least 5% of the median on each side
    assert ood.metric_ranges(pd.DataFrame({"cnr": [1.0, 2.0]})) == {}  # two values describe no spread


def test_the_verdict_joins_features_and_metrics_and_says_when_it_cannot_judge():
    entry = {"calibration": {"threshold": 2.0}, "metric_ranges": {"cnr": {"min": 2, "max": 4, "low": 1, "high": 5}}}
    records = [{"name": "m", "distribution": entry}]
    calm = ood.verdict(records, [1.0], {"cnr": 3.0})
    assert calm["out_of_distribution"] is False and calm["reasons"] == [] and calm["metrics_outside"] == []
    assert ood.banner(calm) is None
    odd = ood.verdict(records, [2.5], {"cnr": 0.2})
    assert odd["out_of_distribution"] is True and len(odd["reasons"]) == 2 and len(odd["metrics_outside"]) == 1
    assert "score 2.50 > threshold 2.00" in odd["reasons"][0] and "do not trust it" in ood.banner(odd)
    old = ood.verdict([{"name": "m"}], [None], {"cnr": 0.2})
    assert old["out_of_distribution"] is None and "before the check" in old["note"]
    assert ood.verdict(records, [3.5], None)["out_of_distribution"] is True  # the features alone flag it


@pytest.mark.parametrize("architecture", ["conv5fc3", "resnet10", "unet"])
def test_features_are_the_deepest_maps_averaged_over_space(architecture):
    segmentation = architecture == "unet"
    config = ModelConfig(architecture, 3 if segmentation else 2, (32, 40, 32))
    torch.manual_seed(0)
    network = build_model(config).eval()
    if segmentation:
        from pipeline.learn.tasks.segmentation.data import predict_volume

        array = np.random.default_rng(0).normal(size=(1, 40, 48, 40)).astype(np.float32)
        plain = predict_volume(lambda x: network(x), array, 32)
        probabilities, found = ood.features_while(network, lambda: predict_volume(lambda x: network(x), array, 32))
        assert found.shape == (1, 128)  # the bottleneck's channels, averaged over the sliding windows
        assert np.array_equal(plain, probabilities)  # the prediction is untouched
    else:
        found = ood.whole_image_features(network, [torch.randn(3, 1, 32, 40, 32)])
        assert found.shape[0] == 3 and found.shape[1] >= 64
    assert np.isfinite(found).all()


def test_the_ensembles_spread_is_reported_per_task():
    classification, regression = get_task("classification"), get_task("regression")
    binary = classification.uncertainty([np.array([0.8, 0.2]), np.array([0.6, 0.4])])
    assert binary["members"] == 2 and binary["fold_sd"] == pytest.approx(0.1414, abs=1e-3)
    assert binary["fold_range"] == [0.2, 0.4] and 0 < binary["entropy"] < 1
    several = classification.uncertainty([np.array([0.1, 0.7, 0.2])])
    assert several["fold_sd"] is None and "predicted class" in several["quantity"]
    value = regression.uncertainty([np.array([70.0]), np.array([74.0])])
    assert value["fold_range"] == [70.0, 74.0] and value["quantity"] == "the predicted value"


def test_segmentation_uncertainty_is_the_normalised_entropy():
    probabilities = np.zeros((3, 2, 2, 1), np.float32)
    probabilities[0, 0] = 1.0
    probabilities[:, 1] = 1 / 3
    entropy = entropy_map(probabilities)
    assert entropy[0].max() == pytest.approx(0, abs=1e-6) and entropy[1].min() == pytest.approx(1, abs=1e-5)
    labels = np.array([[[0], [0]], [[1], [1]]])
    assert structure_uncertainty(labels, entropy, 1) == {"mean": 1.0, "share_above_half": 1.0}
    assert structure_uncertainty(labels, entropy, 2) == {"mean": None, "share_above_half": None}


def test_external_evaluation_compares_flagged_and_unflagged_cases():
    table = pd.DataFrame({"out_of_distribution": [True, True, False, False, None]})
    errors = pd.Series([0.8, 0.6, 0.1, 0.3, 0.5])
    out = by_distribution(table, errors, "error", lower_is_better=True)
    assert out["flagged"] == {"n": 2, "mean": 0.7, "median": 0.7} and out["unflagged"]["n"] == 2
    assert out["text"].endswith("the flagged did worse.")
    dice = by_distribution(table, pd.Series([0.9, 0.9, 0.5, 0.5, 0.5]), "Dice", lower_is_better=False)
    assert dice["text"].endswith("the flagged did not do worse.")
    none = by_distribution(pd.DataFrame({"out_of_distribution": [None]}), pd.Series([0.1]), "e", lower_is_better=True)
    assert "no distribution check" in none["text"]
    from pipeline.learn.tasks.image.base import WholeImage
    from pipeline.learn.tasks.image.external import _flagged_against_unflagged

    assert _flagged_against_unflagged(table, WholeImage(), []) is None  # a task with no per-image error: no comparison
    table["target"], table["predicted"] = [1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.0, 3.0, 4.0, 5.0]
    value = _flagged_against_unflagged(table, get_task("regression"), [])
    assert value["measure"] == "absolute error" and value["flagged"]["mean"] == 0.25


def test_unfamiliar_sample_images_are_extra_participants_named_in_the_generation_record():
    from pipeline.sample.generate import SampleOptions, plan_dataset

    plain, _ = plan_dataset(SampleOptions(n_subjects=4, seed=3))
    participants, images = plan_dataset(SampleOptions(n_subjects=4, seed=3, unfamiliar=("flair", "scanner")))
    assert participants[:4] == plain  # the others do not depend on them
    assert [p["participant_id"] for p in participants[4:]] == ["sub-05", "sub-06"]
    assert [i.unfamiliar for i in images[-2:]] == ["flair", "scanner"]
    with pytest.raises(ValueError, match="unknown kind"):
        plan_dataset(SampleOptions(n_subjects=1, unfamiliar=("knee",)))
